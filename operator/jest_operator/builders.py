"""Pure builders: a parsed ``JESTTrainingJob`` -> the desired child objects as plain dicts (DESIGN.md §4).

The operator creates exactly what these functions return, ``jestctl run`` runs the pods they return as
local processes, and the tests validate every object with ``kubernetes-validate`` — so the pod contract
(names, labels, environment, volumes, security context) lives here and nowhere else.

Children of job ``<name>`` in namespace ``<ns>``:

- ConfigMap ``<name>-config`` whose ``config.json`` is the ``WorkerConfig`` (training + energy),
  mounted at ``/etc/jest``;
- headless Service ``<name>`` (``publishNotReadyAddresses``) giving every pod the stable DNS name
  ``<name>-node-<i>.<name>.<ns>.svc``; rank 0's is the rendezvous address;
- one Pod ``<name>-node-<i>`` per node, ``restartPolicy: Never`` (the operator restarts the whole gang
  with attempt + 1), restricted security context, read-only root filesystem with emptyDirs for
  ``/tmp`` and ``/dev/shm``.

The ConfigMap and Service carry ``jest.training/spec-hash`` (:func:`spec_hash` of their labels and content), so
the operator detects a child that drifted from the desired state (an edited ``spec.training``) by comparing
one annotation, and patches it back. Pods carry none: they are immutable, and a new spec reaches them when
the gang is next (re)created.

Checkpoints: when a podTemplate volume is mounted at (or above) ``training.checkpoint.dir`` the
trainer writes there; otherwise the builder mounts an ``emptyDir``, which a gang restart discards —
resuming across restarts needs a PersistentVolumeClaim (see examples/gpu-siglip.yaml).

No I/O, no clock, no torch: same input, same output.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from jest_trainer.config import WorkerConfig

from jest_operator.api import (
    ANNOTATION_ATTEMPT,
    ANNOTATION_SPEC_HASH,
    API_VERSION,
    CONFIG_FILE_NAME,
    CONFIG_MOUNT_DIR,
    DEFAULT_RUN_AS_ID,
    GPU_RESOURCE,
    KIND,
    KUEUE_POD_GROUP_NAME_LABEL,
    KUEUE_POD_GROUP_TOTAL_COUNT_ANNOTATION,
    KUEUE_QUEUE_NAME_LABEL,
    LABEL_ATTEMPT,
    LABEL_JOB_NAME,
    LABEL_MANAGED_BY,
    LABEL_REPLICA_INDEX,
    MANAGED_BY,
    METRICS_PORT,
    RENDEZVOUS_PORT,
    TPU_ACCELERATOR_SELECTOR,
    TPU_RESOURCE,
    TPU_TOPOLOGY_SELECTOR,
    JESTTrainingJob,
    normalise_path,
    world_size,
)

CONTAINER_NAME = "trainer"
#: Where the trainer leaves its final figures (the kubelet's default path, named explicitly so the
#: trainer's ``JEST_TERMINATION_MESSAGE_PATH`` and the container spec cannot disagree).
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
CONFIG_VOLUME = "jest-config"
SHM_VOLUME = "dshm"
TMP_VOLUME = "tmp"
CHECKPOINT_VOLUME = "checkpoints"
TPU_RUNTIME_PORT = 8471
#: Environment defaults for a read-only root filesystem; a podTemplate env entry of the same name wins.
WRITABLE_CACHE_ENV: dict[str, str] = {
    "PYTHONUNBUFFERED": "1",
    "XDG_CACHE_HOME": "/tmp/.cache",
    "MPLCONFIGDIR": "/tmp/.config/matplotlib",
}


def config_map_name(job: JESTTrainingJob) -> str:
    """``<name>-config``."""
    return f"{job.name}-config"


def service_name(job: JESTTrainingJob) -> str:
    """The headless Service is named like the job (it is the pods' DNS subdomain)."""
    return job.name


def pod_name(job: JESTTrainingJob, index: int) -> str:
    """``<name>-node-<index>``; also the pod's hostname."""
    return f"{job.name}-node-{index}"


def pod_fqdn(job: JESTTrainingJob, index: int) -> str:
    """Stable DNS name of pod ``index`` through the headless Service: ``<pod>.<name>.<ns>.svc``."""
    return f"{pod_name(job, index)}.{service_name(job)}.{job.namespace}.svc"


def master_address(job: JESTTrainingJob) -> str:
    """Rendezvous address (rank 0's pod)."""
    return pod_fqdn(job, 0)


def job_labels(job: JESTTrainingJob) -> dict[str, str]:
    """Labels on every child: selecting ``jest.training/job-name=<name>`` finds them all."""
    return {LABEL_JOB_NAME: job.name, LABEL_MANAGED_BY: MANAGED_BY}


def owner_references(job: JESTTrainingJob) -> list[dict[str, Any]]:
    """The job as controlling owner, so deleting it garbage-collects the children.

    Empty when the job has no uid (a manifest run by ``jestctl run`` never reached an API server).
    """
    if not job.metadata.uid:
        return []
    return [
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": job.name,
            "uid": job.metadata.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def _metadata(job: JESTTrainingJob, name: str, labels: dict[str, str], annotations: dict[str, str] | None = None):
    metadata: dict[str, Any] = {"name": name, "namespace": job.namespace, "labels": labels}
    if annotations:
        metadata["annotations"] = annotations
    owners = owner_references(job)
    if owners:
        metadata["ownerReferences"] = owners
    return metadata


def worker_config(job: JESTTrainingJob) -> WorkerConfig:
    """What the trainer reads from ``JEST_CONFIG``: ``spec.training`` and ``spec.energy``."""
    return WorkerConfig(training=job.spec.training, energy=job.spec.energy)


def worker_config_json(job: JESTTrainingJob) -> str:
    """Deterministic JSON of the worker config (sorted keys, so unchanged specs give unchanged bytes)."""
    return json.dumps(worker_config(job).to_wire(), indent=2, sort_keys=True) + "\n"


def spec_hash(manifest: dict[str, Any]) -> str:
    """Digest of what the operator owns in a ConfigMap/Service: its labels, ``data`` and ``spec``.

    Annotations, ownerReferences and server-set fields are left out, so the value is the same for the built
    manifest and for the stored object as long as nobody changed the content.
    """
    content = {
        "labels": (manifest.get("metadata") or {}).get("labels") or {},
        "data": manifest.get("data"),
        "spec": manifest.get("spec"),
    }
    encoded = json.dumps(content, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()[:20]


def _with_spec_hash(manifest: dict[str, Any]) -> dict[str, Any]:
    manifest["metadata"].setdefault("annotations", {})[ANNOTATION_SPEC_HASH] = spec_hash(manifest)
    return manifest


def build_config_map(job: JESTTrainingJob) -> dict[str, Any]:
    """ConfigMap ``<name>-config`` with ``config.json`` = the WorkerConfig JSON (and its spec hash)."""
    return _with_spec_hash({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, config_map_name(job), job_labels(job)),
        "data": {CONFIG_FILE_NAME: worker_config_json(job)},
    })


def build_service(job: JESTTrainingJob) -> dict[str, Any]:
    """Headless Service ``<name>``: stable pod DNS for the rendezvous, published before pods are ready."""
    return _with_spec_hash({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, service_name(job), job_labels(job)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB_NAME: job.name, LABEL_MANAGED_BY: MANAGED_BY},
            "ports": [
                {"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT, "protocol": "TCP"}
            ],
        },
    })


def container_command(job: JESTTrainingJob) -> list[str]:
    """``jest-trainer`` for one process per pod, else torchrun (which reads the ``PET_*`` variables)."""
    if job.spec.num_proc_per_node == 1:
        return ["jest-trainer"]
    return ["torchrun", "-m", "jest_trainer.train"]


def _env(name: str, value: str | int) -> dict[str, str]:
    return {"name": name, "value": str(value)}


def pod_env(job: JESTTrainingJob, index: int, *, attempt: int) -> list[dict[str, Any]]:
    """The trainer container's environment: the contract of DESIGN.md §4, then the podTemplate's extras."""
    spec = job.spec
    master = master_address(job)
    env = [
        _env("MASTER_ADDR", master),
        _env("MASTER_PORT", RENDEZVOUS_PORT),
        _env("PET_MASTER_ADDR", master),
        _env("PET_MASTER_PORT", RENDEZVOUS_PORT),
        _env("PET_NNODES", spec.num_nodes),
        _env("PET_NODE_RANK", index),
        _env("PET_NPROC_PER_NODE", spec.num_proc_per_node),
    ]
    if spec.num_proc_per_node == 1:
        env += [_env("WORLD_SIZE", world_size(job)), _env("RANK", index), _env("LOCAL_RANK", 0)]
    env += [
        _env("JEST_CONFIG", f"{CONFIG_MOUNT_DIR}/{CONFIG_FILE_NAME}"),
        _env("JEST_JOB_NAME", job.name),
        _env("JEST_NAMESPACE", job.namespace),
        _env("JEST_ATTEMPT", attempt),
        _env("JEST_METRICS_PORT", METRICS_PORT),
        _env("JEST_TERMINATION_MESSAGE_PATH", TERMINATION_MESSAGE_PATH),
        # the node the pod landed on: node-wide energy counters (RAPL) are metered by one rank per node
        {"name": "JEST_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
    ]
    if spec.accelerator.type == "tpu":
        hostnames = ",".join(pod_fqdn(job, i) for i in range(spec.num_nodes))
        env += [_env("TPU_WORKER_ID", index), _env("TPU_WORKER_HOSTNAMES", hostnames), _env("PJRT_DEVICE", "TPU")]
    user_env = spec.pod_template.env
    user_names = {variable.name for variable in user_env}
    env += [_env(name, value) for name, value in WRITABLE_CACHE_ENV.items() if name not in user_names]
    env += [variable.to_wire() for variable in user_env]
    return env


def container_resources(job: JESTTrainingJob) -> dict[str, Any]:
    """``spec.resources`` merged with the accelerator's extended resource (as a limit, which implies the request)."""
    spec = job.spec
    requests = dict(spec.resources.requests)
    limits = dict(spec.resources.limits)
    if spec.accelerator.type == "gpu" and spec.accelerator.count:
        limits[GPU_RESOURCE] = str(spec.accelerator.count)
    elif spec.accelerator.type == "tpu" and spec.accelerator.count:
        limits[TPU_RESOURCE] = str(spec.accelerator.count)
    resources: dict[str, Any] = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return resources


def checkpoint_mount_covered(job: JESTTrainingJob) -> bool:
    """Whether a podTemplate volume is mounted at or above ``training.checkpoint.dir``."""
    directory = normalise_path(job.spec.training.checkpoint.dir)
    for mount in job.spec.pod_template.volume_mounts:
        path = normalise_path(mount.mount_path)
        if directory == path or directory.startswith(path.rstrip("/") + "/"):
            return True
    return directory == "/tmp" or directory.startswith("/tmp/")


def _volumes_and_mounts(job: JESTTrainingJob) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    template = job.spec.pod_template
    volumes: list[dict[str, Any]] = [
        {"name": CONFIG_VOLUME, "configMap": {"name": config_map_name(job)}},
        {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}},
        {"name": TMP_VOLUME, "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": CONFIG_VOLUME, "mountPath": CONFIG_MOUNT_DIR, "readOnly": True},
        {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
        {"name": TMP_VOLUME, "mountPath": "/tmp"},
    ]
    if not checkpoint_mount_covered(job):
        volumes.append({"name": CHECKPOINT_VOLUME, "emptyDir": {}})
        mounts.append({"name": CHECKPOINT_VOLUME, "mountPath": normalise_path(job.spec.training.checkpoint.dir)})
    volumes += [volume.to_wire() for volume in template.volumes]
    mounts += [mount.to_wire() for mount in template.volume_mounts]
    return volumes, mounts


def _pod_labels_and_annotations(job: JESTTrainingJob, index: int, attempt: int):
    template = job.spec.pod_template
    labels = {
        **template.labels,
        **job_labels(job),
        LABEL_REPLICA_INDEX: str(index),
        LABEL_ATTEMPT: str(attempt),
    }
    annotations = {
        **template.annotations,
        ANNOTATION_ATTEMPT: str(attempt),
        "kubectl.kubernetes.io/default-container": CONTAINER_NAME,
    }
    queue = job.spec.run_policy.queue_name
    if queue:
        labels[KUEUE_QUEUE_NAME_LABEL] = queue
        labels[KUEUE_POD_GROUP_NAME_LABEL] = job.name
        annotations[KUEUE_POD_GROUP_TOTAL_COUNT_ANNOTATION] = str(job.spec.num_nodes)
    return labels, annotations


def _container(job: JESTTrainingJob, index: int, attempt: int, mounts: list[dict[str, Any]]) -> dict[str, Any]:
    spec = job.spec
    ports = [
        {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"},
    ]
    # torchrun starts numProcPerNode trainers in this container; local rank r serves on METRICS_PORT + r.
    ports[1:1] = [
        {"name": f"metrics-{local_rank}", "containerPort": METRICS_PORT + local_rank, "protocol": "TCP"}
        for local_rank in range(1, spec.num_proc_per_node)
    ]
    if spec.accelerator.type == "tpu":
        ports.append({"name": "tpu-runtime", "containerPort": TPU_RUNTIME_PORT, "protocol": "TCP"})
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "command": container_command(job),
        "env": pod_env(job, index, attempt=attempt),
        "ports": ports,
        "volumeMounts": mounts,
        # a clean exit leaves the final metrics summary here; a crash leaves the log tail (the error)
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "readinessProbe": {
            "httpGet": {"path": "/metrics", "port": "metrics"},
            "initialDelaySeconds": 2,
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    resources = container_resources(job)
    if resources:
        container["resources"] = resources
    return container


def _pod_security_context(job: JESTTrainingJob) -> dict[str, Any]:
    overrides = job.spec.pod_template.security_context
    user = overrides.run_as_user if overrides and overrides.run_as_user else DEFAULT_RUN_AS_ID
    group = overrides.run_as_group if overrides and overrides.run_as_group else DEFAULT_RUN_AS_ID
    fs_group = overrides.fs_group if overrides and overrides.fs_group else DEFAULT_RUN_AS_ID
    return {
        "runAsNonRoot": True,
        "runAsUser": user,
        "runAsGroup": group,
        "fsGroup": fs_group,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def build_pod(job: JESTTrainingJob, index: int, *, attempt: int) -> dict[str, Any]:
    """Worker pod ``<name>-node-<index>`` of gang attempt ``attempt`` (rank ``index`` when one process per pod)."""
    if not 0 <= index < job.spec.num_nodes:
        raise ValueError(f"pod index {index} out of range for numNodes={job.spec.num_nodes}")
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    spec = job.spec
    template = spec.pod_template
    labels, annotations = _pod_labels_and_annotations(job, index, attempt)
    volumes, mounts = _volumes_and_mounts(job)
    pod_spec: dict[str, Any] = {
        "hostname": pod_name(job, index),
        "subdomain": service_name(job),
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": template.termination_grace_period_seconds,
        "enableServiceLinks": False,
        "securityContext": _pod_security_context(job),
        "containers": [_container(job, index, attempt, mounts)],
        "volumes": volumes,
    }
    if template.service_account_name:
        pod_spec["serviceAccountName"] = template.service_account_name
    else:
        pod_spec["automountServiceAccountToken"] = False
    if template.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [secret.to_wire() for secret in template.image_pull_secrets]
    node_selector = dict(template.node_selector)
    if spec.accelerator.type == "tpu" and spec.accelerator.tpu is not None:
        node_selector[TPU_ACCELERATOR_SELECTOR] = spec.accelerator.tpu.accelerator
        node_selector[TPU_TOPOLOGY_SELECTOR] = spec.accelerator.tpu.topology
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if template.tolerations:
        pod_spec["tolerations"] = [toleration.to_wire() for toleration in template.tolerations]
    if template.affinity:
        pod_spec["affinity"] = template.affinity
    if spec.run_policy.priority_class_name:
        pod_spec["priorityClassName"] = spec.run_policy.priority_class_name
    if spec.run_policy.scheduler_name:
        pod_spec["schedulerName"] = spec.run_policy.scheduler_name
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(job, pod_name(job, index), labels, annotations),
        "spec": pod_spec,
    }


def build_children(job: JESTTrainingJob, *, attempt: int) -> list[dict[str, Any]]:
    """Everything the job needs, in creation order: ConfigMap, Service, then pods by index."""
    pods = [build_pod(job, index, attempt=attempt) for index in range(job.spec.num_nodes)]
    return [build_config_map(job), build_service(job), *pods]
