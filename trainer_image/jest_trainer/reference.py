"""The frozen reference model: train it on curated data (or load it), then cache its pool embeddings.

JEST's learnability needs the reference loss of every candidate pair in every super-batch. The
reference never changes, so its image and text embeddings of the whole pool (and its t*, b*) are
computed once; the reference logit matrix of a super-batch is then a single ``[B, D] @ [D, B]``
product, with no reference forward pass per step (JEST.md, "Reference model").

Distributed contract: only rank 0 trains (or loads) the reference; its parameters are then broadcast
to every rank, so all ranks score against bit-identical references without each paying for the
training (on a shared CPU host the other ranks just wait in the broadcast). Rank 0 also stores the
trained reference next to the learner checkpoints (``reference.pt``) so a restarted job reloads it
instead of training a new one, which keeps resumed runs identical to uninterrupted ones.

Reference training is single-process by design (it uses the plain batch losses, never the
distributed ``contrastive_loss``), so it cannot deadlock while other ranks wait.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from jest_trainer import losses
from jest_trainer.checkpoint import atomic_write_bytes
from jest_trainer.config import ModelConfig, TrainingConfig

log = logging.getLogger(__name__)

REFERENCE_FILE_NAME = "reference.pt"
EMBED_CHUNK = 1024


class ReferenceTrainingInterruptedError(RuntimeError):
    """A stop was requested (SIGTERM) while the reference was training; nothing worth saving exists yet."""


@dataclass
class ReferenceModel:
    """A frozen reference with cached embeddings of every pool example (rows = global pool indices)."""

    model: nn.Module
    image_embeddings: Tensor
    text_embeddings: Tensor
    logit_scale: Tensor
    logit_bias: Tensor

    @property
    def embed_dim(self) -> int:
        """Width D of the cached embeddings."""
        return int(self.image_embeddings.shape[1])

    def logits(self, indices: Tensor, *, loss: str) -> Tensor:
        """Reference logit matrix ``[B, B]`` of the pool examples ``indices`` (one matrix product)."""
        image = self.image_embeddings.index_select(0, indices)
        text = self.text_embeddings.index_select(0, indices)
        if loss == "sigmoid":
            return losses.sigmoid_logits(image, text, self.logit_scale, self.logit_bias)
        return losses.softmax_logits(image, text, self.logit_scale)


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
    """Train a fresh reference on the curated ``PairTable`` with AdamW + cosine decay, seeded by ``cfg.seed``.

    Batches are drawn without replacement epoch by epoch from a generator seeded by the job seed, so
    the result depends only on the config and the data. ``should_stop`` is polled every step; when it
    answers True, :class:`ReferenceTrainingInterruptedError` is raised (a SIGTERM must not wait for a long
    reference training to finish: the pod's grace period is short).
    """
    from jest_trainer.models import build_model

    train_cfg = cfg.reference.train
    if train_cfg is None:
        raise ValueError("training.reference.train: required when training.reference.checkpoint is not set")
    count = len(curated)
    if count < 2:
        raise ValueError(f"training.reference: the curated split has {count} examples; need at least 2")
    batch_size = min(train_cfg.batch_size, count)
    torch.manual_seed(cfg.seed + 7_919)
    model = build_model(reference_model_config(cfg), image_shape=image_shape).to(device)
    tokens = model.tokenize(list(curated.captions)).to(device)
    images = curated.images.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, weight_decay=cfg.optimizer.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed + 104_729)
    order = torch.randperm(count, generator=generator)
    cursor = 0
    model.train()
    for step in range(train_cfg.steps):
        if should_stop is not None and should_stop():
            raise ReferenceTrainingInterruptedError(f"stopped at reference step {step} of {train_cfg.steps}")
        if cursor + batch_size > count:
            order = torch.randperm(count, generator=generator)
            cursor = 0
        batch = order[cursor : cursor + batch_size].to(device)
        cursor += batch_size
        for group in optimizer.param_groups:
            group["lr"] = train_cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / train_cfg.steps))
        loss = batch_loss(model, images.index_select(0, batch), tokens.index_select(0, batch), kind=cfg.selection.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return freeze(model)


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


@torch.no_grad()
def embed_pairs(model: nn.Module, images: Tensor, tokens: Tensor, *, device: torch.device) -> tuple[Tensor, Tensor]:
    """Normalised image and text embeddings of aligned pairs, computed in chunks (no gradient)."""
    image_parts, text_parts = [], []
    for start in range(0, images.shape[0], EMBED_CHUNK):
        image_parts.append(model.encode_image(images[start : start + EMBED_CHUNK].to(device)))
        text_parts.append(model.encode_text(tokens[start : start + EMBED_CHUNK].to(device)))
    return torch.cat(image_parts), torch.cat(text_parts)


def broadcast_module(model: nn.Module, *, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``model`` (in place)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=src)


def build_reference(
    cfg: TrainingConfig,
    demo: Any,
    *,
    image_shape: tuple[int, ...],
    device: torch.device,
    rank: int = 0,
    cache_dir: Path | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ReferenceModel:
    """Load or train the reference (rank 0), broadcast it, and cache its embeddings of ``demo.pool``.

    Order of sources: ``training.reference.checkpoint``; else ``<cache_dir>/reference.pt`` from an
    earlier attempt of this job; else train on ``demo.curated`` and store it in ``cache_dir``.
    Every rank must call this (it contains a collective when distributed). ``should_stop`` is passed to
    :func:`train_reference`.
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
            model = train_reference(
                cfg, demo.curated, image_shape=image_shape, device=device, should_stop=should_stop
            )
            if cached is not None:
                save_reference(model, cached, model_config)
    if distributed:
        shared = [model_config.to_wire()]
        dist.broadcast_object_list(shared, src=0)
        model_config = ModelConfig.model_validate(shared[0])
    if model is None:
        model = freeze(build_model(model_config, image_shape=image_shape).to(device))
    broadcast_module(model)
    pool = demo.pool
    tokens = model.tokenize(list(pool.captions))
    image_embeddings, text_embeddings = embed_pairs(model, pool.images, tokens, device=device)
    return ReferenceModel(
        model=model,
        image_embeddings=image_embeddings,
        text_embeddings=text_embeddings,
        logit_scale=model.logit_scale.detach().clone(),
        logit_bias=model.logit_bias.detach().clone(),
    )
