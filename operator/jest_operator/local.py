"""Run a worker pod of a ``JESTTrainingJob`` as a local process.

``jestctl run`` and the test-only local kubelet both execute the pods that ``jest_operator.builders``
produces, so there is exactly one description of a worker (command, environment, config) whether it
runs on a cluster or on a laptop. This module translates a pod dict into a local command
(``localize_pod``: cluster addresses become loopback, ports become free local ports, the ConfigMap
becomes a file under the work directory) and supervises that command (``LocalPodProcess``: own
process group, rank-prefixed logs, SIGTERM with a grace period then SIGKILL). ``GangRunner`` runs a
whole gang and leaves every decision about it to the operator's state machine
(:func:`jest_operator.status.judge_gang`), its processes observed as pods (:func:`judge_local_gang`).

It never imports torch: the operator image and ``jestctl`` start without it.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from jest_trainer.exit_codes import NON_RETRYABLE_EXIT_CODES

from jest_operator.status import (
    PHASE_FAILED,
    PHASE_PENDING,
    PHASE_RESTARTING,
    PHASE_RUNNING,
    PHASE_SUCCEEDED,
    PHASE_SUSPENDED,
    REASON_BACKOFF_LIMIT_EXCEEDED,
    REASON_DEADLINE_EXCEEDED,
    REASON_ENERGY_BUDGET_EXCEEDED,
    REASON_NON_RETRYABLE_ERROR,
    REASON_POD_DISRUPTED,
    REASON_SUSPENDED,
    GangObservation,
    GangPolicy,
    GangVerdict,
    ObservedPod,
    TrainerProgress,
    judge_gang,
)

LOOPBACK = "127.0.0.1"
CONFIG_FILE_NAME = "config.json"
PROGRESS_FILE_NAME = "progress.json"
CHECKPOINT_DIR_NAME = "checkpoints"
TRAINER_CONTAINER_NAME = "trainer"

# Variables of the parent shell that would confuse a worker about its place in a gang; the pod's own
# environment is the only source of these for a localized worker.
_INHERITED_VARIABLES_TO_DROP = re.compile(
    r"^(WORLD_SIZE|RANK|LOCAL_RANK|LOCAL_WORLD_SIZE|GROUP_RANK|MASTER_ADDR|MASTER_PORT|PET_.*|JEST_.*|TPU_.*"
    r"|TORCHELASTIC_.*|PJRT_DEVICE)$"
)
_ENV_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


class LocalizeError(ValueError):
    """A pod cannot be run locally; ``field`` is the pod path at fault (e.g. ``spec.containers[0].env[2]``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class LocalCommand:
    """What to execute for one pod: argv (console scripts resolved), the pod's environment, the cwd.

    ``env`` holds only the pod's variables (after localization); ``LocalPodProcess`` lays them over the
    parent environment minus any inherited distributed/JEST variables.
    """

    argv: list[str]
    env: dict[str, str]
    cwd: Path


def trainer_container(pod: Mapping[str, Any]) -> tuple[int, Mapping[str, Any]]:
    """(index, container) of the trainer container: the one named ``trainer``, else the first one."""
    containers = pod.get("spec", {}).get("containers") or []
    if not containers:
        raise LocalizeError("spec.containers", "the pod has no containers")
    for index, container in enumerate(containers):
        if container.get("name") == TRAINER_CONTAINER_NAME:
            return index, container
    return 0, containers[0]


def pod_rank(pod: Mapping[str, Any]) -> int:
    """The node rank of a worker pod: its replica-index label, else ``PET_NODE_RANK``/``RANK``, else 0."""
    labels = pod.get("metadata", {}).get("labels") or {}
    index = labels.get("jest.training/replica-index")
    if index is not None:
        return int(index)
    _, container = trainer_container(pod)
    env = {item.get("name"): item.get("value") for item in container.get("env") or []}
    for name in ("PET_NODE_RANK", "RANK"):
        if env.get(name) is not None:
            return int(env[name])
    return 0


def expand_references(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known variables are substituted, unknown ones kept, ``$$`` is ``$``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _ENV_REFERENCE.sub(replace, value)


def _field_value(pod: Mapping[str, Any], field_path: str, where: str) -> str:
    """Resolve a downward-API ``fieldRef`` the way the kubelet would, with loopback for pod addresses."""
    metadata = pod.get("metadata", {})
    simple = {
        "metadata.name": metadata.get("name", ""),
        "metadata.namespace": metadata.get("namespace", "default"),
        "metadata.uid": metadata.get("uid", ""),
        "spec.nodeName": "localhost",
        "spec.serviceAccountName": pod.get("spec", {}).get("serviceAccountName", "default"),
        "status.podIP": LOOPBACK,
        "status.hostIP": LOOPBACK,
    }
    if field_path in simple:
        return str(simple[field_path])
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", field_path)
    if match:
        return str((metadata.get(match.group(1)) or {}).get(match.group(2), ""))
    raise LocalizeError(where, f"fieldRef {field_path!r} is not supported locally")


def _resolve_env(pod: Mapping[str, Any], container_index: int, container: Mapping[str, Any],
                 config_map: Mapping[str, Any] | None) -> dict[str, str]:
    """The container's environment as the kubelet would build it (in order, with ``$(VAR)`` expansion)."""
    env: dict[str, str] = {}
    base = f"spec.containers[{container_index}]"
    if container.get("envFrom"):
        raise LocalizeError(f"{base}.envFrom", "envFrom is not supported locally")
    for position, item in enumerate(container.get("env") or []):
        where = f"{base}.env[{position}]"
        name = item.get("name")
        if not name:
            raise LocalizeError(f"{where}.name", "an environment variable needs a name")
        if "valueFrom" in item:
            source = item["valueFrom"] or {}
            if "fieldRef" in source:
                env[name] = _field_value(pod, source["fieldRef"].get("fieldPath", ""), f"{where}.valueFrom.fieldRef")
            elif "configMapKeyRef" in source and config_map is not None:
                key = source["configMapKeyRef"].get("key", "")
                data = config_map.get("data") or {}
                if key not in data:
                    raise LocalizeError(f"{where}.valueFrom.configMapKeyRef", f"key {key!r} is not in the ConfigMap")
                env[name] = str(data[key])
            else:
                kind = next(iter(source), "valueFrom")
                raise LocalizeError(f"{where}.valueFrom.{kind}", "this value source is not supported locally")
        else:
            env[name] = expand_references(str(item.get("value", "")), env)
    return env


def resolve_executable(name: str, search_path: str | None = None) -> str:
    """Absolute path of a console script, preferring the running interpreter's environment (the venv).

    ``python``/``python3`` map to ``sys.executable``; names with a slash are returned unchanged.
    """
    if "/" in name:
        return name
    if name in {"python", "python3"}:
        return sys.executable
    venv_candidate = Path(sys.executable).parent / name
    if venv_candidate.is_file() and os.access(venv_candidate, os.X_OK):
        return str(venv_candidate)
    found = shutil.which(name, path=search_path)
    if found is None:
        raise LocalizeError("spec.containers[].command", f"executable {name!r} not found in this environment")
    return found


def write_local_config(config_map: Mapping[str, Any], workdir: Path) -> Path:
    """Write the ConfigMap's ``config.json`` under ``workdir`` with the checkpoint dir moved there too.

    The file is written atomically (temp + rename) because several pods of one job write the same file.
    """
    data = config_map.get("data") or {}
    if CONFIG_FILE_NAME not in data:
        raise LocalizeError(f"data.{CONFIG_FILE_NAME}", "the ConfigMap has no worker config")
    try:
        document = json.loads(data[CONFIG_FILE_NAME])
    except json.JSONDecodeError as error:
        raise LocalizeError(f"data.{CONFIG_FILE_NAME}", f"not valid JSON: {error}") from error
    training = document.setdefault("training", {})
    training.setdefault("checkpoint", {})["dir"] = str(workdir / CHECKPOINT_DIR_NAME)
    workdir.mkdir(parents=True, exist_ok=True)
    target = workdir / CONFIG_FILE_NAME
    temporary = workdir / f".{CONFIG_FILE_NAME}.{os.getpid()}.{threading.get_ident()}.tmp"
    temporary.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, target)
    return target


def localize_pod(pod: dict, *, config_map: dict | None, workdir: Path, master_port: int,
                 metrics_port: int | None) -> LocalCommand:
    """Translate a worker pod of our builders into a command that runs on this machine.

    - ``MASTER_ADDR``/``PET_MASTER_ADDR`` become 127.0.0.1 and ``MASTER_PORT``/``PET_MASTER_PORT``
      become ``master_port`` (one free port shared by the whole gang);
    - with a ``config_map``, its ``config.json`` is written to ``workdir/config.json`` with
      ``training.checkpoint.dir`` = ``workdir/checkpoints`` and ``JEST_CONFIG`` points there (also
      any argv element equal to the pod's original ``JEST_CONFIG``); without one the pod's
      ``JEST_CONFIG`` is kept as is;
    - ``JEST_STATUS_FILE`` is ``workdir/progress.json``; ``JEST_METRICS_PORT`` is ``metrics_port``
      (removed when None, so the worker serves no metrics); ``JEST_TERMINATION_MESSAGE_PATH`` is removed
      (a kubelet's file: a local run reads the progress file instead);
    - argv is the container's command + args, ``$(VAR)``-expanded, with its executable resolved from
      this interpreter's environment (``jest-trainer``, ``torchrun``).

    Pure apart from writing ``config.json``; raises ``LocalizeError`` naming the unsupported pod field.
    """
    container_index, container = trainer_container(pod)
    env = _resolve_env(pod, container_index, container, config_map)
    original_config_path = env.get("JEST_CONFIG")
    for name in ("MASTER_ADDR", "PET_MASTER_ADDR"):
        if name in env:
            env[name] = LOOPBACK
    for name in ("MASTER_PORT", "PET_MASTER_PORT"):
        if name in env:
            env[name] = str(master_port)
    if config_map is not None:
        env["JEST_CONFIG"] = str(write_local_config(config_map, workdir))
    env["JEST_STATUS_FILE"] = str(workdir / PROGRESS_FILE_NAME)
    env.pop("JEST_TERMINATION_MESSAGE_PATH", None)
    if metrics_port is None:
        env.pop("JEST_METRICS_PORT", None)
    else:
        env["JEST_METRICS_PORT"] = str(metrics_port)
    env.setdefault("PYTHONUNBUFFERED", "1")

    raw_argv = [*(container.get("command") or []), *(container.get("args") or [])]
    if not raw_argv:
        raise LocalizeError(f"spec.containers[{container_index}].command",
                            "the container has no command (an image entrypoint cannot be run locally)")
    argv = [expand_references(str(part), env) for part in raw_argv]
    if original_config_path and config_map is not None:
        argv = [env["JEST_CONFIG"] if part == original_config_path else part for part in argv]
    argv[0] = resolve_executable(argv[0])
    return LocalCommand(argv=argv, env=env, cwd=workdir)


def local_environment(pod_env: Mapping[str, str], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The full environment of a localized worker: ``base`` (default ``os.environ``) without inherited
    gang variables, the interpreter's bin directory first on PATH, then the pod's variables."""
    source = os.environ if base is None else base
    env = {key: value for key, value in source.items() if not _INHERITED_VARIABLES_TO_DROP.match(key)}
    bin_dir = str(Path(sys.executable).parent)
    path_entries = env.get("PATH", "").split(os.pathsep) if env.get("PATH") else []
    env["PATH"] = os.pathsep.join([bin_dir, *[entry for entry in path_entries if entry != bin_dir]])
    env.update(pod_env)
    return env


LineSink = Callable[[str], None]


def _stderr_sink(line: str) -> None:
    """Default log sink: the parent's stderr (flushed, so interleaving stays line-atomic)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


@dataclass
class LocalPodProcess:
    """One localized pod as a supervised child process.

    The child runs in its own session (process group), so a terminal Ctrl-C reaches only ``jestctl``,
    which decides what to forward, and so signals reach grandchildren (torchrun's workers). Every
    stdout/stderr line is passed to ``sink`` prefixed ``[<label>]`` (default ``[rank r]``) and, when
    ``log_path`` is set, appended unprefixed to that file (the local kubelet's ``kubectl logs``). The
    last ``tail_lines`` stderr lines are kept for failure messages; ``pod_name`` names the pod it runs in
    those messages. With ``die_with_parent`` (Linux) the
    child receives SIGTERM if the thread that started it dies, so a crashed ``jestctl`` leaves no
    orphaned workers (they checkpoint and exit); only use it from a long-lived thread.
    """

    command: LocalCommand
    rank: int = 0
    label: str | None = None
    sink: LineSink = _stderr_sink
    log_path: Path | None = None
    base_env: Mapping[str, str] | None = None
    tail_lines: int = 20
    die_with_parent: bool = False
    pod_name: str = ""
    _process: subprocess.Popen[str] | None = field(default=None, init=False, repr=False)
    _readers: list[threading.Thread] = field(default_factory=list, init=False, repr=False)
    _stderr_tail: collections.deque[str] = field(init=False, repr=False)
    _log_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _log_file: IO[str] | None = field(default=None, init=False, repr=False)
    _finished: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self._stderr_tail = collections.deque(maxlen=self.tail_lines)

    @property
    def prefix(self) -> str:
        """The log prefix, e.g. ``[rank 1]``."""
        return f"[{self.label if self.label is not None else f'rank {self.rank}'}]"

    @property
    def pid(self) -> int | None:
        """PID of the child (also its process-group id), None before ``start``."""
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """Exit status once known (negative: killed by that signal), else None."""
        return self._process.returncode if self._process is not None else None

    def start(self) -> None:
        """Start the child in its own session with the localized environment; idempotent errors raise."""
        if self._process is not None:
            raise RuntimeError(f"{self.prefix} already started")
        self.command.cwd.mkdir(parents=True, exist_ok=True)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = self.log_path.open("a", encoding="utf-8")
        self._process = subprocess.Popen(
            self.command.argv,
            cwd=self.command.cwd,
            env=local_environment(self.command.env, self.base_env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            start_new_session=True,
            preexec_fn=_terminate_with_parent if self.die_with_parent else None,
        )
        for stream, is_stderr in ((self._process.stdout, False), (self._process.stderr, True)):
            reader = threading.Thread(target=self._pump, args=(stream, is_stderr), daemon=True,
                                      name=f"logs{self.prefix}")
            reader.start()
            self._readers.append(reader)

    def _pump(self, stream: IO[str], is_stderr: bool) -> None:
        """Forward one output stream line by line until the child closes it."""
        for raw_line in stream:
            line = raw_line.rstrip("\n")
            if is_stderr:
                self._stderr_tail.append(line)
            with self._log_lock:
                if self._log_file is not None:
                    self._log_file.write(raw_line if raw_line.endswith("\n") else raw_line + "\n")
                    self._log_file.flush()
            with contextlib.suppress(Exception):
                self.sink(f"{self.prefix} {line}")
        stream.close()

    def poll(self) -> int | None:
        """The exit status if the child has exited (log readers drained), else None."""
        if self._process is None:
            return None
        code = self._process.poll()
        if code is not None:
            self._finish()
        return code

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait up to ``timeout`` seconds for the child; its exit status, or None if still running."""
        if self._process is None:
            return None
        try:
            code = self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self._finish()
        return code

    def _finish(self) -> None:
        """Drain the log readers and close the log file once the child is gone (idempotent).

        A reader is given a few seconds: an orphaned grandchild may hold the pipe open forever.
        """
        if self._finished:
            return
        self._finished = True
        for reader in self._readers:
            reader.join(timeout=5)
        with self._log_lock:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the child's whole process group (no-op once it has been reaped)."""
        if self._process is None or self._process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, signum)

    def terminate(self, grace_seconds: float = 30.0) -> int | None:
        """SIGTERM the group (the trainer checkpoints and exits 0), SIGKILL after ``grace_seconds``."""
        self.send_signal(signal.SIGTERM)
        code = self.wait(timeout=grace_seconds)
        if code is None:
            self.kill()
            code = self.wait(timeout=10)
        return code

    def kill(self) -> None:
        """SIGKILL the whole process group, including orphans left by an exited leader."""
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=10)
        self._finish()

    def stderr_tail(self, lines: int | None = None) -> list[str]:
        """The last ``lines`` (default all kept) stderr lines, for a failure message."""
        kept = list(self._stderr_tail)
        return kept if lines is None else kept[-lines:]


def _terminate_with_parent() -> None:
    """In the forked child: ask Linux for SIGTERM when the parent thread dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def terminate_all(processes: Iterable[LocalPodProcess], grace_seconds: float) -> dict[int, int | None]:
    """SIGTERM every process at once, wait one shared grace period, SIGKILL the rest; rank -> exit code."""
    processes = list(processes)
    for process in processes:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    codes: dict[int, int | None] = {}
    for process in processes:
        code = process.wait(timeout=max(0.0, deadline - time.monotonic()))
        if code is None:
            process.kill()
            code = process.returncode
        codes[process.rank] = code
    return codes


def read_progress(path: Path) -> dict[str, Any] | None:
    """The trainer's progress file (contract C2), or None while it is missing or mid-replace."""
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return document if isinstance(document, dict) else None


def find_free_port() -> int:
    """A free loopback TCP port for the gang's rendezvous (asked of the OS, never hard-coded)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def describe_exit(code: int | None) -> str:
    """Human form of an exit status: ``exit code 3`` or ``signal SIGKILL``."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def observe_process(rank: int, code: int | None, *, name: str = "", attempt: int = 0,
                    stderr_tail: Sequence[str] = ()) -> ObservedPod:
    """A local worker as the operator observes a worker pod, so both feed :func:`judge_gang` the same facts.

    Running while the process runs; Succeeded on exit 0; otherwise Failed with reason ``Error``, the exit
    code a container runtime reports (128 + n for a process killed by signal n, e.g. 137 for SIGKILL) and
    its last stderr line as message (what ``FallbackToLogsOnError`` puts in a failed pod's termination
    message: the trainer's last line names its error).
    """
    name = name or f"node-{rank}"
    if code is None:
        return ObservedPod(name=name, index=rank, attempt=attempt, phase="Running", ready=True, terminating=False)
    if code == 0:
        return ObservedPod(name=name, index=rank, attempt=attempt, phase="Succeeded", ready=False, terminating=False,
                           reason="Completed", exit_code=0)
    last_line = next((line.strip() for line in reversed(stderr_tail) if line.strip()), describe_exit(code))
    return ObservedPod(name=name, index=rank, attempt=attempt, phase="Failed", ready=False, terminating=False,
                       reason="Error", message=last_line, exit_code=code if code > 0 else 128 - code)


def trainer_progress(document: Mapping[str, Any] | None) -> TrainerProgress | None:
    """Rank 0's progress file (contract C2) as the operator's :class:`TrainerProgress` (None without one).

    The step and total steps say whether a clean exit came before the last step; the energy (with its
    method and source) is what an energy budget is enforced on, as the operator does from rank 0's report.
    """
    if not document:
        return None
    energy = document.get("energy") if isinstance(document.get("energy"), Mapping) else {}
    checkpoint = document.get("checkpoint") if isinstance(document.get("checkpoint"), Mapping) else {}
    return TrainerProgress(
        step=_whole(document.get("step")),
        total_steps=_whole(document.get("totalSteps")),
        examples_trained=_number(document.get("examplesTrained")),
        energy_joules=_number(energy.get("joules")),
        energy_method=energy.get("method") or None,
        energy_source=energy.get("source") or None,
        checkpoint_step=_whole(checkpoint.get("step")),
        checkpoint_path=checkpoint.get("path") or None,
    )


def _whole(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def judge_local_gang(
    policy: GangPolicy,
    codes: Mapping[int, int | None],
    progress: Mapping[str, Any] | None,
    *,
    attempt: int = 0,
    restarts: int = 0,
    active_seconds: float = 0.0,
    energy_joules: float | None = None,
    names: Mapping[int, str] | None = None,
    stderr_tails: Mapping[int, Sequence[str]] | None = None,
) -> GangVerdict:
    """The verdict on a local gang attempt: ``codes`` (rank -> exit code, None while running) and rank 0's
    progress file observed as pods and a trainer report, judged by the operator's :func:`judge_gang`.

    Pure, so the parity with the operator is table-tested. Every local worker is started at once and
    cannot vanish, so the gang counts as running (a missing rank is impossible) and no process is ever
    disrupted (evictions exist only on a cluster). ``energy_joules`` defaults to the progress file's.
    """
    report = trainer_progress(progress)
    if energy_joules is None and report is not None:
        energy_joules = report.energy_joules
    pods = tuple(
        observe_process(rank, code, name=(names or {}).get(rank, ""), attempt=attempt,
                        stderr_tail=(stderr_tails or {}).get(rank, ()))
        for rank, code in sorted(codes.items())
    )
    return judge_gang(policy, GangObservation(pods=pods, progress=report, restarts=restarts,
                                              active_seconds=active_seconds, energy_joules=energy_joules,
                                              was_running=True))


@dataclass(frozen=True)
class WorkerFailure:
    """Why a gang attempt failed: the worker blamed, its exit, its last stderr lines, other failed ranks."""

    rank: int
    exit_code: int | None
    stderr_tail: tuple[str, ...]
    other_failed: tuple[tuple[int, int | None], ...] = ()

    def message(self, max_lines: int = 8) -> str:
        """One message naming the worker, how it ended and its last stderr lines."""
        text = f"worker rank {self.rank} failed with {describe_exit(self.exit_code)}"
        if self.other_failed:
            others = ", ".join(f"rank {rank}: {describe_exit(code)}" for rank, code in self.other_failed)
            text += f" (also {others})"
        lines = [line for line in self.stderr_tail if line.strip()][-max_lines:]
        if lines:
            text += ":\n" + "\n".join(lines)
        return text


def blame(failed: Mapping[int, tuple[int | None, tuple[str, ...]]]) -> WorkerFailure:
    """Pick the root cause among workers that ended badly in the same poll.

    A worker that exited with a non-retryable code (:mod:`jest_trainer.exit_codes`) said what is wrong; else
    a worker killed by a signal (OOM killer, ``kill -9``) is the likely cause and its peers' collective
    errors the consequence; otherwise a worker with an error message beats a silent one; ties go to the
    lowest rank. Pure, so the choice is unit-tested.
    """

    def key(rank: int) -> tuple[int, int, int, int]:
        code, tail = failed[rank]
        return (0 if code in NON_RETRYABLE_EXIT_CODES else 1, 0 if code is not None and code < 0 else 1,
                0 if any(line.strip() for line in tail) else 1, rank)

    chosen = min(failed, key=key)
    code, tail = failed[chosen]
    others = tuple(sorted((rank, failed[rank][0]) for rank in failed if rank != chosen))
    return WorkerFailure(rank=chosen, exit_code=code, stderr_tail=tuple(tail), other_failed=others)


@dataclass
class GangResult:
    """Outcome of a local gang run; ``progress`` is the last progress file read (rank 0, C2); ``reason`` is
    the operator's condition reason for the same outcome (:data:`jest_operator.status.REASONS`)."""

    phase: str  # Succeeded | Failed | Suspended
    restarts: int
    attempts: int
    message: str
    wall_seconds: float
    progress: dict[str, Any] | None
    failure: WorkerFailure | None = None
    interrupted_by: int | None = None
    resume_seconds: list[float] = field(default_factory=list)
    reason: str = ""


@dataclass
class GangRunner:
    """Runs the pods of one job as a local gang, judged by the operator's own state machine.

    Every attempt asks ``build_children(job, attempt=...)`` for the ConfigMap and Pods (the operator's
    builders: one source of truth), localizes every pod before starting any, then polls them and asks
    :func:`jest_operator.status.judge_gang` (through :func:`judge_local_gang`) what the observations mean,
    so a local run and the operator give the same phase for the same facts. It acts on the verdict:
    Restarting stops every worker and recreates the gang with attempt+1 (``JEST_ATTEMPT``) on a fresh
    rendezvous port, resuming from the newest checkpoint; Suspended and Failed stop the workers and end the
    run; Succeeded lets the other workers finish (up to ``grace_seconds``) and ends it.

    ``stop`` (set by jestctl's signal handler) is the local ``spec.runPolicy.suspend``: the workers get
    SIGTERM, checkpoint and exit 0, and the run ends Suspended. ``backoff_limit``,
    ``active_deadline_seconds`` (counted from ``run``'s start) and the energy budget (``budget_joules``,
    ``on_budget_exceeded``, on rank 0's reported energy) are the job's run policy, enforced as the operator
    does. Workers die with the thread that calls ``run`` (``die_with_parent``): call it from the main thread.
    """

    job: Any
    build_children: Callable[..., list[dict]]
    workdir: Path
    backoff_limit: int
    metrics_port: int | None = None
    procs_per_pod: int = 1
    sink: LineSink = _stderr_sink
    on_progress: Callable[[dict[str, Any] | None, int], None] | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    stop_signal: list[int] = field(default_factory=list)
    grace_seconds: float = 60.0
    failure_grace_seconds: float = 10.0
    poll_seconds: float = 0.25
    active_deadline_seconds: float | None = None
    budget_joules: float | None = None
    on_budget_exceeded: str = "Warn"
    extra_env: dict[str, str] = field(default_factory=dict)
    first_attempt: int = 0
    die_with_parent: bool = True

    @property
    def progress_path(self) -> Path:
        """Where rank 0 writes progress (``JEST_STATUS_FILE``)."""
        return self.workdir / PROGRESS_FILE_NAME

    def policy(self, num_nodes: int) -> GangPolicy:
        """The run policy :func:`judge_gang` applies now (``suspend`` is whether a stop was requested)."""
        metadata = getattr(self.job, "metadata", None)
        training = getattr(getattr(self.job, "spec", None), "training", None)
        steps = getattr(training, "steps", None)
        return GangPolicy(
            name=str(getattr(metadata, "name", "local")), num_nodes=num_nodes, backoff_limit=self.backoff_limit,
            total_steps=steps if isinstance(steps, int) else None, suspend=self.stop.is_set(),
            active_deadline_seconds=self.active_deadline_seconds, budget_joules=self.budget_joules,
            on_budget_exceeded=self.on_budget_exceeded,
        )

    def _localize_attempt(self, attempt: int) -> list[LocalPodProcess]:
        """Build and localize every pod of one attempt (raises before any process starts)."""
        children = self.build_children(self.job, attempt=attempt)
        config_map = next((child for child in children if child.get("kind") == "ConfigMap"), None)
        pods = sorted((child for child in children if child.get("kind") == "Pod"), key=pod_rank)
        if not pods:
            raise LocalizeError("spec", "the builders produced no pods")
        master_port = find_free_port()
        processes = []
        for pod in pods:
            rank = pod_rank(pod)
            port = None if self.metrics_port is None else self.metrics_port + rank * self.procs_per_pod
            command = localize_pod(pod, config_map=config_map, workdir=self.workdir, master_port=master_port,
                                   metrics_port=port)
            command.env.update(self.extra_env)
            log_path = self.workdir / "logs" / f"attempt-{attempt}" / f"rank-{rank}.log"
            # a torchrun pod holds several ranks: label its lines by node, not by a rank it does not own
            label = f"node {rank}" if self.procs_per_pod > 1 else None
            processes.append(LocalPodProcess(command, rank=rank, label=label, sink=self.sink, log_path=log_path,
                                             die_with_parent=self.die_with_parent,
                                             pod_name=str((pod.get("metadata") or {}).get("name") or "")))
        return processes

    def _read_attempt_progress(self, attempt: int) -> dict[str, Any] | None:
        """The progress file if it belongs to this attempt (a stale one from before is ignored)."""
        progress = read_progress(self.progress_path)
        if progress is None or progress.get("attempt", attempt) != attempt:
            return None
        return progress

    def _stop_workers(self, processes: list[LocalPodProcess], verdict: GangVerdict) -> None:
        """Stop the workers as the verdict requires.

        Succeeded: the others are finishing too, so they get ``grace_seconds`` to exit on their own.
        Suspended, a deadline, a budget or an eviction: SIGTERM with ``grace_seconds``, so they checkpoint
        (what the operator's pod deletion with the pod's grace period does). A failed gang: its collective
        is broken and nothing is left to checkpoint, so ``failure_grace_seconds``.
        """
        if verdict.phase == PHASE_SUCCEEDED:
            deadline = time.monotonic() + self.grace_seconds
            for process in processes:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            terminate_all([p for p in processes if p.poll() is None], self.failure_grace_seconds)
        elif verdict.phase == PHASE_SUSPENDED or verdict.reason in (
                REASON_DEADLINE_EXCEEDED, REASON_ENERGY_BUDGET_EXCEEDED, REASON_POD_DISRUPTED):
            terminate_all(processes, self.grace_seconds)
        else:
            terminate_all(processes, self.failure_grace_seconds)

    def run(self) -> GangResult:
        """Run attempts until a verdict ends the run (success, suspension, failure); never raises for worker
        failures (they are the result), only for pods that cannot be localized."""
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.progress_path.unlink()
        restarts = 0
        attempt = self.first_attempt
        last_progress: dict[str, Any] | None = None
        energy_joules: float | None = None
        resume_seconds: list[float] = []
        failure_time: float | None = None

        def result(verdict: GangVerdict, message: str, failure: WorkerFailure | None = None) -> GangResult:
            return GangResult(phase=verdict.phase, restarts=restarts, attempts=attempt - self.first_attempt + 1,
                              message=message, wall_seconds=time.monotonic() - started, progress=last_progress,
                              failure=failure, interrupted_by=self.stop_signal[-1] if self.stop_signal else None,
                              resume_seconds=resume_seconds, reason=verdict.reason)

        while True:
            processes = self._localize_attempt(attempt)
            if self.stop.is_set():
                return result(GangVerdict(PHASE_SUSPENDED, REASON_SUSPENDED, "stop requested"),
                              "interrupted before the workers started")
            for process in processes:
                process.start()
            attempt_progress_seen = False
            failure: WorkerFailure | None = None
            verdict = GangVerdict(PHASE_PENDING, "", "")
            try:
                while verdict.phase in (PHASE_PENDING, PHASE_RUNNING):
                    time.sleep(self.poll_seconds)
                    codes = {process.rank: process.poll() for process in processes}
                    # read after the exit codes: a worker that has exited wrote its last progress before, so
                    # a clean exit is never judged by a report older than the exit
                    progress = self._read_attempt_progress(attempt)
                    if progress is not None:
                        last_progress = progress
                        reported = _number((progress.get("energy") or {}).get("joules"))
                        if reported is not None:
                            energy_joules = max(energy_joules or 0.0, reported)
                        if failure_time is not None and not attempt_progress_seen:
                            resume_seconds.append(time.monotonic() - failure_time)
                            failure_time = None
                        attempt_progress_seen = True
                    if self.on_progress is not None:
                        self.on_progress(progress, attempt)
                    tails = {process.rank: tuple(process.stderr_tail()) for process in processes}
                    verdict = judge_local_gang(
                        self.policy(len(processes)), codes, progress, attempt=attempt, restarts=restarts,
                        active_seconds=time.monotonic() - started, energy_joules=energy_joules,
                        names={process.rank: process.pod_name for process in processes}, stderr_tails=tails)
                    if verdict.phase in (PHASE_PENDING, PHASE_RUNNING):
                        continue
                    failed = {rank: (code, tails[rank]) for rank, code in codes.items() if code not in (None, 0)}
                    failure = blame(failed) if failed else None
                    self._stop_workers(processes, verdict)
            finally:
                for process in processes:
                    if process.poll() is None:
                        process.kill()
            final_progress = self._read_attempt_progress(attempt)
            if final_progress is not None:
                last_progress = final_progress
            if self.on_progress is not None:
                self.on_progress(last_progress, attempt)
            if verdict.phase != PHASE_RESTARTING:
                return result(verdict, self._message(verdict, failure, last_progress, restarts, len(processes)),
                              failure if verdict.phase == PHASE_FAILED else None)
            failure_time = time.monotonic()
            restarts += 1
            attempt += 1
            what = failure.message(max_lines=3) if failure is not None else verdict.detail
            self.sink(f"[jestctl] {what}")
            self.sink(f"[jestctl] restarting the gang (restart {restarts} of at most {self.backoff_limit}, "
                      f"attempt {attempt})")

    def _message(self, verdict: GangVerdict, failure: WorkerFailure | None, progress: Mapping[str, Any] | None,
                 restarts: int, workers: int) -> str:
        """The run's closing message: the verdict's, in a local run's words (ranks and their stderr)."""
        if verdict.phase == PHASE_SUCCEEDED:
            return f"rank 0 finished training ({workers} workers)"
        if verdict.phase == PHASE_SUSPENDED and verdict.reason == REASON_SUSPENDED:
            checkpoint = (progress or {}).get("checkpoint") or {}
            where = f"checkpoint at step {checkpoint.get('step')}" if checkpoint else "no checkpoint yet"
            return f"interrupted; workers stopped ({where}); run again to resume"
        what = failure.message() if failure is not None else verdict.detail
        if verdict.reason == REASON_NON_RETRYABLE_ERROR and failure is not None:
            return (f"{verdict.reason}: {what} (exit code {failure.exit_code}: the same inputs fail again; "
                    "not retried)")
        if verdict.reason == REASON_BACKOFF_LIMIT_EXCEEDED:
            return f"{verdict.reason}: {restarts} gang restarts (backoffLimit {self.backoff_limit}); last error: {what}"
        if verdict.reason == REASON_DEADLINE_EXCEEDED:
            return f"{verdict.reason}: the job ran longer than activeDeadlineSeconds ({self.active_deadline_seconds:g})"
        return f"{verdict.reason}: {verdict.message}"
