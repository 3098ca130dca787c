"""The full loop: kubectl apply -> the real operator -> pods -> a local kubelet -> real training -> CR status.

No cluster exists here, so a small test-only kubelet stands in for one: it polls the emulator for pods,
runs each pod's container through ``jest_operator.local`` (the very code ``jestctl run`` uses), points
the pod's ``jest.training/metrics-url`` annotation at the worker's local metrics port (so the operator
scrapes it as it would scrape ``podIP:9090``), and reports phases back like a kubelet (Running, then
Succeeded/Failed with the exit code). A deleted pod's process gets SIGTERM with the pod's grace period.
"""

from __future__ import annotations

import copy
import json
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import yaml
from jest_operator.local import LocalPodProcess, find_free_port, localize_pod

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: tests.* helpers
from tests.integration.kube.conftest import (
    REPO,
    THREAD_LIMITS,
    Cluster,
    start_emulator,
    start_operator,
    stop_process,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@dataclass
class _RunningPod:
    process: LocalPodProcess
    uid: str
    grace: float
    reported: str = "Pending"


@dataclass
class LocalKubelet:
    """Runs the emulator's pods as local processes and reports their phases (test-only, one namespace)."""

    cluster: Cluster
    workdir: Path
    namespace: str = "default"
    poll_seconds: float = 0.3
    pods: dict[str, _RunningPod] = field(default_factory=dict)
    master_ports: dict[tuple[str, str], int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="local-kubelet", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for pod in self.pods.values():
            if pod.process.poll() is None:
                pod.process.terminate(grace_seconds=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except Exception as error:  # keep the kubelet alive; the test inspects errors
                self.errors.append(repr(error))
            self._stop.wait(self.poll_seconds)

    def _api(self, path: str) -> str:
        return f"{self.cluster.url}/api/v1/namespaces/{self.namespace}/{path}"

    def _patch(self, path: str, body: dict) -> None:
        requests.patch(self._api(path), data=json.dumps(body),
                       headers={"Content-Type": "application/merge-patch+json"}, timeout=5)

    def _sync(self) -> None:
        listed = requests.get(self._api("pods"), params={"labelSelector": "app.kubernetes.io/managed-by=jest-operator"},
                              timeout=5).json().get("items", [])
        present = {p["metadata"]["name"]: p for p in listed}
        for name, running in list(self.pods.items()):
            pod = present.get(name)
            if (pod is None or pod["metadata"]["uid"] != running.uid) and running.process.poll() is None:
                threading.Thread(target=running.process.terminate, args=(running.grace,), daemon=True).start()
            if pod is None or pod["metadata"]["uid"] != running.uid:
                if running.process.poll() is not None:
                    del self.pods[name]
                continue
            code = running.process.poll()
            if code is not None and running.reported == "Running":
                self._report_exit(name, code, running)
        for name, pod in present.items():
            if name not in self.pods and not pod["metadata"].get("deletionTimestamp") and (
                pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                self._run(pod)

    def _run(self, pod: dict) -> None:
        name = pod["metadata"]["name"]
        job_name = pod["metadata"]["labels"]["jest.training/job-name"]
        attempt = pod["metadata"]["annotations"].get("jest.training/attempt", "0")
        config_name = next(v["configMap"]["name"] for v in pod["spec"]["volumes"] if "configMap" in v)
        config_map = requests.get(self._api(f"configmaps/{config_name}"), timeout=5).json()
        master_port = self.master_ports.setdefault((job_name, attempt), find_free_port())
        metrics_port = find_free_port()
        job_dir = self.workdir / job_name
        command = localize_pod(pod, config_map=config_map, workdir=job_dir, master_port=master_port,
                               metrics_port=metrics_port)
        command.env.update(THREAD_LIMITS)
        rank = int(pod["metadata"]["labels"]["jest.training/replica-index"])
        process = LocalPodProcess(command, rank=rank, label=name, sink=lambda line: None,
                                  log_path=job_dir / "logs" / f"{name}.log")
        process.start()
        grace = float(pod["spec"].get("terminationGracePeriodSeconds") or 30)
        self.pods[name] = _RunningPod(process, pod["metadata"]["uid"], grace, "Running")
        self._patch(f"pods/{name}", {"metadata": {"annotations": {
            "jest.training/metrics-url": f"http://127.0.0.1:{metrics_port}/metrics"}}})
        self._patch(f"pods/{name}/status", {"status": {
            "phase": "Running", "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}]}})

    def _report_exit(self, name: str, code: int, running: _RunningPod) -> None:
        phase = "Succeeded" if code == 0 else "Failed"
        message = "\n".join(running.process.stderr_tail(5)) if code else ""
        self._patch(f"pods/{name}/status", {"status": {
            "phase": phase, "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [{"name": "trainer", "ready": False, "state": {"terminated": {
                "exitCode": code, "reason": "Completed" if code == 0 else "Error", "message": message[-1000:]}}}],
        }})
        running.reported = phase


def quickstart_for_the_test() -> dict:
    """examples/quickstart.yaml with few steps, so the real 2-worker gloo run takes seconds, not minutes."""
    manifest = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    manifest = copy.deepcopy(manifest)
    training = manifest["spec"]["training"]
    # long enough that the operator scrapes several times after the energy meter's first 1 s sample: it only
    # sees what the workers expose while they run
    training["steps"] = 150
    training["reference"] = {"train": {"steps": 20, "batchSize": 64, "lr": 2.0e-3}}
    training["checkpoint"] = {**training.get("checkpoint", {}), "intervalSteps": 50}
    training["eval"] = {"intervalSteps": 50}
    return manifest


def test_quickstart_trains_for_real_and_ends_succeeded(tmp_path: Path):
    cluster = start_emulator(tmp_path, "--no-crd")
    operator = None
    kubelet = LocalKubelet(cluster, tmp_path / "nodes")
    try:
        cluster.kubectl("apply", "--validate=false", "-f", str(REPO / "crds"))
        operator = start_operator(cluster, tmp_path, resync_seconds=0.5)
        kubelet.start()
        manifest = quickstart_for_the_test()
        name = manifest["metadata"]["name"]
        cluster.kubectl("apply", "--validate=false", "-f", "-", input_text=yaml.safe_dump(manifest))

        def finished() -> str | None:
            phase = ((cluster.job(name) or {}).get("status") or {}).get("phase")
            return phase if phase in ("Succeeded", "Failed") else None

        phase = wait_for(finished, timeout=420, interval=1.0, what="the quickstart job to finish")
        status = cluster.job(name)["status"]
        logs = {p.name: p.read_text(errors="replace")[-3000:] for p in (tmp_path / "nodes").glob("*/logs/*.log")}
        assert phase == "Succeeded", json.dumps({"status": status, "logs": logs, "kubelet": kubelet.errors}, indent=1)
        assert status["restarts"] == 0
        assert status["progress"]["totalSteps"] == 150
        assert status["progress"]["step"] >= 1, status
        assert status["progress"]["examplesTrained"] > 0
        assert 0 < status["progress"]["observedSelectionRatio"] <= 1
        assert "energy" in status, status
        energy = status["energy"]
        assert energy["joules"] > 0 and energy["method"] == "modelled"
        assert energy["source"] == "config:modelledWattsPerDevice"
        assert energy["co2eGrams"] > 0  # the quickstart sets carbonIntensityGramsPerKWh
        assert status["throughput"]["examplesPerSecond"] > 0
        assert next(c for c in status["conditions"] if c["type"] == "Succeeded")["status"] == "True"
        checkpoints = sorted((tmp_path / "nodes" / name / "checkpoints").glob("ckpt-*.pt"))
        assert checkpoints, "rank 0 wrote no checkpoint"
        checkpoint = status["checkpoint"]  # from rank 0's jest_checkpoint_* gauges, path in the pod's volume
        assert checkpoint["step"] in (50, 100, 150), checkpoint
        assert checkpoint["path"] == f"/checkpoints/ckpt-{checkpoint['step']:08d}.pt" and checkpoint["time"]
        table = cluster.kubectl("get", "jtj", name).stdout.splitlines()
        assert table[1].split()[1] == "Succeeded"
        assert kubelet.errors == []
    finally:
        kubelet.stop()
        if operator is not None:
            stop_process(operator.process, grace=10)
        stop_process(cluster.process)
