"""Tests that control the operator processes themselves, on the real control plane (no module-wide operator).

A SIGKILLed operator restarted mid-job neither duplicates nor loses pods; kube-apiserver or etcd restarted
under a running job leaves it intact and the operator resumes its watches; a standby replica under Kopf
peering does nothing (its resync loop included); a status write computed from a stale read is refused by
the API server (resourceVersion precondition) and re-planned instead of overwriting a newer write.

The fault tests measure their time to recover and append it as JSON to the file named by
$JEST_FAULT_TIMINGS_OUT when set (docs/real-cluster.md has the figures); no test asserts a duration.
"""

from __future__ import annotations

import json
import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
    wait_phase,
    wait_pods,
)

pytestmark = pytest.mark.slow
PEERING = "jest-operator-test"
TIMINGS_ENV = "JEST_FAULT_TIMINGS_OUT"


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


def record_timings(fault: str, figures: dict[str, Any]) -> None:
    """Print one fault test's measurement and, when $JEST_FAULT_TIMINGS_OUT names a file, append it there.

    The file holds ``{fault: [measurement, ...]}``; other faults' entries and earlier runs are kept (a file that
    is not such JSON fails the test rather than being overwritten). Seconds are wall clock on whatever machine
    ran the test: recorded, never asserted.
    """
    entry = {**figures, "load_avg_1m": round(os.getloadavg()[0], 2),
             "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"{fault}: {json.dumps(entry)}")
    out = os.environ.get(TIMINGS_ENV)
    if not out:
        return
    path = Path(out)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        data = {}
    except ValueError as err:
        pytest.fail(f"${TIMINGS_ENV}={path} is not JSON ({err}); not overwriting it")
    if not isinstance(data, dict):
        pytest.fail(f"${TIMINGS_ENV}={path} holds {type(data).__name__}, not an object; not overwriting it")
    data.setdefault(fault, []).append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)


class FirstSeen:
    """Polls ``predicate`` on a thread (every ``interval`` s, from construction) and keeps the time.monotonic()
    at which it first returned true, read just after that poll's answer: an upper bound, late by at most one
    interval plus one GET. Errors (the API server down) count as false. Use as a context manager."""

    def __init__(self, predicate: Callable[[], Any], *, interval: float = 0.05):
        self._predicate, self._interval = predicate, interval
        self._seen, self._stop = threading.Event(), threading.Event()
        self.at: float | None = None
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                held = bool(self._predicate())
            except Exception:  # connection refused, an error body while it starts: not yet
                held = False
            if held:
                self.at = time.monotonic()
                self._seen.set()
                return
            self._stop.wait(self._interval)

    def wait(self, timeout: float, what: str) -> float:
        if not self._seen.wait(timeout):
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        assert self.at is not None
        return self.at

    def __enter__(self) -> FirstSeen:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def first_status_write(ns: RealCluster, name: str) -> Callable[[], bool]:
    """True once the job's status.observedGeneration equals its metadata.generation: an operator reconciled
    this generation and its status write landed (only the operator writes the status subresource)."""

    def written() -> bool:
        job = ns.job(name) or {}
        generation = (job.get("metadata") or {}).get("generation")
        return generation is not None and (job.get("status") or {}).get("observedGeneration") == generation

    return written


def uids(pods: list[dict]) -> dict[str, str]:
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods}


def play_to_success(ns: RealCluster, names: list[str], *, timeout: float = 120) -> dict[str, dict]:
    """Play the kubelet to the end of these jobs, as test_the_job_survives_a_control_plane_restart does: every
    pod Running, each job Running, then rank 1 and rank 0 exit 0; returns each job's final status."""
    for name in names:
        for pod in ns.pods(name):
            ns.set_pod_phase(pod["metadata"]["name"], "Running")
    for name in names:
        wait_phase(ns, name, "Running", timeout=timeout)
    for name in names:
        for index in (1, 0):
            ns.set_pod_phase(f"{name}-node-{index}", "Succeeded")
    return {name: wait_phase(ns, name, "Succeeded", timeout=timeout) for name in names}


def api_ready(cp: ControlPlane) -> bool:
    try:
        return cp.api("GET", "/readyz", timeout=2)[0] == 200
    except OSError:
        return False


def test_sigkilled_operator_neither_duplicates_nor_loses_pods(real: ControlPlane, identity: OperatorIdentity,
                                                              module_tmp: Path, operators: list[Operator]):
    """SIGKILL the operator as the first pod of a burst of new jobs appears (mid-reconcile), move the world
    on while it is down (pods start, a job is created), start it again: every job keeps each pod that existed
    at the kill (same uid), has exactly its two attempt-0 pods, and ends Succeeded with restarts 0 (the kill
    alone costs no restart).

    Time to recover (recorded, see :func:`record_timings`): from the moment the second operator process is
    spawned until the job created while no operator ran ("newcomer") shows status.observedGeneration ==
    metadata.generation, the new operator's first status write for it (polled every 50 ms). Also recorded:
    spawn to the liveness endpoint answering, and spawn to every job caught up (survivor-b Running, every
    job's two pods created).
    """
    ns = new_namespace(real, "restart")
    operators.append(start_operator(identity.kubeconfig, module_tmp, namespaces=None, name="first"))
    survivors = ["survivor-a", "survivor-b"]
    for name in survivors:
        ns.create_job(job_manifest(name))
    before = {name: wait_pods(ns, name, 2) for name in survivors}
    for pod in before["survivor-a"]:
        ns.set_pod_phase(pod["metadata"]["name"], "Running")
    wait_phase(ns, "survivor-a", "Running")
    burst = [f"burst-{i}" for i in range(4)]

    def burst_pods() -> int:
        _, payload = ns.api("GET", f"/api/v1/namespaces/{ns.namespace}/pods", expect=(200,))
        return sum(p["metadata"]["name"].startswith("burst-") for p in payload["items"])

    for name in burst:
        ns.create_job(job_manifest(name))
    # SIGKILL as soon as the first of the burst's 8 pods exists: mid-reconcile (some pods created, some not)
    wait_for(lambda: burst_pods() > 0, timeout=60, interval=0.01, what="the burst's first pod")
    os.killpg(operators[0].process.pid, signal.SIGKILL)
    operators[0].process.wait(timeout=10)
    at_kill = {name: uids(ns.pods(name)) for name in survivors + burst}

    ns.set_pod_phase("survivor-b-node-0", "Running")  # the world moves on while it is down
    ns.set_pod_phase("survivor-b-node-1", "Running")
    ns.create_job(job_manifest("newcomer"))
    with FirstSeen(first_status_write(ns, "newcomer")) as newcomer:
        spawned = time.monotonic()
        second = start_operator(identity.kubeconfig, module_tmp, namespaces=None, name="second")
        live = time.monotonic() - spawned
        operators.append(second)
        recovered = newcomer.wait(120, "the restarted operator's first status write for the newcomer") - spawned
    wait_phase(ns, "survivor-b", "Running", timeout=60)
    jobs = survivors + burst + ["newcomer"]
    for name in jobs:
        wait_pods(ns, name, 2, attempt=0, timeout=60)
    caught_up = time.monotonic() - spawned
    time.sleep(3)  # several resyncs: nothing more is created or deleted
    settled: dict[str, dict[str, str]] = {}
    for name in jobs:
        pods = ns.pods(name)
        settled[name] = uids(pods)
        assert sorted(settled[name]) == [f"{name}-node-0", f"{name}-node-1"], f"{name}: {sorted(settled[name])}"
        assert {p["metadata"]["annotations"]["jest.training/attempt"] for p in pods} == {"0"}, name
        lost = {pod: uid for pod, uid in at_kill.get(name, {}).items() if settled[name].get(pod) != uid}
        assert not lost, f"{name}: pods alive at the kill were lost or replaced: {lost}"
        assert ns.job(name)["status"]["restarts"] == 0, name
    for name, pods in before.items():
        assert settled[name] == uids(pods), name

    final = play_to_success(ns, jobs)
    for name in jobs:
        assert final[name]["restarts"] == 0 and final[name].get("disruptions", 0) == 0, (name, final[name])
        assert uids(ns.pods(name)) == settled[name], f"{name}: a pod was replaced on the way to Succeeded"
    assert 'jest_operator_reconcile_total{result="error"} 0.0' in second.metrics()
    record_timings("operator-sigkill", {
        "recover_s": round(recovered, 2),
        "liveness_s": round(live, 2),
        "all_caught_up_s": round(caught_up, 2),
        "jobs": len(jobs),
        "burst_pods_at_kill": {name: len(at_kill[name]) for name in burst},
        "definition": "second operator spawned -> newcomer (created while no operator ran) has "
                      "status.observedGeneration == metadata.generation",
    })


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
    """Restart kube-apiserver (or etcd) under a running job (ControlPlane.restart: SIGTERM, 2 s down, the same
    command line, port and data): no pod is lost or duplicated, the operator reconnects its watches, sees
    the failure that happens after the restart, restarts the gang once, and the job succeeds with restarts 1.

    Time to recover (recorded, see :func:`record_timings`): from the end of the fault, the API server
    answering /readyz again, until a job created at that moment ("probe") shows status.observedGeneration ==
    metadata.generation, the operator's first status write for it (polled every 50 ms): the operator's watch
    resumed and a reconcile went through. Also recorded: the outage (stop signal to /readyz, the 2 s down
    included), stop signal to the restarted component's own readiness probe, and a pod failure reported
    after the restart to the new gang's pods existing.
    """
    ns = new_namespace(real, "fault")
    operator = start_operator(identity.kubeconfig, module_tmp, namespaces=None, name=f"fault-{component}")
    operators.append(operator)
    name = "enduring"
    ns.create_job(job_manifest(name, run_policy={"backoffLimit": 2}))
    ns.run_pods(name, 2, attempt=0)
    wait_phase(ns, name, "Running")
    uids_before = uids(ns.pods(name))

    stopped = time.monotonic()
    real.restart(component, down_for=2.0, timeout=90)
    component_ready = time.monotonic()
    wait_for(lambda: api_ready(real), timeout=90, interval=0.05,
             what=f"the API server ready again after restarting {component}")
    back = time.monotonic()
    with FirstSeen(first_status_write(ns, "probe")) as probe:
        ns.create_job(job_manifest("probe"))
        recovered = probe.wait(120, f"the operator's first status write for a job created after the {component} "
                                    "restart") - back
    assert uids(ns.pods(name)) == uids_before, "no pod lost or duplicated by the restart"
    assert len(wait_pods(ns, "probe", 2, attempt=0, timeout=60)) == 2
    time.sleep(2)
    assert ns.job(name)["status"]["restarts"] == 0, "the restart itself is not a gang failure"

    failed_at = time.monotonic()
    ns.set_pod_phase(f"{name}-node-1", "Failed", reason="Error", message="after the restart")
    pods = wait_pods(ns, name, 2, attempt=1, timeout=120)  # reconnected watches (or the resync) saw it
    new_gang = time.monotonic() - failed_at
    for pod in pods:
        ns.set_pod_phase(pod["metadata"]["name"], "Running")
    wait_phase(ns, name, "Running")
    for index in (1, 0):
        ns.set_pod_phase(f"{name}-node-{index}", "Succeeded")
    status = wait_phase(ns, name, "Succeeded")
    assert status["restarts"] == 1 and status.get("disruptions", 0) == 0
    assert uids(ns.pods(name)) == uids(pods), "the attempt-1 pods are the ones that succeeded"
    ns.delete_job("probe")
    record_timings(f"{component}-restart", {
        "recover_s": round(recovered, 2),
        "outage_s": round(back - stopped, 2),
        "component_ready_s": round(component_ready - stopped, 2),
        "failure_to_new_gang_s": round(new_gang, 2),
        "definition": f"API server /readyz again after the {component} restart -> a job created then has "
                      "status.observedGeneration == metadata.generation",
    })
