"""Prometheus metrics of the operator process itself (DESIGN.md §5, operator section).

Low cardinality on purpose: no per-job labels (a cluster can hold thousands of jobs; per-job figures
live in the trainers' own metrics). Own :class:`CollectorRegistry`, so tests can build several.

* ``jest_operator_reconcile_total{result}`` -- reconciles by outcome: ``ok``, ``invalid`` (InvalidSpec),
  ``gone`` (the job vanished meanwhile), ``error`` (an API call failed; retried on the next trigger).
* ``jest_operator_reconcile_duration_seconds`` -- histogram of reconcile wall time (observe, scrape, plan,
  apply).
* ``jest_operator_trainingjobs{phase}`` -- jobs this operator currently watches, by ``status.phase``.
* ``jest_operator_gang_restarts_total`` -- gang restarts the operator started.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from jest_operator.status import PHASES

RECONCILE_RESULTS: tuple[str, ...] = ("ok", "invalid", "gone", "error")
OPERATOR_METRIC_NAMES: tuple[str, ...] = (
    "jest_operator_reconcile_total",
    "jest_operator_reconcile_duration_seconds",
    "jest_operator_trainingjobs",
    "jest_operator_gang_restarts_total",
)
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))


class OperatorMetrics:
    """The operator's metric families in a private registry; ``serve`` exposes them over HTTP."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.reconcile_total = Counter(
            "jest_operator_reconcile", "Reconciles of JESTTrainingJobs by result.", ["result"],
            registry=self.registry,
        )
        self.reconcile_duration = Histogram(
            "jest_operator_reconcile_duration_seconds", "Wall time of one reconcile.",
            buckets=_DURATION_BUCKETS, registry=self.registry,
        )
        self.trainingjobs = Gauge(
            "jest_operator_trainingjobs", "JESTTrainingJobs watched by this operator, by phase.", ["phase"],
            registry=self.registry,
        )
        self.gang_restarts = Counter(
            "jest_operator_gang_restarts", "Gang restarts started by the operator.", registry=self.registry
        )
        for result in RECONCILE_RESULTS:
            self.reconcile_total.labels(result=result)
        for phase in (*PHASES, "Unknown"):
            self.trainingjobs.labels(phase=phase).set(0)

    def observe_reconcile(self, result: str, seconds: float) -> None:
        """Count one reconcile and its duration; ``result`` must be one of RECONCILE_RESULTS."""
        if result not in RECONCILE_RESULTS:
            raise ValueError(f"result must be one of {RECONCILE_RESULTS}, got {result!r}")
        self.reconcile_total.labels(result=result).inc()
        self.reconcile_duration.observe(max(0.0, seconds))

    def set_phases(self, phases: Mapping[str, str | None]) -> None:
        """Set the per-phase gauge from job key -> phase (None counts as Unknown)."""
        counts = dict.fromkeys((*PHASES, "Unknown"), 0)
        for phase in phases.values():
            key = phase if phase in counts else "Unknown"
            counts[key] += 1
        for phase, count in counts.items():
            self.trainingjobs.labels(phase=phase).set(count)

    def gang_restarted(self) -> None:
        """Count one gang restart."""
        self.gang_restarts.inc()

    def serve(self, port: int, address: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` on ``address:port`` (0 = an ephemeral port) in a daemon thread; returns the port."""
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        return int(server.server_address[1])
