"""What the loop tells the outside world: phase timing, Prometheus, the progress file, the progress bar.

Why one module: the loop body should read "score, select, optimise", not perf_counter arithmetic and
JSON documents. ``PhaseTimer`` times the named phases of one step (DESIGN.md §5 ``phase`` label);
``Telemetry`` owns the energy meter, the rank's ``TrainerMetrics``, rank 0's reporter and progress file
(``JEST_STATUS_FILE``, read by the operator and ``jestctl run``), and the signal-driven stop flag.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jest_trainer import checkpoint as ckpt
from jest_trainer.distributed import DistContext, all_gather_object, env_int, pjrt_device, sync

log = logging.getLogger("jest_trainer.train")

PHASES: tuple[str, ...] = ("data", "selection", "forward_backward", "optimizer", "checkpoint")
STEP_TIME_SMOOTHING = 0.1
#: Environment variable naming the pod's ``terminationMessagePath`` (unset: no termination message).
TERMINATION_MESSAGE_PATH_ENV = "JEST_TERMINATION_MESSAGE_PATH"
LOOP_METRIC_NAMES: tuple[str, ...] = ("jest_eval_retrieval_recall", "jest_data_samples_skipped_total")


def now_iso() -> str:
    """UTC now as ``YYYY-MM-DDTHH:MM:SSZ`` (checkpoint and progress stamps)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def unix_time(iso: str | None) -> float:
    """Unix time of a checkpoint's ISO stamp (now when it has none, e.g. a checkpoint from an older trainer)."""
    try:
        return dt.datetime.fromisoformat(iso).timestamp() if iso else time.time()
    except ValueError:
        return time.time()


class PhaseTimer:
    """Wall time per named phase of one step; ``with timer("selection"): ...`` adds to that phase.

    The device is synchronised on exit of each phase so asynchronous CUDA work is charged to the phase
    that queued it. The ``data`` phase is the time blocked on the input pipeline for the next
    super-batch (plus its host-to-device copy): its share of the step is the data-wait fraction.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        """Time the enclosed block as ``phase`` (one of ``PHASES``)."""
        if phase not in self.seconds:
            raise ValueError(f"phase: unknown {phase!r}; expected one of {PHASES}")
        begin = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.seconds[phase] += time.perf_counter() - begin

    @property
    def total(self) -> float:
        """Seconds of the whole step (sum over phases)."""
        return sum(self.seconds.values())


class StopFlag:
    """Set by SIGTERM (or an extra poll function); the loop checks it, agreed across ranks, per step."""

    def __init__(self, extra: Callable[[], bool] | None = None) -> None:
        self.requested = False
        self._extra = extra

    def request(self, signum: int, _frame: Any) -> None:
        """Signal handler: remember the request; the loop checkpoints at the next step boundary."""
        log.warning("received signal %d: checkpointing at the next step boundary", signum)
        self.requested = True

    def __call__(self) -> bool:
        """Whether a stop was requested (signal or the extra poll)."""
        return self.requested or (self._extra is not None and self._extra())


@contextlib.contextmanager
def signal_handlers(flag: StopFlag, enabled: bool) -> Iterator[None]:
    """Route SIGTERM to ``flag`` for the duration (main thread only; restores the previous handler)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, flag.request)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Reporter:
    """Progress output of rank 0: a rich progress bar or one plain log line per log interval."""

    def __init__(self, mode: str, total_steps: int, start_step: int) -> None:
        self.mode = mode
        self._progress = None
        self._task = None
        if mode == "rich":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]JEST[/bold]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  {task.fields[eps]} ex/s"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._task = self._progress.add_task(
                "train", total=total_steps, completed=start_step, loss="-", acc="-", eps="-"
            )
            self._progress.start()

    def update(self, *, step: int, total: int, loss: float, accuracy: float | None, examples_per_second: float) -> None:
        """Show the newest step, loss, last accuracy and throughput."""
        acc = "-" if accuracy is None else f"{accuracy:.3f}"
        if self._progress is not None:
            self._progress.update(
                self._task, completed=step, loss=f"{loss:.4f}", acc=acc, eps=f"{examples_per_second:,.0f}"
            )
        else:
            log.info("step %d/%d loss %.4f acc %s examples/s %.1f", step, total, loss, acc, examples_per_second)

    def close(self) -> None:
        """Stop the progress bar (no-op for plain lines)."""
        if self._progress is not None:
            self._progress.stop()


def progress_mode(env: Mapping[str, str]) -> str:
    """``JEST_PROGRESS`` (rich | plain); default rich on a terminal, plain otherwise."""
    mode = env.get("JEST_PROGRESS", "").strip().lower()
    if mode in ("rich", "plain"):
        return mode
    if mode:
        raise ValueError(f"JEST_PROGRESS: expected 'rich' or 'plain', got {mode!r}")
    return "rich" if sys.stderr.isatty() else "plain"


class _LoopCollector(Collector):
    """Series the loop adds to the rank's registry: retrieval recall and skipped samples (read at scrape)."""

    def __init__(self, trainingjob: str, rank: int) -> None:
        self._base = [trainingjob, str(rank)]
        self.recall: dict[tuple[str, int], float] = {}
        self.skipped: Callable[[], Mapping[str, int]] = dict

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        recall = GaugeMetricFamily(
            "jest_eval_retrieval_recall", "Last retrieval recall@k on the eval set (0-1).",
            labels=["trainingjob", "rank", "direction", "k"],
        )
        for (direction, k), value in sorted(self.recall.items()):
            recall.add_metric([*self._base, direction, str(k)], value)
        yield recall
        skipped = CounterMetricFamily(
            "jest_data_samples_skipped", "Training samples the input pipeline skipped, by reason.",
            labels=["trainingjob", "rank", "reason"],
        )
        for reason, count in sorted(self.skipped().items()):
            skipped.add_metric([*self._base, reason], float(count))
        yield skipped


def report_stopped_before_training(env: Mapping[str, str], ctx: DistContext, *, total_steps: int,
                                   checkpoint_dir: Path) -> None:
    """Say "stopped at step 0 of ``total_steps``" where a clean exit is judged, when a stop came before step 0.

    A SIGTERM during reference training ends the run with exit 0 before :class:`Telemetry` exists. Without a
    report, the gang's judge (``jest_operator.status.judge_gang``) could only read the exit code and would
    call the run Succeeded; with step 0 it sees an early stop (Suspended when one was requested, else a
    restart from the checkpoint). Rank 0 writes the progress file (``jestctl run``), local rank 0 the
    termination message (the operator); a path that cannot be written is logged, never fatal.
    """
    if ctx.is_main:
        status_file = progress_file_path(env, checkpoint_dir)
        with contextlib.suppress(OSError):
            status_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            ckpt.atomic_write_json(status_file, {
                "phase": "Running", "step": 0, "totalSteps": total_steps, "worldSize": ctx.world_size,
                "attempt": env_int(env, "JEST_ATTEMPT", 0), "updatedAt": now_iso(),
            })
        except OSError as error:
            log.warning("cannot write the progress file %s: %s", status_file, error)
    if ctx.local_rank == 0:
        write_termination_message(env.get(TERMINATION_MESSAGE_PATH_ENV, ""), "jest_train_steps_total 0.0\n")


def progress_file_path(env: Mapping[str, str], checkpoint_dir: Path) -> Path:
    """Where rank 0 writes its progress file: ``JEST_STATUS_FILE`` (``jestctl run`` sets it), else beside
    the checkpoints."""
    return Path(env.get("JEST_STATUS_FILE") or checkpoint_dir / "progress.json")


def write_termination_message(path: str, text: str) -> None:
    """Write ``text`` to the container's termination-message file ``path`` (nothing when unset); a path that
    cannot be written is logged, never fatal."""
    if not path:
        return
    try:
        Path(path).write_text(text)
    except OSError as error:
        log.warning("cannot write the termination message to %s: %s", path, error)


def energy_device_kind(ctx: DistContext, env: Mapping[str, str]) -> str:
    """The hardware an energy meter should look for: torch's device type, except that an XLA device is a TPU
    only under ``PJRT_DEVICE=TPU``; torch_xla on CPU (``PJRT_DEVICE=CPU``, the CI path) computes on the CPU."""
    if ctx.device.type == "xla" and pjrt_device(env) != "TPU":
        return "cpu"
    return ctx.device.type


def owns_node_energy(rank: int, node_names: list[str]) -> bool:
    """Whether ``rank`` meters its node's node-wide counters (RAPL): the job's lowest rank on that node.

    ``node_names[r]`` is the node rank r runs on (``JEST_NODE_NAME``, the pod's ``spec.nodeName``). Two pods
    of one job on one node (or every worker of ``jestctl run``, all on ``localhost``) would otherwise each
    count the same CPU packages.
    """
    return node_names.index(node_names[rank]) == rank


def node_name(env: Mapping[str, str]) -> str:
    """The node this process runs on: ``JEST_NODE_NAME`` (downward API), else this host's name."""
    import socket

    return env.get("JEST_NODE_NAME") or socket.gethostname()


def metered_devices(ctx: DistContext, cuda_device_count: Callable[[], int] | None = None) -> list[int]:
    """The devices this process's energy meter covers (``create_meter``'s ``device_indices``).

    CUDA: the index of the device torch uses (``cuda:<i>``; the meter maps it to its NVML board through
    ``CUDA_VISIBLE_DEVICES``), unless more local ranks than devices share the boards (``local_rank %
    device_count``): then only local ranks below the device count meter one, so no board is counted twice.
    Other devices: the local rank (modelled devices one per rank; RAPL, node-wide, goes by
    :func:`owns_node_energy` instead).
    """
    if ctx.device.type != "cuda":
        return [ctx.local_rank]
    index = ctx.device.index if ctx.device.index is not None else torch.cuda.current_device()
    count = (cuda_device_count or torch.cuda.device_count)()
    if ctx.local_rank >= count:
        log.info("local rank %d shares cuda:%d with local rank %d, which meters its energy",
                 ctx.local_rank, index, ctx.local_rank % count if count else 0)
        return []
    return [index]


class Telemetry:
    """Energy meter, Prometheus metrics, progress bar and progress file of one rank, started together.

    ``start`` serves metrics and starts the meter; ``close`` stops both. ``write_progress`` is a no-op off
    rank 0. The per-step smoothing of step time (``STEP_TIME_SMOOTHING``) feeds the progress file's
    ``examplesPerSecond`` and ``stepSeconds``.
    """

    def __init__(
        self, config: Any, env: Mapping[str, str], ctx: DistContext, *, status_file: Path, total_steps: int,
        restored_joules: float,
    ) -> None:
        from jest_trainer.energy import create_meter
        from jest_trainer.metrics import TrainerMetrics

        self.ctx = ctx
        self.status_file = status_file
        self.total_steps = total_steps
        self.mode = progress_mode(env)
        self.metrics_port = env_int(env, "JEST_METRICS_PORT", 0)
        self.attempt = env_int(env, "JEST_ATTEMPT", 0)
        self.termination_message_path = env.get(TERMINATION_MESSAGE_PATH_ENV, "")
        # a collective: every rank builds its telemetry at the same point of the run
        node_names = [str(name) for name in all_gather_object(node_name(env), ctx)]
        self.meter = create_meter(
            config.energy, device_kind=energy_device_kind(ctx, env), device_indices=metered_devices(ctx),
            initial_joules=restored_joules, owns_node=owns_node_energy(ctx.rank, node_names),
        )
        self.metrics = TrainerMetrics(trainingjob=env.get("JEST_JOB_NAME", "local"), rank=ctx.rank)
        self.metrics.attach_energy(self.meter)
        self.loop_series = _LoopCollector(self.metrics.trainingjob, ctx.rank)
        self.metrics.registry.register(self.loop_series)
        self.reporter: Reporter | None = None
        self.smoothed_step = 0.0
        self.started_at = time.monotonic()

    def start(self, start_step: int) -> None:
        """Serve ``/metrics`` (port ``JEST_METRICS_PORT`` + local rank), start the meter and the reporter."""
        if self.metrics_port > 0:
            # torchrun runs several ranks in one pod: local rank r serves on JEST_METRICS_PORT + r (the pod
            # declares those ports as metrics-<r>), so ranks never contend for one port.
            self.metrics.serve(self.metrics_port + self.ctx.local_rank)
        self.meter.start()
        self.started_at = time.monotonic()
        if self.ctx.is_main:
            self.reporter = Reporter(self.mode, self.total_steps, start_step)

    def observe_step(self, timer: PhaseTimer, *, examples: int, candidates: int, flops: Mapping[str, float],
                     loss: float) -> None:
        """Record one finished step in Prometheus and in the smoothed step time."""
        seconds = timer.total
        self.smoothed_step = seconds if self.smoothed_step == 0 else (
            (1 - STEP_TIME_SMOOTHING) * self.smoothed_step + STEP_TIME_SMOOTHING * seconds
        )
        self.metrics.observe_step(
            duration_seconds=seconds, phase_seconds=timer.seconds, examples=examples, candidates=candidates,
            flops=flops, loss=loss, selection_ratio=examples / candidates,
        )

    def examples_per_second(self, global_batch: int) -> float:
        """Trained examples per second of the job at the smoothed step time."""
        return global_batch / self.smoothed_step if self.smoothed_step > 0 else 0.0

    def report(self, *, step: int, loss: float, accuracy: float | None, global_batch: int) -> None:
        """One progress-bar update / log line (rank 0)."""
        if self.reporter is not None:
            self.reporter.update(step=step, total=self.total_steps, loss=loss, accuracy=accuracy,
                                 examples_per_second=self.examples_per_second(global_batch))

    def observe_eval(self, accuracy: float | None, recall: Mapping[str, Mapping[int, float]] | None) -> None:
        """Record the latest zero-shot accuracy and retrieval recall (either may be absent)."""
        if accuracy is not None:
            self.metrics.observe_eval(accuracy)
        for direction, by_k in (recall or {}).items():
            for k, value in by_k.items():
                self.loop_series.recall[(direction, int(k))] = float(value)

    def watch_skipped(self, skipped: Callable[[], Mapping[str, int]]) -> None:
        """Export ``jest_data_samples_skipped_total{reason}`` from the input pipeline's running counts."""
        self.loop_series.skipped = skipped

    def write_progress(self, document: Mapping[str, Any]) -> None:
        """Atomically write rank 0's progress file (contract with the operator and ``jestctl run``)."""
        if self.ctx.is_main:
            ckpt.atomic_write_json(self.status_file, {**document, "updatedAt": now_iso()})

    def write_termination_message(self) -> None:
        """Write this rank's :meth:`TrainerMetrics.final_summary` to ``$JEST_TERMINATION_MESSAGE_PATH``.

        The pod's ``terminationMessagePath``: the kubelet copies the file into the container's terminated
        state, where the operator reads the figures of a worker that exited between two scrapes. Only local
        rank 0 writes (it is also the rank behind the pod's ``metrics`` port). The loop calls this only on a
        clean exit: a failing rank leaves the message to ``FallbackToLogsOnError`` (its log tail, the error
        the job's status shows). A path that cannot be written is logged, never fatal.
        """
        if self.termination_message_path and self.ctx.local_rank == 0:
            write_termination_message(self.termination_message_path, self.metrics.final_summary())

    def elapsed(self) -> float:
        """Seconds since ``start`` (at least 1 ns)."""
        return max(1e-9, time.monotonic() - self.started_at)

    def close(self) -> None:
        """Stop the reporter, the meter and the metrics server."""
        self.meter.stop()
        if self.reporter is not None:
            self.reporter.close()
        self.metrics.close()


def nan_to_none(value: float) -> float | None:
    """JSON-safe float: NaN (no value yet) becomes None."""
    return None if math.isnan(value) else value
