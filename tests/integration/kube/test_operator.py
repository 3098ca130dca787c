"""The real operator (Kopf, subprocess) on a real kube-apiserver + etcd + kube-controller-manager.

The operator runs with the Helm chart's ServiceAccount token, so RBAC (and OwnerReferencesPermission-
Enforcement on its ``blockOwnerDeletion`` owner references) checks every call; manifests go through the
API server's own schema, defaulting and CEL; deleted jobs are cleaned up by the real garbage collector.
No kubelet runs: the tests play it (bind pods, report phases, finish graceful deletions). Each test has
its own namespace; one operator watches them all (``-A``, the chart's default).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from jest_trainer.config import EnergyConfig
from jest_trainer.energy import create_meter
from jest_trainer.metrics import TrainerMetrics

from hack.devcluster.controlplane import ControlPlane

from .conftest import REPO, Operator, start_operator, stop_process, wait_for
from .realcluster import (
    OPERATOR_NAMESPACE,
    OperatorIdentity,
    RealCluster,
    install_crd,
    job_manifest,
    new_namespace,
    operator_identity,
    wait_phase,
    wait_pods,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real(control_plane: ControlPlane) -> ControlPlane:
    install_crd(control_plane)
    return control_plane


@pytest.fixture(scope="module")
def identity(real: ControlPlane, module_tmp: Path) -> OperatorIdentity:
    return operator_identity(real, module_tmp)


@pytest.fixture(scope="module")
def operator(real: ControlPlane, identity: OperatorIdentity, module_tmp: Path) -> Iterator[Operator]:
    started = start_operator(identity.kubeconfig, module_tmp, namespaces=None)
    try:
        yield started
    finally:
        stop_process(started.process, grace=10)


@pytest.fixture
def ns(real: ControlPlane, operator: Operator) -> RealCluster:
    return new_namespace(real, "op")


def condition(status: dict, type_: str) -> dict:
    return next(c for c in status.get("conditions", []) if c["type"] == type_)


def env_of(pod: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env", [])}


def reasons(cluster: RealCluster, name: str) -> list[str]:
    return [e.get("reason") for e in cluster.events(name)]


def forbidden_in_log(operator: Operator) -> list[str]:
    """Log lines of refused API calls (our KubeError says 'HTTP 403', Kopf's errors say 'Forbidden')."""
    return [line for line in operator.log().splitlines() if re.search(r"HTTP 403|Forbidden", line)]


# ---------------------------------------------------------------------------------------------- the user flow
def test_quickstart_with_kubectl_runs_to_success(ns: RealCluster, operator: Operator):
    quickstart = REPO / "examples" / "quickstart.yaml"
    name = yaml.safe_load(quickstart.read_text())["metadata"]["name"]
    ns.kubectl("apply", "-f", str(quickstart))  # validated by the API server itself (schema + CEL)
    uid = ns.job(name)["metadata"]["uid"]
    pods = wait_pods(ns, name, 2)
    for index, pod in enumerate(pods):
        env = env_of(pod)
        assert env["MASTER_ADDR"] == f"{name}-node-0.{name}.{ns.namespace}.svc"
        assert env["WORLD_SIZE"] == "2" and env["RANK"] == str(index) and env["JEST_ATTEMPT"] == "0"
        (owner,) = pod["metadata"]["ownerReferences"]
        # created by the chart's ServiceAccount past OwnerReferencesPermissionEnforcement
        assert (owner["kind"], owner["uid"], owner["blockOwnerDeletion"]) == ("JESTTrainingJob", uid, True)
    assert [c["metadata"]["name"] for c in ns.children("configmaps", name)] == [f"{name}-config"]
    assert [c["metadata"]["name"] for c in ns.children("services", name)] == [name]

    for pod in pods:
        ns.set_pod_phase(pod["metadata"]["name"], "Running")
    status = wait_phase(ns, name, "Running")
    assert status["nodes"] == "2/2"
    table = ns.kubectl("get", "jtj", name).stdout.splitlines()  # columns as served by the API server
    assert table[0].split()[:7] == ["NAME", "PHASE", "NODES", "STEP", "SEL", "ENERGY(KJ)", "ENERGYBY"]
    assert table[1].split()[:3] == [name, "Running", "2/2"]

    ns.set_pod_phase(pods[1]["metadata"]["name"], "Succeeded")
    ns.set_pod_phase(pods[0]["metadata"]["name"], "Succeeded")
    status = wait_phase(ns, name, "Succeeded")
    assert condition(status, "Succeeded")["status"] == "True" and status["completionTime"]
    wait_for(lambda: {"Created", "AllPodsRunning", "Succeeded"} <= set(reasons(ns, name)), timeout=15,
             what="the Created/AllPodsRunning/Succeeded events")
    assert "Succeeded" in ns.kubectl("describe", "jtj", name).stdout
    assert forbidden_in_log(operator) == []


def test_failed_pod_restarts_the_gang_until_the_backoff_limit(ns: RealCluster, operator: Operator):
    name = "gang"
    ns.create_job(job_manifest(name, run_policy={"backoffLimit": 1}))
    first_uids = {p["metadata"]["uid"] for p in ns.run_pods(name, 2, attempt=0)}
    wait_phase(ns, name, "Running")

    ns.set_pod_phase(f"{name}-node-1", "Failed", reason="Error", message="worker crashed")
    pods = wait_pods(ns, name, 2, attempt=1)
    assert not first_uids & {p["metadata"]["uid"] for p in pods}
    status = ns.job(name)["status"]
    assert status["restarts"] == 1 and status.get("disruptions", 0) == 0
    assert "worker crashed" in condition(status, "Restarting")["message"]

    for pod in pods:
        ns.set_pod_phase(pod["metadata"]["name"], "Running")
    assert condition(wait_phase(ns, name, "Running"), "Restarting")["reason"] == "Recovered"

    ns.set_pod_phase(f"{name}-node-0", "Failed", reason="OOMKilled", message="out of memory")
    status = wait_phase(ns, name, "Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == "BackoffLimitExceeded" and "OOMKilled: out of memory" in failed["message"]
    assert status["restarts"] == 1
    wait_for(lambda: [p["metadata"]["name"] for p in ns.pods(name)] == [f"{name}-node-0"], timeout=15,
             what="cleanPodPolicy Running to remove the still running pod")


def test_suspend_deletes_pods_and_resume_recreates_them(ns: RealCluster, operator: Operator):
    name = "pausable"
    ns.create_job(job_manifest(name))
    ns.run_pods(name, 2)
    wait_phase(ns, name, "Running")

    ns.kubectl("patch", "jtj", name, "--type=merge", "-p", json.dumps({"spec": {"runPolicy": {"suspend": True}}}))
    status = wait_phase(ns, name, "Suspended")
    wait_pods(ns, name, 0)
    assert condition(status, "Suspended")["status"] == "True" and "startTime" not in status
    assert ns.children("configmaps", name), "suspension keeps the ConfigMap"

    ns.kubectl("patch", "jtj", name, "--type=merge", "-p", json.dumps({"spec": {"runPolicy": {"suspend": False}}}))
    wait_pods(ns, name, 2)
    status = wait_phase(ns, name, "Pending")
    assert condition(status, "Suspended")["reason"] == "Resumed"
    assert status["observedGeneration"] == 3  # the API server's generation: create, suspend, resume


def test_deleting_the_job_deletes_its_children(ns: RealCluster, operator: Operator):
    name = "doomed"
    ns.create_job(job_manifest(name))
    wait_pods(ns, name, 2)
    wait_for(lambda: ns.children("services", name) and ns.children("configmaps", name), what="the children")
    assert not ns.job(name)["metadata"].get("finalizers"), "the operator must stay finalizer-free"
    ns.kubectl("delete", "jtj", name, "--wait=false")
    wait_for(lambda: not ns.pods(name) and not ns.children("services", name)
             and not ns.children("configmaps", name), what="every child to be gone")


def test_invalid_spec_creates_nothing_and_says_which_field(ns: RealCluster, operator: Operator):
    name = "broken"
    # accepted by the CRD (no CEL can follow a reference between two lists), refused by the operator
    ns.create_job(job_manifest(name, spec_extra={"podTemplate": {"volumeMounts": [
        {"name": "data", "mountPath": "/data"}]}}))
    failed = condition(wait_phase(ns, name, "Failed"), "Failed")
    assert failed["reason"] == "InvalidSpec" and "spec.podTemplate.volumeMounts[0].name" in failed["message"]
    time.sleep(2)  # a couple of resyncs: still nothing
    assert ns.pods(name) == [] and ns.children("configmaps", name) == []
    wait_for(lambda: reasons(ns, name).count("InvalidSpec") == 1, what="exactly one InvalidSpec event")

    ns.patch_job(name, {"spec": {"podTemplate": {"volumes": [{"name": "data", "emptyDir": {}}]}}})
    wait_pods(ns, name, 2)
    assert condition(ns.job(name)["status"], "Failed")["reason"] == "SpecFixed"


def test_the_api_server_refuses_what_the_crd_forbids(ns: RealCluster, operator: Operator):
    manifest = job_manifest("indivisible", num_nodes=3)  # 32 examples over 3 nodes x 4 chunks
    result = ns.kubectl("apply", "-f", "-", input_text=json.dumps(manifest), check=False)
    assert result.returncode != 0 and "batchSize" in result.stderr
    assert ns.job("indivisible") is None


# ---------------------------------------------------------------------------------------------- real-server defects
def test_a_recreated_job_waits_for_the_old_pods_and_never_adopts_them(ns: RealCluster, operator: Operator):
    name = "phoenix"
    old_uid = ns.create_job(job_manifest(name, run_policy={"backoffLimit": 0}))["metadata"]["uid"]
    for pod in ns.run_pods(name, 2):  # a finalizer keeps them after the garbage collector deleted them
        ns.patch_pod(pod["metadata"]["name"], {"metadata": {"finalizers": ["test.jest.training/hold"]}})
    wait_phase(ns, name, "Running")
    ns.delete_job(name)
    wait_for(lambda: ns.job(name) is None and all(p["metadata"].get("deletionTimestamp") for p in ns.pods(name)),
             what="the old job gone and its pods terminating (GC)")

    new_uid = ns.create_job(job_manifest(name, run_policy={"backoffLimit": 0}))["metadata"]["uid"]
    assert new_uid != old_uid
    wait_for(lambda: (condition((ns.job(name) or {}).get("status") or {"conditions": [{"type": "Created"}]},
                                "Created").get("reason") == "NameInUse"), what="the new job to wait for the names")
    time.sleep(3)  # several resyncs: neither adopted nor counted
    status = ns.job(name)["status"]
    assert status["phase"] == "Pending" and status["restarts"] == 0 and status["nodes"] == "0/2"
    assert "left by a deleted job of the same name" in condition(status, "Created")["message"]
    assert {p["metadata"]["ownerReferences"][0]["uid"] for p in ns.pods(name)} == {old_uid}

    for pod in ns.pods(name):  # GC finishes
        ns.patch_pod(pod["metadata"]["name"], {"metadata": {"finalizers": None}})
    pods = wait_pods(ns, name, 2, attempt=0)
    assert {p["metadata"]["ownerReferences"][0]["uid"] for p in pods} == {new_uid}
    for pod in pods:
        ns.set_pod_phase(pod["metadata"]["name"], "Running")
    status = wait_phase(ns, name, "Running")
    assert status["restarts"] == 0 and condition(status, "Created")["reason"] == "Created"


def test_block_owner_deletion_needs_the_finalizers_rule(real: ControlPlane, ns: RealCluster, module_tmp: Path,
                                                       operator: Operator):
    """The chart grants update on jesttrainingjobs/finalizers; without it OwnerReferencesPermissionEnforcement
    refuses every child the operator creates (what OpenShift users met)."""
    job = ns.create_job(job_manifest("owned", run_policy={"suspend": True}))
    owner = {"apiVersion": "jest.training/v1alpha1", "kind": "JESTTrainingJob", "name": "owned",
             "uid": job["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    child = {"apiVersion": "v1", "kind": "ConfigMap", "data": {"a": "b"},
             "metadata": {"name": "probe", "ownerReferences": [owner]}}
    reduced = operator_identity(real, module_tmp, drop_rules={("jest.training", "jesttrainingjobs/finalizers")})
    path = f"/api/v1/namespaces/{ns.namespace}/configmaps"
    status, body = ns.api("POST", path, child, token=reduced.token)
    assert status == 403 and "cannot set blockOwnerDeletion" in json.dumps(body)
    full = operator_identity(real, module_tmp)
    ns.api("POST", path, child, token=full.token, expect=(201,))


def test_gang_shape_is_immutable_while_running_and_training_edits_reach_the_config_map(
        ns: RealCluster, operator: Operator):
    name = "steady"
    ns.create_job(job_manifest(name))
    pods = ns.run_pods(name, 2)
    wait_phase(ns, name, "Running")
    uids = [p["metadata"]["uid"] for p in pods]

    refused = ns.kubectl("patch", "jtj", name, "--type=merge", "-p", json.dumps({"spec": {"numNodes": 4}}),
                         check=False)
    assert refused.returncode != 0
    assert "spec.numNodes cannot change while the job runs" in refused.stderr
    refused = ns.kubectl("patch", "jtj", name, "--type=merge", "-p",
                         json.dumps({"spec": {"training": {"model": {"embedDim": 32}}}}), check=False)
    assert refused.returncode != 0 and "spec.training.model is immutable" in refused.stderr

    ns.kubectl("patch", "jtj", name, "--type=merge", "-p",
               json.dumps({"spec": {"training": {"steps": 77, "optimizer": {"lr": 0.001}}}}))

    def config() -> dict:
        (config_map,) = ns.children("configmaps", name)
        return json.loads(config_map["data"]["config.json"])

    wait_for(lambda: config()["training"]["steps"] == 77, what="the edited spec.training in config.json")
    assert config()["training"]["optimizer"]["lr"] == 0.001
    assert [p["metadata"]["uid"] for p in ns.pods(name)] == uids, "a running gang is not restarted by an edit"
    assert ns.job(name)["status"]["phase"] == "Running"

    # suspended and stopped, the shape may change (what a queueing controller does before admission)
    ns.kubectl("patch", "jtj", name, "--type=merge", "-p", json.dumps({"spec": {"runPolicy": {"suspend": True}}}))
    wait_phase(ns, name, "Suspended")
    wait_pods(ns, name, 0)
    ns.kubectl("patch", "jtj", name, "--type=merge", "-p", json.dumps({"spec": {"numNodes": 4}}))
    ns.kubectl("patch", "jtj", name, "--type=merge", "-p", json.dumps({"spec": {"runPolicy": {"suspend": False}}}))
    pods = wait_pods(ns, name, 4)
    assert {env_of(p)["WORLD_SIZE"] for p in pods} == {"4"}


def test_failure_restart_deletes_with_a_short_grace_eviction_keeps_the_full_one(ns: RealCluster,
                                                                                operator: Operator):
    from jest_operator.status import SHORT_GRACE_SECONDS

    name = "graceful"
    ns.create_job(job_manifest(name, run_policy={"backoffLimit": 0}))
    ns.run_pods(name, 2, bind=True)
    wait_phase(ns, name, "Running")

    # eviction (kubectl drain, preemption): DisruptionTarget on the pod, then its graceful deletion
    ns.evict(f"{name}-node-1")
    status = wait_phase(ns, name, "Restarting")
    assert status["restarts"] == 1 and status["disruptions"] == 1
    restarting = condition(status, "Restarting")
    assert restarting["reason"] == "PodDisrupted" and "EvictionByEvictionAPI" in restarting["message"]
    survivor = wait_for(lambda: (ns.pod(f"{name}-node-0") or {}).get("metadata", {}).get("deletionTimestamp")
                        and ns.pod(f"{name}-node-0"), what="the survivor's deletion")
    assert survivor["metadata"]["deletionGracePeriodSeconds"] == 120  # the gang checkpoints together
    for index in (0, 1):
        ns.finish_deletion(f"{name}-node-{index}")
    ns.run_pods(name, 2, attempt=1, bind=True)
    status = wait_phase(ns, name, "Running")
    assert status["restarts"] == 1, "backoffLimit 0 and still running: the eviction did not count"

    # a crash: the collective is broken, nothing left to checkpoint -> short grace
    ns.set_pod_phase(f"{name}-node-1", "Failed", reason="Error", message="crash")
    status = wait_phase(ns, name, "Failed")  # backoffLimit 0: this one counts
    assert condition(status, "Failed")["reason"] == "BackoffLimitExceeded"
    survivor = wait_for(lambda: (ns.pod(f"{name}-node-0") or {}).get("metadata", {}).get("deletionTimestamp")
                        and ns.pod(f"{name}-node-0"), what="cleanPodPolicy deleting the survivor")
    assert survivor["metadata"]["deletionGracePeriodSeconds"] == SHORT_GRACE_SECONDS


def test_a_crash_restart_uses_the_short_grace(ns: RealCluster, operator: Operator):
    from jest_operator.status import SHORT_GRACE_SECONDS

    name = "crashy"
    ns.create_job(job_manifest(name, run_policy={"backoffLimit": 2}))
    ns.run_pods(name, 2, bind=True)
    wait_phase(ns, name, "Running")
    ns.set_pod_phase(f"{name}-node-1", "Failed", reason="Error", message="segfault")
    survivor = wait_for(lambda: (ns.pod(f"{name}-node-0") or {}).get("metadata", {}).get("deletionTimestamp")
                        and ns.pod(f"{name}-node-0"), what="the gang restart's deletion")
    assert survivor["metadata"]["deletionGracePeriodSeconds"] == SHORT_GRACE_SECONDS
    time.sleep(2)
    assert [p["metadata"]["name"] for p in ns.pods(name)] == [f"{name}-node-0"], (
        "no new rank while the old rank 0 is still terminating")
    ns.finish_deletion(f"{name}-node-0")
    pods = wait_pods(ns, name, 2, attempt=1)
    assert ns.job(name)["status"]["restarts"] == 1 and len(pods) == 2


# ---------------------------------------------------------------------------------------------- telemetry
def test_progress_and_energy_budget_suspend_through_real_metrics_endpoints(ns: RealCluster, operator: Operator):
    name = "budgeted"
    ns.create_job(job_manifest(name, energy={"budgetJoules": 5000, "onBudgetExceeded": "Suspend",
                                             "carbonIntensityGramsPerKWh": 400}))
    pods = wait_pods(ns, name, 2)
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
            ns.kubectl("annotate", "pod", pod["metadata"]["name"],
                       f"jest.training/metrics-url=http://127.0.0.1:{port}/metrics")
            ns.set_pod_phase(pod["metadata"]["name"], "Running")
        wait_phase(ns, name, "Running")
        wait_for(lambda: (ns.job(name)["status"].get("progress") or {}).get("step") == 3, what="progress")
        status = ns.job(name)["status"]
        assert status["progress"]["examplesTrained"] == 96
        assert status["progress"]["observedSelectionRatio"] == pytest.approx(0.2)
        energy = status["energy"]
        assert energy["method"] == "modelled" and energy["source"] == "config:modelledWattsPerDevice"
        assert energy["joules"] >= 2000 and energy["co2eGrams"] > 0

        for meter in meters:
            meter.stop()
        for metrics in ranks:
            metrics.attach_energy(create_meter(config, device_kind="cpu", device_indices=[0], initial_joules=3000.0))
        status = wait_phase(ns, name, "Suspended")
        assert condition(status, "Suspended")["reason"] == "EnergyBudgetExceeded"
        assert ns.job(name)["spec"]["runPolicy"]["suspend"] is True  # patched by the ServiceAccount
        wait_pods(ns, name, 0)
    finally:
        for meter in meters:
            meter.stop()
        for metrics in ranks:
            metrics.close()


def test_operator_metrics_and_rbac_cleanliness(ns: RealCluster, operator: Operator, identity: OperatorIdentity):
    ns.create_job(job_manifest("metered"))
    wait_pods(ns, "metered", 2)
    wait_for(lambda: 'jest_operator_reconcile_total{result="ok"} 0.0' not in operator.metrics(), what="reconciles")
    text = operator.metrics()
    for family in ("jest_operator_reconcile_total", "jest_operator_reconcile_duration_seconds_bucket",
                   "jest_operator_trainingjobs", "jest_operator_gang_restarts_total"):
        assert family in text
    health = requests.get(f"http://127.0.0.1:{operator.liveness_port}/healthz", timeout=5).json()
    assert "resync" in health
    assert forbidden_in_log(operator) == [], "the chart's RBAC must cover every call the operator makes"
    assert identity.service_account and OPERATOR_NAMESPACE
