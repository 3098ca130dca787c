"""Tests that control the operator processes themselves, on the real control plane (no module-wide operator).

A SIGKILLed operator restarted mid-job neither duplicates nor loses pods; kube-apiserver or etcd restarted
under a running job leaves it intact and the operator resumes its watches; a standby replica under Kopf
peering does nothing (its resync loop included); a status write computed from a stale read is refused by
the API server (resourceVersion precondition) and re-planned instead of overwriting a newer write.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jest_operator.handlers import reconcile_job
from jest_operator.kube import KubeClient

from hack.devcluster.controlplane import ControlPlane

from .conftest import Operator, start_operator, stop_process, wait_for
from .realcluster import (
    OperatorIdentity,
    RealCluster,
    install_crd,
    job_manifest,
    new_namespace,
    operator_identity,
    restart_component,
    wait_phase,
    wait_pods,
)

pytestmark = pytest.mark.slow
PEERING = "jest-operator-test"


@pytest.fixture(scope="module")
def real(control_plane: ControlPlane) -> ControlPlane:
    install_crd(control_plane)
    return control_plane


@pytest.fixture(scope="module")
def identity(real: ControlPlane, module_tmp: Path) -> OperatorIdentity:
    """The chart's RBAC for a peering group (replicas > 1: the ClusterKopfPeering CRD and its rules too)."""
    return operator_identity(real, module_tmp, values={"replicas": 2})


@pytest.fixture
def operators() -> Iterator[list[Operator]]:
    started: list[Operator] = []
    yield started
    for operator in started:
        stop_process(operator.process, grace=10)


def reconciles(operator: Operator) -> float:
    """Every reconcile this operator ran, whatever its outcome."""
    found = re.findall(r'^jest_operator_reconcile_total\{result="\w+"\} ([0-9.e+]+)$', operator.metrics(), re.M)
    return sum(float(value) for value in found)


def admin_client(cp: ControlPlane) -> KubeClient:
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(config_file=str(cp.kubeconfig), client_configuration=configuration)
    return KubeClient(client.ApiClient(configuration))


def test_sigkilled_operator_neither_duplicates_nor_loses_pods(real: ControlPlane, identity: OperatorIdentity,
                                                              module_tmp: Path, operators: list[Operator]):
    ns = new_namespace(real, "restart")
    operators.append(start_operator(identity.kubeconfig, module_tmp, namespaces=None, name="first"))
    for name in ("survivor-a", "survivor-b"):
        ns.create_job(job_manifest(name))
    before = {name: wait_pods(ns, name, 2) for name in ("survivor-a", "survivor-b")}
    for pod in before["survivor-a"]:
        ns.set_pod_phase(pod["metadata"]["name"], "Running")
    wait_phase(ns, "survivor-a", "Running")
    burst = [f"burst-{i}" for i in range(4)]
    for name in burst:  # SIGKILL while these are being reconciled (some pods created, some not)
        ns.create_job(job_manifest(name))
    time.sleep(0.3)
    os.killpg(operators[0].process.pid, signal.SIGKILL)
    operators[0].process.wait(timeout=10)

    ns.set_pod_phase("survivor-b-node-0", "Running")  # the world moves on while it is down
    ns.set_pod_phase("survivor-b-node-1", "Running")
    ns.create_job(job_manifest("newcomer"))
    restarted = time.monotonic()
    second = start_operator(identity.kubeconfig, module_tmp, namespaces=None, name="second")
    operators.append(second)
    wait_phase(ns, "survivor-b", "Running")
    wait_pods(ns, "newcomer", 2)
    for name in burst:
        assert len(wait_pods(ns, name, 2, attempt=0)) == 2
    recovered = time.monotonic() - restarted
    time.sleep(3)  # several resyncs
    for name in burst:
        assert len(ns.pods(name)) == 2 and ns.job(name)["status"]["restarts"] == 0, name
    for name, pods in before.items():
        after = ns.pods(name)
        assert [p["metadata"]["uid"] for p in after] == [p["metadata"]["uid"] for p in pods], name
        assert ns.job(name)["status"]["restarts"] == 0
    assert 'jest_operator_reconcile_total{result="error"} 0.0' in second.metrics()
    print(f"operator restart to the newcomer's pods: {recovered:.1f} s")


def test_a_standby_replica_does_nothing_not_even_its_resync(real: ControlPlane, identity: OperatorIdentity,
                                                            module_tmp: Path, operators: list[Operator]):
    ns = new_namespace(real, "peers")
    real.kubectl("apply", "-f", "-", input=(
        f"apiVersion: kopf.dev/v1\nkind: ClusterKopfPeering\nmetadata: {{name: {PEERING}}}\n"))
    low = start_operator(identity.kubeconfig, module_tmp, namespaces=None, name="low",
                         extra_args=("--peering", PEERING, "--priority", "0"))
    operators.append(low)
    ns.create_job(job_manifest("watched"))
    wait_pods(ns, "watched", 2)  # the only replica: it acts
    wait_for(lambda: reconciles(low) > 0, what="the low-priority replica reconciling while alone")

    high = start_operator(identity.kubeconfig, module_tmp, namespaces=None, name="high",
                          extra_args=("--peering", PEERING, "--priority", "10"))
    operators.append(high)
    wait_for(lambda: "Pausing operations" in low.log(), timeout=60, what="Kopf pausing the low replica")
    time.sleep(2)  # a reconcile already running when the pause came may still finish
    paused_at = reconciles(low)
    time.sleep(5)  # five resync periods of 1 s
    assert reconciles(low) == paused_at, "the standby's resync loop kept reconciling"
    for pod in ns.pods("watched"):
        ns.set_pod_phase(pod["metadata"]["name"], "Running")
    wait_phase(ns, "watched", "Running")  # the active replica does the work
    assert reconciles(high) > 0 and reconciles(low) == paused_at

    stop_process(high.process, grace=10)  # the standby takes over
    wait_for(lambda: reconciles(low) > paused_at, timeout=90, what="the standby resuming after the active left")


def test_a_status_write_from_a_stale_read_is_refused_and_replanned(real: ControlPlane):
    """No operator runs here: reconcile_job is driven directly, and a competing writer races its status patch."""
    ns: RealCluster = new_namespace(real, "conflict")
    ns.create_job(job_manifest("raced"))
    kube = admin_client(real)

    class Racing(KubeClient):
        """The real client; just before its first status write another writer updates the status."""

        raced = False

        def patch_status(self, namespace: str, name: str, status: dict, *,
                         resource_version: str | None = None) -> str:
            if not self.raced:
                self.raced = True
                ns.patch_job(name, {"status": {"restarts": 1, "phase": "Restarting"}}, subresource="status")
            return super().patch_status(namespace, name, status, resource_version=resource_version)

    racing = Racing(kube._client)
    result = reconcile_job(racing, ns.namespace, "raced", read_progress=lambda *a, **k: None)
    assert racing.raced and result.conflicts == 1
    status = ns.job("raced")["status"]
    assert status["restarts"] == 1, "the competing write was kept: the plan was recomputed from it"
    # the re-plan saw the attempt-0 pods the stale plan had created and removed them; the next reconcile
    # creates attempt 1
    again = reconcile_job(kube, ns.namespace, "raced", read_progress=lambda *a, **k: None)
    assert again.conflicts == 0
    assert {p["metadata"]["annotations"]["jest.training/attempt"] for p in ns.pods("raced")} == {"1"}


@pytest.mark.parametrize("component", ["kube-apiserver", "etcd"])
def test_the_job_survives_a_control_plane_restart(real: ControlPlane, identity: OperatorIdentity,
                                                  module_tmp: Path, operators: list[Operator], component: str):
    """Restart kube-apiserver (or etcd) under a running job: the operator reconnects its watches, sees the
    failure that happens after the restart, restarts the gang once, and the job succeeds with restarts 1."""
    ns = new_namespace(real, "fault")
    operator = start_operator(identity.kubeconfig, module_tmp, namespaces=None, name=f"fault-{component}")
    operators.append(operator)
    name = "enduring"
    ns.create_job(job_manifest(name, run_policy={"backoffLimit": 2}))
    ns.run_pods(name, 2, attempt=0)
    wait_phase(ns, name, "Running")
    uids = {p["metadata"]["uid"] for p in ns.pods(name)}

    unavailable = restart_component(real, component)
    assert {p["metadata"]["uid"] for p in ns.pods(name)} == uids, "no pod lost or duplicated by the restart"
    time.sleep(2)
    assert ns.job(name)["status"]["restarts"] == 0, "the restart itself is not a gang failure"

    failed_at = time.monotonic()
    ns.set_pod_phase(f"{name}-node-1", "Failed", reason="Error", message="after the restart")
    pods = wait_pods(ns, name, 2, attempt=1, timeout=120)  # reconnected watches (or the resync) saw it
    recovered = time.monotonic() - failed_at
    for pod in pods:
        ns.set_pod_phase(pod["metadata"]["name"], "Running")
    wait_phase(ns, name, "Running")
    for index in (1, 0):
        ns.set_pod_phase(f"{name}-node-{index}", "Succeeded")
    status = wait_phase(ns, name, "Succeeded")
    assert status["restarts"] == 1 and status.get("disruptions", 0) == 0
    assert len(ns.pods(name)) == 2
    print(f"{component}: API unavailable {unavailable:.1f} s after restart; a failure after it -> new gang in "
          f"{recovered:.1f} s")
