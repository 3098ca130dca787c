"""Pure functions of the step: the learning rate, seeds, and the seeded order of the in-memory pool.

Why pure: a resumed run must continue exactly where an uninterrupted one would be, so everything the
loop derives from "which step is this" (LR, the selection generator, which pool rows a step reads) is a
function of (config, step, rank) and never of process history.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


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


def mixed_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (SeedSequence: neighbouring inputs give unrelated seeds)."""
    state = np.random.SeedSequence([int(part) for part in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def selection_generator(seed: int, step: int, rank: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The generator ``select_batch`` uses on ``rank`` at 0-based ``step`` (reproducible per (seed, step, rank))."""
    return torch.Generator(device=device).manual_seed(mixed_seed(seed, step, rank, 0x5E1EC7))


def init_seed(seed: int) -> int:
    """The global torch seed the learner is initialised from (identical on every rank)."""
    return mixed_seed(seed, 0x1EA2)


def shard_indices(pool_size: int, *, world_size: int, rank: int, seed: int) -> Tensor:
    """Global pool indices of ``rank``'s shard: a seeded permutation split round-robin (disjoint, covering)."""
    if pool_size < world_size:
        raise ValueError(f"the pool has {pool_size} examples, fewer than the world size {world_size}")
    generator = torch.Generator().manual_seed(mixed_seed(seed, 0x5A4D))
    return torch.randperm(pool_size, generator=generator)[rank::world_size]


def super_batch_positions(shard_size: int, *, local_super_batch: int, step: int, seed: int, rank: int) -> Tensor:
    """Positions in the shard of the super-batch of 0-based ``step``.

    The shard is read in epochs, each a fresh seeded permutation; step ``s`` takes the ``B/W`` positions
    starting at cursor ``s * B/W`` of that infinite stream, so every super-batch is distinct within an
    epoch and the stream depends only on (seed, rank, step).
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
        generator = torch.Generator().manual_seed(mixed_seed(seed, rank, epoch, 0xE90C))
        order = torch.randperm(shard_size, generator=generator)
        take = min(needed, shard_size - offset)
        parts.append(order[offset : offset + take])
        cursor += take
        needed -= take
    return torch.cat(parts)
