"""The ``JESTTrainingJob`` API (``jest.training/v1alpha1``) as pydantic models: the single source of truth.

The CRD (``crd.py``), the pod builders (``builders.py``), the operator's status derivation and
``jestctl`` all read these models, so a field exists in exactly one place. Wire names are camelCase and
unknown fields are rejected, as in the embedded ``jest_trainer.config`` models. Every field carries a
description because the CRD generator turns it into ``kubectl explain`` text.

``parse_job`` is the operator's admission check: it validates a raw manifest (strictly: ``"2"`` is not
an integer, as the API server would also refuse), then applies the cross-field rules the CRD states
as CEL ``x-kubernetes-validations`` (mirrored here so that a cluster without CEL, KMock and
``jestctl run`` enforce the same API) plus the checks CEL cannot express. The CRD's transition rules
(fields immutable while a job runs, ``crd.IMMUTABILITY_RULES``) are not mirrored: they compare with the
stored object, which only the API server sees. Every failure is an
``InvalidSpec`` naming the offending field, e.g. ``spec.training.selection.batchSize``.

This module never imports torch: the operator image must stay small.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal

import yaml
from jest_trainer.config import EnergyConfig, TrainingConfig
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel

GROUP = "jest.training"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "JESTTrainingJob"
PLURAL = "jesttrainingjobs"
SINGULAR = "jesttrainingjob"
SHORT_NAMES: tuple[str, ...] = ("jtj", "jestjob")
CATEGORIES: tuple[str, ...] = ("jest",)

LABEL_JOB_NAME = "jest.training/job-name"
LABEL_REPLICA_INDEX = "jest.training/replica-index"
LABEL_ATTEMPT = "jest.training/attempt"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "jest-operator"
ANNOTATION_ATTEMPT = "jest.training/attempt"
#: On the ConfigMap and Service: a digest of the content the builders produced, so the operator sees drift
#: (an edited ``spec.training``) with one string comparison and patches the child back to the desired state.
ANNOTATION_SPEC_HASH = "jest.training/spec-hash"

KUEUE_QUEUE_NAME_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_POD_GROUP_NAME_LABEL = "kueue.x-k8s.io/pod-group-name"
KUEUE_POD_GROUP_TOTAL_COUNT_ANNOTATION = "kueue.x-k8s.io/pod-group-total-count"

GPU_RESOURCE = "nvidia.com/gpu"
TPU_RESOURCE = "google.com/tpu"
TPU_ACCELERATOR_SELECTOR = "cloud.google.com/gke-tpu-accelerator"
TPU_TOPOLOGY_SELECTOR = "cloud.google.com/gke-tpu-topology"

RENDEZVOUS_PORT = 29500
METRICS_PORT = 9090
CONFIG_MOUNT_DIR = "/etc/jest"
CONFIG_FILE_NAME = "config.json"
DEFAULT_RUN_AS_ID = 1000
DEFAULT_TERMINATION_GRACE_SECONDS = 120

#: Pod names are ``<name>-node-<i>`` and must stay valid DNS-1123 labels (63 characters) for any index.
MAX_JOB_NAME_LENGTH = 50
JOB_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

#: Environment variables the operator sets itself (DESIGN.md §4); a podTemplate may not override them.
RESERVED_ENV_NAMES: tuple[str, ...] = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "NODE_RANK",
    "TPU_WORKER_ID",
    "TPU_WORKER_HOSTNAMES",
    "PJRT_DEVICE",
)
RESERVED_ENV_PREFIXES: tuple[str, ...] = ("JEST_", "PET_", "TORCHELASTIC_")
#: Label/annotation key prefixes the operator owns on the pods it creates.
RESERVED_LABEL_PREFIXES: tuple[str, ...] = ("jest.training/", "kueue.x-k8s.io/", LABEL_MANAGED_BY)
#: Volume names and mount paths the pod builder uses itself.
RESERVED_VOLUME_NAMES: tuple[str, ...] = ("jest-config", "dshm", "tmp", "checkpoints")
RESERVED_MOUNT_PATHS: tuple[str, ...] = (CONFIG_MOUNT_DIR, "/dev/shm", "/tmp")

_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_SUBDOMAIN_OR_EMPTY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)?$"
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$")
_TOPOLOGY = r"^[1-9][0-9]*(x[1-9][0-9]*){1,2}$"
_QUALIFIED_KEY = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)

LabelValue = Annotated[str, StringConstraints(max_length=63, pattern=r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")]


def _int_or_string(value: Any) -> int | str:
    """Accept what Kubernetes calls int-or-string (never a float or a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"must be an integer or a quantity string such as '500m' or '64Gi', got {value!r}")
    return value


#: A Kubernetes resource quantity (``"500m"``, ``"64Gi"``, ``8``): int-or-string in the CRD.
Quantity = Annotated[
    int | str,
    PlainValidator(_int_or_string),
    WithJsonSchema({"x-kubernetes-int-or-string": True}),
]


class InvalidSpec(ValueError):  # noqa: N818 - the condition reason the operator reports has this name
    """A manifest the operator refuses; ``field`` is the dotted path (``spec.numNodes``), ``message`` why.

    The operator reports ``str(error)`` as the message of condition ``Failed`` with reason ``InvalidSpec``
    and creates nothing.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Phase(StrEnum):
    """Lifecycle phase of a job (``status.phase``)."""

    PENDING = "Pending"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class ConditionType(StrEnum):
    """Condition types of ``status.conditions`` (metav1.Condition-style)."""

    CREATED = "Created"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class ConditionReason(StrEnum):
    """Stable reasons of conditions and events (CamelCase, as Kubernetes requires; users alert on them,
    so never rename one). ``jest_operator.status`` emits exactly these."""

    CREATED = "Created"
    PODS_PENDING = "PodsPending"
    ALL_PODS_RUNNING = "AllPodsRunning"
    POD_FAILED = "PodFailed"
    POD_MISSING = "PodMissing"
    POD_DISRUPTED = "PodDisrupted"
    NAME_IN_USE = "NameInUse"
    RESTARTING = "Restarting"
    RECOVERED = "Recovered"
    SUSPENDED = "Suspended"
    RESUMED = "Resumed"
    SUCCEEDED = "Succeeded"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    NON_RETRYABLE_ERROR = "NonRetryableError"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    ENERGY_BUDGET_NEARLY_SPENT = "EnergyBudgetNearlySpent"
    ENERGY_BUDGET_EXCEEDED = "EnergyBudgetExceeded"
    INVALID_SPEC = "InvalidSpec"
    SPEC_FIXED = "SpecFixed"
    TTL_EXPIRED = "TTLExpired"


class WireModel(BaseModel):
    """Base of the operator's wire models: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def to_wire(self) -> dict[str, Any]:
        """The camelCase JSON-compatible form, without unset optionals."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _free_form(description: str) -> Any:
    """A field holding an arbitrary Kubernetes sub-object, passed through to the pod unchanged."""
    return Field(None, description=description, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})


class TPUSpec(WireModel):
    """Which TPU slice to schedule on (GKE node selectors ``cloud.google.com/gke-tpu-*``)."""

    accelerator: str = Field(
        ...,
        pattern=r"^tpu-[a-z0-9-]+$",
        max_length=63,
        description="GKE TPU accelerator type, e.g. 'tpu-v5-lite-podslice' (node selector "
        "cloud.google.com/gke-tpu-accelerator).",
    )
    topology: str = Field(
        ...,
        pattern=_TOPOLOGY,
        max_length=32,
        description="Slice topology, e.g. '2x4' (node selector cloud.google.com/gke-tpu-topology); its chip count "
        "must equal numNodes x accelerator.count.",
    )


class AcceleratorSpec(WireModel):
    """Which accelerator each worker pod gets; drives resources, node selectors and the distributed backend."""

    type: Literal["cpu", "gpu", "tpu"] = Field(
        "cpu", description="cpu (gloo), gpu (nvidia.com/gpu, NCCL) or tpu (google.com/tpu, PJRT/XLA)."
    )
    count: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Devices per pod: nvidia.com/gpu or google.com/tpu chips. Required for gpu and tpu; "
        "must be at least numProcPerNode for gpu.",
    )
    tpu: TPUSpec | None = Field(None, description="TPU slice settings; required when type is tpu, else forbidden.")


class ResourceRequirements(WireModel):
    """Container resources, merged with the accelerator's (which the operator sets itself)."""

    requests: dict[str, Quantity] = Field(
        default_factory=dict,
        max_length=32,
        description="Minimum resources, e.g. {cpu: '8', memory: 64Gi}.",
    )
    limits: dict[str, Quantity] = Field(
        default_factory=dict,
        max_length=32,
        description="Maximum resources; nvidia.com/gpu and google.com/tpu come from accelerator.count.",
    )


class RunPolicy(WireModel):
    """Lifecycle policy of the gang of worker pods (Kubeflow Trainer / Kueue conventions)."""

    suspend: bool = Field(
        False, description="Suspended jobs keep no pods (Kueue-compatible); resuming continues from the checkpoint."
    )
    backoff_limit: int = Field(
        3, ge=0, le=1000, description="Gang restarts allowed (all pods recreated) before the job is Failed."
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Wall-clock limit of the job in seconds; exceeded means Failed (DeadlineExceeded)."
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the finished job this many seconds after it Succeeded or Failed."
    )
    clean_pod_policy: Literal["None", "Running", "All"] = Field(
        "Running", description="Which pods to delete when the job finishes: None, Running (still running) or All."
    )
    queue_name: str | None = Field(
        None,
        max_length=63,
        pattern=_DNS_SUBDOMAIN_OR_EMPTY,
        description="Kueue LocalQueue; sets label kueue.x-k8s.io/queue-name and a Kueue pod group on the pods.",
    )
    priority_class_name: str | None = Field(
        None, max_length=253, pattern=_DNS_SUBDOMAIN_OR_EMPTY, description="priorityClassName of the worker pods."
    )
    scheduler_name: str | None = Field(
        None, max_length=253, pattern=_DNS_SUBDOMAIN_OR_EMPTY, description="schedulerName of the worker pods."
    )


class Toleration(WireModel):
    """A pod toleration (core/v1 Toleration)."""

    key: str | None = Field(None, max_length=317, description="Taint key to tolerate; empty with Exists = all.")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal (default Equal).")
    value: str | None = Field(None, max_length=63, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; empty = all effects."
    )
    toleration_seconds: int | None = Field(None, description="How long a NoExecute taint is tolerated.")


class EnvVar(WireModel):
    """An extra environment variable for the trainer container (names the operator sets are reserved)."""

    name: str = Field(
        ..., min_length=1, max_length=256, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", description="Variable name."
    )
    value: str | None = Field(None, max_length=32768, description="Literal value.")
    value_from: dict[str, Any] | None = _free_form(
        "core/v1 EnvVarSource: secretKeyRef, configMapKeyRef, fieldRef or resourceFieldRef."
    )


class PersistentVolumeClaimSource(WireModel):
    """A PersistentVolumeClaim in the job's namespace (what checkpoints need to survive gang restarts)."""

    claim_name: str = Field(..., min_length=1, max_length=253, description="Name of the PersistentVolumeClaim.")
    read_only: bool | None = Field(None, description="Mount read-only.")


#: Volume sources a restricted pod may use (Pod Security Standards, "restricted" profile).
VOLUME_SOURCES: tuple[str, ...] = (
    "persistentVolumeClaim",
    "emptyDir",
    "configMap",
    "secret",
    "csi",
    "ephemeral",
    "projected",
    "downwardAPI",
)


class Volume(WireModel):
    """A pod volume; only the sources the restricted Pod Security profile allows (no hostPath)."""

    name: str = Field(..., max_length=63, pattern=_DNS_LABEL, description="Volume name (DNS label).")
    persistent_volume_claim: PersistentVolumeClaimSource | None = Field(None, description="A PVC.")
    empty_dir: dict[str, Any] | None = _free_form("core/v1 EmptyDirVolumeSource (medium, sizeLimit).")
    config_map: dict[str, Any] | None = _free_form("core/v1 ConfigMapVolumeSource.")
    secret: dict[str, Any] | None = _free_form("core/v1 SecretVolumeSource.")
    csi: dict[str, Any] | None = _free_form("core/v1 CSIVolumeSource (e.g. a GCS FUSE bucket).")
    ephemeral: dict[str, Any] | None = _free_form("core/v1 EphemeralVolumeSource (a per-pod PVC).")
    projected: dict[str, Any] | None = _free_form("core/v1 ProjectedVolumeSource.")
    downward_api: dict[str, Any] | None = Field(
        None,
        alias="downwardAPI",
        description="core/v1 DownwardAPIVolumeSource.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )

    def sources(self) -> list[str]:
        """The wire names of the volume sources set on this volume (exactly one is valid)."""
        return [name for name in VOLUME_SOURCES if getattr(self, _field_for_alias(Volume, name)) is not None]


class VolumeMount(WireModel):
    """Mounts one of ``podTemplate.volumes`` into the trainer container."""

    name: str = Field(..., max_length=63, pattern=_DNS_LABEL, description="Name of a podTemplate volume.")
    mount_path: str = Field(..., min_length=1, max_length=4096, pattern=r"^/", description="Absolute path.")
    sub_path: str | None = Field(None, max_length=4096, description="Sub-path inside the volume.")
    read_only: bool | None = Field(None, description="Mount read-only.")


class LocalObjectReference(WireModel):
    """A reference to an object in the job's namespace by name."""

    name: str = Field(..., min_length=1, max_length=253, description="Object name, e.g. an image pull Secret.")


class PodSecurityOverrides(WireModel):
    """The non-root identity the trainer runs as; everything else stays at the restricted profile."""

    run_as_user: int | None = Field(None, ge=1, description="UID of the trainer (never 0); default 1000.")
    run_as_group: int | None = Field(None, ge=1, description="Primary GID of the trainer; default 1000.")
    fs_group: int | None = Field(None, ge=1, description="GID owning mounted volumes (checkpoint PVCs); default 1000.")


class PodTemplateOverrides(WireModel):
    """Restricted overrides of the worker pods: scheduling, extra env and volumes, identity.

    Deliberately not a full PodTemplateSpec: privileged containers, host namespaces, hostPath volumes,
    added capabilities and root users cannot be expressed, and operator-owned names are reserved.
    """

    labels: dict[str, LabelValue] = Field(default_factory=dict, max_length=64, description="Extra pod labels.")
    annotations: dict[str, str] = Field(default_factory=dict, max_length=64, description="Extra pod annotations.")
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        max_length=64,
        description="Extra node selector (TPU selectors are added by the operator).",
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64, description="Pod tolerations.")
    affinity: dict[str, Any] | None = _free_form("core/v1 Affinity (nodeAffinity, podAffinity, podAntiAffinity).")
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=256,
        description="Extra environment of the trainer container (operator-set names are reserved).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    volumes: list[Volume] = Field(
        default_factory=list,
        max_length=64,
        description="Extra pod volumes, e.g. a PVC for training.checkpoint.dir so gang restarts can resume.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list,
        max_length=64,
        description="Mounts of podTemplate.volumes in the trainer container.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["mountPath"]},
    )
    service_account_name: str | None = Field(
        None, max_length=253, pattern=_DNS_SUBDOMAIN_OR_EMPTY, description="ServiceAccount of the worker pods."
    )
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, max_length=16, description="Secrets for pulling the trainer image."
    )
    security_context: PodSecurityOverrides | None = Field(
        None, description="Non-root UID/GID overrides; the rest of the restricted security context is fixed."
    )
    termination_grace_period_seconds: int = Field(
        DEFAULT_TERMINATION_GRACE_SECONDS,
        ge=10,
        le=86_400,
        description="Seconds a worker gets after SIGTERM to write its checkpoint before it is killed.",
    )


class JESTTrainingJobSpec(WireModel):
    """Desired state of a JEST training job: the worker gang, its accelerators and the training recipe."""

    image: str = Field(
        ..., min_length=1, max_length=1024, pattern=r"^\S+$", description="Trainer container image (required)."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="Pull policy of the trainer image (Kubernetes default when unset)."
    )
    num_nodes: int = Field(1, ge=1, le=4096, description="Worker pods; one torch.distributed node each.")
    num_proc_per_node: int = Field(
        1, ge=1, le=64, description="Processes per pod (one per GPU); more than one runs the trainer under torchrun."
    )
    accelerator: AcceleratorSpec = Field(default_factory=AcceleratorSpec, description="Accelerator of each pod.")
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements, description="Trainer container resources (merged with the accelerator's)."
    )
    training: TrainingConfig = Field(
        default_factory=TrainingConfig,
        description="The training recipe (model, reference, data, selection, optimizer, steps, checkpoints); the "
        "workers receive it as /etc/jest/config.json.",
    )
    energy: EnergyConfig = Field(
        default_factory=EnergyConfig, description="Energy accounting and an optional budget with enforcement."
    )
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Suspend, restarts, deadlines, Kueue queue.")
    pod_template: PodTemplateOverrides = Field(
        default_factory=PodTemplateOverrides, description="Restricted overrides of the worker pods."
    )


class Condition(WireModel):
    """One observation about the job (metav1.Condition shape)."""

    type: str = Field(..., min_length=1, max_length=316, description="Created, Running, Restarting, Suspended, ...")
    status: Literal["True", "False", "Unknown"] = Field(..., description="True, False or Unknown.")
    reason: str = Field(
        ...,
        max_length=1024,
        pattern=r"^([A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?)?$",
        description="CamelCase machine-readable reason, e.g. InvalidSpec or BackoffLimitExceeded.",
    )
    message: str = Field("", max_length=32768, description="Human-readable details.")
    last_transition_time: str | None = Field(
        None, description="When status last changed (RFC 3339).", json_schema_extra={"format": "date-time"}
    )
    observed_generation: int | None = Field(None, ge=0, description="metadata.generation this was computed from.")


class ReplicaStatus(WireModel):
    """Counts of worker pods of the current attempt."""

    active: int = Field(0, ge=0, description="Pods pending or running.")
    ready: int = Field(0, ge=0, description="Pods whose trainer is ready (metrics endpoint up).")
    succeeded: int = Field(0, ge=0, description="Pods that exited 0.")
    failed: int = Field(0, ge=0, description="Pods that failed.")
    total: int | None = Field(None, ge=0, description="Pods the job wants (numNodes).")


class ProgressStatus(WireModel):
    """Training progress as reported by rank 0's progress file."""

    step: int = Field(0, ge=0, description="Completed learner steps.")
    total_steps: int | None = Field(None, ge=0, description="spec.training.steps.")
    examples_scored: int = Field(0, ge=0, description="Candidates scored by learner + reference (super-batches).")
    examples_trained: int = Field(0, ge=0, description="Examples the learner trained on (selected batches).")
    observed_selection_ratio: float | None = Field(
        None, ge=0, le=1, description="examplesTrained / examplesScored (configured: 1 - filterRatio)."
    )
    last_eval_accuracy: float | None = Field(None, ge=0, le=1, description="Latest zero-shot accuracy.")


class ThroughputStatus(WireModel):
    """Recent speed of the job."""

    examples_per_second: float | None = Field(None, ge=0, description="Trained examples per second.")
    step_seconds: float | None = Field(None, ge=0, description="Seconds per learner step.")
    selection_overhead_fraction: float | None = Field(
        None, ge=0, le=1, description="Fraction of step time spent scoring and selecting."
    )


class EnergyStatus(WireModel):
    """Energy spent so far; ``method`` says whether it was measured, integrated from power, or modelled."""

    joules: float | None = Field(None, ge=0, description="Energy of all accelerators since the job started.")
    kilojoules: float | None = Field(None, ge=0, description="joules / 1000 (the kubectl get column).")
    average_watts: float | None = Field(None, ge=0, description="Average power over the run.")
    joules_per_example: float | None = Field(None, ge=0, description="joules / examplesTrained.")
    method: Literal["measured", "integrated", "modelled"] | None = Field(
        None, description="measured (hardware counter), integrated (power x time) or modelled (configured watts)."
    )
    source: str | None = Field(None, max_length=256, description="Where the figure comes from, e.g. nvml, rapl.")
    co2e_grams: float | None = Field(
        None, ge=0, alias="co2eGrams", description="CO2e estimate from energy.carbonIntensityGramsPerKWh."
    )

    @model_validator(mode="after")
    def _derive_kilojoules(self) -> EnergyStatus:
        if self.kilojoules is None and self.joules is not None:
            self.kilojoules = round(self.joules / 1000.0, 3)
        return self


class CheckpointStatus(WireModel):
    """The newest complete checkpoint."""

    step: int = Field(..., ge=0, description="Learner step of the checkpoint.")
    path: str = Field(..., description="Path of the checkpoint file inside the worker.")
    time: str | None = Field(
        None, description="When it was written (RFC 3339).", json_schema_extra={"format": "date-time"}
    )


class JESTTrainingJobStatus(WireModel):
    """Observed state, written only by the operator (status subresource)."""

    phase: Phase | None = Field(None, description="Pending, Running, Restarting, Suspended, Succeeded or Failed.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Created, Running, Restarting, Suspended, Succeeded, Failed.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(None, ge=0, description="metadata.generation last reconciled.")
    start_time: str | None = Field(
        None, description="When the job first started pods.", json_schema_extra={"format": "date-time"}
    )
    completion_time: str | None = Field(
        None, description="When the job Succeeded or Failed.", json_schema_extra={"format": "date-time"}
    )
    restarts: int = Field(0, ge=0, description="Gang restarts so far (the current attempt number).")
    disruptions: int = Field(
        0,
        ge=0,
        description="Gang restarts caused by an eviction or preemption (included in restarts; they do not count "
        "against runPolicy.backoffLimit).",
    )
    nodes: str | None = Field(
        None, pattern=r"^[0-9]+/[0-9]+$", description="ready/total worker pods (the kubectl get column)."
    )
    replicas: ReplicaStatus | None = Field(None, description="Worker pod counts of the current attempt.")
    progress: ProgressStatus | None = Field(None, description="Steps and examples scored/trained.")
    throughput: ThroughputStatus | None = Field(None, description="Examples per second, step time, selection cost.")
    energy: EnergyStatus | None = Field(None, description="Energy spent, with method and source.")
    checkpoint: CheckpointStatus | None = Field(None, description="Newest complete checkpoint.")

    @model_validator(mode="after")
    def _derive_nodes(self) -> JESTTrainingJobStatus:
        if self.nodes is None and self.replicas is not None and self.replicas.total is not None:
            self.nodes = f"{self.replicas.ready}/{self.replicas.total}"
        return self


class ObjectMeta(BaseModel):
    """The parts of metadata the operator uses; everything else the API server adds is ignored."""

    model_config = ConfigDict(extra="ignore")

    name: str
    namespace: str = "default"
    uid: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    generation: int | None = None


class JESTTrainingJob(BaseModel):
    """A parsed, validated ``JESTTrainingJob``: what the builders and the operator work from."""

    api_version: str = API_VERSION
    kind: str = KIND
    metadata: ObjectMeta
    spec: JESTTrainingJobSpec
    status: JESTTrainingJobStatus | None = None

    @property
    def name(self) -> str:
        """metadata.name."""
        return self.metadata.name

    @property
    def namespace(self) -> str:
        """metadata.namespace ('default' when the manifest has none)."""
        return self.metadata.namespace


def world_size(job: JESTTrainingJob) -> int:
    """Total trainer processes: numNodes x numProcPerNode."""
    return job.spec.num_nodes * job.spec.num_proc_per_node


def topology_chips(topology: str) -> int:
    """Number of chips of a TPU topology such as ``2x4`` or ``2x2x4``."""
    chips = 1
    for part in topology.split("x"):
        chips *= int(part)
    return chips


def parse_job(body: Mapping[str, Any]) -> JESTTrainingJob:
    """Validate a raw ``JESTTrainingJob`` manifest and return the typed job, or raise ``InvalidSpec``.

    The same rules as the CRD schema and its CEL validations, plus those CEL cannot express (TPU topology
    size, volume references). Status keys unknown to the model (e.g. Kopf's bookkeeping) are ignored.
    """
    if not isinstance(body, Mapping):
        raise InvalidSpec("<root>", f"a manifest must be a mapping, got {type(body).__name__}")
    api_version = body.get("apiVersion")
    if api_version != API_VERSION:
        raise InvalidSpec("apiVersion", f"must be {API_VERSION!r}, got {api_version!r}")
    if body.get("kind") != KIND:
        raise InvalidSpec("kind", f"must be {KIND!r}, got {body.get('kind')!r}")
    metadata = _parse_metadata(body.get("metadata"))
    raw_spec = body.get("spec")
    if not isinstance(raw_spec, Mapping):
        raise InvalidSpec("spec", "is required and must be a mapping")
    _check_pod_template_restrictions(raw_spec.get("podTemplate"))
    spec = _validate_model(JESTTrainingJobSpec, raw_spec, "spec")
    _check_cross_field_rules(spec)
    status = None
    raw_status = body.get("status")
    if isinstance(raw_status, Mapping) and raw_status:
        known = {field.alias or name for name, field in JESTTrainingJobStatus.model_fields.items()}
        status = _validate_model(JESTTrainingJobStatus, {k: v for k, v in raw_status.items() if k in known}, "status")
    return JESTTrainingJob(api_version=api_version, kind=KIND, metadata=metadata, spec=spec, status=status)


def _parse_metadata(raw: Any) -> ObjectMeta:
    if not isinstance(raw, Mapping):
        raise InvalidSpec("metadata", "is required and must be a mapping")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidSpec("metadata.name", "is required")
    if len(name) > MAX_JOB_NAME_LENGTH or not re.match(JOB_NAME_PATTERN, name):
        raise InvalidSpec(
            "metadata.name",
            f"must be a DNS-1035 label of at most {MAX_JOB_NAME_LENGTH} characters (pod hostnames "
            f"'<name>-node-<i>' derive from it), got {name!r}",
        )
    try:
        return ObjectMeta.model_validate(_plain(raw))
    except ValidationError as error:
        first = error.errors()[0]
        raise InvalidSpec(_format_loc("metadata", first["loc"]), first["msg"]) from error


_FORBIDDEN_POD_KEYS: dict[str, str] = {
    "hostNetwork": "host namespaces are not allowed (restricted Pod Security profile)",
    "hostPID": "host namespaces are not allowed (restricted Pod Security profile)",
    "hostIPC": "host namespaces are not allowed (restricted Pod Security profile)",
    "hostUsers": "host user namespaces are not allowed (restricted Pod Security profile)",
}
_FORBIDDEN_SECURITY_KEYS: dict[str, str] = {
    "privileged": "privileged containers are not allowed (restricted Pod Security profile)",
    "capabilities": "adding capabilities is not allowed; the trainer drops ALL",
    "allowPrivilegeEscalation": "privilege escalation is always disabled",
    "runAsNonRoot": "the trainer always runs as non-root",
    "seccompProfile": "the seccomp profile is always RuntimeDefault",
    "seLinuxOptions": "SELinux options cannot be overridden",
    "procMount": "procMount cannot be overridden",
}


def _check_pod_template_restrictions(raw: Any) -> None:
    """Refuse what the restricted profile forbids, with a message saying why (before the type checks)."""
    if not isinstance(raw, Mapping):
        return
    for key, why in _FORBIDDEN_POD_KEYS.items():
        if key in raw:
            raise InvalidSpec(f"spec.podTemplate.{key}", why)
    security = raw.get("securityContext")
    if isinstance(security, Mapping):
        for key, why in _FORBIDDEN_SECURITY_KEYS.items():
            if key in security:
                raise InvalidSpec(f"spec.podTemplate.securityContext.{key}", why)
        for key in ("runAsUser", "runAsGroup", "fsGroup"):
            if security.get(key) == 0:
                raise InvalidSpec(
                    f"spec.podTemplate.securityContext.{key}", "must not be 0 (root); the trainer runs as non-root"
                )
    volumes = raw.get("volumes")
    if isinstance(volumes, list | tuple):
        for index, volume in enumerate(volumes):
            if isinstance(volume, Mapping) and "hostPath" in volume:
                raise InvalidSpec(
                    f"spec.podTemplate.volumes[{index}].hostPath",
                    "hostPath volumes are not allowed (restricted Pod Security profile); use a PVC",
                )
    for key in ("containers", "initContainers", "securityContextConstraints"):
        if key in raw:
            raise InvalidSpec(
                f"spec.podTemplate.{key}", "is not overridable; the operator builds the trainer container"
            )


def _validate_model(model: type[BaseModel], data: Mapping[str, Any], prefix: str) -> Any:
    """Strict validation (JSON semantics: no string-to-number coercion) with the first error as InvalidSpec."""
    try:
        payload = json.dumps(_plain(data))
    except (TypeError, ValueError) as error:
        raise InvalidSpec(prefix, f"is not JSON-serialisable: {error}") from error
    try:
        return model.model_validate_json(payload, strict=True)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        field = _format_loc(prefix, first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        field = _refine_field(field, message)
        if first["type"] == "extra_forbidden":
            message = "unknown field (not part of the JESTTrainingJob API)"
        raise InvalidSpec(field, message) from error


def _plain(value: Any) -> Any:
    """Plain dicts and lists from any Mapping / sequence view (e.g. Kopf's body views), for JSON."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _format_loc(prefix: str, loc: tuple[Any, ...]) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int) or "/" in str(part) or "." in str(part):
            path += f"[{part}]"
        else:
            path += f".{part}"
    return path


_DOTTED_REFERENCE = re.compile(r"\b([a-z][A-Za-z]*)\.([a-z][A-Za-z]*)\b")


def _refine_field(field: str, message: str) -> str:
    """Point an object-level error (``spec.training.data``) at the field its message names (``data.urls``)."""
    last = field.rsplit(".", 1)[-1]
    for match in _DOTTED_REFERENCE.finditer(message):
        if match.group(1) == last:
            return f"{field}.{match.group(2)}"
    return field


def _check_cross_field_rules(spec: JESTTrainingJobSpec) -> None:
    """Rules spanning several fields: the CEL rules of the CRD (mirrored) and what CEL cannot express."""
    selection = spec.training.selection
    world = spec.num_nodes * spec.num_proc_per_node
    try:
        selection.per_rank(world)
    except ValueError as error:
        raise InvalidSpec(
            "spec.training.selection.batchSize",
            f"must be divisible by numNodes x numProcPerNode x chunks ({spec.num_nodes} x {spec.num_proc_per_node} "
            f"x {selection.chunks}): {error}",
        ) from error
    directory = spec.training.checkpoint.dir
    if not directory.startswith("/"):
        raise InvalidSpec("spec.training.checkpoint.dir", f"must be an absolute path in a pod, got {directory!r}")
    for reserved in (CONFIG_MOUNT_DIR, "/dev/shm"):
        normalised = normalise_path(directory)
        if normalised == reserved or normalised.startswith(reserved + "/"):
            raise InvalidSpec("spec.training.checkpoint.dir", f"must not be under {reserved} (used by the operator)")
    _check_accelerator(spec)
    _check_resources(spec)
    _check_pod_template(spec)


def _check_accelerator(spec: JESTTrainingJobSpec) -> None:
    accelerator = spec.accelerator
    if accelerator.type != "cpu" and accelerator.count is None:
        raise InvalidSpec("spec.accelerator.count", f"is required when accelerator.type is {accelerator.type!r}")
    if accelerator.type == "tpu" and accelerator.tpu is None:
        raise InvalidSpec("spec.accelerator.tpu", "is required when accelerator.type is 'tpu'")
    if accelerator.type != "tpu" and accelerator.tpu is not None:
        raise InvalidSpec("spec.accelerator.tpu", "is only allowed when accelerator.type is 'tpu'")
    if accelerator.type == "cpu" and accelerator.count is not None:
        raise InvalidSpec("spec.accelerator.count", "is only allowed for gpu and tpu (cpu pods use resources.requests)")
    if accelerator.type == "gpu" and accelerator.count is not None and spec.num_proc_per_node > accelerator.count:
        raise InvalidSpec(
            "spec.numProcPerNode",
            f"must not exceed accelerator.count ({accelerator.count}) for gpu: one process per GPU",
        )
    if accelerator.type == "tpu" and accelerator.tpu is not None and accelerator.count is not None:
        chips = topology_chips(accelerator.tpu.topology)
        if chips != spec.num_nodes * accelerator.count:
            raise InvalidSpec(
                "spec.accelerator.tpu.topology",
                f"{accelerator.tpu.topology} has {chips} chips but numNodes x accelerator.count is "
                f"{spec.num_nodes} x {accelerator.count} = {spec.num_nodes * accelerator.count}",
            )


def _check_resources(spec: JESTTrainingJobSpec) -> None:
    for kind in ("requests", "limits"):
        values: dict[str, Quantity] = getattr(spec.resources, kind)
        for resource, quantity in values.items():
            field = f"spec.resources.{kind}[{resource}]"
            if resource in (GPU_RESOURCE, TPU_RESOURCE):
                raise InvalidSpec(field, "is set by the operator from accelerator.type and accelerator.count")
            if isinstance(quantity, str) and not _QUANTITY.match(quantity):
                raise InvalidSpec(field, f"{quantity!r} is not a Kubernetes quantity (e.g. '500m', '64Gi', '8')")
            if isinstance(quantity, int) and quantity < 0:
                raise InvalidSpec(field, "must not be negative")
    for resource, limit in spec.resources.limits.items():
        request = spec.resources.requests.get(resource)
        if request is not None and _quantity_value(request) > _quantity_value(limit):
            raise InvalidSpec(f"spec.resources.requests[{resource}]", f"must not exceed limits[{resource}]")


_SUFFIXES = {
    "": 1.0,
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
    "Pi": 2.0**50,
    "Ei": 2.0**60,
}


def _quantity_value(quantity: Quantity) -> float:
    """Approximate numeric value of a quantity (enough to compare a request with its limit)."""
    if isinstance(quantity, int):
        return float(quantity)
    match = re.match(r"^([+-]?[0-9.]+)(.*)$", quantity)
    if match is None:
        return float("nan")
    number, suffix = match.groups()
    if suffix in _SUFFIXES:
        return float(number) * _SUFFIXES[suffix]
    try:
        return float(quantity)
    except ValueError:
        return float("nan")


def is_reserved_env_name(name: str) -> bool:
    """Whether ``name`` is set by the operator (DESIGN.md §4) and so may not come from a podTemplate."""
    return name in RESERVED_ENV_NAMES or name.startswith(RESERVED_ENV_PREFIXES)


def _check_pod_template(spec: JESTTrainingJobSpec) -> None:
    template = spec.pod_template
    for index, variable in enumerate(template.env):
        if is_reserved_env_name(variable.name):
            raise InvalidSpec(f"spec.podTemplate.env[{index}].name", f"{variable.name} is set by the operator")
        if variable.value is not None and variable.value_from is not None:
            raise InvalidSpec(f"spec.podTemplate.env[{index}]", "set value or valueFrom, not both")
    for kind in ("labels", "annotations"):
        for key in getattr(template, kind):
            if not re.match(_QUALIFIED_KEY, key) or len(key) > 317:
                raise InvalidSpec(f"spec.podTemplate.{kind}[{key}]", "is not a valid label/annotation key")
            if key.startswith(RESERVED_LABEL_PREFIXES):
                raise InvalidSpec(f"spec.podTemplate.{kind}[{key}]", "is reserved for the operator")
    accelerator = spec.accelerator
    if accelerator.type == "tpu":
        for key in (TPU_ACCELERATOR_SELECTOR, TPU_TOPOLOGY_SELECTOR):
            if key in template.node_selector:
                raise InvalidSpec(
                    f"spec.podTemplate.nodeSelector[{key}]", "is set by the operator from accelerator.tpu"
                )
    names: set[str] = set()
    for index, volume in enumerate(template.volumes):
        if volume.name in RESERVED_VOLUME_NAMES:
            raise InvalidSpec(f"spec.podTemplate.volumes[{index}].name", f"{volume.name!r} is used by the operator")
        if volume.name in names:
            raise InvalidSpec(f"spec.podTemplate.volumes[{index}].name", f"duplicate volume {volume.name!r}")
        names.add(volume.name)
        if len(volume.sources()) != 1:
            raise InvalidSpec(
                f"spec.podTemplate.volumes[{index}]",
                f"must set exactly one volume source of {', '.join(VOLUME_SOURCES)}",
            )
    paths: set[str] = set()
    for index, mount in enumerate(template.volume_mounts):
        if mount.name not in names:
            raise InvalidSpec(f"spec.podTemplate.volumeMounts[{index}].name", f"no podTemplate volume {mount.name!r}")
        path = normalise_path(mount.mount_path)
        if path in RESERVED_MOUNT_PATHS:
            raise InvalidSpec(f"spec.podTemplate.volumeMounts[{index}].mountPath", f"{path} is used by the operator")
        if path in paths:
            raise InvalidSpec(f"spec.podTemplate.volumeMounts[{index}].mountPath", f"duplicate mount path {path}")
        paths.add(path)


def normalise_path(path: str) -> str:
    """A POSIX path without trailing or repeated slashes (``/data//ckpt/`` -> ``/data/ckpt``)."""
    parts = [part for part in path.split("/") if part not in ("", ".")]
    return "/" + "/".join(parts)


def _field_for_alias(model: type[BaseModel], alias: str) -> str:
    for name, field in model.model_fields.items():
        if (field.alias or to_camel(name)) == alias:
            return name
    raise KeyError(alias)


class ManifestLoader(yaml.SafeLoader):
    """PyYAML's safe loader with Kubernetes' idea of a float: ``3.6e9`` is a number, not a string.

    PyYAML follows YAML 1.1, whose floats need a dot and a signed exponent, while kubectl (go-yaml) reads
    ``3.6e9`` as a number; with a plain ``yaml.safe_load`` such a manifest would fail as a wrong type
    here but be accepted by a cluster.
    """


_FLOAT_TAG = "tag:yaml.org,2002:float"
ManifestLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ManifestLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)?\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def load_manifests(text: str) -> list[dict[str, Any]]:
    """Every non-empty YAML document of ``text``, read the way kubectl reads numbers (see ManifestLoader)."""
    return [document for document in yaml.load_all(text, Loader=ManifestLoader) if document is not None]
