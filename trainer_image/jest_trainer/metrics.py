"""Prometheus exposition of one trainer process: throughput, selection, loss and energy (DESIGN.md §5).

Each worker serves its own ``/metrics`` (one scrape target per rank; the PodMonitor scrapes port
``metrics``), from a private :class:`~prometheus_client.CollectorRegistry` so that tests and several
trainers in one interpreter never collide. Every series carries ``trainingjob`` and ``rank`` (never a
label named ``job``: that belongs to the scraper). Each rank counts only its own examples, candidates and
FLOPs, so ``sum`` over ranks is the job figure; steps are per rank (aggregate with ``max``).

Counters continue across restarts: the trainer stores :meth:`TrainerMetrics.counter_state` in its
checkpoint and calls :meth:`TrainerMetrics.restore` before the first step after a resume. The step-time
histogram starts afresh (``rate``/``histogram_quantile`` cope with a reset). Energy is read from an
:class:`~jest_trainer.energy.EnergyMeter` at scrape time, never pushed from the training loop.

Energy series: ``jest_accelerator_energy_joules_total`` / ``jest_accelerator_power_watts`` per device
(since sampler start, labels ``device``, ``source``, ``method`` and ``scope``: ``device``, or ``node`` for
RAPL, which counts the whole node's CPU packages), ``jest_accelerator_info{device, uuid, source}`` (1 per
metered board whose NVML UUID is known: join it on ``device`` to name the physical GPU), ``jest_energy_backend_info``,
``jest_energy_consumed_joules_total`` (this rank's energy *including* what was restored from a checkpoint,
which is what the budget alert compares against ``jest_energy_budget_joules``),
``jest_energy_sampling_seconds_total`` (the meter's own cost) and ``jest_energy_sampler_errors_total``.

Job totals: rank 0 alone also exports ``jest_job_train_steps_total``, ``jest_job_train_examples_total``,
``jest_job_selection_candidates_total``, ``jest_job_energy_joules_total`` (one series per energy ``method``,
labelled with the ``source`` of the ranks that use it) and ``jest_job_average_power_watts`` (this attempt's
job energy / its wall time), all over the whole process group and refreshed at every progress report
(:meth:`TrainerMetrics.observe_job`, fed by a collective in the loop). Separate names, not a label on the
per-rank families, so no ``sum()`` over ranks ever counts them twice; one scrape of rank 0 gives the job
whatever ``numProcPerNode`` is (the operator reads these, and the per-rank families only as a fallback).

A process that has exited can no longer be scraped, so its last figures would be lost between two scrapes
of a short job. :meth:`TrainerMetrics.final_summary` is the same exposition cut to what the operator's
status needs (labels reduced to ``phase``, ``method`` and ``source``) and to the 4 KiB a Kubernetes
termination message holds; the trainer writes it to ``$JEST_TERMINATION_MESSAGE_PATH`` as it exits and
the operator parses it with the parser it uses for scrapes.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from jest_trainer.energy import EnergyMeter

#: Environment variable naming the address the metrics server binds (default: every interface).
METRICS_HOST_ENV = "JEST_METRICS_HOST"

PHASES: tuple[str, ...] = ("data", "selection", "forward_backward", "optimizer", "checkpoint")
FLOP_KINDS: tuple[str, ...] = ("train", "selection_learner", "selection_reference")

# Step times from tens of milliseconds (tiny CPU demo) to minutes (large models on slow links).
STEP_SECONDS_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 150.0, float("inf"),
)

# Rank 0's job totals (see the module docstring).
JOB_METRIC_NAMES: tuple[str, ...] = (
    "jest_job_train_steps_total",
    "jest_job_train_examples_total",
    "jest_job_selection_candidates_total",
    "jest_job_energy_joules_total",
    "jest_job_average_power_watts",
)

# Every metric family this module exports (exposition names, without histogram/counter suffixes other
# than ``_total``); the dashboard test checks panels only use these and the operator's.
TRAINER_METRIC_NAMES: tuple[str, ...] = (
    "jest_train_steps_total",
    "jest_train_examples_total",
    "jest_selection_candidates_total",
    "jest_step_duration_seconds",
    "jest_step_phase_seconds_total",
    "jest_model_flops_total",
    "jest_train_loss",
    "jest_eval_accuracy",
    "jest_selection_ratio",
    "jest_accelerator_energy_joules_total",
    "jest_accelerator_power_watts",
    "jest_energy_backend_info",
    "jest_energy_consumed_joules_total",
    "jest_energy_sampling_seconds_total",
    "jest_energy_sampler_errors_total",
    "jest_energy_budget_joules",
    "jest_checkpoint_step",
    "jest_checkpoint_timestamp_seconds",
    *JOB_METRIC_NAMES,
)

#: What a termination message may hold: Kubernetes keeps at most 4096 bytes of it.
TERMINATION_MESSAGE_LIMIT_BYTES = 4096

# The samples of the final summary (exposition sample names) and the labels they keep.
SUMMARY_SAMPLE_NAMES: frozenset[str] = frozenset({
    "jest_train_steps_total",
    "jest_train_examples_total",
    "jest_selection_candidates_total",
    "jest_step_duration_seconds_sum",
    "jest_step_duration_seconds_count",
    "jest_step_phase_seconds_total",
    "jest_train_loss",
    "jest_eval_accuracy",
    "jest_selection_ratio",
    "jest_energy_consumed_joules_total",
    "jest_accelerator_power_watts",
    "jest_energy_backend_info",
    "jest_checkpoint_step",
    "jest_checkpoint_timestamp_seconds",
    *JOB_METRIC_NAMES,
})
SUMMARY_LABELS: tuple[str, ...] = ("phase", "method", "source")
_SAMPLE_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)")
_LABEL_PAIR = re.compile(r'(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"')

_STATE_KEYS: tuple[str, ...] = (
    "steps",
    "examples",
    "candidates",
    *(f"phase_seconds.{phase}" for phase in PHASES),
    *(f"flops.{kind}" for kind in FLOP_KINDS),
)


class _EnergyCollector(Collector):
    """Reads an EnergyMeter at scrape time; the only bridge between the sampler threads and /metrics."""

    def __init__(self, meter: EnergyMeter, trainingjob: str, rank: str) -> None:
        self._meter = meter
        self._trainingjob = trainingjob
        self._rank = rank

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        base = [self._trainingjob, self._rank]
        device_labels = ["trainingjob", "rank", "device", "source", "method", "scope"]
        energy = CounterMetricFamily(
            "jest_accelerator_energy_joules",
            "Energy of one physical device since its sampler started (method: measured|integrated|modelled).",
            labels=device_labels,
            unit="joules",
        )
        power = GaugeMetricFamily(
            "jest_accelerator_power_watts", "Latest power of one physical device.", labels=device_labels, unit="watts"
        )
        boards = GaugeMetricFamily(
            "jest_accelerator_info", "The physical board behind a metered device: its NVML UUID (value 1).",
            labels=["trainingjob", "rank", "device", "uuid", "source"],
        )
        for sample in self._meter.samples():
            labels = [*base, sample.device, sample.source, sample.method, sample.scope]
            energy.add_metric(labels, sample.joules)
            power.add_metric(labels, sample.watts)
            if sample.uuid:
                boards.add_metric([*base, sample.device, sample.uuid, sample.source], 1.0)
        yield energy
        yield power
        yield boards

        info = GaugeMetricFamily(
            "jest_energy_backend_info",
            "The energy backend this worker uses (value 1).",
            labels=["trainingjob", "rank", "source", "method"],
        )
        info.add_metric([*base, self._meter.source, self._meter.method], 1.0)
        yield info

        rank_labels = ["trainingjob", "rank", "source", "method"]
        consumed = CounterMetricFamily(
            "jest_energy_consumed_joules",
            "This rank's energy including the total restored from a checkpoint (compare with the budget).",
            labels=rank_labels,
            unit="joules",
        )
        consumed.add_metric([*base, self._meter.source, self._meter.method], self._meter.total_joules())
        yield consumed

        sampling = CounterMetricFamily(
            "jest_energy_sampling_seconds",
            "Wall time the energy sampler threads spent reading devices (their overhead).",
            labels=["trainingjob", "rank", "source"],
            unit="seconds",
        )
        sampling.add_metric([*base, self._meter.source], self._meter.sampling_seconds_total())
        yield sampling

        errors = CounterMetricFamily(
            "jest_energy_sampler_errors", "Failed energy readings (exceptions, counter resets).",
            labels=["trainingjob", "rank", "source"],
        )
        errors.add_metric([*base, self._meter.source], float(self._meter.errors_total()))
        yield errors

        if self._meter.budget_joules is not None:
            budget = GaugeMetricFamily(
                "jest_energy_budget_joules",
                "The job's configured energy budget (energy.budgetJoules).",
                labels=["trainingjob"],
                unit="joules",
            )
            budget.add_metric([self._trainingjob], float(self._meter.budget_joules))
            yield budget


@dataclass(frozen=True)
class JobTotals:
    """The whole job's figures at one progress report (every rank's share summed by a collective).

    ``joules_by_method`` maps each energy method some rank uses to those ranks' energy (restored
    checkpoint energy included); ``sources`` maps the same methods to their ranks' sources joined by ``+``.
    """

    steps: int
    examples: float
    candidates: float
    joules_by_method: Mapping[str, float]
    sources: Mapping[str, str]
    average_watts: float


class _JobCollector(Collector):
    """Rank 0's job totals (nothing until the first :meth:`TrainerMetrics.observe_job`)."""

    def __init__(self, trainingjob: str) -> None:
        self.trainingjob = trainingjob
        self.totals: JobTotals | None = None

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        totals = self.totals
        if totals is None:
            return
        job = [self.trainingjob]
        for name, help_text, value in (
            ("jest_job_train_steps", "Optimizer steps of the job.", totals.steps),
            ("jest_job_train_examples", "Examples the whole job trained on.", totals.examples),
            ("jest_job_selection_candidates", "Super-batch examples the whole job scored.", totals.candidates),
        ):
            family = CounterMetricFamily(name, help_text, labels=["trainingjob"])
            family.add_metric(job, float(value))
            yield family
        energy = CounterMetricFamily(
            "jest_job_energy_joules", "Energy of the whole job by method (measured|integrated|modelled), "
            "checkpoint-restored energy included.", labels=["trainingjob", "method", "source"], unit="joules",
        )
        for method, joules in sorted(totals.joules_by_method.items()):
            energy.add_metric([*job, method, totals.sources.get(method, "")], float(joules))
        yield energy
        power = GaugeMetricFamily("jest_job_average_power_watts",
                                  "This attempt's job energy divided by its wall time.", labels=["trainingjob"])
        power.add_metric(job, float(totals.average_watts))
        yield power


class TrainerMetrics:
    """The Prometheus metrics of one trainer rank, in a private registry (contract C3).

    ``observe_step`` is the only call on the training loop's path: a handful of in-memory increments,
    no I/O. Unknown phases or FLOP kinds raise ``ValueError`` naming the key.
    """

    def __init__(self, *, trainingjob: str, rank: int, registry: CollectorRegistry | None = None) -> None:
        if not trainingjob:
            raise ValueError("trainingjob must be a non-empty name")
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.trainingjob = trainingjob
        self.rank = rank
        self.registry = registry if registry is not None else CollectorRegistry()
        self._labels = {"trainingjob": trainingjob, "rank": str(rank)}
        self._energy_collector: _EnergyCollector | None = None
        self._server: WSGIServer | None = None
        self._server_thread: threading.Thread | None = None
        self._observed = False
        self._job = _JobCollector(trainingjob)
        self.registry.register(self._job)

        names = ["trainingjob", "rank"]
        reg = self.registry
        self._steps = Counter("jest_train_steps", "Optimizer steps this rank completed.", names, registry=reg)
        self._examples = Counter(
            "jest_train_examples", "Examples this rank trained on (its share of the selected batch).", names,
            registry=reg,
        )
        self._candidates = Counter(
            "jest_selection_candidates", "Super-batch examples this rank scored for selection.", names, registry=reg
        )
        self._step_duration = Histogram(
            "jest_step_duration_seconds", "Wall time of one training step on this rank.", names,
            buckets=STEP_SECONDS_BUCKETS, registry=reg,
        )
        self._phase_seconds = Counter(
            "jest_step_phase_seconds", "Cumulative wall time per step phase.", [*names, "phase"], registry=reg
        )
        self._flops = Counter(
            "jest_model_flops", "Analytic model FLOPs: training and selection scoring (learner, reference).",
            [*names, "kind"], registry=reg,
        )
        self._loss = Gauge("jest_train_loss", "Training loss of the last step.", names, registry=reg)
        self._accuracy = Gauge("jest_eval_accuracy", "Last zero-shot evaluation accuracy (0-1).", names, registry=reg)
        self._selection_ratio = Gauge(
            "jest_selection_ratio", "Observed fraction of scored candidates that were trained on (last step).",
            names, registry=reg,
        )
        self._checkpoint_step = Gauge(
            "jest_checkpoint_step", "Step of the newest complete checkpoint (absent until one exists).", names,
            registry=reg,
        )
        self._checkpoint_time = Gauge(
            "jest_checkpoint_timestamp_seconds", "Unix time the newest complete checkpoint was written.", names,
            registry=reg,
        )
        # Export every labelled child from the start so series exist (at 0) before the first step.
        for metric in (self._steps, self._examples, self._candidates, self._step_duration):
            metric.labels(**self._labels)
        for phase in PHASES:
            self._phase_seconds.labels(**self._labels, phase=phase)
        for kind in FLOP_KINDS:
            self._flops.labels(**self._labels, kind=kind)
        # Per-step gauges read NaN (Prometheus' "no value yet") until the first step: the series exist from
        # the first scrape without claiming a loss or a ratio nobody measured.
        for gauge in (self._loss, self._selection_ratio):
            gauge.labels(**self._labels).set(math.nan)

    # --- serving ---------------------------------------------------------------------------------------

    def serve(self, port: int, host: str | None = None) -> int:
        """Serve ``/metrics`` on ``host``:``port`` in a daemon thread (0 = ephemeral); returns the port.

        ``host`` defaults to ``$JEST_METRICS_HOST``, else every interface (0.0.0.0, what a pod wants). The
        dev cluster's node agent sets it to the pod's own loopback IP, so pods sharing one host can all
        serve on the fixed port 9090.
        """
        if self._server is not None:
            raise RuntimeError(f"metrics are already served on port {self._server.server_port}")
        if not 0 <= port <= 65535:
            raise ValueError(f"metrics port must be in 0..65535, got {port}")
        address = host or os.environ.get(METRICS_HOST_ENV) or "0.0.0.0"
        self._server, self._server_thread = start_http_server(port, addr=address, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop the HTTP server (if serving) and release its port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._server_thread is not None:
                self._server_thread.join(timeout=5.0)
            self._server = None
            self._server_thread = None

    # --- observations ----------------------------------------------------------------------------------

    def observe_step(
        self,
        *,
        duration_seconds: float,
        phase_seconds: Mapping[str, float],
        examples: int,
        candidates: int,
        flops: Mapping[str, float],
        loss: float,
        selection_ratio: float,
    ) -> None:
        """Record one completed step of this rank (its own examples/candidates/FLOPs, not the global ones)."""
        unknown_phases = sorted(set(phase_seconds) - set(PHASES))
        if unknown_phases:
            raise ValueError(f"phase_seconds: unknown phase(s) {unknown_phases}; expected a subset of {PHASES}")
        unknown_kinds = sorted(set(flops) - set(FLOP_KINDS))
        if unknown_kinds:
            raise ValueError(f"flops: unknown kind(s) {unknown_kinds}; expected a subset of {FLOP_KINDS}")
        for field, value in (("duration_seconds", duration_seconds), ("examples", examples),
                             ("candidates", candidates)):
            if value < 0:
                raise ValueError(f"{field} must be >= 0, got {value}")
        for key, value in (*phase_seconds.items(), *flops.items()):
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        self._observed = True
        labels = self._labels
        self._steps.labels(**labels).inc()
        self._examples.labels(**labels).inc(examples)
        self._candidates.labels(**labels).inc(candidates)
        self._step_duration.labels(**labels).observe(duration_seconds)
        for phase, seconds in phase_seconds.items():
            self._phase_seconds.labels(**labels, phase=phase).inc(seconds)
        for kind, amount in flops.items():
            self._flops.labels(**labels, kind=kind).inc(amount)
        self._loss.labels(**labels).set(loss)
        self._selection_ratio.labels(**labels).set(selection_ratio)

    def observe_eval(self, accuracy: float) -> None:
        """Record the latest evaluation accuracy (a fraction in [0, 1])."""
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
        self._accuracy.labels(**self._labels).set(accuracy)

    def observe_job(self, totals: JobTotals) -> None:
        """Export the job's totals (rank 0 calls this at each progress report; other ranks never do)."""
        self._job.totals = totals

    def observe_checkpoint(self, step: int, unix_time: float) -> None:
        """Record the newest complete checkpoint, so the operator can put it in ``status.checkpoint``."""
        if step < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {step}")
        self._checkpoint_step.labels(**self._labels).set(step)
        self._checkpoint_time.labels(**self._labels).set(unix_time)

    def attach_energy(self, meter: EnergyMeter) -> None:
        """Export ``meter``'s readings at scrape time (replaces a previously attached meter)."""
        if self._energy_collector is not None:
            self.registry.unregister(self._energy_collector)
        self._energy_collector = _EnergyCollector(meter, self.trainingjob, str(self.rank))
        self.registry.register(self._energy_collector)

    def final_summary(self, limit_bytes: int = TERMINATION_MESSAGE_LIMIT_BYTES) -> str:
        """The figures the operator's status reads, as Prometheus text of at most ``limit_bytes`` bytes.

        Samples outside :data:`SUMMARY_SAMPLE_NAMES` and labels outside :data:`SUMMARY_LABELS` are dropped
        (the pod already says which job and rank it is); NaN gauges (nothing observed yet) are left out.
        Whole lines are dropped from the end should the limit still be exceeded, so the text always parses.
        """
        lines: list[str] = []
        for line in generate_latest(self.registry).decode().splitlines():
            match = _SAMPLE_LINE.match(line)
            if match is None or match["name"] not in SUMMARY_SAMPLE_NAMES or match["value"].lower() == "nan":
                continue
            kept = [f'{pair["key"]}="{pair["value"]}"' for pair in _LABEL_PAIR.finditer(match["labels"] or "")
                    if pair["key"] in SUMMARY_LABELS]
            lines.append(f"{match['name']}{{{','.join(kept)}}} {match['value']}" if kept
                         else f"{match['name']} {match['value']}")
        text = "".join(f"{line}\n" for line in lines)
        while len(text.encode()) > limit_bytes and lines:
            lines.pop()
            text = "".join(f"{line}\n" for line in lines)
        return text

    # --- checkpoint state ------------------------------------------------------------------------------

    def _value(self, name: str, **extra: str) -> float:
        value = self.registry.get_sample_value(name, {**self._labels, **extra})
        return float(value or 0.0)

    def counter_state(self) -> dict[str, float]:
        """Counter totals to store in a checkpoint (keys: steps, examples, candidates, phase_seconds.<phase>,
        flops.<kind>)."""
        state = {
            "steps": self._value("jest_train_steps_total"),
            "examples": self._value("jest_train_examples_total"),
            "candidates": self._value("jest_selection_candidates_total"),
        }
        for phase in PHASES:
            state[f"phase_seconds.{phase}"] = self._value("jest_step_phase_seconds_total", phase=phase)
        for kind in FLOP_KINDS:
            state[f"flops.{kind}"] = self._value("jest_model_flops_total", kind=kind)
        return state

    def restore(self, state: Mapping[str, float]) -> None:
        """Continue the counters from a checkpoint's :meth:`counter_state`; call before the first step.

        Missing keys count as 0 (older checkpoints); unknown keys or negative values raise ``ValueError``
        naming the key.
        """
        if self._observed or any(self.counter_state().values()):
            raise RuntimeError("restore() must be called before any step is observed")
        unknown = sorted(set(state) - set(_STATE_KEYS))
        if unknown:
            raise ValueError(f"counter state: unknown key(s) {unknown}; expected a subset of {list(_STATE_KEYS)}")
        for key, value in state.items():
            if float(value) < 0:
                raise ValueError(f"counter state {key} must be >= 0, got {value}")
        labels = self._labels
        self._steps.labels(**labels).inc(float(state.get("steps", 0.0)))
        self._examples.labels(**labels).inc(float(state.get("examples", 0.0)))
        self._candidates.labels(**labels).inc(float(state.get("candidates", 0.0)))
        for phase in PHASES:
            self._phase_seconds.labels(**labels, phase=phase).inc(float(state.get(f"phase_seconds.{phase}", 0.0)))
        for kind in FLOP_KINDS:
            self._flops.labels(**labels, kind=kind).inc(float(state.get(f"flops.{kind}", 0.0)))
