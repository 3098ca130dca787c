"""The JEST training loop as named pieces: a ``TrainState``, one ``train_step``, and ``run``.

Reading order (nanoGPT / open_clip style): ``LoopPlan`` holds what the config fixes for the whole run
(batch sizes, which scores a method needs, per-step FLOPs); ``TrainState`` is everything a checkpoint
must restore (model, optimizer, step, counters, RNG, energy, the data stream's cursor) with
``state_dict`` / ``load_state_dict``; ``train_step`` is score -> select -> optimise on one super-batch;
``run`` is the loop: stop vote, next super-batch, step, bookkeeping, evaluate, checkpoint, report.

Determinism contract: what step ``s`` of rank ``r`` trains on depends only on (config, s, r): the
stream's cursor is restored exactly, the selection generator is seeded by (seed, s, r), the LR is a
pure function of ``s``, and the RNG state of every rank is checkpointed. A resumed run therefore trains
on the same sample keys, step by step, as an uninterrupted one (``JEST_DEBUG_KEYS_DIR`` records them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from jest_trainer import checkpoint as ckpt
from jest_trainer import flops as flops_mod
from jest_trainer.config import TrainingConfig, WorkerConfig
from jest_trainer.distributed import (
    DistContext,
    all_gather_object,
    all_reduce,
    any_rank,
    average_gradients,
    broadcast_object,
    uses_ddp,
)
from jest_trainer.energy import METHODS as ENERGY_METHODS
from jest_trainer.metrics import JobTotals
from jest_trainer.schedule import init_seed, lr_at, selection_generator
from jest_trainer.telemetry import (
    PhaseTimer,
    StopFlag,
    Telemetry,
    nan_to_none,
    now_iso,
    progress_file_path,
    unix_time,
)

log = logging.getLogger("jest_trainer.train")

LOG_INTERVAL_STEPS = 10
DEBUG_DUMP_STEPS = 3
# Config fields (wire paths) whose change keeps the data order and the model: everything else under
# training.model, training.seed, training.data and the two selection sizes must match on resume.
ORDER_NEUTRAL_DATA_FIELDS: frozenset[str] = frozenset(
    {"evalUrls", "evalMaxSamples", "maxSkipFraction", "readRetries", "retryBackoffSeconds", "prefetch"}
)


# --------------------------------------------------------------------------------------------------
# What the config fixes for the whole run
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopPlan:
    """Run-wide constants derived from the config and the world size."""

    cfg: TrainingConfig
    local_batch: int
    local_super: int
    world_size: int
    uses_learner: bool
    uses_reference: bool
    autocast_dtype: torch.dtype | None

    @classmethod
    def of(cls, cfg: TrainingConfig, world_size: int) -> LoopPlan:
        """The plan of ``cfg`` on ``world_size`` ranks (raises ValueError when the batch sizes do not split)."""
        local_batch, local_super = cfg.selection.per_rank(world_size)
        return cls(
            cfg=cfg, local_batch=local_batch, local_super=local_super, world_size=world_size,
            uses_learner=cfg.selection.method in flops_mod.LEARNER_SCORED_METHODS,
            uses_reference=cfg.selection.method in flops_mod.REFERENCE_SCORED_METHODS,
            autocast_dtype=torch.bfloat16 if cfg.precision == "bf16" else None,
        )

    @property
    def global_batch(self) -> int:
        """Trained pairs per step, all ranks."""
        return self.local_batch * self.world_size

    @property
    def global_super(self) -> int:
        """Scored candidates per step, all ranks."""
        return self.local_super * self.world_size

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """bf16 autocast when ``training.precision`` asks for it, else a no-op context."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


# --------------------------------------------------------------------------------------------------
# Everything a checkpoint restores
# --------------------------------------------------------------------------------------------------


@dataclass
class Counters:
    """Running totals that survive restarts (stored in checkpoints)."""

    examples_trained: int = 0
    examples_scored: int = 0
    flops: dict[str, float] = field(default_factory=lambda: dict.fromkeys(flops_mod.FLOP_KINDS, 0.0))
    selected_mix: dict[str, int] = field(default_factory=dict)
    eval_history: list[list[float]] = field(default_factory=list)
    last_eval_accuracy: float | None = None
    last_eval_recall: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_state(self) -> dict[str, Any]:
        """Plain-container form (checkpoints load with ``weights_only=True``)."""
        return {
            "examples_trained": self.examples_trained,
            "examples_scored": self.examples_scored,
            "flops": dict(self.flops),
            "selected_mix": dict(self.selected_mix),
            "eval_history": [list(row) for row in self.eval_history],
            "last_eval_accuracy": self.last_eval_accuracy,
            "last_eval_recall": {key: dict(value) for key, value in self.last_eval_recall.items()},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Counters:
        """Inverse of ``to_state`` (missing keys keep their defaults)."""
        counters = cls()
        counters.examples_trained = int(state.get("examples_trained", 0))
        counters.examples_scored = int(state.get("examples_scored", 0))
        counters.flops.update({key: float(value) for key, value in state.get("flops", {}).items()})
        counters.selected_mix = {key: int(value) for key, value in state.get("selected_mix", {}).items()}
        counters.eval_history = [list(row) for row in state.get("eval_history", [])]
        last = state.get("last_eval_accuracy")
        counters.last_eval_accuracy = None if last is None else float(last)
        counters.last_eval_recall = {key: dict(value) for key, value in state.get("last_eval_recall", {}).items()}
        return counters


@dataclass
class TrainState:
    """Model, optimizer, step, counters and the data stream: what ``state_dict`` saves and restores.

    Per-rank parts (RNG, energy, metric counters, the stream cursor) are gathered to rank 0, which writes
    one file; ``load_state_dict`` gives each rank its own part back when the world size is unchanged.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    stream: Any
    config: TrainingConfig
    step: int = 0
    counters: Counters = field(default_factory=Counters)
    restored_joules: float = 0.0
    restored_metrics: dict[str, float] | None = None
    resumed_from: int | None = None
    last_checkpoint: dict[str, Any] | None = None

    def rank_state(self, *, joules: float, metrics: Mapping[str, float]) -> dict[str, Any]:
        """This rank's share of a checkpoint."""
        return {"rng": ckpt.capture_rng_state(), "energy": float(joules), "metrics": dict(metrics),
                "stream": self.stream.state_dict()}

    def state_dict(self, rank_states: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint document (rank 0), given every rank's ``rank_state`` in rank order."""
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "counters": self.counters.to_state(),
            "rng": [item["rng"] for item in rank_states],
            "energy_joules": [item["energy"] for item in rank_states],
            "metrics": [item["metrics"] for item in rank_states],
            "stream": [item["stream"] for item in rank_states],
            "world_size": len(rank_states),
            "time": now_iso(),
            "config": self.config.to_wire(),
        }

    def load_state_dict(self, state: Mapping[str, Any], *, rank: int, world_size: int, path: str) -> None:
        """Restore from a checkpoint document; raises ValueError naming the field that does not fit."""
        refuse_incompatible_config(state.get("config"), self.config, path=path, step=int(state["step"]))
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise ValueError(
                f"training.checkpoint.dir: checkpoint {path} does not fit training.model / optimizer "
                f"of this job ({error}); use a fresh checkpoint directory for a different model"
            ) from error
        self.step = int(state["step"])
        self.resumed_from = self.step
        self.counters = Counters.from_state(state.get("counters", {}))
        self.last_checkpoint = {"step": self.step, "path": path, "time": state.get("time")}
        energy = [float(value) for value in state.get("energy_joules", [])]
        if int(state.get("world_size", 1)) != world_size:
            if rank == 0:
                log.warning(
                    "checkpoint was written by %s ranks, this job has %d: model and optimizer resume, but the data "
                    "order and RNG streams restart for the new sharding", state.get("world_size"), world_size,
                )
                self.restored_joules = sum(energy)
            return
        ckpt.restore_rng_state(state["rng"][rank])
        self.restored_joules = energy[rank] if rank < len(energy) else 0.0
        metrics = state.get("metrics", [])
        self.restored_metrics = metrics[rank] if rank < len(metrics) else None
        streams = state.get("stream")
        if streams:
            self.stream.load_state_dict(streams[rank])
        elif rank == 0:
            log.warning("checkpoint %s holds no data stream cursor (an older trainer): the data order restarts", path)


def _flatten(document: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(document, Mapping):
        return {prefix: document}
    flat: dict[str, Any] = {}
    for key, value in document.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def order_relevant(path: str) -> bool:
    """Whether a changed ``training`` field (wire path) changes the data order or the model."""
    head, _, rest = path.partition(".")
    if head in ("model", "seed"):
        return True
    if head == "data":
        return rest.split(".")[0] not in ORDER_NEUTRAL_DATA_FIELDS
    return path in ("selection.batchSize", "selection.filterRatio")


def refuse_incompatible_config(saved: Mapping[str, Any] | None, cfg: TrainingConfig, *, path: str, step: int) -> None:
    """Raise ValueError naming the first field whose change would alter the data order or the model."""
    if saved is None:
        return
    try:
        saved_flat = _flatten(TrainingConfig.model_validate(saved).to_wire())
    except ValueError:
        saved_flat = _flatten(saved)
    now_flat = _flatten(cfg.to_wire())
    for key in sorted(set(saved_flat) | set(now_flat)):
        if order_relevant(key) and saved_flat.get(key) != now_flat.get(key):
            raise ValueError(
                f"training.{key}: the checkpoint {path} (step {step}) was written with training.{key}="
                f"{json.dumps(saved_flat.get(key))}, this job has {json.dumps(now_flat.get(key))}; that changes the "
                "data order or the model, so the resumed run would not continue the same run. Restore the value or "
                "use a fresh training.checkpoint.dir"
            )


# --------------------------------------------------------------------------------------------------
# One step: score, select, optimise
# --------------------------------------------------------------------------------------------------


@dataclass
class StepOutput:
    """What one step produced (selected rows are local to the super-batch)."""

    loss: Tensor
    selected: Tensor
    learner_logits: Tensor | None
    reference_logits: Tensor | None
    arithmetic_seconds: float


def pair_logits(model: nn.Module, image: Tensor, text: Tensor, kind: str) -> Tensor:
    """The learner's ``[n, n]`` logit matrix of its own embeddings (sigmoid or softmax form)."""
    from jest_trainer import losses

    if kind == "sigmoid":
        return losses.sigmoid_logits(image, text, model.logit_scale, model.logit_bias)
    return losses.softmax_logits(image, text, model.logit_scale)


def score(
    plan: LoopPlan, model: nn.Module, scorer: Any, batch: Any, device: torch.device
) -> tuple[Tensor | None, Tensor | None]:
    """Learner and reference logits of the super-batch, each only when the method uses it (no grad).

    The towers run at the training precision (bf16 autocast when configured), but the logit matrices are
    formed in float32 from float32 copies of the embeddings, whatever the precision: learnability is a
    difference of two losses of similar size, and bf16's 8-bit mantissa would round most of it away and
    reorder near pairs. So bf16 and fp32 runs of one model select the same examples up to near-ties.
    """
    learner = reference = None
    with torch.no_grad():
        if plan.uses_learner:
            model.eval()
            with plan.autocast(device):
                image_emb, text_emb = model(batch.images, batch.tokens)
            learner = pair_logits(model, image_emb.float(), text_emb.float(), plan.cfg.selection.loss)
            model.train()
        if plan.uses_reference:
            reference = scorer.logits(batch, loss=plan.cfg.selection.loss).float()
    return learner, reference


def train_step(
    plan: LoopPlan, state: TrainState, train_model: nn.Module, scorer: Any, batch: Any, *, rank: int,
    device: torch.device, timer: PhaseTimer,
) -> StepOutput:
    """Score the super-batch, select ``b/W`` of its pairs, and take one optimizer step on them."""
    import time

    from jest_trainer import losses
    from jest_trainer.selection import select_batch

    sel, model = plan.cfg.selection, state.model
    with timer("selection"):
        learner_logits, reference_logits = score(plan, model, scorer, batch, device)
        select_on = device
        if device.type == "xla":
            # XLA: the chunk loop (sequential top-k and gathers at data-dependent indices) runs on the host, in
            # microseconds with the native kernel, after one copy of each [B, B] matrix; traced, it would be a
            # graph per chunk, and torch_xla 2.9 aborts tracing index_select on pending top-k indices
            select_on = torch.device("cpu")
            learner_logits, reference_logits = (None if logits is None else logits.cpu()
                                                for logits in (learner_logits, reference_logits))
        size_hint = None
        if learner_logits is None and reference_logits is None:
            size_hint = torch.zeros(1, 1, device=select_on).expand(plan.local_super, plan.local_super)
        begin = time.perf_counter()
        selected = select_batch(
            sel.method,
            learner_logits=learner_logits if learner_logits is not None else size_hint,
            reference_logits=reference_logits,
            loss=sel.loss,
            batch_size=plan.local_batch,
            n_chunks=sel.chunks,
            # a CPU generator everywhere: identical draws on every device, and XLA has no device generators
            generator=selection_generator(plan.cfg.seed, state.step, rank),
        )
        arithmetic = time.perf_counter() - begin
        selected = selected.to(device)
    with timer("forward_backward"):
        with plan.autocast(device):
            image_emb, text_emb = train_model(batch.images.index_select(0, selected),
                                              batch.tokens.index_select(0, selected))
            loss = losses.contrastive_loss(
                image_emb.float(), text_emb.float(), model.logit_scale, model.logit_bias, kind=sel.loss
            )
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if device.type == "xla":
            average_gradients(model.parameters())  # DDP's averaging, without DDP on XLA (distributed.py)
    with timer("optimizer"):
        learning_rate = lr_at(state.step, total_steps=plan.cfg.steps, peak_lr=plan.cfg.optimizer.lr,
                              warmup_steps=plan.cfg.optimizer.warmup_steps)
        for group in state.optimizer.param_groups:
            group["lr"] = learning_rate
        state.optimizer.step()
        if device.type == "xla":
            import torch_xla.core.xla_model as xm

            xm.mark_step()
    return StepOutput(loss=loss.detach(), selected=selected, learner_logits=learner_logits,
                      reference_logits=reference_logits, arithmetic_seconds=arithmetic)


# --------------------------------------------------------------------------------------------------
# Set-up: data, reference, learner, resume
# --------------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """The frozen reference and the model-input shape for one (config seed, data, reference).

    Reusable across runs that differ only in the selection method (the benchmark shares it).
    """

    reference: nn.Module
    image_shape: tuple[int, ...]


def _curated_source(cfg: TrainingConfig, ctx: DistContext) -> Any:
    """What the reference trains on: the digits curated table, or a factory of the curated shard stream."""
    from jest_trainer.data import load_digits_demo, open_curated_stream
    from jest_trainer.preprocess import build_image_transform
    from jest_trainer.reference import reference_model_config, stream_batches

    if cfg.data.source == "digits":
        return load_digits_demo(cfg.data.noise, seed=cfg.seed).curated
    batch_size = cfg.reference.train.batch_size if cfg.reference.train is not None else 64

    def open_stream(model: nn.Module) -> Any:
        from jest_trainer.shards import resolve_shards

        transform = build_image_transform(reference_model_config(cfg), cfg.data, train=True,
                                          image_spec=model.image_spec)
        # a curated set is often a single shard: never ask for more readers than it has shards
        urls = cfg.reference.train.urls if cfg.reference.train is not None else None
        shards = len(resolve_shards(urls, field="reference.train.urls")) if urls else 1
        workers = min(cfg.data.loader_workers, shards)
        curated_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"loader_workers": workers})})
        stream = open_curated_stream(curated_cfg, rank=0, world_size=1, batch_size=batch_size, transform=transform,
                                     tokenizer=model.tokenizer, pin_memory=ctx.device.type == "cuda")
        return stream_batches(stream)

    return open_stream


def prepare(
    cfg: TrainingConfig, ctx: DistContext, *, cache_dir: Path | None, should_stop: Callable[[], bool] | None = None,
) -> Prepared:
    """Build (load or train on the curated data) the frozen reference, on every rank.

    Raises ``ReferenceTrainingInterruptedError`` when ``should_stop`` answers True during reference training.
    """
    from jest_trainer.data import model_input_shape
    from jest_trainer.reference import build_reference

    image_shape = model_input_shape(cfg)
    curated = _curated_source(cfg, ctx) if ctx.is_main and not cfg.reference.checkpoint else None
    reference = build_reference(cfg, curated, image_shape=image_shape, device=ctx.device, rank=ctx.rank,
                                cache_dir=cache_dir, should_stop=should_stop)
    return Prepared(reference=reference, image_shape=image_shape)


def _open_data(cfg: TrainingConfig, ctx: DistContext, model: nn.Module, local_super: int) -> tuple[Any, Any]:
    """This rank's training stream and (rank 0) the bounded eval set, preprocessed for ``model``."""
    from jest_trainer.data import load_eval_set, open_train_stream
    from jest_trainer.preprocess import build_image_transform

    train_transform = build_image_transform(cfg.model, cfg.data, train=True, image_spec=model.image_spec)
    stream = open_train_stream(cfg, rank=ctx.rank, world_size=ctx.world_size, local_super_batch=local_super,
                               transform=train_transform, tokenizer=model.tokenizer,
                               pin_memory=ctx.device.type == "cuda")
    eval_set = None
    if ctx.is_main:
        eval_transform = build_image_transform(cfg.model, cfg.data, train=False, image_spec=model.image_spec)
        eval_set = load_eval_set(cfg, transform=eval_transform, tokenizer=model.tokenizer)
    return stream, eval_set


def _pool_mix(cfg: TrainingConfig) -> dict[str, float]:
    """Noise-kind shares of the digits pool (unknown for shards: {})."""
    if cfg.data.source != "digits":
        return {}
    from jest_trainer.data import load_digits_demo

    kinds = list(load_digits_demo(cfg.data.noise, seed=cfg.seed).pool.noise_kind)
    return {name: kinds.count(name) / len(kinds) for name in sorted(set(kinds))}


def _resume(state: TrainState, ctx: DistContext, checkpoint_dir: Path) -> None:
    """Load the newest complete checkpoint (rank 0 reads, every rank receives) into ``state``."""
    loaded = None
    if ctx.is_main:
        found = ckpt.load_latest_checkpoint(checkpoint_dir)
        loaded = None if found is None else {"path": str(found.path), "state": found.state}
    loaded = broadcast_object(loaded, ctx)
    if loaded is not None:
        state.load_state_dict(loaded["state"], rank=ctx.rank, world_size=ctx.world_size, path=loaded["path"])
        if ctx.is_main:
            log.info("resumed from %s (step %d)", loaded["path"], state.step)


def _samples_skipped(stream: Any, ctx: DistContext) -> tuple[dict[str, int], int]:
    """Job-wide skipped samples by reason and samples read (collective)."""
    gathered = all_gather_object({"skipped": dict(getattr(stream, "skipped", {}) or {}),
                                  "seen": int(getattr(stream, "seen", 0))}, ctx)
    skipped: dict[str, int] = {}
    for item in gathered:
        for reason, count in item["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + int(count)
    return skipped, sum(item["seen"] for item in gathered)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


class _KeyLog:
    """Debug hook (``JEST_DEBUG_KEYS_DIR``): one JSON line per step with candidate and selected keys."""

    def __init__(self, directory: str | None, rank: int) -> None:
        self.path = Path(directory) / f"keys-rank{rank}.jsonl" if directory else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, batch: Any, selected: Tensor) -> None:
        if self.path is None:
            return
        keys = list(batch.keys)
        chosen = [keys[index] for index in selected.cpu().tolist()]
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, "candidates": keys, "selected": chosen}) + "\n")


def _dump_selection(dump_dir: Path, *, step: int, ctx: DistContext, cfg: TrainingConfig, local_batch: int,
                    out: StepOutput, keys: list[str]) -> None:
    """Debug hook (``JEST_DEBUG_DUMP_DIR``): everything needed to recompute this rank's selection offline."""
    dump_dir.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "step": step, "rank": ctx.rank, "world_size": ctx.world_size, "seed": cfg.seed,
            "candidate_keys": keys,
            "learner_logits": None if out.learner_logits is None else out.learner_logits.cpu(),
            "reference_logits": None if out.reference_logits is None else out.reference_logits.cpu(),
            "selected": out.selected.cpu(), "method": cfg.selection.method, "batch_size": local_batch,
            "chunks": cfg.selection.chunks, "loss": cfg.selection.loss, "train_loss": float(out.loss),
        },
        dump_dir / f"sel-step{step}-rank{ctx.rank}.pt",
    )


def _due(completed: int, interval: int, total: int) -> bool:
    return completed % interval == 0 or completed == total


def run(
    config: WorkerConfig, *, env: Mapping[str, str], ctx: DistContext, prepared: Prepared | None, stop: StopFlag,
) -> dict[str, Any]:
    """Run (or resume) the training of ``config`` on this rank; returns the rank's summary (see ``train.train``)."""
    from jest_trainer import native
    from jest_trainer.data import check_skip_fraction
    from jest_trainer.models import build_model, forward_flops_per_example
    from jest_trainer.reference import make_scorer

    cfg, device = config.training, ctx.device
    plan = LoopPlan.of(cfg, ctx.world_size)
    checkpoint_dir = Path(cfg.checkpoint.dir)
    if ctx.is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ckpt.prune_temporaries(checkpoint_dir)

    from jest_trainer.data import model_input_shape

    torch.manual_seed(init_seed(cfg.seed))
    model = build_model(cfg.model, image_shape=model_input_shape(cfg)).to(device)
    # the data first: a bad shard pattern or missing sidecars fail before a (long) reference training
    stream, eval_set = _open_data(cfg, ctx, model, plan.local_super)
    try:
        prepared = prepared or prepare(cfg, ctx, cache_dir=checkpoint_dir if ctx.is_main else None, should_stop=stop)
    except BaseException:
        stream.close()
        raise
    scorer = make_scorer(cfg, prepared.reference, input_spec=model.image_spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
    per_step_flops = flops_mod.step_flops(
        method=cfg.selection.method, forward_per_example=forward_flops_per_example(model), embed_dim=model.embed_dim,
        reference_embed_dim=scorer.embed_dim, local_batch=plan.local_batch, global_batch=plan.global_batch,
        local_super_batch=plan.local_super,
        reference_forward_per_example=(forward_flops_per_example(prepared.reference)
                                       if cfg.reference.mode == "online" else None),
    )
    state = TrainState(model=model, optimizer=optimizer, stream=stream, config=cfg)
    _resume(state, ctx, checkpoint_dir)
    if ctx.is_main and device.type == "cpu" and cfg.selection.loss == "sigmoid" and native.KERNEL is None:
        log.warning("selection: the native CPU kernel was not built (no C compiler when the package was installed); "
                    "the NumPy fallback draws the same batches, with about twice the selection time per step")
    if cfg.selection.loss == "softmax":
        # the softmax (CLIP) loss never reads the bias: a parameter without a gradient stalls DDP's reducer
        model.logit_bias.requires_grad_(False)
    train_model: nn.Module = model
    if uses_ddp(ctx):
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    status_file = progress_file_path(env, checkpoint_dir)
    telemetry = Telemetry(config, env, ctx, status_file=status_file, total_steps=cfg.steps,
                          restored_joules=state.restored_joules)
    if state.restored_metrics:
        telemetry.metrics.restore(state.restored_metrics)
    if state.last_checkpoint is not None:
        last = state.last_checkpoint
        telemetry.metrics.observe_checkpoint(last["step"], unix_time(last.get("time")))
    telemetry.watch_skipped(lambda: dict(getattr(stream, "skipped", {}) or {}))
    dump_dir = Path(env["JEST_DEBUG_DUMP_DIR"]) if env.get("JEST_DEBUG_DUMP_DIR") else None
    keys_log = _KeyLog(env.get("JEST_DEBUG_KEYS_DIR"), ctx.rank)
    totals = {"phase": dict.fromkeys(PhaseTimer(device).seconds, 0.0), "arithmetic": 0.0}
    last_loss = float("nan")
    skipped: dict[str, int] = {}
    max_skip = cfg.data.max_skip_fraction

    meter = telemetry.meter
    energy_sources = job_energy_sources(all_gather_object((meter.method, meter.source), ctx))
    restored_job_joules: float | None = None

    def job_joules() -> float:
        """The job's energy, every rank's by method (a collective: all ranks call it at the same step).

        Rank 0 also exports the job totals of this moment (:class:`~jest_trainer.metrics.JobTotals`).
        """
        own = [meter.total_joules() if method == meter.method else 0.0 for method in ENERGY_METHODS]
        by_method = dict(zip(ENERGY_METHODS, all_reduce(own, ctx), strict=True))
        joules = sum(by_method.values())
        if ctx.is_main:
            spent = 0.0 if restored_job_joules is None else max(0.0, joules - restored_job_joules)
            telemetry.metrics.observe_job(JobTotals(
                steps=state.step, examples=state.counters.examples_trained, candidates=state.counters.examples_scored,
                joules_by_method={method: by_method[method] for method in energy_sources},
                sources=energy_sources, average_watts=spent / telemetry.elapsed(),
            ))
        return joules

    def progress(phase: str, joules: float) -> dict[str, Any]:
        loop_seconds = sum(totals["phase"].values())
        counters = state.counters
        return {
            "phase": phase, "step": state.step, "totalSteps": cfg.steps,
            "examplesTrained": counters.examples_trained, "examplesScored": counters.examples_scored,
            "observedSelectionRatio": (counters.examples_trained / counters.examples_scored
                                       if counters.examples_scored else None),
            "lastEvalAccuracy": counters.last_eval_accuracy, "lastEvalRetrieval": counters.last_eval_recall or None,
            "loss": nan_to_none(last_loss),
            "examplesPerSecond": telemetry.examples_per_second(plan.global_batch),
            "stepSeconds": telemetry.smoothed_step,
            "selectionOverheadFraction": totals["phase"]["selection"] / loop_seconds if loop_seconds > 0 else 0.0,
            "dataWaitFraction": totals["phase"]["data"] / loop_seconds if loop_seconds > 0 else 0.0,
            "samplesSkipped": skipped, "referenceMode": cfg.reference.mode,
            "energy": {"joules": joules,
                       "averageWatts": max(0.0, joules - (restored_job_joules or 0.0)) / telemetry.elapsed(),
                       # the least trustworthy method any rank uses, so a partly modelled job never reads measured
                       "method": max(energy_sources, key=ENERGY_METHODS.index),
                       "source": "+".join(sorted(set("+".join(energy_sources.values()).split("+"))))},
            "checkpoint": state.last_checkpoint, "resumedFromStep": state.resumed_from,
            "worldSize": ctx.world_size, "attempt": telemetry.attempt,
            # what actually ran (after defaults and device fallbacks), so a summary proves its configuration
            "configuration": {"method": cfg.selection.method, "loss": cfg.selection.loss,
                              "precision": cfg.precision, "device": ctx.device.type, "backend": ctx.backend},
        }

    def save() -> None:
        """Write the checkpoint of the current step (collective: every rank calls it)."""
        rank_states = all_gather_object(
            state.rank_state(joules=telemetry.meter.total_joules(), metrics=telemetry.metrics.counter_state()), ctx
        )
        if ctx.is_main:
            document = state.state_dict(rank_states)
            path = ckpt.save_checkpoint(checkpoint_dir, state.step, document, keep=cfg.checkpoint.keep)
            state.last_checkpoint = {"step": state.step, "path": str(path), "time": document["time"]}
        state.last_checkpoint = broadcast_object(state.last_checkpoint, ctx)
        telemetry.metrics.observe_checkpoint(state.step, unix_time(state.last_checkpoint.get("time")))

    def evaluate_now() -> None:
        from jest_trainer.evaluate import evaluate

        if not ctx.is_main:
            return
        accuracy, recall = evaluate(model, eval_set, device=device)
        counters = state.counters
        counters.last_eval_accuracy = accuracy
        counters.last_eval_recall = {name: {str(k): v for k, v in by_k.items()} for name, by_k in recall.items()}
        headline = accuracy if accuracy is not None else recall["image_to_text"][1]
        counters.eval_history.append([float(state.step), headline, flops_mod.total_flops(counters.flops)])
        telemetry.observe_eval(accuracy, recall)

    restored_job_joules = job_joules()
    stopped = False
    try:
        telemetry.start(state.step)
        telemetry.write_progress(progress("Running", restored_job_joules))
        if state.step == 0 and not state.counters.eval_history and not stop.requested:
            evaluate_now()
        batches: Iterator[Any] = iter(stream)  # after _resume: the stream continues at its restored cursor
        while state.step < cfg.steps:
            if any_rank(stop(), ctx):
                stopped = True
                break
            timer = PhaseTimer(device)
            with timer("data"):
                batch = _to_device(next(batches), device)
            out = train_step(plan, state, train_model, scorer, batch, rank=ctx.rank, device=device, timer=timer)
            last_loss = float(out.loss)
            keys_log.write(state.step, batch, out.selected)
            if dump_dir is not None and state.step < (state.resumed_from or 0) + DEBUG_DUMP_STEPS:
                _dump_selection(dump_dir, step=state.step, ctx=ctx, cfg=cfg, local_batch=plan.local_batch, out=out,
                                keys=list(batch.keys))
            state.step += 1
            _count(state.counters, plan, batch, out.selected, per_step_flops)
            totals["arithmetic"] += out.arithmetic_seconds
            if _due(state.step, cfg.eval.interval_steps, cfg.steps):
                evaluate_now()  # not part of the step's time: evaluation is not training work
            if _due(state.step, cfg.checkpoint.interval_steps, cfg.steps):
                if state.step == cfg.steps:
                    telemetry.meter.stop()  # a final reading, so the last checkpoint holds the whole run's energy
                with timer("checkpoint"):
                    save()
            for name, seconds in timer.seconds.items():
                totals["phase"][name] += seconds
            telemetry.observe_step(timer, examples=plan.local_batch, candidates=plan.local_super,
                                   flops=per_step_flops, loss=last_loss)
            if _due(state.step, LOG_INTERVAL_STEPS, cfg.steps):
                skipped, seen = _samples_skipped(stream, ctx)
                check_skip_fraction(skipped, seen, max_skip)
                telemetry.report(step=state.step, loss=last_loss, accuracy=state.counters.last_eval_accuracy,
                                 global_batch=plan.global_batch)
                telemetry.write_progress(progress("Running", job_joules()))
        telemetry.meter.stop()  # before the stop checkpoint: it must hold a fresh energy reading
        if stopped and (state.last_checkpoint is None or state.last_checkpoint["step"] != state.step):
            timer = PhaseTimer(device)
            with timer("checkpoint"):
                save()
            totals["phase"]["checkpoint"] += timer.seconds["checkpoint"]
        skipped, seen = _samples_skipped(stream, ctx)
        check_skip_fraction(skipped, seen, max_skip)
        joules = job_joules()
        telemetry.write_progress(progress("Succeeded" if state.step >= cfg.steps else "Running", joules))
        telemetry.write_termination_message()
    except BaseException:
        telemetry.meter.stop()
        with contextlib.suppress(Exception):
            telemetry.write_progress(progress("Failed", telemetry.meter.total_joules()))
        raise
    finally:
        telemetry.close()
        stream.close()

    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), dump_dir / f"params-rank{ctx.rank}.pt")
    return _summary(state, plan, ctx, per_step_flops=per_step_flops, totals=totals, stopped=stopped, loss=last_loss,
                    joules=joules, meter=telemetry.meter, pool_mix=_pool_mix(cfg), skipped=skipped)


def _to_device(batch: Any, device: torch.device) -> Any:
    """The batch with its tensors on ``device`` (non-blocking: pinned host memory overlaps the copy)."""
    return batch if device.type == "cpu" else batch.to(device, non_blocking=True)


def job_energy_sources(rank_meters: list[tuple[str, str]]) -> dict[str, str]:
    """Each energy method some rank uses -> the distinct sources of those ranks, joined by ``+`` (sorted)."""
    sources: dict[str, set[str]] = {}
    for method, source in rank_meters:
        sources.setdefault(method, set()).add(source)
    return {method: "+".join(sorted(names)) for method, names in sorted(sources.items())}


def _count(
    counters: Counters, plan: LoopPlan, batch: Any, selected: Tensor, per_step_flops: Mapping[str, float]
) -> None:
    """Add one step's examples, FLOPs and selected noise kinds to the running totals."""
    kinds = getattr(batch, "noise_kind", None)
    if kinds is not None:
        for index in selected.cpu().tolist():
            counters.selected_mix[kinds[index]] = counters.selected_mix.get(kinds[index], 0) + 1
    counters.examples_trained += plan.global_batch
    counters.examples_scored += plan.global_super
    for kind, value in per_step_flops.items():
        counters.flops[kind] += value * plan.world_size


def _summary(state: TrainState, plan: LoopPlan, ctx: DistContext, *, per_step_flops: Mapping[str, float],
             totals: Mapping[str, Any], stopped: bool, loss: float, joules: float, meter: Any,
             pool_mix: Mapping[str, float], skipped: Mapping[str, int]) -> dict[str, Any]:
    counters, phase = state.counters, totals["phase"]
    loop_seconds = sum(phase.values())
    return {
        "completed_steps": state.step,
        "total_steps": plan.cfg.steps,
        "stopped": stopped,
        "resumed_from_step": state.resumed_from,
        "method": plan.cfg.selection.method,
        "reference_mode": plan.cfg.reference.mode,
        "world_size": ctx.world_size,
        "final_accuracy": counters.last_eval_accuracy,
        "retrieval": counters.last_eval_recall,
        "eval_history": counters.eval_history,
        "flops": {**counters.flops, "total": flops_mod.total_flops(counters.flops)},
        "flops_per_step": {**per_step_flops, "total": flops_mod.total_flops(per_step_flops) * ctx.world_size},
        "selected_mix": dict(counters.selected_mix),
        "pool_mix": dict(pool_mix),
        "phase_seconds": dict(phase),
        "selection_arithmetic_seconds": totals["arithmetic"],
        "step_seconds": loop_seconds,
        "selection_overhead_fraction": phase["selection"] / loop_seconds if loop_seconds > 0 else 0.0,
        "data_wait_fraction": phase["data"] / loop_seconds if loop_seconds > 0 else 0.0,
        "samples_skipped": dict(skipped),
        "examples_trained": counters.examples_trained,
        "examples_scored": counters.examples_scored,
        "loss": loss if not math.isnan(loss) else None,
        "energy": {"joules": joules, "method": meter.method, "source": meter.source},
        "checkpoint": state.last_checkpoint,
    }
