"""Pure reconciliation logic: (job, observed pods, trainer progress, now) -> what to do and the new status.

Everything the operator decides lives here as plain functions over plain data, so every transition is
unit-tested without a cluster. ``handlers.py`` only observes (GET the job, LIST its pods, scrape rank 0),
calls :func:`plan`, and applies the returned :class:`Plan` (create/delete children, ONE status patch,
events, an optional spec patch, an optional delete of the job).

The state machine (DESIGN.md §3, §6) is :func:`judge_gang`: a pure verdict over one gang attempt's
observations that ``jestctl run`` (``jest_operator.local.GangRunner``) asks too, with its local processes
observed as pods, so a laptop and a cluster give the same phase for the same facts; :func:`plan` adds what
only a cluster needs (children, ownership, conditions, events, cleanup). Its phases:

* **Pending** -- children are created (ConfigMap, headless Service, one pod per node, all labelled with
  the gang attempt); the job is Pending until every pod of the current attempt runs.
* **Running** -- every pod of the current attempt runs.
* **Restarting** -- a pod failed (or vanished while the gang ran) and the failures so far are fewer than
  ``backoffLimit``: every pod is deleted with a short grace (:data:`SHORT_GRACE_SECONDS`: with a peer gone
  the survivors cannot finish a collective checkpoint; the gang resumes from the newest complete one),
  ``restarts`` (= the gang attempt) increments, and the gang is recreated once EVERY old pod is gone (pod
  names are stable, and a new rank must never rendezvous with an old rank 0 still shutting down).
  An evicted or preempted pod (condition ``DisruptionTarget``, or reason ``Evicted``/``Preempted``)
  restarts the gang the same way but is counted in ``disruptions`` instead of against ``backoffLimit``,
  and the other pods get their full grace period: the trainer's SIGTERM stop is agreed across ranks, so
  the whole gang checkpoints together.
* **Suspended** -- ``spec.runPolicy.suspend`` or an energy budget with ``onBudgetExceeded: Suspend``:
  every pod is deleted with its grace period, so the trainer checkpoints on SIGTERM (a short grace when
  the newest checkpoint already holds the newest step); ``startTime`` is cleared like a Kubernetes Job's,
  so ``activeDeadlineSeconds`` counts active time only. Resuming recreates the pods, which resume from the
  newest checkpoint.
* **Succeeded** -- rank 0 succeeded and no pod of the attempt failed or was disrupted. Rank 0 exiting 0
  *before its last step* (its termination message says so) without a suspension is no success: the
  trainer was stopped from outside after a checkpoint, so the gang restarts from it like a failed gang,
  counted against ``backoffLimit`` (why: :func:`judge_gang`).
* **Failed** -- a worker exited with a non-retryable code (``NonRetryableError``: an invalid config or a
  deterministic error, see :mod:`jest_trainer.exit_codes`; failed at once, backoff untouched), backoff
  exhausted (``BackoffLimitExceeded``, with the failed pod's reason and message),
  ``activeDeadlineSeconds`` passed (``DeadlineExceeded``), energy budget spent with ``onBudgetExceeded:
  Fail`` (``EnergyBudgetExceeded``) or a spec the schema could not reject (``InvalidSpec``, see
  :func:`invalid_spec_plan`; fixing the spec leaves this state).

Ownership: a child belongs to the job only if an ownerReference carries the job's uid (a job without a
uid, as ``jestctl run`` has, owns everything labelled with its name). A child owned by an earlier job of
the same name (deleted, its garbage not yet collected) is never adopted or counted: it is deleted, and
the names it holds are waited for. A child of the same name owned by anything else is left alone and
waited for, with condition ``Created`` False / ``NameInUse`` naming it.

Desired state: the ConfigMap and Service are compared with the builders' output through their
``jest.training/spec-hash`` annotation and patched when they differ (an edited ``spec.training`` reaches
``config.json``; the trainer reads it at the next gang start). Pods are never patched: the next gang
(re)start creates them from the current spec.

Finished jobs apply ``cleanPodPolicy`` (None keeps every pod, Running deletes pods still pending or
running, All deletes every pod); a deadline or a budget failure always stops active pods, as those are
what the limit is about; these cleanups use the short grace (rank 0 finished and checkpointed, or the job
failed and nothing resumes). ``ttlSecondsAfterFinished`` then deletes the job itself.

Conditions keep ``lastTransitionTime`` unless their ``status`` flips; events carry stable reasons
(:data:`REASONS`). Energy figures always carry ``method`` and ``source`` from the trainer's meter.
"""

from __future__ import annotations

import copy
import datetime as dt
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from jest_trainer.exit_codes import NON_RETRYABLE_EXIT_CODES

from jest_operator.api import ANNOTATION_SPEC_HASH, API_VERSION, KIND, ConditionReason, ConditionType, Phase

# The vocabulary lives in the API module (one source of truth); these plain-string aliases keep the state
# machine terse and its output serialisable by any encoder.
PHASE_PENDING = Phase.PENDING.value
PHASE_RUNNING = Phase.RUNNING.value
PHASE_RESTARTING = Phase.RESTARTING.value
PHASE_SUSPENDED = Phase.SUSPENDED.value
PHASE_SUCCEEDED = Phase.SUCCEEDED.value
PHASE_FAILED = Phase.FAILED.value
PHASES: tuple[str, ...] = tuple(phase.value for phase in Phase)
FINISHED_PHASES: frozenset[str] = frozenset({PHASE_SUCCEEDED, PHASE_FAILED})

CONDITION_TYPES: tuple[str, ...] = tuple(kind.value for kind in ConditionType)

REASON_CREATED = ConditionReason.CREATED.value
REASON_PODS_PENDING = ConditionReason.PODS_PENDING.value
REASON_ALL_PODS_RUNNING = ConditionReason.ALL_PODS_RUNNING.value
REASON_POD_FAILED = ConditionReason.POD_FAILED.value
REASON_POD_MISSING = ConditionReason.POD_MISSING.value
REASON_POD_DISRUPTED = ConditionReason.POD_DISRUPTED.value
REASON_NAME_IN_USE = ConditionReason.NAME_IN_USE.value
REASON_RESTARTING = ConditionReason.RESTARTING.value
REASON_RECOVERED = ConditionReason.RECOVERED.value
REASON_SUSPENDED = ConditionReason.SUSPENDED.value
REASON_RESUMED = ConditionReason.RESUMED.value
REASON_SUCCEEDED = ConditionReason.SUCCEEDED.value
REASON_BACKOFF_LIMIT_EXCEEDED = ConditionReason.BACKOFF_LIMIT_EXCEEDED.value
REASON_NON_RETRYABLE_ERROR = ConditionReason.NON_RETRYABLE_ERROR.value
#: The worker pods' trainer container (jest_operator.builders.CONTAINER_NAME; a test keeps them equal).
TRAINER_CONTAINER_NAME = "trainer"
REASON_DEADLINE_EXCEEDED = ConditionReason.DEADLINE_EXCEEDED.value
REASON_ENERGY_BUDGET_NEARLY_SPENT = ConditionReason.ENERGY_BUDGET_NEARLY_SPENT.value
REASON_ENERGY_BUDGET_EXCEEDED = ConditionReason.ENERGY_BUDGET_EXCEEDED.value
REASON_INVALID_SPEC = ConditionReason.INVALID_SPEC.value
REASON_SPEC_FIXED = ConditionReason.SPEC_FIXED.value
REASON_TTL_EXPIRED = ConditionReason.TTL_EXPIRED.value
REASONS: tuple[str, ...] = tuple(reason.value for reason in ConditionReason)

ENERGY_WARNING_FRACTION = 0.9
JOULES_PER_KWH = 3.6e6
LABEL_REPLICA_INDEX = "jest.training/replica-index"
ANNOTATION_ATTEMPT = "jest.training/attempt"
#: Grace period of deletions where nothing is left to checkpoint (gang restarts after a failure, cleanups of
#: finished jobs, stale pods): SIGTERM, then SIGKILL after this many seconds instead of the pod's own 120 s.
SHORT_GRACE_SECONDS = 5
#: Pod condition the API server, scheduler and kubelet set before they evict or preempt a pod.
DISRUPTION_CONDITION = "DisruptionTarget"
#: Pod status reasons of evictions and preemptions that come without the condition (older kubelets).
DISRUPTION_REASONS: frozenset[str] = frozenset({"Evicted", "Preempted", "Preempting"})


class ChildBuilder(Protocol):
    """``jest_operator.builders.build_children``: the desired children of one gang attempt."""

    def __call__(self, job: Any, *, attempt: int) -> list[dict]: ...


@dataclass(frozen=True)
class EventSpec:
    """A Kubernetes event to post on the job: ``type`` is Normal or Warning, ``reason`` one of REASONS."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class ObservedPod:
    """The facts about one child pod that the state machine needs (see :func:`observe_pod`)."""

    name: str
    index: int
    attempt: int
    phase: str
    ready: bool
    terminating: bool
    reason: str = ""
    message: str = ""
    owners: tuple[tuple[str, str], ...] = ()
    disruption: str | None = None
    exit_code: int | None = None


def job_owners(metadata: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """``(name, uid)`` of every JESTTrainingJob in an object's ownerReferences."""
    found: list[tuple[str, str]] = []
    for ref in metadata.get("ownerReferences") or []:
        if not isinstance(ref, Mapping):
            continue
        if ref.get("kind") == KIND and str(ref.get("apiVersion", "")).split("/")[0] == API_VERSION.split("/")[0]:
            found.append((str(ref.get("name", "")), str(ref.get("uid", ""))))
    return tuple(found)


Ownership = Literal["ours", "previous", "foreign"]


def ownership(owners: Iterable[tuple[str, str]], job_name: str, job_uid: str | None) -> Ownership:
    """Whose child this is: ``ours`` (an owner reference carries the job's uid, or the job has no uid at
    all, like a ``jestctl run`` manifest), ``previous`` (owned by an earlier job of the same name: garbage
    awaiting collection) or ``foreign`` (anything else holding the name)."""
    if not job_uid:
        return "ours"
    owners = tuple(owners)
    if any(uid == job_uid for _, uid in owners):
        return "ours"
    if any(name == job_name for name, _ in owners):
        return "previous"
    return "foreign"


@dataclass(frozen=True)
class ObservedChild:
    """An existing ConfigMap or Service of the job (see :func:`observe_child`)."""

    kind: str
    name: str
    owners: tuple[tuple[str, str], ...]
    spec_hash: str | None
    terminating: bool


def observe_child(child: Mapping[str, Any]) -> ObservedChild:
    """Reduce a ConfigMap/Service manifest to what the desired-state comparison needs."""
    metadata = child.get("metadata") or {}
    return ObservedChild(
        kind=str(child.get("kind", "")),
        name=str(metadata.get("name", "")),
        owners=job_owners(metadata),
        spec_hash=(metadata.get("annotations") or {}).get(ANNOTATION_SPEC_HASH),
        terminating=bool(metadata.get("deletionTimestamp")),
    )


@dataclass(frozen=True)
class TrainerProgress:
    """What the operator learned from the trainer (rank 0's metrics, or its progress file).

    Every field is optional: an endpoint may be partial. ``energy_joules`` is the job's energy so far and
    is only used together with ``energy_method`` and ``energy_source`` (never an unlabelled figure).
    """

    step: int | None = None
    total_steps: int | None = None
    examples_trained: float | None = None
    examples_scored: float | None = None
    observed_selection_ratio: float | None = None
    last_eval_accuracy: float | None = None
    loss: float | None = None
    examples_per_second: float | None = None
    step_seconds: float | None = None
    selection_overhead_fraction: float | None = None
    energy_joules: float | None = None
    average_watts: float | None = None
    energy_method: str | None = None
    energy_source: str | None = None
    checkpoint_step: int | None = None
    checkpoint_path: str | None = None
    checkpoint_time: str | None = None


@dataclass(frozen=True)
class Plan:
    """The outcome of one reconcile; ``handlers.py`` applies it in this order.

    ``create``: child manifests to create (409 counts as success). ``update``: ConfigMap/Service manifests
    whose stored copy drifted from them (patch them to this content). ``delete_pods``: pod names to delete,
    with ``delete_grace_seconds`` (None = the pod's own ``terminationGracePeriodSeconds``, so the trainer
    can checkpoint on SIGTERM). ``delete_children``: ``(kind, name)`` of ConfigMaps/Services left by an
    earlier job of the same name. ``spec_patch``: a merge patch of ``spec`` (energy-budget suspension).
    ``status``: the complete new status block (patch it only when it differs from the old one).
    ``delete_job``: the TTL after finishing has passed. ``restarted``: a gang restart began.
    """

    status: dict[str, Any]
    create: tuple[dict, ...] = ()
    update: tuple[dict, ...] = ()
    delete_pods: tuple[str, ...] = ()
    delete_grace_seconds: int | None = None
    delete_children: tuple[tuple[str, str], ...] = ()
    events: tuple[EventSpec, ...] = ()
    spec_patch: dict[str, Any] | None = None
    delete_job: bool = False
    restarted: bool = False


def format_time(moment: dt.datetime) -> str:
    """RFC 3339 in UTC with second precision, the Kubernetes wire format of timestamps."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> dt.datetime | None:
    """Parse a Kubernetes timestamp (``...Z`` or with an offset); None or garbage gives None."""
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def observe_pod(pod: Mapping[str, Any]) -> ObservedPod:
    """Reduce a pod manifest to :class:`ObservedPod`.

    The replica index comes from the ``jest.training/replica-index`` label (else -1: not a valid rank), the
    attempt from the ``jest.training/attempt`` annotation (else 0). ``ready`` is the pod's Ready condition;
    ``reason``/``message`` come from the pod status or, failing that, its first terminated container.
    ``owners`` are its JESTTrainingJob owner references; ``disruption`` says why it is being evicted or
    preempted (condition ``DisruptionTarget`` True, or reason Evicted/Preempted), else None.
    """
    metadata = pod.get("metadata") or {}
    status = pod.get("status") or {}
    labels = metadata.get("labels") or {}
    annotations = metadata.get("annotations") or {}
    index = _as_int(labels.get(LABEL_REPLICA_INDEX), -1)
    attempt = _as_int(annotations.get(ANNOTATION_ATTEMPT), 0)
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )
    reason = str(status.get("reason") or "")
    message = str(status.get("message") or "")
    disruption: str | None = None
    for condition in status.get("conditions") or []:
        if condition.get("type") == DISRUPTION_CONDITION and condition.get("status") == "True":
            disruption = ": ".join(str(x) for x in (condition.get("reason"), condition.get("message")) if x) or (
                DISRUPTION_CONDITION)
    if disruption is None and reason in DISRUPTION_REASONS:
        disruption = ": ".join(x for x in (reason, message) if x)
    exit_code: int | None = None
    explained = bool(reason or message)
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated") or {}
        if not terminated:
            continue
        if not explained:
            reason = str(terminated.get("reason") or f"ExitCode{terminated.get('exitCode', '?')}")
            message = str(terminated.get("message") or "")
            explained = True
        if container.get("name") == TRAINER_CONTAINER_NAME and isinstance(terminated.get("exitCode"), int):
            exit_code = int(terminated["exitCode"])
    return ObservedPod(
        name=str(metadata.get("name", "")),
        index=index,
        attempt=attempt,
        phase=str(status.get("phase") or "Pending"),
        ready=ready,
        terminating=bool(metadata.get("deletionTimestamp")),
        reason=reason,
        message=message,
        owners=job_owners(metadata),
        disruption=disruption,
        exit_code=exit_code,
    )


def _as_int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def status_dict(status: Any) -> dict[str, Any]:
    """The job's current status as a camelCase dict, whatever form it came in (model, dict or None)."""
    if status is None:
        return {}
    if hasattr(status, "model_dump"):
        return status.model_dump(mode="json", by_alias=True, exclude_none=True)
    return copy.deepcopy(dict(status))


def set_condition(
    conditions: list[dict[str, Any]], type_: str, status: bool, reason: str, message: str, now: dt.datetime
) -> None:
    """Set one condition in place; ``lastTransitionTime`` changes only when its status flips."""
    wire_status = "True" if status else "False"
    for condition in conditions:
        if condition.get("type") == type_:
            if condition.get("status") != wire_status or not condition.get("lastTransitionTime"):
                condition["lastTransitionTime"] = format_time(now)
            condition.update(status=wire_status, reason=reason, message=message)
            return
    conditions.append(
        {
            "type": type_,
            "status": wire_status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": format_time(now),
        }
    )
    order = {name: i for i, name in enumerate(CONDITION_TYPES)}
    conditions.sort(key=lambda c: order.get(str(c.get("type")), len(order)))


def get_condition(status: Mapping[str, Any], type_: str) -> dict[str, Any] | None:
    """The condition of that type, or None."""
    for condition in status.get("conditions") or []:
        if condition.get("type") == type_:
            return condition
    return None


def condition_is_true(status: Mapping[str, Any], type_: str) -> bool:
    """Whether the condition exists with status True."""
    condition = get_condition(status, type_)
    return condition is not None and condition.get("status") == "True"


def merge_progress(status: dict[str, Any], progress: TrainerProgress | None, *, total_steps: int,
                   carbon_intensity: float | None, checkpoint_dir: str | None = None) -> None:
    """Fold trainer progress into ``status`` in place (progress, throughput, energy, checkpoint).

    Missing values keep what the status already had, so an unreachable or partial endpoint never erases
    known progress. Energy joules never decrease (a restarted trainer's counters start again until it
    restores its checkpoint). ``joulesPerExample`` = joules / examplesTrained; ``co2eGrams`` = kWh x the
    configured carbon intensity. Energy is only written with its ``method`` and ``source``. A checkpoint
    known only by its step (rank 0's ``jest_checkpoint_step``) gets the trainer's file name in
    ``checkpoint_dir`` (``ckpt-<step:08d>.pt``, the trainer's checkpoint contract).
    """
    prog = dict(status.get("progress") or {})
    prog.setdefault("totalSteps", total_steps)
    thr = dict(status.get("throughput") or {})
    energy = dict(status.get("energy") or {})
    if progress is not None:
        _put(prog, "step", progress.step)
        _put(prog, "totalSteps", progress.total_steps)
        _put(prog, "examplesTrained", _int_or_none(progress.examples_trained))
        _put(prog, "examplesScored", _int_or_none(progress.examples_scored))
        _put(prog, "observedSelectionRatio", progress.observed_selection_ratio)
        _put(prog, "lastEvalAccuracy", progress.last_eval_accuracy)
        _put(thr, "examplesPerSecond", progress.examples_per_second)
        _put(thr, "stepSeconds", progress.step_seconds)
        _put(thr, "selectionOverheadFraction", progress.selection_overhead_fraction)
        if progress.energy_joules is not None and progress.energy_method and progress.energy_source:
            energy["joules"] = max(float(energy.get("joules") or 0.0), float(progress.energy_joules))
            energy["method"] = progress.energy_method
            energy["source"] = progress.energy_source
            _put(energy, "averageWatts", progress.average_watts)
        checkpoint_path = progress.checkpoint_path
        if checkpoint_path is None and progress.checkpoint_step is not None and checkpoint_dir:
            checkpoint_path = posixpath.join(checkpoint_dir, f"ckpt-{progress.checkpoint_step:08d}.pt")
        if progress.checkpoint_step is not None and checkpoint_path:
            checkpoint = {"step": progress.checkpoint_step, "path": checkpoint_path}
            _put(checkpoint, "time", progress.checkpoint_time)
            status["checkpoint"] = checkpoint
    if "joules" in energy:
        energy["kilojoules"] = round(float(energy["joules"]) / 1000.0, 3)
        trained = prog.get("examplesTrained")
        if trained:
            energy["joulesPerExample"] = float(energy["joules"]) / float(trained)
        if carbon_intensity is not None:
            energy["co2eGrams"] = float(energy["joules"]) / JOULES_PER_KWH * carbon_intensity
    status["progress"] = prog
    if thr:
        status["throughput"] = thr
    if energy:
        status["energy"] = energy


def _put(target: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        target[key] = value


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else round(value)


@dataclass
class _JobFacts:
    """The handful of spec fields the state machine reads (one place that knows the API's attribute names)."""

    name: str
    uid: str | None
    generation: int | None
    num_nodes: int
    total_steps: int
    suspend: bool
    backoff_limit: int
    active_deadline_seconds: int | None
    ttl_seconds_after_finished: int | None
    clean_pod_policy: str
    budget_joules: float | None
    on_budget_exceeded: str
    carbon_intensity: float | None
    checkpoint_dir: str

    @classmethod
    def of(cls, job: Any) -> _JobFacts:
        spec = job.spec
        policy = getattr(spec, "run_policy", None)
        energy = getattr(spec, "energy", None)
        return cls(
            name=job.metadata.name,
            uid=getattr(job.metadata, "uid", None),
            generation=getattr(job.metadata, "generation", None),
            num_nodes=int(spec.num_nodes),
            total_steps=int(spec.training.steps),
            suspend=bool(getattr(policy, "suspend", False)),
            backoff_limit=int(getattr(policy, "backoff_limit", 3) or 0),
            active_deadline_seconds=getattr(policy, "active_deadline_seconds", None),
            ttl_seconds_after_finished=getattr(policy, "ttl_seconds_after_finished", None),
            clean_pod_policy=str(getattr(policy, "clean_pod_policy", "Running") or "Running"),
            budget_joules=getattr(energy, "budget_joules", None),
            on_budget_exceeded=str(getattr(energy, "on_budget_exceeded", "Warn") or "Warn"),
            carbon_intensity=getattr(energy, "carbon_intensity_grams_per_k_wh", None),
            checkpoint_dir=str(spec.training.checkpoint.dir),
        )

    def policy(self) -> GangPolicy:
        """The fields :func:`judge_gang` reads."""
        return GangPolicy(
            name=self.name, num_nodes=self.num_nodes, backoff_limit=self.backoff_limit, total_steps=self.total_steps,
            suspend=self.suspend, active_deadline_seconds=self.active_deadline_seconds,
            budget_joules=self.budget_joules, on_budget_exceeded=self.on_budget_exceeded,
        )


@dataclass
class _Draft:
    """Mutable working state of one :func:`plan` call."""

    status: dict[str, Any]
    now: dt.datetime
    events: list[EventSpec] = field(default_factory=list)
    create: list[dict] = field(default_factory=list)
    update: list[dict] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    delete_children: list[tuple[str, str]] = field(default_factory=list)
    grace: int | None = SHORT_GRACE_SECONDS

    def condition(self, type_: str, value: bool, reason: str, message: str) -> None:
        set_condition(self.status.setdefault("conditions", []), type_, value, reason, message, self.now)

    def clear(self, type_: str, reason: str, message: str = "") -> None:
        """Set a condition False, but only if it exists (no noise for conditions never raised)."""
        if get_condition(self.status, type_) is not None:
            self.condition(type_, False, reason, message)

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.events.append(EventSpec(type_, reason, message))

    def delete_pods(self, pods: Iterable[ObservedPod]) -> None:
        for pod in pods:
            if not pod.terminating and pod.name not in self.delete:
                self.delete.append(pod.name)



# ------------------------------------------------------------------------------------------- gang verdict
@dataclass(frozen=True)
class GangPolicy:
    """The spec fields that decide a gang's phase. The operator reads them from the job (``_JobFacts``);
    ``jestctl run`` from the same job, with ``suspend`` standing for its stop request (Ctrl-C, SIGTERM)."""

    name: str
    num_nodes: int
    backoff_limit: int
    total_steps: int | None = None
    suspend: bool = False
    active_deadline_seconds: float | None = None
    budget_joules: float | None = None
    on_budget_exceeded: str = "Warn"


@dataclass(frozen=True)
class GangObservation:
    """What is known about the current attempt of a gang, whoever runs it.

    ``pods``: the attempt's pods (those being deleted included: an eviction is seen on a terminating pod);
    ``progress``: what the trainer reported with this observation (not an older status, so a clean exit is
    judged by the exited trainer's own last word: its termination message, or ``jestctl``'s progress file);
    ``restarts`` / ``disruptions``: gang restarts so far, and how many of them were evictions (not counted
    against ``backoffLimit``); ``active_seconds``: time active since the start or the last resume;
    ``energy_joules``: the job's energy so far; ``was_running``: whether every pod had been running (a pod
    missing from a running gang vanished; from a starting one it is merely not created yet).
    """

    pods: tuple[ObservedPod, ...]
    progress: TrainerProgress | None = None
    restarts: int = 0
    disruptions: int = 0
    active_seconds: float = 0.0
    energy_joules: float | None = None
    was_running: bool = False


@dataclass(frozen=True)
class GangVerdict:
    """The phase a gang attempt leads to, and why.

    ``phase``: Running or Pending (nothing to do), Succeeded, Suspended or Failed (stop the workers), or
    Restarting (stop the workers, start attempt+1 from the newest checkpoint). ``reason`` is one of
    :data:`REASONS` (for Restarting: PodFailed, PodMissing or PodDisrupted). ``message`` is the sentence
    for the condition; ``detail`` says what went wrong without what is done about it (failures only);
    ``culprit`` is the pod blamed, if any.
    """

    phase: str
    reason: str
    message: str
    detail: str = ""
    culprit: ObservedPod | None = None


def stopped_early(progress: TrainerProgress | None, total_steps: int | None) -> bool:
    """Whether the trainer's report says it stopped before its last step (``total_steps`` unless it says).

    Without a step the question cannot be answered and the exit code alone decides (False).
    """
    if progress is None or progress.step is None:
        return False
    total = progress.total_steps if progress.total_steps is not None else total_steps
    return total is not None and progress.step < total


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def judge_gang(policy: GangPolicy, seen: GangObservation) -> GangVerdict:
    """The one gang state machine: the phase of a gang attempt for what was observed (pure).

    The operator (:func:`plan`) and ``jestctl run`` (``jest_operator.local.GangRunner``) both ask it, each
    with its own observations turned into :class:`ObservedPod` and :class:`TrainerProgress`, so the same
    facts give the same phase whether a cluster or a laptop runs the gang. In order of precedence:

    1. **Succeeded**: rank 0 exited 0 at its last step and no pod of the attempt failed or was disrupted.
    2. **Suspended**: the energy budget is spent with ``onBudgetExceeded: Suspend``, or suspension is
       requested (``spec.runPolicy.suspend``; ``jestctl``'s Ctrl-C/SIGTERM): the trainer checkpoints on the
       SIGTERM that follows and exits 0.
    3. **Failed**: ``activeDeadlineSeconds`` passed (DeadlineExceeded); the budget is spent with ``Fail``.
    4. **Restarting** (PodDisrupted): a pod was evicted or preempted; never counted against backoffLimit.
    5. **Failed** (NonRetryableError): a worker exited with a code of
       :data:`jest_trainer.exit_codes.NON_RETRYABLE_EXIT_CODES`; the same inputs would fail again.
    6. **Restarting**, or **Failed** (BackoffLimitExceeded) once ``restarts - disruptions`` reaches
       ``backoffLimit``: a worker failed (PodFailed), a pod vanished from a running gang (PodMissing), or
       rank 0 exited 0 *before its last step* without a suspension (PodFailed, see below).
    7. Otherwise **Running** when every pod runs, else **Pending**.

    An early clean exit: the trainer exits 0 before its last step only after a stop request (SIGTERM),
    having checkpointed. When the gang's controller asked (a suspension), the job is Suspended by rule 2.
    Otherwise the stop came from outside (a ``kill`` of a local worker, a pod deleted or its node shut down
    without an eviction condition): calling that Succeeded would report an unfinished model as trained, and
    calling it Suspended would park a job nobody suspended. So the gang restarts from that checkpoint, the
    way a vanished pod restarts it, and the restart counts against ``backoffLimit`` (nothing proves it was
    a disruption, and a trainer that keeps stopping early must not restart forever). "Before its last
    step" is read from ``seen.progress``; without a step, exit 0 means Succeeded.
    """
    current = [p for p in seen.pods if not p.terminating]
    disrupted = [p for p in seen.pods if p.disruption is not None]
    failed = [p for p in current if p.phase == "Failed"]
    rank0 = next((p for p in current if p.index == 0), None)
    rank0_exited_clean = rank0 is not None and rank0.phase == "Succeeded"
    early = rank0_exited_clean and stopped_early(seen.progress, policy.total_steps)
    if rank0_exited_clean and not early and not failed and not disrupted:
        return GangVerdict(PHASE_SUCCEEDED, REASON_SUCCEEDED, "rank 0 finished training")

    budget = policy.budget_joules
    budget_spent = budget is not None and float(seen.energy_joules or 0.0) >= float(budget)
    if budget_spent and policy.on_budget_exceeded == "Suspend":
        return GangVerdict(PHASE_SUSPENDED, REASON_ENERGY_BUDGET_EXCEEDED,
                           f"energy budget of {budget:.6g} J is spent; the workers are stopped after a checkpoint")
    if policy.suspend:
        return GangVerdict(PHASE_SUSPENDED, REASON_SUSPENDED,
                           "suspension requested; the workers are stopped after a checkpoint")
    deadline = policy.active_deadline_seconds
    if deadline is not None and seen.active_seconds >= deadline:
        return GangVerdict(PHASE_FAILED, REASON_DEADLINE_EXCEEDED,
                           f"the job was active longer than activeDeadlineSeconds ({_seconds(deadline)} s)")
    if budget_spent and policy.on_budget_exceeded == "Fail":
        return GangVerdict(PHASE_FAILED, REASON_ENERGY_BUDGET_EXCEEDED, f"energy budget of {budget:.6g} J is spent")

    if disrupted:
        culprit = disrupted[0]
        detail = f"pod {culprit.name} (rank {culprit.index}) was evicted or preempted ({culprit.disruption})"
        return GangVerdict(PHASE_RESTARTING, REASON_POD_DISRUPTED, f"{detail}; restarting the gang from its checkpoint",
                           detail=detail, culprit=culprit)

    non_retryable = [p for p in failed if p.exit_code in NON_RETRYABLE_EXIT_CODES]
    culprit = (non_retryable or failed or [None])[0]
    reason, detail = REASON_POD_FAILED, ""
    if culprit is not None:
        why = ": ".join(x for x in (culprit.reason, culprit.message) if x) or "no reason given"
        detail = f"pod {culprit.name} (rank {culprit.index}) failed: {why}"
    elif early and rank0 is not None and seen.progress is not None:
        culprit = rank0
        total = seen.progress.total_steps if seen.progress.total_steps is not None else policy.total_steps
        detail = (f"pod {rank0.name} (rank 0) exited 0 at step {seen.progress.step} of {total}, before the last "
                  "step, without a suspension (stopped from outside, e.g. SIGTERM)")
    if non_retryable and culprit is not None:
        return GangVerdict(PHASE_FAILED, REASON_NON_RETRYABLE_ERROR,
                           f"{detail} (exit code {culprit.exit_code}: an error the same inputs raise again; "
                           "not retried)", detail=detail, culprit=culprit)
    present = {p.index for p in current}
    missing = [i for i in range(policy.num_nodes) if i not in present]
    if seen.was_running and missing:
        reason = REASON_POD_MISSING
        detail = f"pod {policy.name}-node-{missing[0]} (rank {missing[0]}) disappeared while the gang ran"
        culprit = None
    if detail:
        failures = seen.restarts - seen.disruptions
        if failures >= policy.backoff_limit:
            return GangVerdict(PHASE_FAILED, REASON_BACKOFF_LIMIT_EXCEEDED,
                               f"{detail}; backoffLimit ({policy.backoff_limit}) reached", detail=detail,
                               culprit=culprit)
        return GangVerdict(PHASE_RESTARTING, reason,
                           f"{detail}; restarting the gang (failure {failures + 1} of backoffLimit "
                           f"{policy.backoff_limit})", detail=detail, culprit=culprit)

    running = [p for p in current if p.phase == "Running"]
    if len(running) == policy.num_nodes:
        return GangVerdict(PHASE_RUNNING, REASON_ALL_PODS_RUNNING, f"all {policy.num_nodes} worker pod(s) are running")
    return GangVerdict(PHASE_PENDING, REASON_PODS_PENDING, f"{len(running)} of {policy.num_nodes} pod(s) running")


def plan(
    job: Any,
    observed_pods: Iterable[Mapping[str, Any]],
    progress: TrainerProgress | None,
    now: dt.datetime,
    *,
    build_children: ChildBuilder | None = None,
    existing_children: Iterable[Mapping[str, Any]] | None = None,
    previous_status: Mapping[str, Any] | None = None,
) -> Plan:
    """Decide the next step for one valid job (see the module docstring for the state machine).

    ``job`` is a parsed ``jest_operator.api.JESTTrainingJob`` whose ``status`` is the last written one;
    ``observed_pods`` are the pod manifests labelled with the job's name (ownership is decided here, by
    uid); ``progress`` is what the trainer reported (None when unreachable). ``build_children`` defaults to
    ``jest_operator.builders.build_children``; ``existing_children`` are the stored ConfigMap/Service
    manifests labelled with the job's name (None = unknown: then both are in ``create``, a 409 counts as
    success, and drift is not checked). ``previous_status`` overrides ``job.status`` (the handler passes
    the raw stored status, which may hold fields this version's model would reject).
    """
    if build_children is None:
        from jest_operator.builders import build_children as default_builder

        build_children = default_builder
    facts = _JobFacts.of(job)
    previous = status_dict(job.status if previous_status is None else previous_status)
    draft = _Draft(status=copy.deepcopy(previous), now=now)
    status = draft.status
    if facts.generation is not None:
        status["observedGeneration"] = facts.generation
    status.setdefault("restarts", 0)
    merge_progress(status, progress, total_steps=facts.total_steps, carbon_intensity=facts.carbon_intensity,
                   checkpoint_dir=facts.checkpoint_dir)

    everything = sorted((observe_pod(p) for p in observed_pods), key=lambda p: (p.index, p.name))
    owner = {p: ownership(p.owners, facts.name, facts.uid) for p in everything}
    pods = [p for p in everything if owner[p] == "ours"]
    others = [p for p in everything if owner[p] != "ours"]
    # Garbage of an earlier job with this name: never adopted or counted; removed (GC would, later).
    draft.delete_pods(p for p in others if owner[p] == "previous")
    attempt = int(status.get("restarts") or 0)
    live = [p for p in pods if not p.terminating]
    gang = [p for p in pods if p.attempt == attempt and 0 <= p.index < facts.num_nodes]
    current = [p for p in gang if not p.terminating]
    stale = [p for p in live if p not in current]
    replicas = _replica_counts(current)
    status["replicas"] = {**replicas, "total": facts.num_nodes}
    status["nodes"] = f"{replicas['ready']}/{facts.num_nodes}"

    phase = previous.get("phase")
    if phase == PHASE_FAILED and _failed_reason(previous) == REASON_INVALID_SPEC:
        draft.condition("Failed", False, REASON_SPEC_FIXED, "the spec is valid again")
        draft.event("Normal", REASON_SPEC_FIXED, "the spec is valid again; reconciling")
        phase = None
        status["phase"] = PHASE_PENDING
    if phase in FINISHED_PHASES:
        return _finished(draft, facts, pods)

    _energy_events(draft, facts, previous)
    started = parse_time(status.get("startTime"))
    verdict = judge_gang(facts.policy(), GangObservation(
        pods=tuple(gang),
        progress=progress,
        restarts=attempt,
        disruptions=int(status.get("disruptions") or 0),
        active_seconds=0.0 if started is None else (now - started).total_seconds(),
        energy_joules=float((status.get("energy") or {}).get("joules") or 0.0),
        was_running=phase == PHASE_RUNNING,
    ))
    if verdict.phase == PHASE_SUCCEEDED:
        return _finish(draft, facts, pods, PHASE_SUCCEEDED, verdict.reason, verdict.message)
    if verdict.phase == PHASE_SUSPENDED:
        # level-based: also when the spec patch already landed but the status write did not (a 409 re-plan)
        budget_patch = verdict.reason == REASON_ENERGY_BUDGET_EXCEEDED and not facts.suspend
        return _suspend(draft, live, verdict.reason, {"runPolicy": {"suspend": True}} if budget_patch else None)
    if phase == PHASE_SUSPENDED:
        draft.condition("Suspended", False, REASON_RESUMED, "the job was resumed")
        draft.event("Normal", REASON_RESUMED, "resumed; recreating the worker pods")
        phase = PHASE_PENDING

    if "startTime" not in status:
        status["startTime"] = format_time(now)
    if verdict.reason in (REASON_DEADLINE_EXCEEDED, REASON_ENERGY_BUDGET_EXCEEDED):
        # the limit is about what the active pods spend: stop them whatever cleanPodPolicy says
        draft.delete_pods(p for p in live if p.phase in ("Pending", "Running", "Unknown"))
        return _finish(draft, facts, pods, PHASE_FAILED, verdict.reason, verdict.message)
    if verdict.reason == REASON_POD_DISRUPTED and verdict.culprit is not None:
        return _disruption_restart(draft, facts, live, verdict.culprit)
    if verdict.phase == PHASE_FAILED:
        draft.delete_pods(stale)
        return _finish(draft, facts, pods, PHASE_FAILED, verdict.reason, verdict.message)
    if verdict.phase == PHASE_RESTARTING:
        draft.delete_pods(live)
        status["restarts"] = attempt + 1
        status["phase"] = PHASE_RESTARTING
        draft.condition("Restarting", True, verdict.reason, verdict.message)
        draft.condition("Running", False, REASON_RESTARTING, verdict.message)
        draft.event("Warning", REASON_RESTARTING, verdict.message)
        return _result(draft, spec_patch=None, restarted=True)

    # Normal progress: drop stale pods, bring the ConfigMap/Service to the desired state, and create the
    # missing pods once no other pod holds any of the gang's names.
    draft.delete_pods(stale)
    present = {p.index for p in current}
    missing = [i for i in range(facts.num_nodes) if i not in present]
    desired = build_children(job, attempt=attempt)
    blockers = _reconcile_children(draft, facts, desired, existing_children)
    gang_names = {str((c.get("metadata") or {}).get("name")) for c in desired if c.get("kind") == "Pod"}
    blockers += [f"pod {p.name} is {_holder(owner[p])}" for p in others if p.name in gang_names]
    waiting_for_old_pods = any(p.name in gang_names for p in pods if p not in current)
    created_pods = 0
    if missing and not blockers and not waiting_for_old_pods:
        for child in desired:
            if child.get("kind") != "Pod":
                continue
            index = _as_int(((child.get("metadata") or {}).get("labels") or {}).get(LABEL_REPLICA_INDEX), -1)
            if index in missing:
                draft.create.append(child)
                created_pods += 1
    if missing and blockers:
        draft.condition("Created", False, REASON_NAME_IN_USE,
                        f"waiting: {'; '.join(blockers)}; the worker pods are created once it is gone")
    if created_pods and not condition_is_true(status, "Created"):
        draft.condition("Created", True, REASON_CREATED, f"created {created_pods} worker pod(s)")
        draft.event("Normal", REASON_CREATED, f"created {created_pods} worker pod(s) for attempt {attempt}")

    if verdict.phase == PHASE_RUNNING:
        status["phase"] = PHASE_RUNNING
        if not condition_is_true(status, "Running"):
            draft.event("Normal", verdict.reason, verdict.message)
        draft.condition("Running", True, verdict.reason, verdict.message)
        if condition_is_true(status, "Restarting"):
            draft.condition("Restarting", False, REASON_RECOVERED, f"the gang runs again (attempt {attempt})")
    else:
        # a gang being recreated stays Restarting until it runs again
        status["phase"] = PHASE_RESTARTING if phase == PHASE_RESTARTING else PHASE_PENDING
        if status["phase"] == PHASE_PENDING:
            draft.clear("Running", verdict.reason, verdict.message)
    return _result(draft, spec_patch=None)


def _holder(owner: Ownership) -> str:
    if owner == "previous":
        return "left by a deleted job of the same name (being removed)"
    return "not owned by this job (another object holds the name)"


def _reconcile_children(draft: _Draft, facts: _JobFacts, desired: list[dict],
                        existing: Iterable[Mapping[str, Any]] | None) -> list[str]:
    """Create, patch or wait for the ConfigMap and Service; returns why pods must wait (empty: they need not)."""
    observed = None if existing is None else {
        (child.kind, child.name): child for child in (observe_child(c) for c in existing)
    }
    blockers: list[str] = []
    for child in desired:
        kind = str(child.get("kind"))
        if kind == "Pod":
            continue
        metadata = child.get("metadata") or {}
        name = str(metadata.get("name"))
        found = None if observed is None else observed.get((kind, name))
        if found is None:
            draft.create.append(child)
            continue
        owner = ownership(found.owners, facts.name, facts.uid)
        if found.terminating:
            blockers.append(f"{kind} {name} is being deleted")
        elif owner == "ours":
            if found.spec_hash != (metadata.get("annotations") or {}).get(ANNOTATION_SPEC_HASH):
                draft.update.append(child)
        else:
            if owner == "previous":
                draft.delete_children.append((kind, name))
            blockers.append(f"{kind} {name} is {_holder(owner)}")
    return blockers


def _disruption_restart(draft: _Draft, facts: _JobFacts, live: list[ObservedPod], culprit: ObservedPod) -> Plan:
    """An evicted/preempted pod: restart the gang, counted in ``disruptions``, never against backoffLimit.

    The other pods keep their full grace period: the trainer agrees a SIGTERM stop across ranks, so the
    gang writes one checkpoint together and the next attempt resumes from it.
    """
    status = draft.status
    restarts = int(status.get("restarts") or 0)
    disruptions = int(status.get("disruptions") or 0) + 1
    draft.delete_pods(live)
    draft.grace = None
    status["restarts"] = restarts + 1
    status["disruptions"] = disruptions
    status["phase"] = PHASE_RESTARTING
    message = (
        f"pod {culprit.name} (rank {culprit.index}) was evicted or preempted ({culprit.disruption}); restarting "
        f"the gang from its checkpoint (disruption {disruptions}, not counted against backoffLimit "
        f"{facts.backoff_limit})"
    )
    draft.condition("Restarting", True, REASON_POD_DISRUPTED, message)
    draft.condition("Running", False, REASON_RESTARTING, message)
    draft.event("Warning", REASON_POD_DISRUPTED, message)
    return _result(draft, spec_patch=None, restarted=True)


def _failed_reason(status: Mapping[str, Any]) -> str | None:
    condition = get_condition(status, "Failed")
    if condition is None or condition.get("status") != "True":
        return None
    return str(condition.get("reason"))


def _replica_counts(pods: Iterable[ObservedPod]) -> dict[str, int]:
    counts = {"active": 0, "ready": 0, "succeeded": 0, "failed": 0}
    for pod in pods:
        if pod.phase in ("Pending", "Running", "Unknown"):
            counts["active"] += 1
        if pod.phase == "Running" and pod.ready:
            counts["ready"] += 1
        if pod.phase == "Succeeded":
            counts["succeeded"] += 1
        if pod.phase == "Failed":
            counts["failed"] += 1
    return counts


def _energy_events(draft: _Draft, facts: _JobFacts, previous: Mapping[str, Any]) -> None:
    """Warning events when the energy crosses 90 % and 100 % of the budget (each crossing once)."""
    if facts.budget_joules is None:
        return
    budget = float(facts.budget_joules)
    before = float((previous.get("energy") or {}).get("joules") or 0.0)
    after = float((draft.status.get("energy") or {}).get("joules") or 0.0)
    if before < budget <= after:
        action = {"Warn": "continuing (onBudgetExceeded: Warn)", "Suspend": "suspending after a checkpoint",
                  "Fail": "failing the job"}.get(facts.on_budget_exceeded, facts.on_budget_exceeded)
        draft.event("Warning", REASON_ENERGY_BUDGET_EXCEEDED,
                    f"energy {after:.6g} J reached the budget of {budget:.6g} J; {action}")
    elif before < ENERGY_WARNING_FRACTION * budget <= after:
        draft.event("Warning", REASON_ENERGY_BUDGET_NEARLY_SPENT,
                    f"energy {after:.6g} J is over {ENERGY_WARNING_FRACTION:.0%} of the budget of {budget:.6g} J")


def checkpoint_is_current(status: Mapping[str, Any]) -> bool:
    """Whether the newest checkpoint holds the newest step the trainer reported (nothing left to save)."""
    checkpoint = status.get("checkpoint") or {}
    step = (status.get("progress") or {}).get("step")
    return isinstance(step, int) and step > 0 and isinstance(checkpoint.get("step"), int) and (
        checkpoint["step"] >= step)


def _suspend(draft: _Draft, live: list[ObservedPod], reason: str, spec_patch: dict[str, Any] | None) -> Plan:
    status = draft.status
    draft.delete_pods(live)
    draft.grace = SHORT_GRACE_SECONDS if checkpoint_is_current(status) else None
    was_suspended = condition_is_true(status, "Suspended")
    if not was_suspended:
        message = (
            "energy budget spent; pods are stopped after a checkpoint"
            if reason == REASON_ENERGY_BUDGET_EXCEEDED
            else "spec.runPolicy.suspend is true; pods are stopped after a checkpoint"
        )
        draft.condition("Suspended", True, reason, message)
        draft.event("Normal", REASON_SUSPENDED, message)
    status["phase"] = PHASE_SUSPENDED
    status.pop("startTime", None)
    draft.clear("Running", REASON_SUSPENDED, "the job is suspended")
    return _result(draft, spec_patch=spec_patch)


def _finish(
    draft: _Draft,
    facts: _JobFacts,
    pods: list[ObservedPod],
    phase: str,
    reason: str,
    message: str,
) -> Plan:
    """Transition to Succeeded or Failed now, then behave like an already finished job."""
    status = draft.status
    status["phase"] = phase
    status["completionTime"] = format_time(draft.now)
    draft.condition(phase, True, reason, message)
    draft.clear("Running", reason, message)
    draft.clear("Restarting", reason, message)
    draft.event("Normal" if phase == PHASE_SUCCEEDED else "Warning", reason, message)
    return _finished(draft, facts, pods)


def _finished(draft: _Draft, facts: _JobFacts, pods: list[ObservedPod]) -> Plan:
    """A finished job: apply cleanPodPolicy (short grace: nothing resumes), then the TTL."""
    policy = facts.clean_pod_policy
    if policy == "All":
        draft.delete_pods(pods)
    elif policy == "Running":
        draft.delete_pods(p for p in pods if p.phase in ("Pending", "Running", "Unknown"))
    completed = parse_time(draft.status.get("completionTime")) or draft.now
    draft.status.setdefault("completionTime", format_time(completed))
    delete_job = False
    ttl = facts.ttl_seconds_after_finished
    if ttl is not None and (draft.now - completed).total_seconds() >= ttl:
        delete_job = True
        draft.event("Normal", REASON_TTL_EXPIRED, f"deleting the job {ttl} s after it finished "
                    "(ttlSecondsAfterFinished)")
    plan_ = _result(draft, spec_patch=None)
    return Plan(**{**plan_.__dict__, "delete_job": delete_job})


def _result(draft: _Draft, *, spec_patch: dict[str, Any] | None, restarted: bool = False) -> Plan:
    return Plan(
        status=draft.status,
        create=tuple(draft.create),
        update=tuple(draft.update),
        delete_pods=tuple(draft.delete),
        delete_grace_seconds=draft.grace if draft.delete else None,
        delete_children=tuple(draft.delete_children),
        events=tuple(draft.events),
        spec_patch=spec_patch,
        restarted=restarted,
    )


def invalid_spec_plan(previous_status: Any, *, field_path: str, message: str, generation: int | None,
                      now: dt.datetime) -> Plan:
    """The plan for a spec the schema let through but the operator rejects: Failed/InvalidSpec, NO children.

    The event is emitted only when the message changes, so the resync timer does not repeat it.
    """
    draft = _Draft(status=status_dict(previous_status), now=now)
    full_message = f"{field_path}: {message}" if field_path else message
    condition = get_condition(draft.status, "Failed")
    if condition is None or condition.get("status") != "True" or condition.get("message") != full_message:
        draft.event("Warning", REASON_INVALID_SPEC, full_message)
    draft.status["phase"] = PHASE_FAILED
    if generation is not None:
        draft.status["observedGeneration"] = generation
    draft.condition("Failed", True, REASON_INVALID_SPEC, full_message)
    return _result(draft, spec_patch=None)


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new``; empty when they are equal.

    Removed keys become None, nested dicts are diffed recursively, lists and scalars are replaced whole.
    """
    patch: dict[str, Any] = {}
    for key in old:
        if key not in new:
            patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            nested = merge_patch(before, value)
            if nested:
                patch[key] = nested
        elif key not in old or before != value:
            patch[key] = copy.deepcopy(value)
    return patch
