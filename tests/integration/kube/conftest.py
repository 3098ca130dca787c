"""Operator test helpers: the real operator process, polling, and the KMock emulator for the two modules left on it.

``start_operator``, ``stop_process``, ``wait_for`` and ``job_manifest`` serve the real-control-plane tests
(test_operator.py, test_operator_control.py, tests/e2e/ via ``wait_for``); that cluster's own helpers are in
realcluster.py. The emulator part (``start_emulator``, :class:`Cluster` and the helpers that take one) is used
only by test_operator_emulator.py (garbage specs no real API server would store) and test_emulator.py (which
proves each of emulator.py's workarounds is still needed and still works); bench/reconcile_scale.py starts
emulator.py itself. Nothing in tests/e2e/ or the Helm chart tests uses KMock (docs/architecture.md says why).

Every process is started in its own session and killed by process group, by PID, even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import find_free_port, require_tool

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
EMULATOR = HERE / "emulator.py"

JOBS = "/apis/jest.training/v1alpha1/namespaces/{ns}/jesttrainingjobs"
THREAD_LIMITS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def wait_for(
    predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@dataclass
class Cluster:
    """A running emulator plus the means to talk to it (HTTP for the test's own checks, kubectl for users')."""

    url: str
    kubeconfig: Path
    cache_dir: Path
    process: subprocess.Popen
    kubectl_path: str

    def kubectl(self, *args: str, check: bool = True, input_text: str | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the real kubectl against the emulator."""
        result = subprocess.run(
            [self.kubectl_path, f"--kubeconfig={self.kubeconfig}", f"--cache-dir={self.cache_dir}", *args],
            capture_output=True, text=True, input=input_text, timeout=timeout, check=False,
        )
        if check and result.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def get(self, path: str) -> dict | None:
        response = requests.get(self.url + path, timeout=5)
        return None if response.status_code == 404 else response.json()

    def job(self, name: str, namespace: str = "default") -> dict | None:
        return self.get(JOBS.format(ns=namespace) + f"/{name}")

    def pods(self, job_name: str, namespace: str = "default") -> list[dict]:
        payload = self.get(f"/api/v1/namespaces/{namespace}/pods?labelSelector=jest.training/job-name%3D{job_name}")
        return sorted((payload or {}).get("items", []), key=lambda p: p["metadata"]["name"])

    def children(self, kind_plural: str, job_name: str, namespace: str = "default") -> list[dict]:
        path = f"/api/v1/namespaces/{namespace}/{kind_plural}?labelSelector=jest.training/job-name%3D{job_name}"
        return (self.get(path) or {}).get("items", [])

    def create_job(self, manifest: dict) -> dict:
        namespace = manifest["metadata"].get("namespace", "default")
        response = requests.post(self.url + JOBS.format(ns=namespace), json=manifest, timeout=5)
        assert response.status_code == 201, response.text
        return response.json()

    def patch_job(self, name: str, patch: dict, namespace: str = "default") -> None:
        response = requests.patch(self.url + JOBS.format(ns=namespace) + f"/{name}", data=json.dumps(patch),
                                  headers={"Content-Type": "application/merge-patch+json"}, timeout=5)
        assert response.status_code == 200, response.text

    def set_pod_phase(self, name: str, phase: str, *, ready: bool | None = None, namespace: str = "default",
                      reason: str | None = None, message: str | None = None) -> None:
        """What a kubelet would do: patch the pod's status subresource."""
        ready = phase == "Running" if ready is None else ready
        status: dict[str, Any] = {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        }
        if reason:
            status["reason"] = reason
        if message:
            status["message"] = message
        response = requests.patch(
            f"{self.url}/api/v1/namespaces/{namespace}/pods/{name}/status", data=json.dumps({"status": status}),
            headers={"Content-Type": "application/merge-patch+json"}, timeout=5,
        )
        assert response.status_code == 200, response.text

    def events(self, name: str, namespace: str = "default") -> list[dict]:
        items = (self.get(f"/api/v1/namespaces/{namespace}/events") or {}).get("items", [])
        return [e for e in items if (e.get("involvedObject") or {}).get("name") == name]


def start_emulator(tmp: Path, *extra: str) -> Cluster:
    """Start the emulator process and write a kubeconfig for it."""
    port = find_free_port()
    log = open(tmp / f"emulator-{port}.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, str(EMULATOR), "--port", str(port), *extra],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"emulator exited: {(tmp / f'emulator-{port}.log').read_text()}")
        try:
            return requests.get(url + "/version", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_for(up, timeout=30, what="the emulator")
    except BaseException:
        stop_process(proc)  # a process that never came up must not outlive the failed test
        raise
    kubeconfig = tmp / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: kmock, cluster: {{server: '{url}'}}}}]\n"
        "users: [{name: tester, user: {token: not-checked}}]\n"
        "contexts: [{name: kmock, context: {cluster: kmock, user: tester, namespace: default}}]\n"
        "current-context: kmock\n"
    )
    cache = tmp / "kubectl-cache"
    cache.mkdir(exist_ok=True)
    return Cluster(url, kubeconfig, cache, proc, require_tool("kubectl"))


@dataclass
class Operator:
    """The real operator process (``python -m jest_operator.main``)."""

    process: subprocess.Popen
    liveness_port: int
    metrics_port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text


def start_operator(cluster: Cluster | Path, tmp: Path, *, resync_seconds: float = 1.0, name: str = "operator",
                   namespaces: tuple[str, ...] | None = ("default",), extra_args: tuple[str, ...] = ()) -> Operator:
    """Start the operator (against the emulator, or any kubeconfig) and wait until its liveness endpoint answers.

    ``namespaces=None`` watches every namespace (``-A``, the chart's default).
    """
    liveness, metrics = find_free_port(), find_free_port()
    log_path = tmp / f"{name}-{liveness}.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    kubeconfig = cluster.kubeconfig if isinstance(cluster, Cluster) else cluster
    env = {**os.environ, **THREAD_LIMITS, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"}
    scope = ["-A"] if namespaces is None else [arg for ns in namespaces for arg in ("--namespace", ns)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "jest_operator.main", *scope, "--liveness-port", str(liveness),
         "--liveness-host", "127.0.0.1", "--metrics-port", str(metrics), "--resync-seconds", str(resync_seconds),
         *extra_args],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=REPO,
    )
    operator = Operator(proc, liveness, metrics, log_path)

    def live() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"operator exited ({proc.returncode}):\n{operator.log()[-4000:]}")
        try:
            return requests.get(f"http://127.0.0.1:{liveness}/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_for(live, timeout=60, interval=0.2, what="the operator's liveness endpoint")
    except BaseException:
        stop_process(proc)  # a process that never came up must not outlive the failed test
        raise
    return operator


def phase_of(cluster: Cluster, name: str) -> str | None:
    """The job's status.phase as the API server holds it (None before the operator wrote one)."""
    return ((cluster.job(name) or {}).get("status") or {}).get("phase")


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kube")


def job_manifest(name: str, *, num_nodes: int = 2, run_policy: dict | None = None, energy: dict | None = None,
                 spec_extra: dict | None = None) -> dict:
    """A small valid CPU job (2 nodes, digits, few steps)."""
    spec: dict[str, Any] = {
        "image": "jest-trainer:test",
        "numNodes": num_nodes,
        "training": {"steps": 20, "selection": {"batchSize": 32, "chunks": 4}},
        "runPolicy": {"backoffLimit": 1, **(run_policy or {})},
    }
    if energy:
        spec["energy"] = energy
    spec.update(spec_extra or {})
    return {"apiVersion": "jest.training/v1alpha1", "kind": "JESTTrainingJob",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec}
