"""`python -m hack.devcluster up|status|down` (what make cluster-up/down run): the printed KUBECONFIG works,
and down stops exactly the processes up started, leaving none behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hack.devcluster.controlplane import REPO_ROOT, ControlPlane, ManagedProcess, _proc_start_time, ensure_binaries

pytestmark = pytest.mark.slow


def _cli(*args: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hack.devcluster", *args, "--dir", str(workdir)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, check=False)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_up_prints_a_working_kubeconfig_and_down_leaves_no_process(tmp_path: Path) -> None:
    ensure_binaries()
    workdir = tmp_path / "cluster"
    up = _cli("up", "--no-node-agent", workdir=workdir)
    pids: dict[str, int] = {}
    try:
        assert up.returncode == 0, up.stderr
        export = up.stdout.strip().splitlines()[-1]
        assert export == f"export KUBECONFIG={workdir.resolve() / 'kubeconfig'}"
        state = json.loads((workdir / "pids.json").read_text())
        pids = {p["name"]: p["pid"] for p in state["processes"]}
        assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager"}
        assert all(_running(pid) for pid in pids.values())

        env = {**os.environ, "KUBECONFIG": export.split("=", 1)[1]}
        got = subprocess.run(["kubectl", "--cache-dir", str(tmp_path / "cache"), "get", "namespace", "default",
                              "-o", "name"], env=env, capture_output=True, text=True, timeout=60, check=False)
        assert got.stdout.strip() == "namespace/default", got.stderr

        assert _cli("status", workdir=workdir).returncode == 0
        again = _cli("up", "--no-node-agent", workdir=workdir)
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        down = _cli("down", workdir=workdir)
    assert down.returncode == 0, down.stderr
    assert [name for name, pid in pids.items() if _running(pid)] == []
    assert not (workdir / "pids.json").exists()
    assert _cli("down", workdir=workdir).returncode == 0  # nothing left to stop is not an error


def test_stop_never_signals_a_recycled_pid(tmp_path: Path) -> None:
    """A pids.json entry whose start time does not match the live process with that pid is left alone."""
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        start = _proc_start_time(bystander.pid)
        assert start is not None
        stale = ManagedProcess("etcd", bystander.pid, start - 1, tmp_path / "etcd.log")
        assert not stale.alive()
        stale.stop(grace=0.1)
        time.sleep(0.2)
        assert bystander.poll() is None

        same = ManagedProcess("etcd", bystander.pid, start, tmp_path / "etcd.log", bystander)
        assert same.alive()
        same.stop(grace=2)
        assert bystander.poll() is not None
    finally:
        if bystander.poll() is None:
            bystander.kill()
        bystander.wait()


def test_load_without_state_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"pids\.json"):
        ControlPlane.load(tmp_path)


def _pids_with_arg(arg: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if arg.encode() in argv and _running(int(proc.name)):
                found.append(int(proc.name))
    return found


def test_down_also_ends_the_pods_the_node_agent_runs(tmp_path: Path) -> None:
    """`make cluster-up` starts the node agent; `make cluster-down` must leave none of its pod processes."""
    ensure_binaries()
    workdir = tmp_path / "cluster"
    up = _cli("up", workdir=workdir)
    marker = f"300.{time.time_ns() % 10**9:09d}"  # a sleep argument no other process on the machine has
    try:
        assert up.returncode == 0, up.stderr
        cp = ControlPlane.load(workdir)
        assert "node-agent" in cp.pids
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleeper", "namespace": "default"},
               "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 2,
                        "containers": [{"name": "c", "image": "busybox", "command": ["sleep", marker]}]}}
        cp.kubectl("apply", "-f", "-", input=json.dumps(pod))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _pids_with_arg(marker):
            time.sleep(0.25)
        assert _pids_with_arg(marker), "the node agent never started the pod's process"
        phase = cp.kubectl("get", "pod", "sleeper", "-o", "jsonpath={.status.phase}").stdout
        assert phase in ("Pending", "Running")
    finally:
        down = _cli("down", workdir=workdir)
    assert down.returncode == 0, down.stderr
    assert _pids_with_arg(marker) == []
    assert all(not _running(pid) for pid in cp.pids.values())
