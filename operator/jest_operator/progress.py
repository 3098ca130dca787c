"""Turn what the trainer exposes (Prometheus text of each rank, or rank 0's progress file) into status fields.

The operator scrapes every worker pod's ``/metrics`` (DESIGN.md §5 names) on each reconcile and folds the
result into :class:`jest_operator.status.TrainerProgress`:

* When rank 0 exposes the job totals (``jest_job_*``: its collective over every process of the job, so
  right whatever ``numProcPerNode`` is), step, examples trained/scored and energy (by method) are those,
  average power is the job's true average, and no other rank is scraped.
* Otherwise (fallback) step = max over ranks of ``jest_train_steps_total`` (steps are per rank); examples
  trained/scored = sum over the ranks that answered of ``jest_train_examples_total`` /
  ``jest_selection_candidates_total``; no average power is claimed. Observed selection ratio = trained /
  scored.
* step seconds = rank 0's ``jest_step_duration_seconds`` sum / count; examples per second = (examples per
  step from the continuing counters) / step seconds; selection overhead = ``selection`` share of
  ``jest_step_phase_seconds_total`` over all ranks.
* fallback energy = sum over ranks of ``jest_energy_consumed_joules_total`` (which includes what each rank
  restored from a checkpoint), else of the per-device ``jest_accelerator_energy_joules_total``.
* Either way the job's ``method`` is the least trustworthy one any rank reports (measured > integrated >
  modelled), so a partly modelled figure is never called measured; ``source`` joins the distinct sources
  with ``+``.

A worker that has exited cannot be scraped; its last figures come from its container's termination
message instead (:func:`termination_summary`: on a clean exit the trainer writes there the same
exposition cut to these families). So a job shorter than the reconcile interval still ends with its final
step and energy in the status.

Endpoint resolution (:func:`metrics_url`): the pod annotation ``jest.training/metrics-url`` wins (the
test-only local kubelet sets it to ``http://127.0.0.1:<port>/metrics``, and an admin may point it at a
sidecar); otherwise ``http://<status.podIP>:<container port named "metrics", default 9090>/metrics``.
Pods without an IP, unreachable endpoints, garbage and partial expositions are tolerated: whatever could
be read is used, the rest stays None (and the status keeps its previous value).

Parsing is pure (:func:`parse_metrics`, :func:`termination_summary`, :func:`combine_ranks`); only
:func:`scrape` and :func:`read_progress` do I/O.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import math
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from jest_operator.status import LABEL_REPLICA_INDEX, TRAINER_CONTAINER_NAME, TrainerProgress

METRICS_URL_ANNOTATION = "jest.training/metrics-url"
METRICS_PORT_NAME = "metrics"
DEFAULT_METRICS_PORT = 9090
METHOD_TRUST_ORDER: tuple[str, ...] = ("measured", "integrated", "modelled")


@dataclass
class RankMetrics:
    """The figures of one rank's exposition that the status needs (None / empty = not exposed)."""

    steps: float | None = None
    examples: float | None = None
    candidates: float | None = None
    step_seconds_sum: float | None = None
    step_seconds_count: float | None = None
    phase_seconds: dict[str, float] = field(default_factory=dict)
    loss: float | None = None
    eval_accuracy: float | None = None
    selection_ratio: float | None = None
    consumed_joules: float | None = None
    device_joules: float | None = None
    power_watts: float | None = None
    methods: set[str] = field(default_factory=set)
    sources: set[str] = field(default_factory=set)
    checkpoint_step: float | None = None
    checkpoint_unix_time: float | None = None
    job_steps: float | None = None
    job_examples: float | None = None
    job_candidates: float | None = None
    job_joules_by_method: dict[str, float] = field(default_factory=dict)
    job_sources: set[str] = field(default_factory=set)
    job_average_watts: float | None = None

    @property
    def has_job_totals(self) -> bool:
        """Whether this exposition carries rank 0's job totals (``jest_job_*``)."""
        return self.job_steps is not None and self.job_examples is not None


def parse_metrics(text: str) -> RankMetrics:
    """Parse one rank's Prometheus text exposition; unknown families are ignored, garbage gives empty metrics.

    Values of a family are summed over its series (a rank has one series per device or phase).
    """
    metrics = RankMetrics()
    try:
        families = list(text_string_to_metric_families(text))
    except (ValueError, TypeError, IndexError):
        return metrics
    for family in families:
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, float(sample.value)
            if math.isnan(value):
                continue
            if name == "jest_train_steps_total":
                metrics.steps = (metrics.steps or 0.0) + value
            elif name == "jest_train_examples_total":
                metrics.examples = (metrics.examples or 0.0) + value
            elif name == "jest_selection_candidates_total":
                metrics.candidates = (metrics.candidates or 0.0) + value
            elif name == "jest_step_duration_seconds_sum":
                metrics.step_seconds_sum = (metrics.step_seconds_sum or 0.0) + value
            elif name == "jest_step_duration_seconds_count":
                metrics.step_seconds_count = (metrics.step_seconds_count or 0.0) + value
            elif name == "jest_step_phase_seconds_total":
                phase = labels.get("phase", "")
                metrics.phase_seconds[phase] = metrics.phase_seconds.get(phase, 0.0) + value
            elif name == "jest_train_loss":
                metrics.loss = value
            elif name == "jest_eval_accuracy":
                metrics.eval_accuracy = value
            elif name == "jest_selection_ratio":
                metrics.selection_ratio = value
            elif name == "jest_energy_consumed_joules_total":
                metrics.consumed_joules = (metrics.consumed_joules or 0.0) + value
                _labels_of(metrics, labels)
            elif name == "jest_accelerator_energy_joules_total":
                metrics.device_joules = (metrics.device_joules or 0.0) + value
                _labels_of(metrics, labels)
            elif name == "jest_accelerator_power_watts":
                metrics.power_watts = (metrics.power_watts or 0.0) + value
            elif name == "jest_energy_backend_info":
                _labels_of(metrics, labels)
            elif name == "jest_checkpoint_step":
                metrics.checkpoint_step = value
            elif name == "jest_checkpoint_timestamp_seconds":
                metrics.checkpoint_unix_time = value
            elif name == "jest_job_train_steps_total":
                metrics.job_steps = value
            elif name == "jest_job_train_examples_total":
                metrics.job_examples = value
            elif name == "jest_job_selection_candidates_total":
                metrics.job_candidates = value
            elif name == "jest_job_energy_joules_total" and labels.get("method"):
                method = labels["method"]
                metrics.job_joules_by_method[method] = metrics.job_joules_by_method.get(method, 0.0) + value
                metrics.job_sources.update(x for x in labels.get("source", "").split("+") if x)
            elif name == "jest_job_average_power_watts":
                metrics.job_average_watts = value
    return metrics


def _labels_of(metrics: RankMetrics, labels: Mapping[str, str]) -> None:
    if labels.get("method"):
        metrics.methods.add(labels["method"])
    if labels.get("source"):
        metrics.sources.add(labels["source"])


def least_trustworthy(methods: Iterable[str]) -> str | None:
    """The weakest energy method among ``methods`` (an unknown method counts as the weakest)."""
    found = set(methods)
    if not found:
        return None
    unknown = sorted(found - set(METHOD_TRUST_ORDER))
    if unknown:
        return unknown[0]
    return max(found, key=METHOD_TRUST_ORDER.index)


def combine_ranks(ranks: Mapping[int, RankMetrics], *, total_steps: int | None = None) -> TrainerProgress | None:
    """Fold the metrics of the ranks that answered (rank index -> metrics) into one TrainerProgress.

    Returns None when no rank answered. Energy is only reported with a method and a source.
    """
    if not ranks:
        return None
    values = list(ranks.values())
    rank0 = ranks.get(0, values[0])
    job = rank0 if rank0.has_job_totals else None
    steps = job.job_steps if job is not None else _max(m.steps for m in values)
    examples = job.job_examples if job is not None else _sum(m.examples for m in values)
    candidates = job.job_candidates if job is not None else _sum(m.candidates for m in values)
    ratio = examples / candidates if examples is not None and candidates else rank0.selection_ratio
    step_seconds = None
    if rank0.step_seconds_sum is not None and rank0.step_seconds_count:
        step_seconds = rank0.step_seconds_sum / rank0.step_seconds_count
    examples_per_second = None
    if step_seconds and examples is not None and steps:
        examples_per_second = (examples / steps) / step_seconds
    phases: dict[str, float] = {}
    for m in values:
        for phase, seconds in m.phase_seconds.items():
            phases[phase] = phases.get(phase, 0.0) + seconds
    overhead = None
    if sum(phases.values()) > 0:
        overhead = phases.get("selection", 0.0) / sum(phases.values())
    if job is not None and job.job_joules_by_method:
        joules: float | None = sum(job.job_joules_by_method.values())
        method = least_trustworthy(job.job_joules_by_method)
        sources = sorted(job.job_sources)
        average_watts = job.job_average_watts
    else:
        joules = _sum(m.consumed_joules if m.consumed_joules is not None else m.device_joules for m in values)
        method = least_trustworthy(x for m in values for x in m.methods)
        sources = sorted({x for m in values for x in m.sources})
        average_watts = None  # the ranks' latest power readings are no average over the run
    has_energy = joules is not None and method is not None and bool(sources)
    return TrainerProgress(
        step=None if steps is None else round(steps),
        total_steps=total_steps,
        examples_trained=examples,
        examples_scored=candidates,
        observed_selection_ratio=None if ratio is None else min(1.0, max(0.0, ratio)),
        last_eval_accuracy=rank0.eval_accuracy,
        loss=rank0.loss,
        examples_per_second=examples_per_second,
        step_seconds=step_seconds,
        selection_overhead_fraction=overhead,
        energy_joules=joules if has_energy else None,
        average_watts=average_watts if has_energy else None,
        energy_method=method if has_energy else None,
        energy_source="+".join(sources) if has_energy else None,
        checkpoint_step=None if rank0.checkpoint_step is None else round(rank0.checkpoint_step),
        checkpoint_time=_iso_time(rank0.checkpoint_unix_time),
    )


def _iso_time(unix_time: float | None) -> str | None:
    if unix_time is None:
        return None
    return dt.datetime.fromtimestamp(unix_time, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sum(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _max(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def metrics_url(pod: Mapping[str, Any]) -> str | None:
    """Where a worker pod serves ``/metrics`` (see the module docstring), or None when it cannot be reached."""
    metadata = pod.get("metadata") or {}
    override = (metadata.get("annotations") or {}).get(METRICS_URL_ANNOTATION)
    if override:
        return str(override)
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    port = DEFAULT_METRICS_PORT
    for container in (pod.get("spec") or {}).get("containers") or []:
        for container_port in container.get("ports") or []:
            if container_port.get("name") == METRICS_PORT_NAME and container_port.get("containerPort"):
                port = int(container_port["containerPort"])
    host = f"[{ip}]" if ":" in str(ip) else ip
    return f"http://{host}:{port}/metrics"


def scrape(url: str, timeout: float = 1.0) -> str | None:
    """GET a metrics endpoint; None on any network or HTTP error (never raises for an unreachable pod)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            if response.status != 200:
                return None
            return response.read(8 * 1024 * 1024).decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None


def read_progress(
    pods: Iterable[Mapping[str, Any]],
    *,
    total_steps: int | None = None,
    timeout: float = 1.0,
    fetch: Callable[[str, float], str | None] = scrape,
) -> TrainerProgress | None:
    """Scrape every running worker pod in parallel, read the exited ones' termination messages, and combine
    the answers (None if nobody answered). Pods being deleted are skipped."""
    targets: dict[int, str] = {}
    exited: dict[int, RankMetrics] = {}
    for pod in pods:
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        labels = (pod.get("metadata") or {}).get("labels") or {}
        try:
            index = int(labels.get(LABEL_REPLICA_INDEX, -1))
        except (TypeError, ValueError):
            continue
        if index < 0:
            continue
        phase = (pod.get("status") or {}).get("phase")
        if phase == "Running":
            url = metrics_url(pod)
            if url:
                targets[index] = url
        elif phase in ("Succeeded", "Failed"):
            summary = termination_summary(pod)
            if summary is not None:
                exited[index] = summary
    # rank 0's job totals cover every process of the job: one endpoint (or one message) is then enough
    if 0 in exited and exited[0].has_job_totals:
        return combine_ranks({0: exited[0]}, total_steps=total_steps)
    if 0 in targets:
        text = fetch(targets.pop(0), timeout)
        if text:
            rank0 = parse_metrics(text)
            if rank0.has_job_totals:
                return combine_ranks({0: rank0}, total_steps=total_steps)
            exited[0] = rank0
    texts: dict[int, str | None] = {}
    if targets:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(targets))) as pool:
            texts = dict(zip(targets, pool.map(lambda url: fetch(url, timeout), targets.values()), strict=True))
    ranks = {**exited, **{index: parse_metrics(text) for index, text in texts.items() if text}}
    return combine_ranks(ranks, total_steps=total_steps)


def termination_summary(pod: Mapping[str, Any]) -> RankMetrics | None:
    """The trainer container's final figures from its termination message, or None when it left none.

    A crashed trainer's message is its log tail (``FallbackToLogsOnError``), which parses to no figures
    and so counts as none.
    """
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        if container.get("name") != TRAINER_CONTAINER_NAME:
            continue
        message = ((container.get("state") or {}).get("terminated") or {}).get("message")
        if not message:
            return None
        metrics = parse_metrics(str(message))
        return metrics if metrics.steps is not None else None
    return None
