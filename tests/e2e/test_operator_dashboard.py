"""A real Prometheus scrapes the real operator and evaluates the dashboard's "Operator health" row.

``test_prometheus_scrape.py`` scrapes only a local ``jestctl run`` (no operator), so the operator panels are
listed there in ``ABSENT_ON_CPU``. Here everything is real: the operator installed by ``helm install`` runs in
its pod on the real control plane (tests/e2e/conftest.py), Debian's ``prometheus`` scrapes it at
``<operator podIP>:<metrics port>`` every second, and the quickstart's two trainers run as pods on the node
agent. One trainer process is SIGKILLed mid-run, so its pod really fails (exit 137) and the operator restarts
the gang; then every query of the operator panels must return data at an instant where the scrape target was
up, with values that say what happened: reconciles succeed at a positive rate with finite latency quantiles,
the job is counted under its real phase, and the gang restart shows up. Finally the job succeeds and the
phase gauge follows.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT, find_free_port, require_tool
from tests.e2e.conftest import UserCluster, wait_until
from tests.e2e.test_prometheus_scrape import (
    ABSENT_ON_CPU,
    PromClient,
    scrape_instant_with_every_target_up,
    tail,
    values,
    write_prometheus_config,
)
from tests.integration.test_dashboard import dashboard_queries

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

QUICKSTART = REPO_ROOT / "examples" / "quickstart.yaml"
JOB = yaml.safe_load(QUICKSTART.read_text())["metadata"]["name"]
# The operator panels are exactly those test_prometheus_scrape.py cannot fill without an operator.
OPERATOR_QUERIES = {key for key, why in ABSENT_ON_CPU.items() if why.startswith("operator metrics")}
SUBSTITUTIONS = {"$__rate_interval": "15s", "$__range": "5m", "$trainingjob": JOB}


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

    wait_until(ready, timeout=60, interval=0.5, what="prometheus to become ready")
    return prom


def phase_counts(prom: PromClient, at: float | None = None) -> dict[str, float]:
    """``jest_operator_trainingjobs`` by phase, as Prometheus last scraped it."""
    return {item["metric"]["phase"]: float(item["value"][1])
            for item in prom.query("jest_operator_trainingjobs", at)}


def long_quickstart() -> dict[str, Any]:
    """The quickstart with a run long enough to be killed mid-way and scraped after its gang restart."""
    manifest = copy.deepcopy(yaml.safe_load(QUICKSTART.read_text()))
    training = manifest["spec"]["training"]
    training["steps"] = 400
    training["reference"]["train"]["steps"] = 10
    training["eval"] = {"intervalSteps": 400}
    return manifest


def job_pods(cluster: UserCluster, namespace: str, attempt: int) -> list[dict[str, Any]] | None:
    """Both worker pods of ``attempt`` once they run (their trainers started), else None."""
    listed = cluster.get("pods", "-n", namespace, "-l", f"jest.training/job-name={JOB}") or {}
    pods = [p for p in listed.get("items", [])
            if p["metadata"]["annotations"].get("jest.training/attempt") == str(attempt)
            and not p["metadata"].get("deletionTimestamp")]
    running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
    return running if len(running) == 2 else None


def job_status(cluster: UserCluster, namespace: str) -> dict[str, Any]:
    return (cluster.get("jtj", JOB, "-n", namespace) or {}).get("status") or {}


def test_operator_health_panels_have_data_from_a_real_operator(
    tmp_path: Path, user_cluster: UserCluster, process_reaper: list[subprocess.Popen]
) -> None:
    assert len(OPERATOR_QUERIES) == 5, f"operator panels in ABSENT_ON_CPU changed: {sorted(OPERATOR_QUERIES)}"
    cluster = user_cluster
    operator_ip = cluster.operator_pod()["status"]["podIP"]
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    prom = start_prometheus(prom_dir, f"{operator_ip}:{cluster.operator_metrics_port}", process_reaper)
    # The restart counter must be scraped before the restart, or increase() cannot see it happen; other tests
    # share this operator, so the count is taken relative to what it already holds.
    before = wait_until(lambda: values(prom.query("jest_operator_gang_restarts_total")), timeout=30,
                        what="a first scrape of the operator's gang restart counter")[0]

    namespace = cluster.new_namespace("dashboard")
    try:
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input_text=yaml.safe_dump(long_quickstart()))
        pods = wait_until(lambda: job_pods(cluster, namespace, 0), timeout=120, what="attempt 0 to run")
        wait_until(lambda: job_status(cluster, namespace).get("phase") == "Running"
                   and (job_status(cluster, namespace).get("progress") or {}).get("step", 0) >= 1,
                   timeout=180, what="the job to train")

        # a real worker failure: SIGKILL rank 1's trainer, its pod fails with exit code 137
        rank1 = next(p for p in pods if p["metadata"]["name"] == f"{JOB}-node-1")
        os.kill(int(rank1["status"]["containerStatuses"][0]["containerID"].removeprefix("local://")), signal.SIGKILL)
        wait_until(lambda: job_pods(cluster, namespace, 1), timeout=180,
                   what="the operator to restart the gang (attempt 1 running)")
        status = wait_until(lambda: (s := job_status(cluster, namespace)).get("phase") == "Running" and s,
                            timeout=60, what="the job to run again")
        assert status["restarts"] == 1, status

        wait_until(lambda: values(prom.query("jest_operator_gang_restarts_total")) == [before + 1.0]
                   and phase_counts(prom).get("Running") == 1.0, timeout=60,
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
        assert reconciles.get("error", 0.0) == 0, f"reconcile errors: {reconciles}\n{cluster.operator_log()[-3000:]}"
        for ref_id in ("A", "B"):
            quantiles = values(results[("Reconcile duration p50 / p95", ref_id)])
            assert len(quantiles) == 1 and math.isfinite(quantiles[0]) and quantiles[0] > 0, (ref_id, quantiles)
        p50, p95 = (values(results[("Reconcile duration p50 / p95", ref_id)])[0] for ref_id in ("A", "B"))
        assert p50 <= p95
        phases = {item["metric"]["phase"]: float(item["value"][1])
                  for item in results[("Training jobs by phase", "A")]}
        assert phases["Running"] == 1.0, phases
        assert values(results[("Gang restarts", "A")])[0] >= 1.0 - 1e-9
        assert values(prom.query("jest_operator_gang_restarts_total", at)) == [before + 1.0]

        # The phase gauge follows the job to its end.
        wait_until(lambda: job_status(cluster, namespace).get("phase") in ("Succeeded", "Failed"), timeout=420,
                   interval=2, what="the job to finish")
        assert job_status(cluster, namespace)["phase"] == "Succeeded", cluster.diagnostics(namespace)
        wait_until(lambda: phase_counts(prom).get("Succeeded", 0.0) >= 1.0 and phase_counts(prom).get("Running") == 0.0,
                   timeout=30, what="Prometheus to scrape the Succeeded job")
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
