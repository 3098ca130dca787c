"""The JEST training loop: init distributed -> resume -> (draw, score, select, train, log, checkpoint)*.

Entry point of every worker (console script ``jest-trainer`` == ``python -m jest_trainer.train``, contract
C2). One step on rank ``r`` of ``W``:

1. **data** — draw this rank's super-batch of ``B/W`` pairs from its disjoint shard of the pool; the
   order is a pure function of (seed, rank, step), so a resumed run reads exactly what an uninterrupted
   one would have read;
2. **selection** — learner logits of the super-batch (no grad) and reference logits from cached
   reference embeddings, then ``select_batch`` with ``selection_generator(seed, step, rank)``;
3. **forward_backward** — ``contrastive_loss`` on the selected ``b/W`` pairs with global negatives (DDP
   averages the gradients; the frozen reference is never wrapped);
4. **optimizer** — AdamW at ``lr_at(step)`` (linear warm-up, cosine decay: a pure function of the step);
5. **checkpoint** — every ``checkpoint.intervalSteps``, at the end, and after SIGTERM (then exit 0).

Rank 0 evaluates zero-shot accuracy, writes the progress file (``JEST_STATUS_FILE``) and checkpoints;
every rank serves its own Prometheus metrics and meters its own devices. Collectives happen at the same
steps on every rank (checkpoint gathers, log-interval energy sums, the per-step stop vote), so ranks
never wait on each other except where the step needs them to.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from jest_trainer import checkpoint as ckpt
from jest_trainer import flops as flops_mod
from jest_trainer.config import TrainingConfig, WorkerConfig
from jest_trainer.reference import ReferenceTrainingInterruptedError

log = logging.getLogger("jest_trainer.train")

PHASES: tuple[str, ...] = ("data", "selection", "forward_backward", "optimizer", "checkpoint")
LOG_INTERVAL_STEPS = 10
DEBUG_DUMP_STEPS = 3
EVAL_CHUNK = 1024
STEP_TIME_SMOOTHING = 0.1


# --------------------------------------------------------------------------------------------------
# Pure pieces: LR schedule, seeding, sharding
# --------------------------------------------------------------------------------------------------


def lr_at(step: int, *, total_steps: int, peak_lr: float, warmup_steps: int) -> float:
    """Learning rate of 0-based optimizer step ``step``: linear warm-up to ``peak_lr``, then cosine to 0.

    Warm-up step ``s < warmup`` uses ``peak * (s + 1) / warmup`` (never 0); afterwards
    ``peak * (1 + cos(pi * p)) / 2`` with ``p = (s - warmup) / (total - warmup)``. Pure, so a resumed run
    continues the same schedule.
    """
    if total_steps < 1:
        raise ValueError(f"steps must be >= 1, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _mixed_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (SeedSequence: neighbouring inputs give unrelated seeds)."""
    state = np.random.SeedSequence([int(part) for part in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def selection_generator(seed: int, step: int, rank: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The generator ``select_batch`` uses on ``rank`` at 0-based ``step`` (reproducible per (seed, step, rank))."""
    return torch.Generator(device=device).manual_seed(_mixed_seed(seed, step, rank, 0x5E1EC7))


def shard_indices(pool_size: int, *, world_size: int, rank: int, seed: int) -> Tensor:
    """Global pool indices of ``rank``'s shard: a seeded permutation split round-robin (disjoint, covering)."""
    if pool_size < world_size:
        raise ValueError(f"the pool has {pool_size} examples, fewer than the world size {world_size}")
    generator = torch.Generator().manual_seed(_mixed_seed(seed, 0x5A4D))
    return torch.randperm(pool_size, generator=generator)[rank::world_size]


def super_batch_positions(shard_size: int, *, local_super_batch: int, step: int, seed: int, rank: int) -> Tensor:
    """Positions in the shard of the super-batch of 0-based ``step``.

    The shard is read in epochs, each a fresh seeded permutation; step ``s`` takes the ``B/W`` positions
    starting at cursor ``s * B/W`` of that infinite stream (the data position stored in checkpoints), so
    every super-batch is distinct within an epoch and the stream depends only on (seed, rank, step).
    """
    if local_super_batch > shard_size:
        raise ValueError(
            f"selection: the per-rank super-batch ({local_super_batch}) exceeds this rank's pool shard "
            f"({shard_size}); use a larger pool or a smaller batchSize / filterRatio"
        )
    cursor = step * local_super_batch
    parts: list[Tensor] = []
    needed = local_super_batch
    while needed:
        epoch, offset = divmod(cursor, shard_size)
        generator = torch.Generator().manual_seed(_mixed_seed(seed, rank, epoch, 0xE90C))
        order = torch.randperm(shard_size, generator=generator)
        take = min(needed, shard_size - offset)
        parts.append(order[offset : offset + take])
        cursor += take
        needed -= take
    return torch.cat(parts)


# --------------------------------------------------------------------------------------------------
# Distributed set-up
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the job and where it computes."""

    world_size: int
    rank: int
    local_rank: int
    backend: str | None
    device: torch.device

    @property
    def distributed(self) -> bool:
        """Whether a process group with more than one member is initialised."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 evaluates, writes checkpoints and the progress file."""
        return self.rank == 0


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {raw!r}") from None


def distributed_env(env: Mapping[str, str]) -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` from the pod / torchrun environment (absent => single process)."""
    world = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    local_rank = _env_int(env, "LOCAL_RANK", rank if world > 1 else 0)
    if world < 1:
        raise ValueError(f"WORLD_SIZE: must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"RANK: must be in [0, WORLD_SIZE={world}), got {rank}")
    if local_rank < 0:
        raise ValueError(f"LOCAL_RANK: must be >= 0, got {local_rank}")
    return world, rank, local_rank


def init_distributed(env: Mapping[str, str] | None = None, *, timeout_seconds: float = 1800.0) -> DistContext:
    """Join the process group the environment describes: XLA on TPU, NCCL on CUDA, gloo on CPU.

    ``PJRT_DEVICE=TPU`` needs ``torch_xla`` (clear error when it is missing). Without ``WORLD_SIZE`` (or
    with 1) no process group is created and the device is chosen the same way.
    """
    env = os.environ if env is None else env
    world, rank, local_rank = distributed_env(env)
    if env.get("PJRT_DEVICE", "").upper() == "TPU":
        try:
            import torch_xla.core.xla_model as xm
        except ImportError as error:
            raise RuntimeError(
                "PJRT_DEVICE=TPU but torch_xla is not installed in this image; install torch_xla or unset PJRT_DEVICE"
            ) from error
        device = xm.xla_device()
        backend = "xla"
    elif torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if world == 1:
        return DistContext(world_size=1, rank=0, local_rank=local_rank, backend=None, device=device)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if backend != "xla" and not env.get(name):
            raise ValueError(f"{name}: required when WORLD_SIZE={world} > 1")
    if backend == "xla":
        import torch_xla.distributed.xla_backend  # noqa: F401  (registers the "xla" backend)

        dist.init_process_group("xla", init_method="xla://")
    else:
        dist.init_process_group(
            backend,
            init_method=f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}",
            world_size=world,
            rank=rank,
            timeout=dt.timedelta(seconds=timeout_seconds),
        )
    return DistContext(world_size=world, rank=rank, local_rank=local_rank, backend=backend, device=device)


def configure_cpu_threads(env: Mapping[str, str], ctx: DistContext) -> int | None:
    """Avoid CPU oversubscription when every rank of a CPU job runs on this host; returns the threads set.

    When ``OMP_NUM_THREADS`` is unset, the job runs on CPU with several ranks and ``MASTER_ADDR`` is a
    loopback address (``jestctl run``, the local kubelet, ``torchrun --standalone``), all ranks share
    this machine: each gets ``usable CPUs // world size`` intra-op threads (at least 1). Without this,
    every rank starts one spinning OpenMP thread per core and a 2-rank job on 2 cores runs >10x slower.
    In a pod (``MASTER_ADDR`` is a Service name) or with ``OMP_NUM_THREADS`` set, nothing is changed.
    """
    if env.get("OMP_NUM_THREADS") or ctx.device.type != "cpu" or not ctx.distributed:
        return None
    if env.get("MASTER_ADDR", "") not in ("127.0.0.1", "localhost", "::1"):
        return None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    threads = max(1, usable // ctx.world_size)
    torch.set_num_threads(threads)
    return threads


def _all_reduce(values: list[float], ctx: DistContext, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> list[float]:
    """All-reduce a few floats (identity in a single process)."""
    if not ctx.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor, op=op)
    return [float(value) for value in tensor.cpu()]


def _all_gather_object(value: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``value``, in rank order (``[value]`` in a single process)."""
    if not ctx.distributed:
        return [value]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def _broadcast_object(value: Any, ctx: DistContext) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not ctx.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def zero_shot_accuracy(model: nn.Module, test: Any, class_prompts: list[list[str]], *, device: torch.device) -> float:
    """Zero-shot classification accuracy on ``test``: nearest class prototype by cosine similarity.

    The prototype of class ``c`` is the normalised mean text embedding of ``class_prompts[c]``; images
    are assigned the class of the most similar prototype and compared with ``test.labels``.
    """
    was_training = model.training
    model.eval()
    try:
        prototypes = []
        for prompts in class_prompts:
            text = model.encode_text(model.tokenize(list(prompts)).to(device))
            prototypes.append(nn.functional.normalize(text.float().mean(dim=0), dim=0))
        prototype_matrix = torch.stack(prototypes)
        correct = 0
        for start in range(0, len(test), EVAL_CHUNK):
            images = test.images[start : start + EVAL_CHUNK].to(device)
            predictions = (model.encode_image(images).float() @ prototype_matrix.T).argmax(dim=1)
            correct += int((predictions.cpu() == test.labels[start : start + EVAL_CHUNK]).sum())
        return correct / max(1, len(test))
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------------
# Preparation shared by the loop and the benchmark
# --------------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """Data and the frozen reference for one (config seed, data, reference) — reusable across methods."""

    demo: Any
    reference: Any
    image_shape: tuple[int, ...]


def prepare(
    cfg: TrainingConfig,
    ctx: DistContext,
    *,
    cache_dir: Path | None,
    should_stop: Callable[[], bool] | None = None,
) -> Prepared:
    """Load the training data and build (or load) the reference with its cached pool embeddings.

    Raises ``ReferenceTrainingInterruptedError`` when ``should_stop`` answers True during reference training.
    """
    from jest_trainer.data import load_training_data
    from jest_trainer.reference import build_reference

    demo = load_training_data(cfg)
    image_shape = tuple(int(size) for size in demo.pool.images.shape[1:])
    reference = build_reference(
        cfg, demo, image_shape=image_shape, device=ctx.device, rank=ctx.rank, cache_dir=cache_dir,
        should_stop=should_stop,
    )
    return Prepared(demo=demo, reference=reference, image_shape=image_shape)


# --------------------------------------------------------------------------------------------------
# Telemetry adapter, signals, progress output
# --------------------------------------------------------------------------------------------------


class _StopFlag:
    """Set by SIGTERM; the loop checks it (and agrees across ranks) at every step boundary."""

    def __init__(self) -> None:
        self.requested = False

    def request(self, signum: int, _frame: Any) -> None:
        log.warning("received signal %d: checkpointing at the next step boundary", signum)
        self.requested = True


@contextlib.contextmanager
def _signal_handlers(flag: _StopFlag, enabled: bool) -> Iterator[None]:
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, flag.request)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _create_metrics(trainingjob: str, rank: int) -> Any:
    """``TrainerMetrics`` (contract C3)."""
    from jest_trainer.metrics import TrainerMetrics

    return TrainerMetrics(trainingjob=trainingjob, rank=rank)


class _Reporter:
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
        acc = "-" if accuracy is None else f"{accuracy:.3f}"
        if self._progress is not None:
            self._progress.update(
                self._task, completed=step, loss=f"{loss:.4f}", acc=acc, eps=f"{examples_per_second:,.0f}"
            )
        else:
            log.info(
                "step %d/%d loss %.4f acc %s examples/s %.1f", step, total, loss, acc, examples_per_second
            )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def _progress_mode(env: Mapping[str, str]) -> str:
    mode = env.get("JEST_PROGRESS", "").strip().lower()
    if mode in ("rich", "plain"):
        return mode
    if mode:
        raise ValueError(f"JEST_PROGRESS: expected 'rich' or 'plain', got {mode!r}")
    return "rich" if sys.stderr.isatty() else "plain"


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _unix_time(iso: str | None) -> float:
    """Unix time of a checkpoint's ISO stamp (now when it has none, e.g. a checkpoint from an older trainer)."""
    try:
        return dt.datetime.fromisoformat(iso).timestamp() if iso else time.time()
    except ValueError:
        return time.time()


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass
class _Counters:
    """Running totals that survive restarts (stored in checkpoints)."""

    examples_trained: int = 0
    examples_scored: int = 0
    flops: dict[str, float] = field(default_factory=lambda: dict.fromkeys(flops_mod.FLOP_KINDS, 0.0))
    selected_mix: dict[str, int] = field(default_factory=dict)
    eval_history: list[list[float]] = field(default_factory=list)
    last_eval_accuracy: float | None = None

    def to_state(self) -> dict[str, Any]:
        return {
            "examples_trained": self.examples_trained,
            "examples_scored": self.examples_scored,
            "flops": dict(self.flops),
            "selected_mix": dict(self.selected_mix),
            "eval_history": [list(row) for row in self.eval_history],
            "last_eval_accuracy": self.last_eval_accuracy,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> _Counters:
        counters = cls()
        counters.examples_trained = int(state.get("examples_trained", 0))
        counters.examples_scored = int(state.get("examples_scored", 0))
        counters.flops.update({key: float(value) for key, value in state.get("flops", {}).items()})
        counters.selected_mix = {key: int(value) for key, value in state.get("selected_mix", {}).items()}
        counters.eval_history = [list(row) for row in state.get("eval_history", [])]
        last = state.get("last_eval_accuracy")
        counters.last_eval_accuracy = None if last is None else float(last)
        return counters


def _sync(device: torch.device) -> None:
    """Wait for queued device work so phase timings are honest (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """bf16 autocast when ``training.precision`` asks for it, else a no-op context."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _logits(model: nn.Module, image: Tensor, text: Tensor, kind: str) -> Tensor:
    from jest_trainer import losses

    if kind == "sigmoid":
        return losses.sigmoid_logits(image, text, model.logit_scale, model.logit_bias)
    return losses.softmax_logits(image, text, model.logit_scale)


def train(
    config: WorkerConfig,
    *,
    env: Mapping[str, str] | None = None,
    ctx: DistContext | None = None,
    prepared: Prepared | None = None,
    install_signal_handlers: bool = True,
    stop_flag: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the training described by ``config``; returns a summary of this rank's run.

    ``env`` defaults to ``os.environ`` (C2 variables); ``ctx`` to ``init_distributed(env)`` (the process
    group is then destroyed on return); ``prepared`` lets the benchmark share data and reference across
    methods. ``stop_flag`` is an extra stop request (tests), polled at step boundaries like SIGTERM.
    Summary keys: ``completed_steps``, ``total_steps``, ``stopped``, ``resumed_from_step``,
    ``final_accuracy``, ``eval_history`` ([step, accuracy, cumulative total FLOPs]), ``flops``,
    ``selected_mix``, ``pool_mix``, ``phase_seconds``, ``selection_arithmetic_seconds``, ``step_seconds``,
    ``selection_overhead_fraction``, ``examples_trained``, ``examples_scored``, ``energy``, ``checkpoint``.
    A stop requested while the reference is still training ends the run before step 0 with only
    ``completed_steps`` (0), ``total_steps``, ``stopped``, ``resumed_from_step``, ``final_accuracy`` and
    ``checkpoint`` (None): there is nothing to checkpoint yet.
    """
    env = os.environ if env is None else env
    flag = _StopFlag()
    # Installed before the (possibly long) set-up, so a SIGTERM during data loading or reference training
    # also ends in a checkpoint at the first step boundary and exit 0.
    with _signal_handlers(flag, install_signal_handlers):
        own_ctx = ctx is None
        ctx = init_distributed(env) if ctx is None else ctx
        if own_ctx:
            configure_cpu_threads(env, ctx)
        try:
            return _train(config, env=env, ctx=ctx, prepared=prepared, flag=flag, stop_flag=stop_flag)
        except ReferenceTrainingInterruptedError as interrupted:
            log.warning("stop requested while training the reference (%s): exiting before step 0", interrupted)
            return {"completed_steps": 0, "total_steps": config.training.steps, "stopped": True,
                    "resumed_from_step": None, "final_accuracy": None, "checkpoint": None}
        finally:
            if own_ctx and ctx.distributed and dist.is_initialized():
                dist.destroy_process_group()


def _train(
    config: WorkerConfig,
    *,
    env: Mapping[str, str],
    ctx: DistContext,
    prepared: Prepared | None,
    flag: _StopFlag,
    stop_flag: Callable[[], bool] | None,
) -> dict[str, Any]:
    from jest_trainer import losses, native
    from jest_trainer.energy import create_meter
    from jest_trainer.models import build_model, forward_flops_per_example
    from jest_trainer.selection import select_batch

    cfg = config.training
    sel = cfg.selection
    device = ctx.device
    checkpoint_dir = Path(cfg.checkpoint.dir)
    status_file = Path(env.get("JEST_STATUS_FILE") or checkpoint_dir / "progress.json")
    dump_dir = Path(env["JEST_DEBUG_DUMP_DIR"]) if env.get("JEST_DEBUG_DUMP_DIR") else None
    attempt = _env_int(env, "JEST_ATTEMPT", 0)
    metrics_port = _env_int(env, "JEST_METRICS_PORT", 0)
    progress_mode = _progress_mode(env)
    local_batch, local_super = sel.per_rank(ctx.world_size)
    global_batch, global_super = local_batch * ctx.world_size, local_super * ctx.world_size
    uses_learner = sel.method in flops_mod.LEARNER_SCORED_METHODS
    uses_reference = sel.method in flops_mod.REFERENCE_SCORED_METHODS
    autocast_dtype = torch.bfloat16 if cfg.precision == "bf16" else None

    if ctx.is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ckpt.prune_temporaries(checkpoint_dir)

    # --- data, reference, learner -----------------------------------------------------------------
    def stop_requested() -> bool:
        return flag.requested or (stop_flag is not None and stop_flag())

    prepared = prepared or prepare(
        cfg, ctx, cache_dir=checkpoint_dir if ctx.is_main else None, should_stop=stop_requested
    )
    demo, reference = prepared.demo, prepared.reference
    pool = demo.pool
    shard = shard_indices(len(pool), world_size=ctx.world_size, rank=ctx.rank, seed=cfg.seed)
    torch.manual_seed(_mixed_seed(cfg.seed, 0x1EA2))
    model = build_model(cfg.model, image_shape=prepared.image_shape).to(device)
    pool_tokens = model.tokenize(list(pool.captions)).to(device)
    pool_images = pool.images.to(device)
    kind_names = sorted(set(pool.noise_kind))
    kind_ids = torch.tensor([kind_names.index(kind) for kind in pool.noise_kind], dtype=torch.long)
    pool_mix = {name: float((kind_ids == index).float().mean()) for index, name in enumerate(kind_names)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
    per_step_flops = flops_mod.step_flops(
        method=sel.method,
        forward_per_example=forward_flops_per_example(model, prepared.image_shape),
        embed_dim=_embed_dim(model, device),
        reference_embed_dim=reference.embed_dim,
        local_batch=local_batch,
        global_batch=global_batch,
        local_super_batch=local_super,
    )

    # --- resume -----------------------------------------------------------------------------------
    loaded = None
    if ctx.is_main:
        found = ckpt.load_latest_checkpoint(checkpoint_dir)
        loaded = None if found is None else {"step": found.step, "path": str(found.path), "state": found.state}
    loaded = _broadcast_object(loaded, ctx)
    start_step = 0
    counters = _Counters()
    restored_joules = 0.0
    metrics_state: dict[str, float] | None = None
    last_checkpoint: dict[str, Any] | None = None
    if loaded is not None:
        state = loaded["state"]
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise ValueError(
                f"training.checkpoint.dir: checkpoint {loaded['path']} does not fit training.model / optimizer "
                f"of this job ({error}); use a fresh checkpoint directory for a different model"
            ) from error
        start_step = int(state["step"])
        counters = _Counters.from_state(state.get("counters", {}))
        same_world = int(state.get("world_size", 1)) == ctx.world_size
        if not same_world and ctx.is_main:
            log.warning(
                "checkpoint was written by %s ranks, this job has %d: model and optimizer resume, but the data "
                "order and RNG streams restart for the new sharding", state.get("world_size"), ctx.world_size,
            )
        rng_states = state.get("rng", [])
        if same_world and ctx.rank < len(rng_states):
            ckpt.restore_rng_state(rng_states[ctx.rank])
        energy_by_rank = state.get("energy_joules", [])
        if same_world and ctx.rank < len(energy_by_rank):
            restored_joules = float(energy_by_rank[ctx.rank])
        elif ctx.is_main:
            restored_joules = float(sum(energy_by_rank))
        metric_states = state.get("metrics", [])
        if same_world and ctx.rank < len(metric_states):
            metrics_state = metric_states[ctx.rank]
        last_checkpoint = {"step": start_step, "path": loaded["path"], "time": state.get("time")}
        if ctx.is_main:
            log.info("resumed from %s (step %d)", loaded["path"], start_step)
    resumed_from = start_step if loaded is not None else None
    if ctx.is_main and device.type == "cpu" and sel.loss == "sigmoid" and native.KERNEL is None:
        log.warning(
            "selection: the native CPU kernel was not built (no C compiler when the package was installed); "
            "the NumPy fallback draws the same batches, with about twice the selection time per step"
        )
    train_model: nn.Module = model
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # --- telemetry --------------------------------------------------------------------------------
    meter = create_meter(
        config.energy, device_kind=device.type, device_indices=[ctx.local_rank], initial_joules=restored_joules
    )
    metrics = _create_metrics(env.get("JEST_JOB_NAME", "local"), ctx.rank)
    if metrics_state:
        metrics.restore(metrics_state)
    if last_checkpoint is not None:
        metrics.observe_checkpoint(last_checkpoint["step"], _unix_time(last_checkpoint.get("time")))
    metrics.attach_energy(meter)
    reporter: _Reporter | None = None
    run_phase = dict.fromkeys(PHASES, 0.0)
    arithmetic_seconds = 0.0
    run_step_seconds = 0.0
    smoothed_step = 0.0
    last_loss = float("nan")
    stopped = False
    completed = start_step
    started_at = time.monotonic()

    def write_progress(phase: str, joules: float) -> None:
        if not ctx.is_main:
            return
        elapsed = max(1e-9, time.monotonic() - started_at)
        loop_seconds = sum(run_phase.values())
        document = {
            "phase": phase,
            "step": completed,
            "totalSteps": cfg.steps,
            "examplesTrained": counters.examples_trained,
            "examplesScored": counters.examples_scored,
            "observedSelectionRatio": (
                counters.examples_trained / counters.examples_scored if counters.examples_scored else None
            ),
            "lastEvalAccuracy": counters.last_eval_accuracy,
            "loss": None if math.isnan(last_loss) else last_loss,
            "examplesPerSecond": global_batch / smoothed_step if smoothed_step > 0 else 0.0,
            "stepSeconds": smoothed_step,
            "selectionOverheadFraction": run_phase["selection"] / loop_seconds if loop_seconds > 0 else 0.0,
            "energy": {
                "joules": joules,
                "averageWatts": (joules - restored_total_joules) / elapsed if joules >= restored_total_joules else 0.0,
                "method": meter.method,
                "source": meter.source,
            },
            "checkpoint": last_checkpoint,
            "resumedFromStep": resumed_from,
            "worldSize": ctx.world_size,
            "attempt": attempt,
            "updatedAt": _now_iso(),
        }
        ckpt.atomic_write_json(status_file, document)

    def job_joules() -> float:
        return _all_reduce([meter.total_joules()], ctx)[0]

    def save(step: int) -> float:
        """Write the checkpoint of ``step`` (collective: every rank calls it); returns the seconds it took."""
        nonlocal last_checkpoint
        begin = time.perf_counter()
        gathered = _all_gather_object(
            {"rng": ckpt.capture_rng_state(), "energy": meter.total_joules(), "metrics": metrics.counter_state()}, ctx
        )
        if ctx.is_main:
            stamp = _now_iso()
            state = {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": [item["rng"] for item in gathered],
                "energy_joules": [float(item["energy"]) for item in gathered],
                "metrics": [item["metrics"] for item in gathered],
                "counters": counters.to_state(),
                "data_position": {"examples_per_rank": step * local_super, "seed": cfg.seed},
                "world_size": ctx.world_size,
                "time": stamp,
                "config": cfg.to_wire(),
            }
            path = ckpt.save_checkpoint(checkpoint_dir, step, state, keep=cfg.checkpoint.keep)
            last_checkpoint = {"step": step, "path": str(path), "time": stamp}
        last_checkpoint = _broadcast_object(last_checkpoint, ctx)
        metrics.observe_checkpoint(step, _unix_time(last_checkpoint.get("time")))
        return time.perf_counter() - begin

    def evaluate(step: int) -> None:
        if ctx.is_main:
            accuracy = zero_shot_accuracy(model, demo.test, demo.class_prompts, device=device)
            counters.last_eval_accuracy = accuracy
            counters.eval_history.append([float(step), accuracy, flops_mod.total_flops(counters.flops)])
            metrics.observe_eval(accuracy)

    restored_total_joules = job_joules()
    try:
        if metrics_port > 0:
            # torchrun runs several ranks in one pod: local rank r serves on JEST_METRICS_PORT + r (the pod
            # declares those ports as metrics-<r>), so ranks never contend for one port.
            metrics.serve(metrics_port + ctx.local_rank)
        meter.start()
        reporter = _Reporter(progress_mode, cfg.steps, start_step) if ctx.is_main else None
        write_progress("Running", restored_total_joules)
        if start_step == 0 and ctx.is_main and not counters.eval_history and not flag.requested:
            evaluate(0)
        for step in range(start_step, cfg.steps):
            local_stop = stop_requested()
            if _all_reduce([1.0 if local_stop else 0.0], ctx, dist.ReduceOp.MAX)[0] > 0:
                stopped = True
                break
            step_begin = time.perf_counter()
            phase = dict.fromkeys(PHASES, 0.0)

            # data
            positions = super_batch_positions(
                len(shard), local_super_batch=local_super, step=step, seed=cfg.seed, rank=ctx.rank
            )
            candidates = shard.index_select(0, positions)
            candidates_device = candidates.to(device)
            images = pool_images.index_select(0, candidates_device)
            tokens = pool_tokens.index_select(0, candidates_device)
            _sync(device)
            mark = time.perf_counter()
            phase["data"] = mark - step_begin

            # selection: score, then select
            learner_logits = reference_logits = None
            with torch.no_grad(), _autocast(device, autocast_dtype):
                if uses_learner:
                    model.eval()
                    image_emb, text_emb = model(images, tokens)
                    learner_logits = _logits(model, image_emb, text_emb, sel.loss).float()
                    model.train()
                if uses_reference:
                    reference_logits = reference.logits(candidates_device, loss=sel.loss).float()
            size_hint = None
            if learner_logits is None and reference_logits is None:
                size_hint = torch.zeros(1, 1, device=device).expand(local_super, local_super)
            generator = selection_generator(cfg.seed, step, ctx.rank, device=device)
            _sync(device)
            arithmetic_begin = time.perf_counter()
            selected = select_batch(
                sel.method,
                learner_logits=learner_logits if learner_logits is not None else size_hint,
                reference_logits=reference_logits,
                loss=sel.loss,
                batch_size=local_batch,
                n_chunks=sel.chunks,
                generator=generator,
            )
            _sync(device)
            now = time.perf_counter()
            arithmetic_seconds += now - arithmetic_begin
            phase["selection"] = now - mark
            mark = now

            # forward + backward with global negatives
            with _autocast(device, autocast_dtype):
                image_emb, text_emb = train_model(
                    images.index_select(0, selected), tokens.index_select(0, selected)
                )
                loss = losses.contrastive_loss(
                    image_emb.float(), text_emb.float(), model.logit_scale, model.logit_bias, kind=sel.loss
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _sync(device)
            now = time.perf_counter()
            phase["forward_backward"] = now - mark
            mark = now

            # optimizer
            learning_rate = lr_at(
                step, total_steps=cfg.steps, peak_lr=cfg.optimizer.lr, warmup_steps=cfg.optimizer.warmup_steps
            )
            for group in optimizer.param_groups:
                group["lr"] = learning_rate
            optimizer.step()
            if device.type == "xla":
                import torch_xla.core.xla_model as xm

                xm.mark_step()
            _sync(device)
            phase["optimizer"] = time.perf_counter() - mark

            # bookkeeping
            last_loss = float(loss.detach())
            completed = step + 1
            selected_global = candidates.index_select(0, selected.cpu())
            mix = torch.bincount(kind_ids.index_select(0, selected_global), minlength=len(kind_names))
            for index, name in enumerate(kind_names):
                counters.selected_mix[name] = counters.selected_mix.get(name, 0) + int(mix[index])
            counters.examples_trained += global_batch
            counters.examples_scored += global_super
            for kind, value in per_step_flops.items():
                counters.flops[kind] += value * ctx.world_size
            if dump_dir is not None and step < start_step + DEBUG_DUMP_STEPS:
                _dump_selection(dump_dir, step=step, ctx=ctx, seed=cfg.seed, candidates=candidates,
                                learner_logits=learner_logits, reference_logits=reference_logits,
                                selected=selected, cfg=cfg, local_batch=local_batch, loss=last_loss)
            if completed % cfg.eval.interval_steps == 0 or completed == cfg.steps:
                evaluate(completed)  # not part of the step's time: evaluation is not training work
            if completed % cfg.checkpoint.interval_steps == 0 or completed == cfg.steps:
                if completed == cfg.steps:
                    meter.stop()  # a final reading, so the last checkpoint holds the whole run's energy
                phase["checkpoint"] = save(completed)
            step_seconds = sum(phase.values())
            for name in PHASES:
                run_phase[name] += phase[name]
            run_step_seconds += step_seconds
            smoothed_step = step_seconds if smoothed_step == 0 else (
                (1 - STEP_TIME_SMOOTHING) * smoothed_step + STEP_TIME_SMOOTHING * step_seconds
            )
            metrics.observe_step(
                duration_seconds=step_seconds,
                phase_seconds=phase,
                examples=local_batch,
                candidates=local_super,
                flops=per_step_flops,
                loss=last_loss,
                selection_ratio=local_batch / local_super,
            )
            if completed % LOG_INTERVAL_STEPS == 0 or completed == cfg.steps:
                joules = job_joules()
                if reporter is not None:
                    reporter.update(step=completed, total=cfg.steps, loss=last_loss,
                                    accuracy=counters.last_eval_accuracy,
                                    examples_per_second=global_batch / smoothed_step if smoothed_step else 0.0)
                write_progress("Running", joules)
        meter.stop()  # before the stop checkpoint: it must hold a fresh energy reading
        if stopped and (last_checkpoint is None or last_checkpoint["step"] != completed):
            run_phase["checkpoint"] += save(completed)
        joules = job_joules()
        finished = completed >= cfg.steps
        write_progress("Succeeded" if finished else "Running", joules)
    except BaseException:
        meter.stop()
        with contextlib.suppress(Exception):
            write_progress("Failed", meter.total_joules())
        raise
    finally:
        if reporter is not None:
            reporter.close()
        metrics.close()

    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), dump_dir / f"params-rank{ctx.rank}.pt")
    loop_seconds = sum(run_phase.values())
    return {
        "completed_steps": completed,
        "total_steps": cfg.steps,
        "stopped": stopped,
        "resumed_from_step": resumed_from,
        "method": sel.method,
        "world_size": ctx.world_size,
        "final_accuracy": counters.last_eval_accuracy,
        "eval_history": counters.eval_history,
        "flops": {**counters.flops, "total": flops_mod.total_flops(counters.flops)},
        "flops_per_step": {**per_step_flops, "total": flops_mod.total_flops(per_step_flops) * ctx.world_size},
        "selected_mix": dict(counters.selected_mix),
        "pool_mix": pool_mix,
        "phase_seconds": run_phase,
        "selection_arithmetic_seconds": arithmetic_seconds,
        "step_seconds": run_step_seconds,
        "selection_overhead_fraction": run_phase["selection"] / loop_seconds if loop_seconds > 0 else 0.0,
        "examples_trained": counters.examples_trained,
        "examples_scored": counters.examples_scored,
        "loss": last_loss,
        "energy": {"joules": joules, "method": meter.method, "source": meter.source},
        "checkpoint": last_checkpoint,
    }


def _embed_dim(model: nn.Module, device: torch.device) -> int:
    """Embedding width of ``model`` (from one text encoding; used when no reference is consulted)."""
    with torch.no_grad():
        return int(model.encode_text(model.tokenize(["a"]).to(device)).shape[1])


def _dump_selection(
    dump_dir: Path,
    *,
    step: int,
    ctx: DistContext,
    seed: int,
    candidates: Tensor,
    learner_logits: Tensor | None,
    reference_logits: Tensor | None,
    selected: Tensor,
    cfg: TrainingConfig,
    local_batch: int,
    loss: float,
) -> None:
    """Debug hook (``JEST_DEBUG_DUMP_DIR``): everything needed to recompute this rank's selection offline."""
    dump_dir.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "step": step,
            "rank": ctx.rank,
            "world_size": ctx.world_size,
            "seed": seed,
            "candidate_indices": candidates.cpu(),
            "learner_logits": None if learner_logits is None else learner_logits.cpu(),
            "reference_logits": None if reference_logits is None else reference_logits.cpu(),
            "selected": selected.cpu(),
            "method": cfg.selection.method,
            "batch_size": local_batch,
            "chunks": cfg.selection.chunks,
            "loss": cfg.selection.loss,
            "train_loss": loss,
        },
        dump_dir / f"sel-step{step}-rank{ctx.rank}.pt",
    )


def _stop_note(summary: Mapping[str, Any]) -> str:
    if not summary["stopped"]:
        return ""
    if summary["checkpoint"] is None:
        return " (stopped by signal before the first step; no checkpoint needed)"
    return f" (stopped by signal, checkpoint {summary['checkpoint']['path']})"


def main(argv: list[str] | None = None) -> int:
    """CLI: ``jest-trainer [--config PATH]`` (default ``$JEST_CONFIG``); exit 0 on success or after SIGTERM."""
    parser = argparse.ArgumentParser(prog="jest-trainer", description="JEST contrastive training worker")
    parser.add_argument(
        "--config", default=os.environ.get("JEST_CONFIG"), help="WorkerConfig JSON (default $JEST_CONFIG)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s [rank " +
        os.environ.get("RANK", "0") + "] %(name)s: %(message)s"
    )
    if not args.config:
        print("jest-trainer: no config: pass --config PATH or set JEST_CONFIG", file=sys.stderr)
        return 2
    try:
        config = WorkerConfig.model_validate_json(Path(args.config).read_text())
    except FileNotFoundError:
        print(f"jest-trainer: config file {args.config} does not exist", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"jest-trainer: invalid config {args.config}: {error}", file=sys.stderr)
        return 2
    try:
        summary = train(config)
    except Exception as error:
        log.exception("training failed")
        print(f"jest-trainer: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    log.info(
        "done: %d/%d steps, final accuracy %s%s",
        summary["completed_steps"],
        summary["total_steps"],
        summary["final_accuracy"],
        _stop_note(summary),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
