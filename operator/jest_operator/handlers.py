"""Kopf handlers: thin wiring of observe -> plan -> apply -> ONE status patch.

Every trigger ends in :func:`request_reconcile` for one job, which runs :func:`reconcile_job` in a worker
thread: GET the job, take its pods, ConfigMap and Service from the watch-fed indexes (LIST them before
the indexes exist), scrape the workers' metrics, call the pure :func:`jest_operator.status.plan` (or
:func:`~jest_operator.status.invalid_spec_plan` when :func:`jest_operator.api.parse_job` raises
``InvalidSpec``), apply the plan through :mod:`jest_operator.kube`, and merge-patch the status once, only
if it changed, conditionally on the resourceVersion that was read: a 409 (the job changed meanwhile)
re-reads and re-plans, so no status write is computed from a stale read. Events are posted with
``kopf.event`` (stable reasons from ``status.REASONS``). Reconciles of one job never overlap: a per-job
lock serialises them and triggers arriving meanwhile coalesce into one more run.

Triggers:
* ``on.create`` / ``on.resume`` / ``on.update`` of the job, and ``on.field('spec.runPolicy.suspend')``;
* ``on.event`` of the job: bookkeeping of known jobs and, on deletion, removal of its children (owner
  references let a real cluster's garbage collector do it; this covers clusters/emulators without one
  and an operator that was down);
* ``on.event`` of pods labelled ``app.kubernetes.io/managed-by=jest-operator``: fast reaction to phases;
* ``@kopf.index`` of those pods, and of the operator's ConfigMaps and Services, by job: reconciles read
  them there instead of LISTs per job (the job itself is always read with a GET, as its status is the
  state machine's memory); a ConfigMap/Service being deleted reconciles its job at once;
* a resync loop (every ``resync_seconds``, default 5 s) over every known job: level-based progress,
  deadlines, TTLs and metrics scraping. It is an operator-level task rather than ``@kopf.timer`` because
  Kopf timers (and daemons) put a finalizer on every job, and the operator is finalizer-free: deleting a
  job never blocks on the operator being up. With peering on, the loop reads the KopfPeering object
  Kopf uses and stays idle while another replica holds priority (:func:`peering_active`, Kopf's own rule),
  exactly when Kopf has paused this replica's watches.

Settings: Kopf's progress and diff-base live in annotations with our prefix (``jest.training/``), never
in ``status`` (the structural schema would prune it); peering is off unless ``jest-operator --peering``
names a KopfPeering object (the chart ships the CRDs). ``@kopf.on.login`` uses ``$KUBECONFIG`` when set
(the kubernetes client reads it only at import time), else the in-cluster service account.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import copy
import datetime as dt
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from pydantic import ValidationError

from jest_operator import progress as progress_module
from jest_operator import status as status_module
from jest_operator.api import (
    GROUP,
    LABEL_JOB_NAME,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    PLURAL,
    VERSION,
    InvalidSpec,
    JESTTrainingJobStatus,
    parse_job,
)
from jest_operator.kube import KubeClient, KubeError
from jest_operator.operator_metrics import OperatorMetrics
from jest_operator.status import (
    Plan,
    TrainerProgress,
    invalid_spec_plan,
    merge_patch,
    plan,
)

LOG = logging.getLogger("jest_operator")
ANNOTATION_PREFIX = "jest.training"
FINALIZER = f"{ANNOTATION_PREFIX}/finalizer"


@dataclass
class OperatorConfig:
    """Knobs ``main.py`` sets before Kopf starts (environment variables give the defaults)."""

    metrics_port: int | None = None
    resync_seconds: float = float(os.environ.get("JEST_OPERATOR_RESYNC_SECONDS", "5"))
    scrape_timeout_seconds: float = 1.0
    max_parallel_reconciles: int = 16
    peering_name: str | None = None
    peering_priority: int = 0
    peering_identity: str | None = None
    clusterwide: bool = True


@dataclass
class _JobState:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    dirty: bool = False
    phase: str | None = None


@dataclass
class _Runtime:
    """Process-wide state of the running operator (one Kopf operator per process)."""

    kube: KubeClient | None = None
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    jobs: dict[tuple[str, str], _JobState] = field(default_factory=dict)
    executor: concurrent.futures.ThreadPoolExecutor | None = None
    resync_task: asyncio.Task | None = None
    last_resync: float = field(default_factory=time.monotonic)
    kopf_context: contextvars.Context | None = None
    pod_index: Any = None
    child_indexes: dict[str, Any] = field(default_factory=dict)


CONFIG = OperatorConfig()
RUNTIME = _Runtime()


@dataclass
class ReconcileResult:
    """What one reconcile did: ``outcome`` is ok | invalid | gone; ``body`` the job as read (for events);
    ``conflicts`` how many conditional status writes were refused (409) and re-planned."""

    outcome: str
    body: dict | None = None
    plan: Plan | None = None
    phase: str | None = None
    conflicts: int = 0


def sanitize_status(raw: Any) -> dict[str, Any]:
    """The stored status reduced to what this version's model accepts; never raises.

    Each field the model rejects is dropped at the deepest path the validation error names (so one bad
    nested value does not cost the whole block), and unknown top-level keys are ignored.
    """
    if not isinstance(raw, Mapping):
        return {}
    known = {info.alias or name for name, info in JESTTrainingJobStatus.model_fields.items()}
    candidate: dict[str, Any] = copy.deepcopy({key: value for key, value in raw.items() if key in known})
    for _ in range(64):
        try:
            model = JESTTrainingJobStatus.model_validate(candidate)
        except ValidationError as error:
            if not any(_drop_path(candidate, tuple(item["loc"])) for item in error.errors()):
                return {}
            continue
        except (TypeError, ValueError):
            return {}
        return model.model_dump(mode="json", by_alias=True, exclude_none=True)
    return {}


def _drop_path(document: dict[str, Any], loc: tuple[Any, ...]) -> bool:
    """Delete the value at the longest existing prefix of ``loc``; True if something was removed."""
    for length in range(len(loc), 0, -1):
        parent: Any = document
        for step in loc[: length - 1]:
            try:
                parent = parent[step]
            except (KeyError, IndexError, TypeError):
                parent = None
                break
        key = loc[length - 1]
        if isinstance(parent, dict) and key in parent:
            del parent[key]
            return True
        if isinstance(parent, list) and isinstance(key, int) and 0 <= key < len(parent):
            del parent[key]
            return True
    return False


def decide(
    body: Mapping[str, Any],
    pods: list[dict],
    *,
    existing_children: list[dict] | None,
    progress: TrainerProgress | None,
    now: dt.datetime,
) -> tuple[str, Plan]:
    """Pure entry point of a reconcile: a raw job body + observations -> (outcome, plan); never raises on bad input.

    ``outcome`` is ``invalid`` when the spec fails :func:`parse_job` (the plan then sets Failed/InvalidSpec and
    deletes the job's pods, never another owner's, creating nothing), else ``ok``.
    """
    previous = sanitize_status(body.get("status"))
    metadata = body.get("metadata") if isinstance(body.get("metadata"), Mapping) else {}
    generation = metadata.get("generation") if isinstance(metadata.get("generation"), int) else None
    try:
        job = parse_job({key: value for key, value in body.items() if key != "status"})
    except InvalidSpec as error:
        result = invalid_spec_plan(previous, field_path=error.field, message=error.message, generation=generation,
                                   now=now)
        name = metadata.get("name") if isinstance(metadata.get("name"), str) else ""
        uid = metadata.get("uid") if isinstance(metadata.get("uid"), str) else None
        names = tuple(
            observed.name for observed in (status_module.observe_pod(p) for p in pods)
            if status_module.ownership(observed.owners, name, uid) != "foreign"
        )
        grace = status_module.SHORT_GRACE_SECONDS if names else None
        return "invalid", Plan(**{**result.__dict__, "delete_pods": names, "delete_grace_seconds": grace})
    return "ok", plan(job, pods, progress, now, existing_children=existing_children, previous_status=previous)


#: Conditional status writes refused with 409 are re-planned from a fresh read this many times per reconcile.
MAX_CONFLICT_RETRIES = 5


def reconcile_job(
    kube: KubeClient,
    namespace: str,
    name: str,
    *,
    now: dt.datetime | None = None,
    read_progress: Callable[..., TrainerProgress | None] = progress_module.read_progress,
    scrape_timeout: float = 1.0,
    pods: list[dict] | None = None,
    children: list[dict] | None = None,
) -> ReconcileResult:
    """Observe, plan and apply one job (blocking; runs in a worker thread). See the module docstring.

    The job is always read with a GET (its status is the state machine's memory and must be current);
    ``pods`` and ``children`` (its ConfigMaps/Services) may come from the operator's watch-fed indexes
    (None = LIST them). A stale list is safe: creating an existing child is a 409, deleting a gone one a
    404, and only pods of the current attempt (which the fresh status names) can trigger a gang restart.
    When the status write meets a 409 the job, its pods and children are read again and the plan recomputed
    (its side effects are idempotent), up to :data:`MAX_CONFLICT_RETRIES` times.
    """
    progress: TrainerProgress | None = None
    scraped = False
    for attempt in range(MAX_CONFLICT_RETRIES + 1):
        if pods is None:
            pods = kube.list_pods(namespace, name)
        if children is None:
            children = kube.list_children(namespace, name)
        body = kube.get_job(namespace, name)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            kube.delete_children(namespace, name)
            return ReconcileResult("gone", body)
        if not scraped:
            steps = ((body.get("spec") or {}).get("training") or {}).get("steps")
            progress = read_progress(pods, total_steps=steps if isinstance(steps, int) else None,
                                     timeout=scrape_timeout)
            scraped = True
        moment = now or dt.datetime.now(dt.UTC)
        outcome, the_plan = decide(body, pods, existing_children=children, progress=progress, now=moment)
        try:
            apply_plan(kube, namespace, name, body, the_plan)
        except KubeError as error:
            if error.status != 409 or attempt == MAX_CONFLICT_RETRIES:
                raise
            LOG.info("status of %s/%s changed since it was read; re-planning (%d)", namespace, name, attempt + 1)
            pods = children = None  # the first attempt changed them: observe afresh
            continue
        return ReconcileResult(outcome, body, the_plan, the_plan.status.get("phase"), conflicts=attempt)
    raise AssertionError("unreachable")


def apply_plan(kube: KubeClient, namespace: str, name: str, body: Mapping[str, Any], the_plan: Plan) -> None:
    """Apply a plan in order: spec patch, deletions, creations (409 = fine), drift patches, ONE conditional
    status patch if changed (409 propagates as KubeError for the caller to re-plan), the TTL delete."""
    resource_version = (body.get("metadata") or {}).get("resourceVersion")
    if the_plan.spec_patch:
        resource_version = kube.patch_spec(namespace, name, the_plan.spec_patch) or resource_version
    for pod_name in the_plan.delete_pods:
        kube.delete_pod(namespace, pod_name, the_plan.delete_grace_seconds)
    for kind, child_name in the_plan.delete_children:
        kube.delete_child(kind, namespace, child_name)
    for child in the_plan.create:
        kube.create(child)
    for child in the_plan.update:
        kube.update(child)
    stored = body.get("status") if isinstance(body.get("status"), Mapping) else {}
    patch = merge_patch(stored, the_plan.status)
    if patch:
        kube.patch_status(namespace, name, patch, resource_version=resource_version)
    if the_plan.delete_job:
        kube.delete_job(namespace, name)
        kube.delete_children(namespace, name)


def peering_active(peering: Mapping[str, Any] | None, *, identity: str, priority: int, now: dt.datetime) -> bool:
    """Whether Kopf lets this replica act, by Kopf's rule over its peering object's ``status``.

    ``status`` maps each peer's identity to ``{priority, lifetime, lastseen}``. This replica is active
    when its own entry is alive and no other live peer has the same or a higher priority (Kopf pauses
    every replica of a same-priority tie). No object, or no entry of ours yet, means not active: Kopf is
    paused then too.
    """
    peers = (peering or {}).get("status")
    if not isinstance(peers, Mapping) or identity not in peers:
        return False

    def alive(info: Any) -> bool:
        if not isinstance(info, Mapping):
            return False
        seen = status_module.parse_time(str(info.get("lastseen") or "")) or now
        try:
            lifetime = float(info.get("lifetime", 60))
        except (TypeError, ValueError):
            lifetime = 60.0
        return (now - seen).total_seconds() < lifetime

    if not alive(peers[identity]):
        return False
    for peer, info in peers.items():
        if peer == identity or not alive(info):
            continue
        try:
            other = int(info.get("priority", 0))
        except (TypeError, ValueError):
            other = 0
        if other >= priority:
            return False
    return True


def active_namespaces(kube: KubeClient, namespaces: set[str], *, now: dt.datetime | None = None) -> set[str]:
    """Of ``namespaces``, those where this replica may reconcile (all of them when peering is off)."""
    if CONFIG.peering_name is None or CONFIG.peering_identity is None:
        return set(namespaces)
    moment = now or dt.datetime.now(dt.UTC)

    def allowed(namespace: str | None) -> bool:
        try:
            peering = kube.get_peering(CONFIG.peering_name or "", namespace)
        except Exception as error:  # the API is down: do nothing rather than act as a possible standby
            LOG.warning("cannot read peering %s: %s", CONFIG.peering_name, error)
            return False
        return peering_active(peering, identity=CONFIG.peering_identity or "", priority=CONFIG.peering_priority,
                              now=moment)

    if CONFIG.clusterwide:
        return set(namespaces) if allowed(None) else set()
    return {namespace for namespace in namespaces if allowed(namespace)}


# ---------------------------------------------------------------------------------------------- async side
async def request_reconcile(namespace: str, name: str, *, raise_errors: bool = False) -> None:
    """Reconcile one job now, or mark it dirty if a reconcile of it is running (it then runs once more)."""
    key = (namespace, name)
    state = RUNTIME.jobs.setdefault(key, _JobState())
    if state.lock.locked():
        state.dirty = True
        return
    async with state.lock:
        while True:
            state.dirty = False
            await _reconcile_once(namespace, name, raise_errors=raise_errors)
            if not state.dirty:
                break


async def _reconcile_once(namespace: str, name: str, *, raise_errors: bool) -> None:
    kube = RUNTIME.kube
    if kube is None:
        raise kopf.TemporaryError("the operator has not finished starting", delay=1)
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    pods = indexed_pods(namespace, name)
    children = indexed_children(namespace, name)
    try:
        result = await loop.run_in_executor(
            RUNTIME.executor,
            lambda: reconcile_job(kube, namespace, name, scrape_timeout=CONFIG.scrape_timeout_seconds, pods=pods,
                                  children=children),
        )
    except Exception as error:
        RUNTIME.metrics.observe_reconcile("error", time.monotonic() - started)
        LOG.warning("reconcile of %s/%s failed: %s", namespace, name, error)
        if raise_errors:
            raise kopf.TemporaryError(f"reconcile failed: {error}", delay=2) from error
        return
    RUNTIME.metrics.observe_reconcile(result.outcome, time.monotonic() - started)
    if result.outcome == "gone":
        RUNTIME.jobs.pop((namespace, name), None)
    else:
        RUNTIME.jobs.setdefault((namespace, name), _JobState()).phase = result.phase
    RUNTIME.metrics.set_phases({key: state.phase for key, state in RUNTIME.jobs.items()})
    if result.plan is not None and result.body is not None:
        if result.plan.restarted:
            RUNTIME.metrics.gang_restarted()
        for event in result.plan.events:
            _post_event(result.body, event.type, event.reason, event.message)


def _post_event(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    """Post a Kubernetes event through Kopf's poster, also from the resync task (outside handler contexts)."""
    def post() -> None:
        kopf.event(dict(body), type=type_, reason=reason, message=message)

    try:
        post()
    except LookupError:
        if RUNTIME.kopf_context is None:
            LOG.info("event %s on %s not posted (no Kopf context yet): %s", reason,
                     (body.get("metadata") or {}).get("name"), message)
            return
        RUNTIME.kopf_context.run(post)


async def _resync_loop() -> None:
    """Reconcile every known job every ``CONFIG.resync_seconds`` (bounded parallelism)."""
    semaphore = asyncio.Semaphore(CONFIG.max_parallel_reconciles)

    async def one(namespace: str, name: str) -> None:
        async with semaphore:
            await request_reconcile(namespace, name)

    loop = asyncio.get_running_loop()
    while True:
        RUNTIME.last_resync = time.monotonic()
        keys = list(RUNTIME.jobs)
        if keys and CONFIG.peering_name is not None and RUNTIME.kube is not None:
            namespaces = {namespace for namespace, _ in keys}
            allowed = await loop.run_in_executor(RUNTIME.executor, active_namespaces, RUNTIME.kube, namespaces)
            keys = [key for key in keys if key[0] in allowed]
        if keys:
            await asyncio.gather(*(one(ns, name) for ns, name in keys), return_exceptions=True)
        await asyncio.sleep(CONFIG.resync_seconds)


def indexed_pods(namespace: str, name: str) -> list[dict] | None:
    """The job's pods from the watch-fed index (copied on the event loop), or None before the index exists."""
    index = RUNTIME.pod_index
    if index is None:
        return None
    return [copy.deepcopy(pod) for pod in index.get((namespace, name), ())]


def indexed_children(namespace: str, name: str) -> list[dict] | None:
    """The job's ConfigMaps and Services from the watch-fed indexes, or None before both exist."""
    if set(RUNTIME.child_indexes) != {"ConfigMap", "Service"}:
        return None
    found: list[dict] = []
    for kind, index in RUNTIME.child_indexes.items():
        found += [{**copy.deepcopy(child), "kind": kind} for child in index.get((namespace, name), ())]
    return found


def _remember_index(kwargs: Mapping[str, Any]) -> None:
    """Keep references to Kopf's live indexes (handed to handlers as ``pods_by_job`` etc. kwargs)."""
    if RUNTIME.pod_index is None and kwargs.get("pods_by_job") is not None:
        RUNTIME.pod_index = kwargs["pods_by_job"]
        LOG.info("reconciles now read pods from the pods_by_job index")
    for kind, key in (("ConfigMap", "configmaps_by_job"), ("Service", "services_by_job")):
        if kind not in RUNTIME.child_indexes and kwargs.get(key) is not None:
            RUNTIME.child_indexes[kind] = kwargs[key]


# ---------------------------------------------------------------------------------------------- Kopf
@kopf.index("", "v1", "pods", labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_JOB_NAME: kopf.PRESENT})
def pods_by_job(namespace: str, labels: Mapping[str, str], body: Mapping[str, Any], **_: Any) -> dict:
    """Index the operator's pods by (namespace, job): reconciles read them here instead of LISTing per job.

    Kopf populates every index from its initial listing before any handler runs, so a restarted operator
    never mistakes an unseen pod for a missing one.
    """
    return {(namespace, labels[LABEL_JOB_NAME]): copy.deepcopy(dict(body))}


@kopf.index("", "v1", "configmaps", labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_JOB_NAME: kopf.PRESENT})
def configmaps_by_job(namespace: str, labels: Mapping[str, str], body: Mapping[str, Any], **_: Any) -> dict:
    """Index the operator's ConfigMaps by (namespace, job), for the desired-state comparison."""
    return {(namespace, labels[LABEL_JOB_NAME]): copy.deepcopy(dict(body))}


@kopf.index("", "v1", "services", labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_JOB_NAME: kopf.PRESENT})
def services_by_job(namespace: str, labels: Mapping[str, str], body: Mapping[str, Any], **_: Any) -> dict:
    """Index the operator's Services by (namespace, job), for the desired-state comparison."""
    return {(namespace, labels[LABEL_JOB_NAME]): copy.deepcopy(dict(body))}


@kopf.on.login()
def login(**kwargs: Any) -> Any:
    """``$KUBECONFIG`` when set (the kubernetes client only reads it at import), else the service account."""
    if os.environ.get("KUBECONFIG"):
        return kopf.login_with_kubeconfig(**kwargs)
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Settings (annotation persistence, no finalizers needed), the API client, metrics and the resync loop."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
    settings.networking.request_timeout = 30
    RUNTIME.executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=CONFIG.max_parallel_reconciles, thread_name_prefix="reconcile"
    )
    loop = asyncio.get_running_loop()
    RUNTIME.kube = await loop.run_in_executor(RUNTIME.executor, KubeClient.from_environment)
    if CONFIG.metrics_port is not None:
        port = RUNTIME.metrics.serve(CONFIG.metrics_port)
        LOG.info("operator metrics on :%d/metrics", port)
    RUNTIME.resync_task = asyncio.create_task(_resync_loop(), name="jest-resync")


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    """Stop the resync loop and the worker threads."""
    if RUNTIME.resync_task is not None:
        RUNTIME.resync_task.cancel()
        RUNTIME.resync_task = None
    if RUNTIME.executor is not None:
        RUNTIME.executor.shutdown(wait=False, cancel_futures=True)
        RUNTIME.executor = None


@kopf.on.probe(id="resync")
def resync_probe(**_: Any) -> float:
    """Liveness: seconds since the resync loop last ran; fails when it is stuck."""
    age = time.monotonic() - RUNTIME.last_resync
    if RUNTIME.resync_task is not None and RUNTIME.resync_task.done():
        raise kopf.PermanentError("the resync loop has stopped")
    if age > max(60.0, 12 * CONFIG.resync_seconds):
        raise kopf.TemporaryError(f"the resync loop has not run for {age:.0f} s")
    return round(age, 3)


@kopf.on.create(GROUP, VERSION, PLURAL, id="reconcile-create")
@kopf.on.resume(GROUP, VERSION, PLURAL, id="reconcile-resume")
@kopf.on.update(GROUP, VERSION, PLURAL, id="reconcile-update")
async def on_job_change(namespace: str, name: str, **kwargs: Any) -> None:
    """The spec changed (or the operator restarted): reconcile now; API errors make Kopf retry."""
    _remember_index(kwargs)
    await request_reconcile(namespace, name, raise_errors=True)


@kopf.on.field(GROUP, VERSION, PLURAL, field="spec.runPolicy.suspend", id="suspend-changed")
async def on_suspend_change(namespace: str, name: str, old: Any, new: Any, logger: logging.Logger,
                            **kwargs: Any) -> None:
    """Suspend/resume (a user, a queueing controller, or the energy budget flips this field): react at once."""
    _remember_index(kwargs)
    logger.info("spec.runPolicy.suspend: %s -> %s", old, new)
    await request_reconcile(namespace, name, raise_errors=True)


@kopf.on.event(GROUP, VERSION, PLURAL, id="job-events")
async def on_job_event(type: str | None, namespace: str, name: str, **kwargs: Any) -> None:
    """Track known jobs for the resync loop; a deleted job's children are removed explicitly."""
    _remember_index(kwargs)
    if RUNTIME.kopf_context is None:
        RUNTIME.kopf_context = contextvars.copy_context()
    if type == "DELETED":
        await request_reconcile(namespace, name)
        RUNTIME.jobs.pop((namespace, name), None)
        RUNTIME.metrics.set_phases({key: state.phase for key, state in RUNTIME.jobs.items()})
    else:
        RUNTIME.jobs.setdefault((namespace, name), _JobState())


@kopf.on.event("", "v1", "pods", labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_JOB_NAME: kopf.PRESENT},
               id="pod-events")
async def on_pod_event(namespace: str, labels: Mapping[str, str], **kwargs: Any) -> None:
    """A worker pod changed: reconcile its job (coalesced with any reconcile already running)."""
    _remember_index(kwargs)
    job_name = labels.get(LABEL_JOB_NAME)
    if job_name:
        await request_reconcile(namespace, job_name)


@kopf.on.event("", "v1", "configmaps", labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_JOB_NAME: kopf.PRESENT},
               id="configmap-events")
@kopf.on.event("", "v1", "services", labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_JOB_NAME: kopf.PRESENT},
               id="service-events")
async def on_child_event(type: str | None, namespace: str, labels: Mapping[str, str], meta: Mapping[str, Any],
                         **kwargs: Any) -> None:
    """A ConfigMap/Service of a job is going away: reconcile the job now (it recreates it, or a recreated job
    stops waiting for its name). Other changes (drift) wait for the resync: reacting to every ADDED event
    of our own creations would double the reconciles of a burst of new jobs."""
    _remember_index(kwargs)
    job_name = labels.get(LABEL_JOB_NAME)
    gone = type == "DELETED" or bool(meta.get("deletionTimestamp"))
    if job_name and gone and (namespace, job_name) in RUNTIME.jobs:
        await request_reconcile(namespace, job_name)
