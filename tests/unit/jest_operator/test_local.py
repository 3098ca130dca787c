"""Tests of ``jest_operator.local``: pod localization (pure), supervised processes and gang semantics.

Pods here follow the pod contract of DESIGN.md §4 (what ``jest_operator.builders`` emits); the gang
tests run real Python child processes whose command is a tiny script, so restart, failure and
interruption semantics are checked without the trainer (the trainer runs in tests/integration).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from jest_operator.local import (
    GangRunner,
    LocalCommand,
    LocalizeError,
    LocalPodProcess,
    WorkerFailure,
    blame,
    describe_exit,
    expand_references,
    local_environment,
    localize_pod,
    pod_rank,
    read_progress,
    terminate_all,
)

WORKER_CONFIG = {"training": {"steps": 10, "checkpoint": {"dir": "/checkpoints", "intervalSteps": 5}}, "energy": {}}


def contract_pod(name: str = "demo", index: int = 0, *, nodes: int = 2, command: list[str] | None = None,
                 extra_env: list[dict] | None = None) -> dict:
    """A worker pod shaped like the builders' output (DESIGN.md §4)."""
    env = [
        {"name": "MASTER_ADDR", "value": f"{name}-node-0.{name}.default.svc"},
        {"name": "PET_MASTER_ADDR", "value": f"{name}-node-0.{name}.default.svc"},
        {"name": "MASTER_PORT", "value": "29500"},
        {"name": "PET_MASTER_PORT", "value": "29500"},
        {"name": "PET_NNODES", "value": str(nodes)},
        {"name": "PET_NODE_RANK", "value": str(index)},
        {"name": "PET_NPROC_PER_NODE", "value": "1"},
        {"name": "WORLD_SIZE", "value": str(nodes)},
        {"name": "RANK", "value": str(index)},
        {"name": "LOCAL_RANK", "value": "0"},
        {"name": "JEST_CONFIG", "value": "/etc/jest/config.json"},
        {"name": "JEST_JOB_NAME", "value": name},
        {"name": "JEST_NAMESPACE", "value": "default"},
        {"name": "JEST_ATTEMPT", "value": "0"},
        {"name": "JEST_METRICS_PORT", "value": "9090"},
        *(extra_env or []),
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{name}-node-{index}",
            "namespace": "default",
            "labels": {"jest.training/job-name": name, "jest.training/replica-index": str(index)},
        },
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "trainer",
                "image": "registry/jest-trainer:0.1.0",
                "command": command or ["jest-trainer"],
                "env": env,
                "ports": [{"name": "metrics", "containerPort": 9090}],
            }],
        },
    }


def contract_config_map(name: str = "demo") -> dict:
    """The job's ConfigMap: ``config.json`` = WorkerConfig JSON."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-config"},
            "data": {"config.json": json.dumps(WORKER_CONFIG)}}


# ---------------------------------------------------------------------------------------- localize_pod


def test_localize_rewrites_addresses_ports_config_and_status(tmp_path: Path) -> None:
    command = localize_pod(contract_pod(index=1), config_map=contract_config_map(), workdir=tmp_path,
                           master_port=12345, metrics_port=9401)
    env = command.env
    assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"] == "127.0.0.1"
    assert env["MASTER_PORT"] == env["PET_MASTER_PORT"] == "12345"
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "2" and env["PET_NODE_RANK"] == "1"
    assert env["JEST_METRICS_PORT"] == "9401"
    assert env["JEST_STATUS_FILE"] == str(tmp_path / "progress.json")
    assert "JEST_TERMINATION_MESSAGE_PATH" not in env  # the kubelet's file: a local run reads progress.json
    assert env["JEST_CONFIG"] == str(tmp_path / "config.json")
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["training"]["checkpoint"] == {"dir": str(tmp_path / "checkpoints"), "intervalSteps": 5}
    assert written["training"]["steps"] == 10
    assert command.cwd == tmp_path


def test_localize_resolves_console_scripts_from_this_venv(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    single = localize_pod(contract_pod(), config_map=None, workdir=tmp_path, master_port=1, metrics_port=None)
    assert single.argv == [str(bin_dir / "jest-trainer")]
    multi = localize_pod(contract_pod(command=["torchrun", "-m", "jest_trainer.train"]), config_map=None,
                         workdir=tmp_path, master_port=1, metrics_port=None)
    assert multi.argv == [str(bin_dir / "torchrun"), "-m", "jest_trainer.train"]


def test_localize_without_metrics_port_unsets_it_and_keeps_config_path_without_configmap(tmp_path: Path) -> None:
    command = localize_pod(contract_pod(), config_map=None, workdir=tmp_path, master_port=1, metrics_port=None)
    assert "JEST_METRICS_PORT" not in command.env
    assert command.env["JEST_CONFIG"] == "/etc/jest/config.json"
    assert not (tmp_path / "config.json").exists()


def test_localize_rewrites_config_path_in_args(tmp_path: Path) -> None:
    pod = contract_pod(command=["jest-trainer", "--config", "/etc/jest/config.json"])
    command = localize_pod(pod, config_map=contract_config_map(), workdir=tmp_path, master_port=1, metrics_port=None)
    assert command.argv[1:] == ["--config", str(tmp_path / "config.json")]


def test_localize_resolves_field_refs_and_expands_references(tmp_path: Path) -> None:
    extra = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "INDEX", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['jest.training/replica-index']"}}},
        {"name": "GREETING", "value": "$(POD_NAME) at $(POD_IP) costs $$(POD_NAME), $(UNDEFINED)"},
    ]
    command = localize_pod(contract_pod(index=1, extra_env=extra), config_map=None, workdir=tmp_path,
                           master_port=1, metrics_port=None)
    assert command.env["POD_NAME"] == "demo-node-1"
    assert command.env["INDEX"] == "1"
    assert command.env["GREETING"] == "demo-node-1 at 127.0.0.1 costs $(POD_NAME), $(UNDEFINED)"


def test_localize_names_the_unsupported_field(tmp_path: Path) -> None:
    extra = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]
    with pytest.raises(LocalizeError) as caught:
        localize_pod(contract_pod(extra_env=extra), config_map=None, workdir=tmp_path, master_port=1,
                     metrics_port=None)
    assert caught.value.field == "spec.containers[0].env[15].valueFrom.secretKeyRef"


def test_localize_rejects_missing_command_and_unknown_executable(tmp_path: Path) -> None:
    pod = contract_pod()
    pod["spec"]["containers"][0]["command"] = []
    with pytest.raises(LocalizeError, match=r"spec.containers\[0\].command"):
        localize_pod(pod, config_map=None, workdir=tmp_path, master_port=1, metrics_port=None)
    with pytest.raises(LocalizeError, match="no-such-tool-xyz"):
        localize_pod(contract_pod(command=["no-such-tool-xyz"]), config_map=None, workdir=tmp_path,
                     master_port=1, metrics_port=None)


def test_localize_rejects_configmap_without_worker_config(tmp_path: Path) -> None:
    with pytest.raises(LocalizeError, match=r"data.config.json"):
        localize_pod(contract_pod(), config_map={"data": {}}, workdir=tmp_path, master_port=1, metrics_port=None)


def test_pod_rank_prefers_the_replica_index_label() -> None:
    pod = contract_pod(index=3, nodes=4)
    assert pod_rank(pod) == 3
    del pod["metadata"]["labels"]["jest.training/replica-index"]
    assert pod_rank(pod) == 3


def test_expand_references_matches_kubernetes_rules() -> None:
    assert expand_references("$(A)-$(B)-$$(A)", {"A": "x"}) == "x-$(B)-$(A)"


def test_local_environment_drops_inherited_gang_variables() -> None:
    base = {"PATH": "/usr/bin", "RANK": "7", "PET_NNODES": "9", "JEST_ATTEMPT": "4", "HOME": "/root"}
    env = local_environment({"RANK": "1"}, base)
    assert env["RANK"] == "1" and "PET_NNODES" not in env and "JEST_ATTEMPT" not in env
    assert env["HOME"] == "/root"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


# ------------------------------------------------------------------------------------- LocalPodProcess


def python_command(tmp_path: Path, script: str, env: dict[str, str] | None = None) -> LocalCommand:
    """A LocalCommand running ``script`` with this interpreter."""
    return LocalCommand(argv=[sys.executable, "-c", textwrap.dedent(script)], env=env or {}, cwd=tmp_path)


def test_process_prefixes_lines_keeps_stderr_tail_and_log(tmp_path: Path) -> None:
    lines: list[str] = []
    process = LocalPodProcess(
        python_command(tmp_path, """
            import sys
            print("hello")
            print("oops", file=sys.stderr)
            sys.exit(3)
        """),
        rank=2, sink=lines.append, log_path=tmp_path / "logs" / "rank-2.log",
    )
    process.start()
    assert process.wait(timeout=30) == 3
    assert sorted(lines) == ["[rank 2] hello", "[rank 2] oops"]
    assert process.stderr_tail() == ["oops"]
    assert sorted((tmp_path / "logs" / "rank-2.log").read_text().splitlines()) == ["hello", "oops"]


def test_process_gets_the_pod_environment(tmp_path: Path) -> None:
    lines: list[str] = []
    process = LocalPodProcess(
        python_command(tmp_path, "import os; print(os.environ['RANK'], os.environ.get('PET_NNODES'))",
                       env={"RANK": "5"}),
        rank=5, sink=lines.append, base_env={"PATH": os.environ["PATH"], "PET_NNODES": "99"},
    )
    process.start()
    assert process.wait(timeout=30) == 0
    assert lines == ["[rank 5] 5 None"]


def test_terminate_lets_a_sigterm_handler_finish(tmp_path: Path) -> None:
    lines: list[str] = []
    process = LocalPodProcess(
        python_command(tmp_path, """
            import signal, sys, time
            def stop(signum, frame):
                print("checkpointed", flush=True)
                sys.exit(0)
            signal.signal(signal.SIGTERM, stop)
            print("ready", flush=True)
            time.sleep(60)
        """),
        sink=lines.append,
    )
    process.start()
    wait_for(lambda: "[rank 0] ready" in lines)
    assert process.terminate(grace_seconds=20) == 0
    assert lines[-1] == "[rank 0] checkpointed"


def test_terminate_kills_after_grace_including_grandchildren(tmp_path: Path) -> None:
    lines: list[str] = []
    process = LocalPodProcess(
        python_command(tmp_path, """
            import signal, subprocess, sys, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            child = subprocess.Popen([sys.executable, "-c",
                "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
            print(child.pid, flush=True)
            time.sleep(60)
        """),
        sink=lines.append,
    )
    process.start()
    wait_for(lambda: bool(lines))
    grandchild = int(lines[0].split()[-1])
    assert process.terminate(grace_seconds=0.5) == -signal.SIGKILL
    wait_for(lambda: not pid_alive(grandchild))


def test_terminate_all_stops_every_process(tmp_path: Path) -> None:
    script = "import time; print('up', flush=True); time.sleep(60)"
    lines: list[str] = []
    processes = [LocalPodProcess(python_command(tmp_path, script), rank=r, sink=lines.append) for r in range(2)]
    for process in processes:
        process.start()
    wait_for(lambda: len(lines) == 2)
    assert terminate_all(processes, grace_seconds=10) == {0: -signal.SIGTERM, 1: -signal.SIGTERM}


# ------------------------------------------------------------------------------------- pure helpers


def test_describe_exit() -> None:
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-9) == "signal SIGKILL"
    assert describe_exit(None) == "still running"


def test_blame_prefers_a_non_retryable_exit_then_a_killed_worker_then_one_with_an_error() -> None:
    failed = {0: (1, ("RuntimeError: Connection closed by peer",)), 1: (-9, ())}
    failure = blame(failed)
    assert failure.rank == 1 and failure.other_failed == ((0, 1),)
    assert blame({0: (1, ()), 1: (1, ("ValueError: bad data",))}).rank == 1
    assert blame({0: (1, ("x",)), 1: (1, ("y",))}).rank == 0
    # the worker that said "this cannot work" (exit 3) is the cause; its peers only lost their collective
    assert blame({0: (1, ("peer closed",)), 1: (3, ("ValueError: training.selection",)), 2: (-9, ())}).rank == 1


def test_failure_message_names_rank_exit_and_last_lines() -> None:
    failure = WorkerFailure(rank=1, exit_code=2, stderr_tail=("Traceback", "  ...", "", "FileNotFoundError: /nope"))
    message = failure.message(max_lines=2)
    assert message == "worker rank 1 failed with exit code 2:\n  ...\nFileNotFoundError: /nope"


def test_read_progress_tolerates_missing_and_partial_files(tmp_path: Path) -> None:
    path = tmp_path / "progress.json"
    assert read_progress(path) is None
    path.write_text('{"step": 3')
    assert read_progress(path) is None
    path.write_text('{"step": 3}')
    assert read_progress(path) == {"step": 3}


# ------------------------------------------------------------------------------------- gang semantics

GANG_WORKER = """
import json, os, signal, sys, time
attempt = int(os.environ["JEST_ATTEMPT"])
rank = int(os.environ["RANK"])
behaviour = os.environ.get("BEHAVIOUR", "ok")
status = os.environ["JEST_STATUS_FILE"]
def progress(phase, step):
    if rank == 0:
        tmp = status + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"phase": phase, "step": step, "totalSteps": 3, "attempt": attempt,
                       "resumedFromStep": attempt or None}, f)
        os.replace(tmp, status)
def stop(signum, frame):
    progress("Running", 1)
    print("sigterm: checkpointed", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
progress("Running", 0)
if behaviour == "fail-first" and attempt == 0 and rank == 1:
    print("boom on attempt 0", file=sys.stderr, flush=True)
    sys.exit(7)
if behaviour == "always-fail" and rank == 1:
    print(f"lost the data mount (attempt {attempt})", file=sys.stderr, flush=True)
    sys.exit(1)
if behaviour == "deterministic" and rank == 1:
    print("ValueError: training.selection.batchSize: 36 does not split over 2 ranks", file=sys.stderr, flush=True)
    sys.exit(3)
if (behaviour == "fail-first" and attempt == 0) or behaviour in ("always-fail", "deterministic"):
    time.sleep(60)  # rank 0 waits in a collective for the peer that died, until the gang is stopped
if behaviour == "stop-early" or (behaviour == "stop-early-once" and attempt == 0):
    sys.exit(0)
if behaviour == "wait":
    print("waiting", flush=True)
    time.sleep(60)
progress("Succeeded", 3)
"""


def gang_children(behaviour: str):
    """A build_children stand-in producing 2 pods of the contract that run GANG_WORKER."""

    def build(job: object, *, attempt: int) -> list[dict]:
        pods = []
        for index in range(2):
            pod = contract_pod(index=index, command=["python", "-c", GANG_WORKER],
                               extra_env=[{"name": "BEHAVIOUR", "value": behaviour}])
            for item in pod["spec"]["containers"][0]["env"]:
                if item["name"] == "JEST_ATTEMPT":
                    item["value"] = str(attempt)
            pods.append(pod)
        return [contract_config_map(), *pods]

    return build


def gang(tmp_path: Path, behaviour: str, backoff_limit: int = 2, **kwargs) -> GangRunner:
    lines: list[str] = kwargs.pop("lines", [])
    return GangRunner(job=None, build_children=gang_children(behaviour), workdir=tmp_path,
                      backoff_limit=backoff_limit, sink=lines.append, poll_seconds=0.05,
                      failure_grace_seconds=5, **kwargs)


def test_gang_succeeds_when_every_worker_exits_zero(tmp_path: Path) -> None:
    result = gang(tmp_path, "ok").run()
    assert (result.phase, result.restarts, result.attempts) == ("Succeeded", 0, 1)
    assert result.progress["phase"] == "Succeeded"
    assert (tmp_path / "logs" / "attempt-0" / "rank-1.log").exists()


def test_gang_restarts_everyone_after_a_failure_with_the_next_attempt(tmp_path: Path) -> None:
    lines: list[str] = []
    result = gang(tmp_path, "fail-first", lines=lines).run()
    assert (result.phase, result.restarts, result.attempts) == ("Succeeded", 1, 2)
    assert result.progress["attempt"] == 1 and result.progress["resumedFromStep"] == 1
    assert any("boom on attempt 0" in line for line in lines)
    assert any("restarting the gang (restart 1" in line for line in lines)
    assert len(result.resume_seconds) == 1


def test_gang_fails_after_backoff_limit_with_the_last_worker_error(tmp_path: Path) -> None:
    result = gang(tmp_path, "always-fail", backoff_limit=1).run()
    assert (result.phase, result.restarts, result.attempts) == ("Failed", 1, 2)
    assert result.failure is not None and result.failure.rank == 1
    assert "BackoffLimitExceeded" in result.message
    assert "lost the data mount (attempt 1)" in result.message


def test_gang_fails_at_once_on_a_non_retryable_exit(tmp_path: Path) -> None:
    """Exit code 3 (jest_trainer.exit_codes): the same inputs fail again, so no backoff is spent on it."""
    result = gang(tmp_path, "deterministic", backoff_limit=3).run()
    assert (result.phase, result.restarts, result.attempts) == ("Failed", 0, 1)
    assert result.message.startswith("NonRetryableError: worker rank 1 failed with exit code 3")
    assert "batchSize: 36 does not split" in result.message and "not retried" in result.message


def test_gang_stop_forwards_sigterm_and_suspends(tmp_path: Path) -> None:
    lines: list[str] = []
    runner = gang(tmp_path, "wait", lines=lines, grace_seconds=20)

    def stop_when_running() -> None:
        wait_for(lambda: sum("waiting" in line for line in lines) == 2)
        runner.stop_signal.append(signal.SIGTERM)
        runner.stop.set()

    threading.Thread(target=stop_when_running, daemon=True).start()
    result = runner.run()
    assert result.phase == "Suspended" and result.interrupted_by == signal.SIGTERM
    assert sum("sigterm: checkpointed" in line for line in lines) == 2
    assert result.restarts == 0


def test_gang_whose_workers_exit_zero_before_the_last_step_restarts_until_the_backoff_limit(tmp_path: Path) -> None:
    """Exit 0 at step 0 of 3 with no stop requested: stopped from outside, so not Succeeded, and not Suspended
    (nobody suspended it); the gang resumes from the checkpoint, counted against backoffLimit as the
    operator does (status.judge_gang). Before the shared state machine jestctl called this Suspended."""
    lines: list[str] = []
    result = gang(tmp_path, "stop-early", lines=lines).run()
    assert (result.phase, result.reason, result.restarts, result.attempts) == ("Failed", "BackoffLimitExceeded", 2, 3)
    assert result.interrupted_by is None and result.failure is None
    assert "exited 0 at step 0 of 3, before the last step" in result.message
    assert any("restarting the gang (restart 1" in line for line in lines)


def test_gang_that_stopped_early_once_resumes_and_succeeds(tmp_path: Path) -> None:
    result = gang(tmp_path, "stop-early-once").run()
    assert (result.phase, result.restarts, result.attempts) == ("Succeeded", 1, 2)
    assert result.progress["attempt"] == 1 and result.progress["step"] == 3


def test_gang_deadline_fails_the_run(tmp_path: Path) -> None:
    result = gang(tmp_path, "wait", active_deadline_seconds=0.5, grace_seconds=20).run()
    assert result.phase == "Failed" and "DeadlineExceeded" in result.message


# ------------------------------------------------------------------------------------------------ helpers


def wait_for(condition, timeout: float = 30.0) -> None:
    """Poll ``condition`` until true or fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    pytest.fail("condition not met in time")


def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_die_with_parent_sends_sigterm_when_the_supervisor_dies(tmp_path: Path, process_reaper) -> None:
    import subprocess

    marker = tmp_path / "got-sigterm"
    worker = f"""
import pathlib, signal, sys, time
def stop(signum, frame):
    pathlib.Path({str(marker)!r}).write_text("yes")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(60)
"""
    supervisor = f"""
import sys, time
from pathlib import Path
from jest_operator.local import LocalCommand, LocalPodProcess
process = LocalPodProcess(LocalCommand([sys.executable, "-c", {worker!r}], {{}}, Path({str(tmp_path)!r})),
                          die_with_parent=True, sink=lambda line: print(line, flush=True))
process.start()
time.sleep(60)
"""
    parent = subprocess.Popen([sys.executable, "-c", supervisor], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    process_reaper.append(parent)
    assert parent.stdout.readline().strip() == "[rank 0] ready"
    parent.kill()
    parent.wait(timeout=10)
    wait_for(marker.exists)
