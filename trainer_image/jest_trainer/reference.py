"""The frozen reference model: train it on curated data (or load it), then score super-batches with it.

JEST's learnability needs the reference loss of every candidate pair in every super-batch. Two modes
(``training.reference.mode``), neither of which needs a pass over the whole pool before training:

- ``online``: the frozen reference embeds each super-batch as it arrives (no grad; bf16 autocast on
  CUDA, where the device has it), one reference forward of B examples per step;
- ``precomputed``: ``jestctl score`` ran the reference over the shards once and wrote its per-sample
  embeddings as sidecar shards keyed by ``__key__`` (``write_sidecars``); the input pipeline joins
  them into ``SuperBatch.reference``, so a step spends no reference FLOPs beyond the ``[B, D] @ [D, B]``
  logit product (JEST.md, "Reference model").

Distributed contract: only rank 0 trains (or loads) the reference; its parameters are then broadcast
to every rank, so all ranks score against bit-identical references without each paying for the
training (on a shared CPU host the other ranks just wait in the broadcast). Rank 0 also stores the
trained reference next to the learner checkpoints (``reference.pt``) so a restarted job reloads it
instead of training a new one, which keeps resumed runs identical to uninterrupted ones.

Reference training is single-process by design (it uses the plain batch losses, never the
distributed ``contrastive_loss``), so it cannot deadlock while other ranks wait.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from jest_trainer import losses
from jest_trainer.checkpoint import atomic_write_bytes
from jest_trainer.config import ModelConfig, TrainingConfig
from jest_trainer.distributed import broadcast_tensor_, mark_step

log = logging.getLogger(__name__)

REFERENCE_FILE_NAME = "reference.pt"
SIDECAR_MANIFEST = "reference.json"
SIDECAR_IMAGE_FIELD = "ref_image.npy"
SIDECAR_TEXT_FIELD = "ref_text.npy"
EMBED_CHUNK = 1024


class ReferenceTrainingInterruptedError(RuntimeError):
    """A stop was requested (SIGTERM) while the reference was training; nothing worth saving exists yet."""


@dataclass
class ReferenceScorer:
    """Reference logits of a super-batch, online (embed it now) or precomputed (joined embeddings).

    ``input_spec`` is the image spec of the batches' images (the learner's); when the reference's own
    spec differs, images are converted before the reference sees them. ``logit_scale``/``logit_bias``
    are the frozen t*, b*.
    """

    model: nn.Module
    mode: str
    input_spec: Any
    logit_scale: Tensor
    logit_bias: Tensor

    @property
    def embed_dim(self) -> int:
        """Width D of the reference embeddings."""
        return int(self.model.embed_dim)

    def embeddings(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(image, text)`` reference embeddings of the batch's rows (normalised, float32)."""
        if self.mode == "precomputed":
            if getattr(batch, "reference", None) is None:
                raise ValueError(
                    "training.reference.mode: 'precomputed' but this super-batch carries no reference embeddings "
                    "(set training.reference.embeddingsUrls to the sidecar shards `jestctl score` wrote)"
                )
            image, text = batch.reference
            return image.float(), text.float()
        return embed_batch(self.model, batch.images, batch.tokens, input_spec=self.input_spec)

    def logits(self, batch: Any, *, loss: str) -> Tensor:
        """Reference logit matrix ``[B, B]`` of the super-batch."""
        image, text = self.embeddings(batch)
        scale, bias = self.logit_scale.to(image.device), self.logit_bias.to(image.device)
        if loss == "sigmoid":
            return losses.sigmoid_logits(image, text, scale, bias)
        return losses.softmax_logits(image, text, scale)


def _reference_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where the device has it (CUDA with bf16 support); full precision elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def embed_batch(model: nn.Module, images: Tensor, tokens: Tensor, *, input_spec: Any = None) -> tuple[Tensor, Tensor]:
    """The frozen reference's normalised float32 embeddings of one batch (no grad, bf16 where available)."""
    from jest_trainer.models import convert_input

    if input_spec is not None:
        images = convert_input(images, input_spec, model.image_spec)
    with _reference_autocast(images.device):
        image, text = model.encode_image(images), model.encode_text(tokens)
    return image.float(), text.float()


def reference_model_config(cfg: TrainingConfig) -> ModelConfig:
    """The reference architecture: ``reference.model`` when set, else the learner's."""
    return cfg.reference.model or cfg.model


def batch_loss(model: nn.Module, images: Tensor, tokens: Tensor, *, kind: str) -> Tensor:
    """Single-process contrastive batch loss of ``model`` on aligned pairs (never distributed)."""
    image, text = model(images, tokens)
    if kind == "sigmoid":
        return losses.sigmoid_batch_loss(losses.sigmoid_logits(image, text, model.logit_scale, model.logit_bias))
    return losses.softmax_batch_loss(losses.softmax_logits(image, text, model.logit_scale))


def train_reference(
    cfg: TrainingConfig,
    curated: Any,
    *,
    image_shape: tuple[int, ...],
    device: torch.device,
    should_stop: Callable[[], bool] | None = None,
) -> nn.Module:
    """Train a fresh reference on curated pairs with AdamW + cosine decay, seeded by ``cfg.seed``.

    ``curated`` is an in-memory ``PairTable`` of pixels in [0, 1] (the digits demo's curated split;
    batches drawn without replacement epoch by epoch from a generator seeded by the job seed) or a
    function ``model -> TrainStream`` of model-input batches (``reference.train.urls`` shards, built for
    the fresh model's image spec and tokenizer). Either way the result depends only on the config and
    the data. ``should_stop`` is polled every step; when it answers True,
    :class:`ReferenceTrainingInterruptedError` is raised (a SIGTERM must not wait for a long reference
    training to finish: the pod's grace period is short).
    """
    from jest_trainer.models import build_model

    train_cfg = cfg.reference.train
    if train_cfg is None:
        raise ValueError("training.reference.train: required when training.reference.checkpoint is not set")
    torch.manual_seed(cfg.seed + 7_919)
    model = build_model(reference_model_config(cfg), image_shape=image_shape).to(device)
    batches = curated(model) if callable(curated) else _table_batches(curated, model, train_cfg.batch_size, cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, weight_decay=cfg.optimizer.weight_decay)
    model.train()
    try:
        for step in range(train_cfg.steps):
            if should_stop is not None and should_stop():
                raise ReferenceTrainingInterruptedError(f"stopped at reference step {step} of {train_cfg.steps}")
            images, tokens = next(batches)
            for group in optimizer.param_groups:
                group["lr"] = train_cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / train_cfg.steps))
            loss = batch_loss(model, images.to(device), tokens.to(device), kind=cfg.selection.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            mark_step(device)  # XLA: one graph per step, not one of the whole training
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    return freeze(model)


def _table_batches(curated: Any, model: nn.Module, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless ``(images, tokens)`` batches of an in-memory table, without replacement per epoch."""
    from jest_trainer.models import to_model_input

    count = len(curated)
    if count < 2:
        raise ValueError(f"training.reference: the curated split has {count} examples; need at least 2")
    batch_size = min(batch_size, count)
    tokens = model.tokenize(list(curated.captions))
    images = to_model_input(curated.images, model.image_spec)
    generator = torch.Generator().manual_seed(seed + 104_729)
    order = torch.randperm(count, generator=generator)
    cursor = 0
    while True:
        if cursor + batch_size > count:
            order = torch.randperm(count, generator=generator)
            cursor = 0
        rows = order[cursor : cursor + batch_size]
        cursor += batch_size
        yield images.index_select(0, rows), tokens.index_select(0, rows)


class _StreamBatches:
    """``(images, tokens)`` of a ``TrainStream``'s super-batches (closes the stream with it)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def __iter__(self) -> _StreamBatches:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        batch = next(self.stream)
        return batch.images, batch.tokens

    def close(self) -> None:
        """Stop the stream's loader workers."""
        self.stream.close()


def stream_batches(stream: Any) -> _StreamBatches:
    """Adapt a curated ``TrainStream`` to ``train_reference``'s ``(images, tokens)`` batches."""
    return _StreamBatches(stream)


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode with gradients off (the reference is never trained by the learner loop)."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def save_reference(model: nn.Module, path: Path, model_config: ModelConfig) -> None:
    """Atomically store the reference weights and the architecture they belong to."""
    import io

    buffer = io.BytesIO()
    torch.save({"kind": "jest-reference", "model_config": model_config.to_wire(), "model": model.state_dict()}, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_reference(
    path: Path, cfg: TrainingConfig, *, image_shape: tuple[int, ...], device: torch.device
) -> tuple[nn.Module, ModelConfig]:
    """Load a reference file written by ``save_reference`` or a learner checkpoint (its ``model`` entry).

    The architecture is the one recorded in the file when present, else ``reference_model_config(cfg)``;
    it is returned with the frozen model. Raises ``ValueError`` naming ``training.reference.checkpoint``
    when the file does not fit.
    """
    from jest_trainer.models import build_model

    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"training.reference.checkpoint: cannot read {path}: {error}") from error
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"training.reference.checkpoint: {path} has no 'model' entry")
    model_config = (
        ModelConfig.model_validate(state["model_config"]) if "model_config" in state else reference_model_config(cfg)
    )
    model = build_model(model_config, image_shape=image_shape)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ValueError(f"training.reference.checkpoint: {path} does not match the architecture: {error}") from error
    return freeze(model.to(device)), model_config


def broadcast_module(model: nn.Module, *, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``model`` (in place)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for tensor in [*model.parameters(), *model.buffers()]:
        broadcast_tensor_(tensor.data, src=src)  # through host memory for XLA tensors in a gloo group


def build_reference(
    cfg: TrainingConfig,
    curated: Any,
    *,
    image_shape: tuple[int, ...],
    device: torch.device,
    rank: int = 0,
    cache_dir: Path | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> nn.Module:
    """Load or train the frozen reference (rank 0) and broadcast it to every rank.

    Order of sources: ``training.reference.checkpoint``; else ``<cache_dir>/reference.pt`` from an
    earlier attempt of this job; else train on the ``curated`` ``PairTable`` and store it in
    ``cache_dir``. Every rank must call this (it contains a collective when distributed).
    ``should_stop`` is passed to :func:`train_reference`.
    """
    from jest_trainer.models import build_model

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    model: nn.Module | None = None
    model_config = reference_model_config(cfg)
    if rank == 0:
        cached = Path(cache_dir) / REFERENCE_FILE_NAME if cache_dir is not None else None
        if cfg.reference.checkpoint:
            model, model_config = load_reference(
                Path(cfg.reference.checkpoint), cfg, image_shape=image_shape, device=device
            )
        elif cached is not None and cached.is_file():
            log.info("loading the reference trained by an earlier attempt from %s", cached)
            model, model_config = load_reference(cached, cfg, image_shape=image_shape, device=device)
        else:
            model = train_reference(cfg, curated, image_shape=image_shape, device=device, should_stop=should_stop)
            if cached is not None:
                save_reference(model, cached, model_config)
    if distributed:
        shared = [model_config.to_wire()]
        dist.broadcast_object_list(shared, src=0)
        model_config = ModelConfig.model_validate(shared[0])
    if model is None:
        model = freeze(build_model(model_config, image_shape=image_shape).to(device))
    broadcast_module(model)
    return model


def make_scorer(cfg: TrainingConfig, model: nn.Module, *, input_spec: Any) -> ReferenceScorer:
    """The scorer of ``training.reference.mode`` around the frozen ``model``."""
    return ReferenceScorer(
        model=model,
        mode=cfg.reference.mode,
        input_spec=input_spec,
        logit_scale=model.logit_scale.detach().clone(),
        logit_bias=model.logit_bias.detach().clone(),
    )


def sidecar_pattern(data_urls: str, out_dir: Path) -> str:
    """The ``reference.embeddingsUrls`` of sidecars written to ``out_dir`` for shards ``data_urls``.

    Sidecars carry their data shard's file name (``data.pair_sidecars`` pairs them by name), so the
    pattern is the data pattern's last path component under ``out_dir``.
    """
    return str(Path(out_dir) / data_urls.rstrip("/").rsplit("/", 1)[-1])


def write_sidecars(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    shards: list[str],
    out_dir: Path,
    input_spec: Any = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Write the reference's embeddings of every scanned sample as one sidecar shard per data shard.

    ``batches`` yield ``url``, ``keys``, ``images`` (model input of ``input_spec``), ``tokens`` in shard
    and tar order (``data.ShardScanner``). Sidecar ``out_dir/<data shard file name>`` holds, per usable
    sample and in the same order, ``__key__`` + ``ref_image.npy`` + ``ref_text.npy`` (float16,
    normalised); a data shard without usable samples still gets an (empty) sidecar. Returns the
    manifest also written to ``out_dir/reference.json`` (t*, b*, width, counts).
    """
    import numpy as np
    import webdataset as wds

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device or next(model.parameters()).device
    names = [url.rstrip("/").rsplit("/", 1)[-1] for url in shards]
    if len(set(names)) != len(names):
        raise ValueError("data.urls: two shards share a file name; sidecars are paired with shards by file name")
    writers: dict[str, Any] = {}
    count = 0
    try:
        for batch in batches:
            if batch.url not in writers:
                name = batch.url.rstrip("/").rsplit("/", 1)[-1]
                writers[batch.url] = wds.TarWriter(str(out_dir / name))
            image, text = embed_batch(model, batch.images.to(device), batch.tokens.to(device), input_spec=input_spec)
            image_rows = image.cpu().to(torch.float16).numpy()
            text_rows = text.cpu().to(torch.float16).numpy()
            for row, key in enumerate(batch.keys):
                writers[batch.url].write({"__key__": key, SIDECAR_IMAGE_FIELD: np.ascontiguousarray(image_rows[row]),
                                          SIDECAR_TEXT_FIELD: np.ascontiguousarray(text_rows[row])})
            count += len(batch.keys)
        for url, name in zip(shards, names, strict=True):
            if url not in writers:
                writers[url] = wds.TarWriter(str(out_dir / name))
    finally:
        for writer in writers.values():
            writer.close()
    manifest = {
        "kind": "jest-reference-embeddings",
        "samples": count,
        "shards": len(shards),
        "embedDim": int(model.embed_dim),
        "logitScale": float(model.logit_scale),
        "logitBias": float(model.logit_bias),
        "fields": {"image": SIDECAR_IMAGE_FIELD, "text": SIDECAR_TEXT_FIELD},
    }
    (out_dir / SIDECAR_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
