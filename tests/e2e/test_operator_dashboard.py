"""A real Prometheus scrapes the real operator and evaluates the dashboard's "Operator health" row.

``test_prometheus_scrape.py`` scrapes only a local ``jestctl run`` (no operator), so the operator panels are
listed there in ``ABSENT_ON_CPU``. Here the operator runs for real: the KMock emulator with the CRD applied by
kubectl, the operator process (``python -m jest_operator.main --metrics-port P``) started as the kube
integration tests start it, and Debian's ``prometheus`` scraping ``127.0.0.1:P`` every second. The quickstart
job is applied with kubectl, its pods are driven like a kubelet would (Running, one Failed to force a gang
restart, Running again), and then every query of those operator panels must return data at an instant where the
scrape target was up, with values that say what happened: reconciles succeed at a positive rate with finite
latency quantiles, the job is counted under its real phase, and the gang restart shows up. Finally the pods
succeed and the phase gauge follows.
"""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, find_free_port, require_tool
from tests.e2e.test_prometheus_scrape import (
    ABSENT_ON_CPU,
    PromClient,
    scrape_instant_with_every_target_up,
    tail,
    values,
    write_prometheus_config,
)
from tests.integration.kube.conftest import (
    Cluster,
    Operator,
    start_emulator,
    start_operator,
    stop_process,
    wait_for,
    wait_phase,
    wait_pods,
)
from tests.integration.test_dashboard import dashboard_queries

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

QUICKSTART = REPO_ROOT / "examples" / "quickstart.yaml"
JOB = yaml.safe_load(QUICKSTART.read_text())["metadata"]["name"]
# The operator panels are exactly those test_prometheus_scrape.py cannot fill without an operator.
OPERATOR_QUERIES = {key for key, why in ABSENT_ON_CPU.items() if why.startswith("operator metrics")}
SUBSTITUTIONS = {"$__rate_interval": "15s", "$__range": "5m", "$trainingjob": JOB}


@pytest.fixture
def cluster(tmp_path: Path, process_reaper: list[subprocess.Popen]) -> Iterator[Cluster]:
    """An emulator where jest.training exists only because the real CRD was applied with kubectl."""
    started = start_emulator(tmp_path, "--no-crd")
    process_reaper.append(started.process)
    try:
        started.kubectl("apply", "--validate=false", "-f", str(REPO_ROOT / "crds"))
        yield started
    finally:
        stop_process(started.process)


@pytest.fixture
def operator(cluster: Cluster, tmp_path: Path, process_reaper: list[subprocess.Popen]) -> Iterator[Operator]:
    """The real operator (1 s resync) with its metrics endpoint on a free port."""
    started = start_operator(cluster, tmp_path, resync_seconds=1.0)
    process_reaper.append(started.process)
    try:
        yield started
    finally:
        stop_process(started.process, grace=10)


def start_prometheus(directory: Path, target: str, process_reaper: list[subprocess.Popen]) -> PromClient:
    """Debian's prometheus as a plain process on a free loopback port, scraping ``target`` every second."""
    prometheus_bin = require_tool("prometheus")
    config = write_prometheus_config(directory, [target])
    port = find_free_port()
    log_path = directory / "prometheus.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={directory / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    process_reaper.append(proc)
    prom = PromClient(port)

    def ready() -> bool:
        assert proc.poll() is None, f"prometheus exited:\n{tail(log_path)}"
        return prom.ready()

    wait_for(ready, timeout=60, interval=0.5, what="prometheus to become ready")
    return prom


def phase_counts(prom: PromClient, at: float | None = None) -> dict[str, float]:
    """``jest_operator_trainingjobs`` by phase, as Prometheus last scraped it."""
    return {item["metric"]["phase"]: float(item["value"][1])
            for item in prom.query("jest_operator_trainingjobs", at)}


def test_operator_health_panels_have_data_from_a_real_operator(
    tmp_path: Path, cluster: Cluster, operator: Operator, process_reaper: list[subprocess.Popen]
) -> None:
    assert len(OPERATOR_QUERIES) == 5, f"operator panels in ABSENT_ON_CPU changed: {sorted(OPERATOR_QUERIES)}"
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    prom = start_prometheus(prom_dir, f"127.0.0.1:{operator.metrics_port}", process_reaper)
    # The restart counter must be scraped at 0 before the restart, or increase() cannot see it happen.
    wait_for(lambda: values(prom.query("jest_operator_gang_restarts_total")) == [0.0], timeout=30,
             what="a first scrape of the operator's gang restart counter at 0")

    cluster.kubectl("apply", "--validate=false", "-f", str(QUICKSTART))
    pods = wait_pods(cluster, JOB, 2, attempt=0)
    for pod in pods:
        cluster.set_pod_phase(pod["metadata"]["name"], "Running")
    wait_phase(cluster, JOB, "Running")

    cluster.set_pod_phase(f"{JOB}-node-1", "Failed", reason="Error", message="worker crashed")
    pods = wait_pods(cluster, JOB, 2, attempt=1)
    for pod in pods:
        cluster.set_pod_phase(pod["metadata"]["name"], "Running")
    status = wait_phase(cluster, JOB, "Running")
    assert status["restarts"] == 1

    wait_for(lambda: values(prom.query("jest_operator_gang_restarts_total")) == [1.0]
             and phase_counts(prom).get("Running") == 1.0, timeout=30,
             what="Prometheus to scrape the restart and the Running job")
    time.sleep(2.0)  # a couple more reconciles (1 s resync) inside the rate window
    at = scrape_instant_with_every_target_up(prom, targets=1)

    results: dict[tuple[str, str], list[dict]] = {}
    for title, ref_id, expr in dashboard_queries(SUBSTITUTIONS):
        if (title, ref_id) in OPERATOR_QUERIES:
            results[(title, ref_id)] = prom.query(expr, at)
    assert set(results) == OPERATOR_QUERIES, "an operator panel named in ABSENT_ON_CPU is not on the dashboard"
    empty = [f"{title}/{ref_id}" for (title, ref_id), result in results.items() if not result]
    assert not empty, f"operator panels without data: {empty}"

    reconciles = {item["metric"]["result"]: float(item["value"][1])
                  for item in results[("Reconciles by result", "A")]}
    assert reconciles.get("ok", 0.0) > 0, f"no successful reconciles per second: {reconciles}"
    assert reconciles.get("error", 0.0) == 0, f"reconcile errors: {reconciles}"
    for ref_id in ("A", "B"):
        quantiles = values(results[("Reconcile duration p50 / p95", ref_id)])
        assert len(quantiles) == 1 and math.isfinite(quantiles[0]) and quantiles[0] > 0, (ref_id, quantiles)
    p50, p95 = (values(results[("Reconcile duration p50 / p95", ref_id)])[0] for ref_id in ("A", "B"))
    assert p50 <= p95
    phases = {item["metric"]["phase"]: float(item["value"][1]) for item in results[("Training jobs by phase", "A")]}
    assert phases["Running"] == 1.0 and sum(phases.values()) == 1.0, phases
    assert values(results[("Gang restarts", "A")])[0] >= 1.0 - 1e-9
    assert values(prom.query("jest_operator_gang_restarts_total", at)) == [1.0]

    # The phase gauge follows the job to its end.
    for pod in pods:
        cluster.set_pod_phase(pod["metadata"]["name"], "Succeeded")
    wait_phase(cluster, JOB, "Succeeded")
    wait_for(lambda: phase_counts(prom).get("Succeeded") == 1.0 and phase_counts(prom).get("Running") == 0.0,
             timeout=30, what="Prometheus to scrape the Succeeded job")
