"""Analytic FLOPs accounting of one JEST step, split by what the compute is spent on.

JEST trades extra scoring compute for fewer training iterations, so a fair comparison needs every
FLOP the selection adds (JEST.md, "Cost accounting"). This module counts what the trainer actually
executes on one rank, with multiply-add = 2 FLOPs:

- ``train``: forward + backward (≈ 3x forward) of both towers on the rank's trained batch ``b``, plus
  the logit matrix of its images against the ``b_global`` texts it is contrasted with (global
  negatives), also x3 for the backward pass.
- ``selection_learner``: a no-grad forward of both towers over the rank's super-batch ``B`` and the
  ``B x B`` learner logit matrix — only for methods that look at the learner.
- ``selection_reference``: the ``B x B`` reference logit matrix, plus — in ``reference.mode: online`` —
  the frozen reference's no-grad forward of both towers over the super-batch ``B``. In ``precomputed``
  mode the embeddings were written by ``jestctl score`` beforehand, so only the logit matrix is
  counted. Only for methods that look at the reference.

The O(B·b) selection arithmetic itself (pair losses, conditional scores, Gumbel top-k) is not model
compute and is timed instead of counted (phase ``selection``); zero-shot evaluation is not training
work and is not counted either.
"""

from __future__ import annotations

from collections.abc import Mapping

FLOP_KINDS: tuple[str, ...] = ("train", "selection_learner", "selection_reference")
LEARNER_SCORED_METHODS: frozenset[str] = frozenset({"jest", "learnability_topk", "hard_learner"})
REFERENCE_SCORED_METHODS: frozenset[str] = frozenset({"jest", "learnability_topk", "easy_reference"})
BACKWARD_MULTIPLIER = 3.0


def logits_flops(rows: int, cols: int, embed_dim: int) -> float:
    """FLOPs of a ``[rows, D] @ [D, cols]`` similarity matrix (one multiply-add = 2 FLOPs)."""
    return 2.0 * rows * cols * embed_dim


def step_flops(
    *,
    method: str,
    forward_per_example: Mapping[str, float],
    embed_dim: int,
    local_batch: int,
    global_batch: int,
    local_super_batch: int,
    reference_embed_dim: int | None = None,
    reference_forward_per_example: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """FLOPs one rank spends in one step, per kind (keys = ``FLOP_KINDS``).

    ``forward_per_example`` is the learner's forward cost per example, ``{"image": F_i, "text": F_t}``
    (``jest_trainer.models.forward_flops_per_example``); ``reference_embed_dim`` is the width of the cached
    reference embeddings (default: ``embed_dim``); ``reference_forward_per_example`` is the reference's
    forward cost per example when it embeds each super-batch (online mode; None = precomputed
    embeddings, no reference forward). The uniform baseline scores nothing, so its
    selection kinds are zero; reference-only and learner-only methods pay for one side only.
    """
    per_example = float(forward_per_example["image"]) + float(forward_per_example["text"])
    if local_batch <= 0 or global_batch < local_batch or local_super_batch < local_batch:
        raise ValueError(
            f"inconsistent batch sizes: local {local_batch}, global {global_batch}, super {local_super_batch}"
        )
    train = BACKWARD_MULTIPLIER * (
        local_batch * per_example + logits_flops(local_batch, global_batch, embed_dim)
    )
    learner = 0.0
    if method in LEARNER_SCORED_METHODS:
        learner = local_super_batch * per_example + logits_flops(local_super_batch, local_super_batch, embed_dim)
    reference = 0.0
    if method in REFERENCE_SCORED_METHODS:
        width = embed_dim if reference_embed_dim is None else reference_embed_dim
        reference = logits_flops(local_super_batch, local_super_batch, width)
        if reference_forward_per_example is not None:
            reference += local_super_batch * (
                float(reference_forward_per_example["image"]) + float(reference_forward_per_example["text"])
            )
    return {"train": train, "selection_learner": learner, "selection_reference": reference}


def total_flops(flops: Mapping[str, float]) -> float:
    """Sum over the kinds in ``FLOP_KINDS`` (ignores any other keys such as an existing total)."""
    return float(sum(flops.get(kind, 0.0) for kind in FLOP_KINDS))
