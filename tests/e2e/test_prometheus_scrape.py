"""A real Prometheus scrapes a real 2-worker ``jestctl run`` and evaluates the chart's rules and dashboard.

Debian's ``prometheus`` runs as a plain process on a free loopback port (temporary storage, 1 s scrapes,
the chart's recording rules and alerts with their group intervals shortened to 1 s) and scrapes both
workers of ``jestctl run examples/quickstart.yaml --metrics-port P`` (rank r serves on P + r). Once both
ranks have trained for a while, every query is evaluated at that instant: the required metrics exist for
both ranks, their rates are positive, each recording rule returns a value, every dashboard query returns
data unless it is listed below as needing a metric this CPU-only run cannot have, and no energy series
claims ``method="measured"`` (this machine has no NVML and no RAPL). The run is then stopped with SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from jest_trainer.metrics import JOB_METRIC_NAMES, TRAINER_METRIC_NAMES

from tests.conftest import REPO_ROOT, find_free_port, find_free_port_pair, require_tool
from tests.integration.test_dashboard import dashboard_queries

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

RULES = REPO_ROOT / "charts" / "jest-operator" / "files" / "prometheus-rules.yaml"
JOB = "quickstart"
STEPS = 100_000  # far more than the checks need: the workers must still be serving while they run
READY_AT_STEP = 50
RECORDING_RULES = (
    "trainingjob:jest_train_examples:rate5m",
    "trainingjob:jest_joules_per_example:ratio_rate5m",
    "trainingjob:jest_selection_overhead:ratio_rate5m",
    "trainingjob:jest_power_watts:rate1m",
)
# Dashboard queries that cannot return data here, and why (each must indeed be empty).
ABSENT_ON_CPU = {
    ("Power over time", "B"): "measured per-device power needs a hardware counter (NVML/RAPL)",
    ("Reconciles by result", "A"): "operator metrics: no operator runs in a local jestctl run",
    ("Reconcile duration p50 / p95", "A"): "operator metrics: no operator runs",
    ("Reconcile duration p50 / p95", "B"): "operator metrics: no operator runs",
    ("Training jobs by phase", "A"): "operator metrics: no operator runs",
    ("Gang restarts", "A"): "operator metrics: no operator runs",
}




class PromClient:
    """Minimal HTTP API client of the test's Prometheus."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        response = requests.get(f"{self.base}/api/v1/query", params=params, timeout=10)
        body = response.json()
        assert body.get("status") == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def ready(self) -> bool:
        try:
            return requests.get(f"{self.base}/-/ready", timeout=2).status_code == 200
        except requests.RequestException:
            return False


def write_prometheus_config(directory: Path, targets: list[str]) -> Path:
    """prometheus.yml scraping ``targets`` every second, with the chart's rules evaluated every second."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
    (directory / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(directory / "rules.yaml")],
        "scrape_configs": [{"job_name": "jest-trainers", "static_configs": [{"targets": targets}]}],
    }
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def values(result: list[dict]) -> list[float]:
    return [float(item["value"][1]) for item in result]


def scrape_instant_with_every_target_up(prom: PromClient, *, targets: int, window_seconds: int = 3) -> float:
    """A recent evaluation time at which every target's last scrapes succeeded.

    A scrape that times out (1 s here) on a loaded machine writes staleness markers, and instant queries at
    that moment see no series; checking the dashboard's queries at an instant where ``up`` was 1 for every
    target over the last few seconds tests the queries, not the machine's load.
    """
    deadline = time.monotonic() + 60
    while True:
        at = time.time()
        up = values(prom.query(f"min_over_time(up[{window_seconds}s])", at))
        if len(up) == targets and min(up) == 1:
            return at
        assert time.monotonic() < deadline, f"targets kept failing scrapes: up = {up}"
        time.sleep(1.0)


def test_real_prometheus_scrapes_a_two_worker_run(tmp_path: Path, process_reaper: list) -> None:
    prometheus_bin = require_tool("prometheus")
    promtool = require_tool("promtool")
    metrics_port = find_free_port_pair()
    prom_port = find_free_port()
    config = write_prometheus_config(tmp_path, [f"127.0.0.1:{metrics_port}", f"127.0.0.1:{metrics_port + 1}"])
    check = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr

    prom_log = tmp_path / "prometheus.log"
    with prom_log.open("w") as log:
        process_reaper.append(subprocess.Popen(
            [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))
    prom = PromClient(prom_port)
    deadline = time.monotonic() + 60
    while not prom.ready():
        assert time.monotonic() < deadline, f"prometheus did not become ready:\n{tail(prom_log)}"
        assert process_reaper[0].poll() is None, f"prometheus exited:\n{tail(prom_log)}"
        time.sleep(0.5)

    run_log = tmp_path / "jestctl.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "JEST_PROGRESS": "plain"}
    jestctl = Path(sys.executable).with_name("jestctl")
    with run_log.open("w") as log:
        run = subprocess.Popen(
            [str(jestctl), "run", str(REPO_ROOT / "examples" / "quickstart.yaml"), "--no-progress",
             "--workdir", str(tmp_path / "work"), "--metrics-port", str(metrics_port),
             "--set", f"spec.training.steps={STEPS}", "--set", "spec.training.reference.train.steps=20",
             "--set", "spec.training.eval.intervalSteps=20", "--set", "spec.training.checkpoint.intervalSteps=25",
             "--set", "spec.energy.budgetJoules=1e12"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True,
        )
    process_reaper.append(run)

    # Wait until both ranks have trained READY_AT_STEP steps and an evaluation has been scraped.
    selector = f'trainingjob="{JOB}"'
    deadline = time.monotonic() + 150
    while True:
        assert run.poll() is None, f"jestctl run ended (rc {run.returncode}) before the checks:\n{tail(run_log)}"
        assert time.monotonic() < deadline, f"no progress scraped in time:\n{tail(run_log)}\n{tail(prom_log)}"
        steps = values(prom.query(f"jest_train_steps_total{{{selector}}}"))
        if len(steps) == 2 and min(steps) >= READY_AT_STEP and prom.query(f"jest_eval_accuracy{{{selector}}}"):
            break
        time.sleep(1.0)
    time.sleep(2.0)  # let the 1 s rule evaluations see the same data
    at = scrape_instant_with_every_target_up(prom, targets=2)

    # 1. Every trainer metric is exported by both ranks, with trainingjob and rank labels. Looked up over
    # the last 30 s: one scrape that times out on a loaded machine marks a series stale for an instant.
    for name in TRAINER_METRIC_NAMES:
        series_name = f"{name}_count" if name == "jest_step_duration_seconds" else name
        result = prom.query(f"last_over_time({series_name}{{{selector}}}[30s])", at)
        assert result, f"{name} was not scraped"
        if name in JOB_METRIC_NAMES:  # rank 0 alone, for the whole job, with no rank label to sum over
            assert len(result) == 1 and "rank" not in result[0]["metric"], (name, result)
        elif name not in {"jest_energy_budget_joules", "jest_eval_accuracy"}:
            assert {item["metric"].get("rank") for item in result} == {"0", "1"}, name
    # the job totals are the collective of the last progress report: 64 examples (both ranks) per step, and
    # the same modelled energy the ranks' own counters add up to at that moment (never more)
    job_steps = values(prom.query(f"last_over_time(jest_job_train_steps_total{{{selector}}}[30s])", at))[0]
    job_examples = values(prom.query(f"last_over_time(jest_job_train_examples_total{{{selector}}}[30s])", at))[0]
    assert job_steps >= 10 and job_examples == 64 * job_steps, (job_steps, job_examples)
    job_energy = prom.query(f"last_over_time(jest_job_energy_joules_total{{{selector}}}[30s])", at)
    assert [item["metric"]["method"] for item in job_energy] == ["modelled"], job_energy
    ranks_energy = sum(values(prom.query(f"last_over_time(jest_energy_consumed_joules_total{{{selector}}}[30s])", at)))
    assert 0 < float(job_energy[0]["value"][1]) <= ranks_energy
    assert values(prom.query(f"last_over_time(jest_energy_budget_joules{{{selector}}}[30s])", at)) == [1e12] * 2

    # 2. Rates are positive on every rank.
    for counter in ("jest_train_steps_total", "jest_train_examples_total", "jest_selection_candidates_total",
                    "jest_accelerator_energy_joules_total", "jest_model_flops_total", "jest_step_phase_seconds_total"):
        rates = values(prom.query(f"sum by (rank) (rate({counter}{{{selector}}}[15s]))", at))
        assert len(rates) == 2 and min(rates) > 0, f"{counter}: rates {rates}"

    # 3. Each recording rule returns a value for the job.
    for rule in RECORDING_RULES:
        rule_values = values(prom.query(f"{rule}{{{selector}}}", at))
        assert rule_values and min(rule_values) > 0, f"{rule}: {rule_values}"
    overhead = values(prom.query(f"trainingjob:jest_selection_overhead:ratio_rate5m{{{selector}}}", at))
    assert 0 < overhead[0] < 1
    assert not prom.query('ALERTS{alertname="JestEnergyTelemetryAbsent"}', at), "energy telemetry exists"

    # 4. Every dashboard query returns data, except those that need what a CPU-only local run lacks.
    substitutions = {"$__rate_interval": "15s", "$__range": "5m", "$trainingjob": JOB}
    empty = []
    for title, ref_id, expr in dashboard_queries(substitutions):
        result = prom.query(expr, at)
        if (title, ref_id) in ABSENT_ON_CPU:
            assert not result, f"{title}/{ref_id} returned data; drop it from ABSENT_ON_CPU"
        elif not result:
            empty.append(f"{title}/{ref_id}: {expr}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

    # 5. Honest energy: nothing here is measured; every energy series is modelled.
    assert not prom.query('count({__name__=~"jest_.*", method="measured"})', at)
    methods = {item["metric"]["method"] for item in prom.query(f'{{__name__=~"jest_.*", {selector}, method!=""}}', at)}
    assert methods == {"modelled"}

    # Stop the run the way a scheduler does (SIGTERM): workers checkpoint and exit, and so does jestctl (0).
    os.killpg(run.pid, signal.SIGTERM)
    assert run.wait(timeout=120) == 0, tail(run_log)
