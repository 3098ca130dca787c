"""The real operator (Kopf, subprocess) against the emulator, driven the way users do: kubectl and pod phases.

The emulator has no kubelet: tests patch pod phases themselves (what a kubelet would report).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jest_operator.handlers import decide
from jest_trainer.config import EnergyConfig
from jest_trainer.energy import create_meter
from jest_trainer.metrics import TrainerMetrics

from .conftest import (
    REPO,
    Cluster,
    Operator,
    job_manifest,
    phase_of,
    start_emulator,
    start_operator,
    stop_process,
    wait_for,
    wait_phase,
    wait_pods,
)

pytestmark = pytest.mark.slow


def condition(status: dict, type_: str) -> dict:
    return next(c for c in status.get("conditions", []) if c["type"] == type_)


def env_of(pod: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env", [])}


def reasons(cluster: Cluster, name: str) -> list[str]:
    return [e.get("reason") for e in cluster.events(name)]


def test_quickstart_with_kubectl_runs_to_success(cluster: Cluster, operator: Operator):
    quickstart = REPO / "examples" / "quickstart.yaml"
    name = yaml.safe_load(quickstart.read_text())["metadata"]["name"]
    cluster.kubectl("apply", "--validate=false", "-f", str(quickstart))
    pods = wait_pods(cluster, name, 2)
    for index, pod in enumerate(pods):
        env = env_of(pod)
        assert env["MASTER_ADDR"] == f"{name}-node-0.{name}.default.svc"
        assert env["MASTER_PORT"] == "29500"
        assert env["WORLD_SIZE"] == "2" and env["RANK"] == str(index)
        assert env["JEST_ATTEMPT"] == "0" and env["JEST_JOB_NAME"] == name
        assert pod["metadata"]["ownerReferences"][0]["kind"] == "JESTTrainingJob"
    assert [c["metadata"]["name"] for c in cluster.children("configmaps", name)] == [f"{name}-config"]
    assert [c["metadata"]["name"] for c in cluster.children("services", name)] == [name]

    for pod in pods:
        cluster.set_pod_phase(pod["metadata"]["name"], "Running")
    status = wait_phase(cluster, name, "Running")
    assert status["nodes"] == "2/2"
    table = cluster.kubectl("get", "jtj", name).stdout.splitlines()
    assert table[0].split()[:6] == ["NAME", "PHASE", "NODES", "STEP", "SEL", "ENERGY(KJ)"]
    assert table[1].split()[:3] == [name, "Running", "2/2"]
    crd = yaml.safe_load((REPO / "crds" / "jesttrainingjobs.jest.training.yaml").read_text())
    columns = [c for c in crd["spec"]["versions"][0]["additionalPrinterColumns"] if c["name"] in ("Phase", "Nodes")]
    custom = ",".join(f"{c['name'].upper()}:{c['jsonPath']}" for c in columns)
    assert cluster.kubectl("get", "jestjob", name, "-o", f"custom-columns={custom}").stdout.split()[-2:] == [
        "Running", "2/2"]

    cluster.set_pod_phase(pods[1]["metadata"]["name"], "Succeeded")
    cluster.set_pod_phase(pods[0]["metadata"]["name"], "Succeeded")
    status = wait_phase(cluster, name, "Succeeded")
    assert condition(status, "Succeeded")["status"] == "True"
    assert status["completionTime"]
    wait_for(lambda: {"Created", "AllPodsRunning", "Succeeded"} <= set(reasons(cluster, name)), timeout=15,
             what="the Created/AllPodsRunning/Succeeded events")
    assert "Succeeded" in cluster.kubectl("describe", "jtj", name).stdout


def test_failed_pod_restarts_the_gang_until_the_backoff_limit(cluster: Cluster, operator: Operator):
    name = "gang"
    cluster.create_job(job_manifest(name, run_policy={"backoffLimit": 1}))
    pods = wait_pods(cluster, name, 2, attempt=0)
    first_uids = {p["metadata"]["uid"] for p in pods}
    for pod in pods:
        cluster.set_pod_phase(pod["metadata"]["name"], "Running")
    wait_phase(cluster, name, "Running")

    cluster.set_pod_phase(f"{name}-node-1", "Failed", reason="Error", message="worker crashed")
    pods = wait_pods(cluster, name, 2, attempt=1)
    assert not first_uids & {p["metadata"]["uid"] for p in pods}
    assert {env_of(p)["JEST_ATTEMPT"] for p in pods} == {"1"}
    status = cluster.job(name)["status"]
    assert status["restarts"] == 1
    assert status["phase"] in ("Restarting", "Pending")
    assert "worker crashed" in condition(status, "Restarting")["message"]

    for pod in pods:
        cluster.set_pod_phase(pod["metadata"]["name"], "Running")
    status = wait_phase(cluster, name, "Running")
    assert condition(status, "Restarting")["reason"] == "Recovered"

    cluster.set_pod_phase(f"{name}-node-0", "Failed", reason="OOMKilled", message="out of memory")
    status = wait_phase(cluster, name, "Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "OOMKilled: out of memory" in failed["message"]
    assert status["restarts"] == 1
    wait_for(lambda: [p["metadata"]["name"] for p in cluster.pods(name)] == [f"{name}-node-0"], timeout=15,
             what="cleanPodPolicy Running to remove the still running pod")
    assert "gang_restarts_total 1.0" in operator.metrics().replace("jest_operator_", "")


def test_suspend_deletes_pods_and_resume_recreates_them(cluster: Cluster, operator: Operator):
    name = "pausable"
    cluster.create_job(job_manifest(name))
    pods = wait_pods(cluster, name, 2)
    for pod in pods:
        cluster.set_pod_phase(pod["metadata"]["name"], "Running")
    wait_phase(cluster, name, "Running")

    cluster.kubectl("patch", "jtj", name, "--type=merge", "-p", json.dumps({"spec": {"runPolicy": {"suspend": True}}}))
    status = wait_phase(cluster, name, "Suspended")
    wait_pods(cluster, name, 0)
    assert condition(status, "Suspended")["status"] == "True"
    assert "startTime" not in status
    assert cluster.children("configmaps", name), "suspension keeps the ConfigMap"

    cluster.kubectl("patch", "jtj", name, "--type=merge", "-p", json.dumps({"spec": {"runPolicy": {"suspend": False}}}))
    pods = wait_pods(cluster, name, 2)
    status = wait_phase(cluster, name, "Pending")
    assert condition(status, "Suspended")["reason"] == "Resumed"
    assert status["observedGeneration"] == 3
    wait_for(lambda: {"Suspended", "Resumed"} <= set(reasons(cluster, name)), timeout=15, what="events")


def test_deleting_the_job_deletes_its_children(cluster: Cluster, operator: Operator):
    name = "doomed"
    cluster.create_job(job_manifest(name))
    wait_pods(cluster, name, 2)
    wait_for(lambda: cluster.children("services", name), what="the service")
    assert not cluster.job(name)["metadata"].get("finalizers"), "the operator must stay finalizer-free"
    cluster.kubectl("delete", "jtj", name, "--wait=false")
    wait_pods(cluster, name, 0)
    wait_for(lambda: not cluster.children("services", name) and not cluster.children("configmaps", name),
             what="service and config map removal")


def test_invalid_spec_creates_nothing_and_says_which_field(cluster: Cluster, operator: Operator):
    name = "broken"
    # 32 examples over 3 nodes x 4 chunks does not divide: the CRD cannot express this, the operator can
    cluster.create_job(job_manifest(name, num_nodes=3))
    status = wait_phase(cluster, name, "Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec." in failed["message"] and "batchSize" in failed["message"]
    time.sleep(2)  # a couple of resyncs: still nothing
    assert cluster.pods(name) == []
    assert cluster.children("configmaps", name) == [] and cluster.children("services", name) == []
    wait_for(lambda: reasons(cluster, name).count("InvalidSpec") == 1, what="exactly one InvalidSpec event")

    cluster.patch_job(name, {"spec": {"numNodes": 2}})
    wait_pods(cluster, name, 2)
    assert condition(cluster.job(name)["status"], "Failed")["reason"] == "SpecFixed"


def test_progress_and_energy_budget_suspend_through_real_metrics_endpoints(cluster: Cluster, operator: Operator):
    name = "budgeted"
    cluster.create_job(job_manifest(name, energy={"budgetJoules": 5000, "onBudgetExceeded": "Suspend",
                                                  "carbonIntensityGramsPerKWh": 400}))
    pods = wait_pods(cluster, name, 2)
    config = EnergyConfig(modelled_watts_per_device=50.0, backend="modelled")
    ranks, meters = [], []
    try:
        for index, pod in enumerate(pods):
            metrics = TrainerMetrics(trainingjob=name, rank=index)
            meter = create_meter(config, device_kind="cpu", device_indices=[0], initial_joules=1000.0,
                                 interval_seconds=0.05)
            meter.start()
            metrics.attach_energy(meter)
            for _ in range(3):
                metrics.observe_step(duration_seconds=0.2, phase_seconds={"selection": 0.05, "forward_backward": 0.15},
                                     examples=16, candidates=80, flops={"train": 1e9}, loss=0.4, selection_ratio=0.2)
            port = metrics.serve(0)
            ranks.append(metrics)
            meters.append(meter)
            cluster.kubectl("annotate", "pod", pod["metadata"]["name"],
                            f"jest.training/metrics-url=http://127.0.0.1:{port}/metrics")
            cluster.set_pod_phase(pod["metadata"]["name"], "Running")
        status = wait_phase(cluster, name, "Running")
        wait_for(lambda: (cluster.job(name)["status"].get("progress") or {}).get("step") == 3, what="progress")
        status = cluster.job(name)["status"]
        assert status["progress"]["examplesTrained"] == 96
        assert status["progress"]["observedSelectionRatio"] == pytest.approx(0.2)
        assert status["throughput"]["selectionOverheadFraction"] == pytest.approx(0.25)
        energy = status["energy"]
        assert energy["method"] == "modelled" and energy["source"] == "config:modelledWattsPerDevice"
        assert energy["joules"] >= 2000 and energy["co2eGrams"] > 0

        for meter in meters:  # spend the budget: a restored total beyond it
            meter.stop()
        budget_meters = [create_meter(config, device_kind="cpu", device_indices=[0], initial_joules=3000.0)
                         for _ in ranks]
        for metrics, meter in zip(ranks, budget_meters, strict=True):
            metrics.attach_energy(meter)
        status = wait_phase(cluster, name, "Suspended")
        assert condition(status, "Suspended")["reason"] == "EnergyBudgetExceeded"
        assert cluster.job(name)["spec"]["runPolicy"]["suspend"] is True
        wait_pods(cluster, name, 0)
        wait_for(lambda: "EnergyBudgetExceeded" in reasons(cluster, name), what="the budget event")
    finally:
        for meter in meters:
            meter.stop()
        for metrics in ranks:
            metrics.close()


def test_operator_metrics_are_exported(cluster: Cluster, operator: Operator):
    text = operator.metrics()
    for family in ("jest_operator_reconcile_total", "jest_operator_reconcile_duration_seconds_bucket",
                   "jest_operator_trainingjobs", "jest_operator_gang_restarts_total"):
        assert family in text
    assert 'jest_operator_reconcile_total{result="ok"}' in text
    assert 'jest_operator_reconcile_total{result="ok"} 0.0' not in text
    health = requests.get(f"http://127.0.0.1:{operator.liveness_port}/healthz", timeout=5).json()
    assert "resync" in health


def test_operator_restart_neither_duplicates_nor_loses_pods(tmp_path: Path):
    cluster = start_emulator(tmp_path, "--no-crd")
    first = second = None
    try:
        cluster.kubectl("apply", "--validate=false", "-f", str(REPO / "crds"))
        first = start_operator(cluster, tmp_path, name="first")
        for name in ("survivor-a", "survivor-b"):
            cluster.create_job(job_manifest(name))
        before = {name: wait_pods(cluster, name, 2) for name in ("survivor-a", "survivor-b")}
        for pod in before["survivor-a"]:
            cluster.set_pod_phase(pod["metadata"]["name"], "Running")
        wait_phase(cluster, "survivor-a", "Running")
        stop_process(first.process, grace=0.1)  # crash-like stop mid-job

        cluster.set_pod_phase("survivor-b-node-0", "Running")  # the world moves on while it is down
        cluster.set_pod_phase("survivor-b-node-1", "Running")
        cluster.create_job(job_manifest("newcomer"))
        second = start_operator(cluster, tmp_path, name="second")
        wait_phase(cluster, "survivor-b", "Running")
        wait_pods(cluster, "newcomer", 2)
        time.sleep(3)  # several resyncs
        for name, pods in before.items():
            after = cluster.pods(name)
            assert [p["metadata"]["uid"] for p in after] == [p["metadata"]["uid"] for p in pods], name
        assert cluster.job("survivor-a")["status"]["restarts"] == 0
        assert 'jest_operator_reconcile_total{result="error"} 0.0' in second.metrics()
    finally:
        for proc in (first, second):
            if proc is not None:
                stop_process(proc.process, grace=10)
        stop_process(cluster.process)


# ---------------------------------------------------------------------------------------------- fuzzing
def make_json_values(*, allow_nan: bool) -> st.SearchStrategy:
    """Arbitrary JSON-ish values (NaN only where the value never travels as JSON)."""
    return st.recursive(
        st.none() | st.booleans() | st.integers(-10, 10**12) | st.floats(allow_nan=allow_nan,
                                                                          allow_infinity=allow_nan)
        | st.text(max_size=12),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=4),
        max_leaves=12,
    )


def make_spec_fields(json_values: st.SearchStrategy) -> st.SearchStrategy:
    """Specs mixing plausible and garbage values in every field."""
    return st.fixed_dictionaries(
        {},
        optional={
            "image": st.one_of(st.text(max_size=20), json_values),
            "numNodes": st.one_of(st.integers(-2, 6), json_values),
            "numProcPerNode": st.one_of(st.integers(-1, 4), json_values),
            "accelerator": st.one_of(
                st.fixed_dictionaries({"type": st.sampled_from(["cpu", "gpu", "tpu", "fpga"])},
                                      optional={"count": st.integers(-1, 9)}),
                json_values),
            "training": st.one_of(
                st.fixed_dictionaries({}, optional={
                    "steps": st.one_of(st.integers(-5, 10**9), json_values),
                    "selection": st.fixed_dictionaries({}, optional={
                        "batchSize": st.integers(-4, 1024), "chunks": st.integers(-1, 64),
                        "filterRatio": st.floats(-1, 2, allow_nan=False), "method": st.text(max_size=10)}),
                }),
                json_values),
            "runPolicy": st.one_of(
                st.fixed_dictionaries({}, optional={
                    "suspend": json_values, "backoffLimit": st.integers(-3, 5),
                    "activeDeadlineSeconds": st.integers(-5, 100), "cleanPodPolicy": st.text(max_size=8)}),
                json_values),
            "energy": st.one_of(
                st.fixed_dictionaries({}, optional={
                    "budgetJoules": json_values,
                    "onBudgetExceeded": st.sampled_from(["Warn", "Suspend", "Fail", "x"])}),
                json_values),
            "podTemplate": json_values,
            "bogus": json_values,
        },
    )


json_values = make_json_values(allow_nan=True)
spec_fields = make_spec_fields(json_values)
bodies = st.fixed_dictionaries({
    "apiVersion": st.sampled_from(["jest.training/v1alpha1", "v1"]),
    "kind": st.sampled_from(["JESTTrainingJob", "Pod"]),
    "metadata": st.fixed_dictionaries({"name": st.sampled_from(["fuzz", "Bad_Name", "x" * 70, ""]),
                                       "namespace": st.just("default"), "uid": st.just("u")},
                                      optional={"generation": json_values}),
    "spec": st.one_of(spec_fields, json_values),
}, optional={"status": json_values})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies)
def test_handler_entry_point_never_crashes_on_bad_input(body):
    from datetime import UTC, datetime

    outcome, result = decide(body, [], existing_children=None, progress=None, now=datetime(2026, 1, 1, tzinfo=UTC))
    assert outcome in ("ok", "invalid")
    if outcome == "invalid":
        assert result.create == ()
        failed = next(c for c in result.status["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "InvalidSpec" and ":" in failed["message"]


@settings(max_examples=1, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(specs=st.lists(make_spec_fields(make_json_values(allow_nan=False)), min_size=12, max_size=12))
def test_fuzzed_specs_through_the_running_operator(cluster: Cluster, operator: Operator, specs: list[dict]):
    """Random specs straight into the API (no CRD validation here): every job gets a status, the operator lives."""
    names = []
    for index, spec in enumerate(specs):
        name = f"fuzz-{index}"
        names.append(name)
        response = requests.post(cluster.url + "/apis/jest.training/v1alpha1/namespaces/default/jesttrainingjobs",
                                 json={"apiVersion": "jest.training/v1alpha1", "kind": "JESTTrainingJob",
                                       "metadata": {"name": name}, "spec": spec}, timeout=5)
        assert response.status_code == 201, response.text
    try:
        for name in names:
            wait_for(lambda name=name: phase_of(cluster, name) in ("Pending", "Failed", "Suspended"), timeout=30,
                     what=f"a status for {name}")
        assert operator.process.poll() is None
        assert requests.get(f"http://127.0.0.1:{operator.liveness_port}/healthz", timeout=5).status_code == 200
    finally:
        for name in names:
            requests.delete(cluster.url + f"/apis/jest.training/v1alpha1/namespaces/default/jesttrainingjobs/{name}",
                            timeout=5)
