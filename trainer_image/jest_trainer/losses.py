"""Contrastive image-text losses: per-pair loss matrices for selection and batch losses for training.

JEST scores candidate sub-batches with *per-pair* losses (the sigmoid loss decomposes into a sum over
pairs, see ``JEST.md``) while the learner trains on the selected batch with the usual batch loss. Both
views are built here from the same logit matrices so that selection and training can never disagree on
what "the loss" is.

Conventions (binding, contract C1):

* embeddings are L2-normalised rows; ``logit_scale`` is log t (the temperature is ``exp(logit_scale)``)
  and ``logit_bias`` is b (sigmoid loss only);
* row ``i`` of a logit matrix is image ``i``, column ``j`` is text ``j``; pair ``(i, i)`` is positive;
* the sigmoid (SigLIP) batch loss is ``sum(M) / B`` with ``M_ij = softplus(-z_ij * L_ij)``, exactly
  open_clip's ``SigLipLoss`` normalisation; the softmax (CLIP) batch loss is the mean of the row-wise
  and column-wise cross-entropies.

Distributed training (:func:`contrastive_loss` with ``world_size > 1``) uses global negatives. Each rank
computes only its own rows (its images against every rank's texts, and for softmax also its texts
against every rank's images), features are all-gathered *with* gradient, and the returned value is the
global single-process loss on every rank. Gradient convention: after ``backward()`` on every rank, the
gradient reaching the local features is ``world_size`` times the global loss's gradient for those rows, and
the mean over ranks of each replicated parameter's gradient (tower weights, logit scale and bias) equals
the single-process gradient, which is exactly what DDP's mean all-reduce computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy
import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import functional

from jest_trainer import native
from jest_trainer.distributed import all_gather_tensor, all_reduce_tensor_

LossKind = Literal["sigmoid", "softmax"]
LOSS_KINDS: tuple[str, ...] = ("sigmoid", "softmax")


def _require_matrix(name: str, tensor: Tensor) -> None:
    if tensor.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(tensor.shape)}")


def _require_square(name: str, tensor: Tensor) -> None:
    if tensor.dim() != 2 or tensor.shape[0] != tensor.shape[1]:
        raise ValueError(f"{name}: expected a square [B, B] matrix, got shape {tuple(tensor.shape)}")


def _require_features(image: Tensor, text: Tensor) -> None:
    _require_matrix("image", image)
    _require_matrix("text", text)
    if image.shape[1] != text.shape[1]:
        raise ValueError(
            f"text: embedding width {text.shape[1]} does not match image embedding width {image.shape[1]}"
        )


def sigmoid_logits(image: Tensor, text: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """SigLIP logits ``exp(logit_scale) * image @ text.T + logit_bias`` of shape ``[n, m]``."""
    _require_features(image, text)
    return logit_scale.exp() * image @ text.T + logit_bias


def softmax_logits(image: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    """CLIP logits ``exp(logit_scale) * image @ text.T`` of shape ``[n, m]`` (no bias: softmax ignores it)."""
    _require_features(image, text)
    return logit_scale.exp() * image @ text.T


def softplus_no_grad(x: Tensor) -> Tensor:
    """``log(1 + exp(x))`` as ``max(x, 0) + log(1 + exp(-|x|))`` with in-place steps, for tensors that need
    no gradient (selection scoring).

    About 2.5x faster on CPU than ``functional.softplus``, whose ``log1p`` is not vectorised; values agree
    to float rounding (``log(1 + y)`` for ``y`` in (0, 1] loses only absolute precision below epsilon).
    Not for autograd: the in-place steps would corrupt saved tensors, and ``clamp``/``abs`` give the wrong
    subgradient at 0.
    """
    return torch.exp(x.abs().neg_()).add_(1).log_().add_(x.clamp(min=0))


def log_no_grad_(x: Tensor) -> Tensor:
    """Natural log in place, for tensors that need no gradient; returns ``x``.

    On CPU (contiguous float32/float64) it runs NumPy's SIMD log on the same memory, about 2.5x faster than
    ``Tensor.log_`` with this torch build and within ~1e-7 absolute of it on [1/2, 2] (both faithful logs;
    NaN, inf and the sign of 0 follow IEEE as in torch, without warnings). Elsewhere it is ``Tensor.log_``.
    """
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.is_contiguous() and not (
        x.requires_grad
    ):
        array = x.numpy()
        with numpy.errstate(divide="ignore", invalid="ignore"):
            numpy.log(array, out=array)
        return x
    return x.log_()


def sigmoid_pair_loss_difference_(stacked: Tensor) -> Tensor:
    """``M^0 - M^1`` (or ``M^0`` for one model) with ``M^m = sigmoid_pair_losses(stacked[m])``, for ``stacked``
    of shape ``[2, B, B]`` or ``[1, B, B]``; consumes ``stacked`` in place and needs no gradient (selection).

    JEST's pairwise learnability ``S = M^θ - M^θ*`` is the bulk of the selection arithmetic on CPU, so it is
    built in few full passes over one stacked tensor (half the per-op overhead of two matrices):
    ``softplus(x) = max(x, 0) - log(sigmoid(|x|))`` with the positives' ``-L`` negated in place first, and the
    two logs merged into ``log(sigmoid(|y|) / sigmoid(|x|))``. ``sigmoid(|x|)`` lies in [1/2, 1], so the
    ratio lies in [1/2, 2] and nothing is lost to cancellation; ``torch.sigmoid`` is vectorised faster on
    CPU than ``exp`` followed by a log, and the log is :func:`log_no_grad_`. Equal to the two-matrix
    formulation to float rounding (a few ulps of the losses).
    """
    if stacked.dim() != 3 or stacked.shape[0] not in (1, 2) or stacked.shape[1] != stacked.shape[2]:
        raise ValueError(f"stacked: expected [1 or 2, B, B] logits, got shape {tuple(stacked.shape)}")
    stacked.diagonal(dim1=1, dim2=2).neg_()
    hinge = stacked.clamp(min=0)
    sigmoid = stacked.abs_().sigmoid_()
    if stacked.shape[0] == 1:
        return log_no_grad_(sigmoid[0]).neg_().add_(hinge[0])
    learner, reference = sigmoid.unbind(0)
    learner_hinge, reference_hinge = hinge.unbind(0)
    return log_no_grad_(reference.div_(learner)).add_(learner_hinge).sub_(reference_hinge)


def logit_magnitude_limit(dtype: torch.dtype, size: int) -> float:
    """Largest |logit| the pair-loss difference accepts for a ``[size, size]`` super-batch in ``dtype``.

    Each pair score is at most ``|L^θ| + |L^θ*| + log 2`` in magnitude and JEST's conditional scores sum at
    most ``2B + 1`` of them, so below ``max / (4B + 4)`` none of those sums can overflow (~2.6e35 in float32 at
    B = 320: far above any real logit, whose scale is bounded by the learned temperature).
    """
    return torch.finfo(dtype).max / (4 * size + 4)


def within_magnitude(tensor: Tensor, limit: float) -> bool:
    """Every entry finite and at most ``limit`` in magnitude (NaN fails the comparison)."""
    # max(), not amax(): torch_xla 2.9 returns amax() with no dim unreduced (the tensor itself)
    return float(tensor.detach().abs().max()) <= limit


def sigmoid_pair_loss_difference(logits: Sequence[Tensor], dtype: torch.dtype) -> Tensor | None:
    """``M^0 - M^1`` (or ``M^0`` for one matrix) of one or two ``[B, B]`` logit matrices, as a new tensor in
    ``dtype``; ``None`` if any logit is NaN, infinite or beyond :func:`logit_magnitude_limit` (the caller names
    the bad input). Inputs are left untouched; no gradient (selection).

    The same stable form as :func:`sigmoid_pair_loss_difference_`, exact for every finite logit: with
    ``a = z·L``, ``M = -min(a, 0) - log sigmoid(|a|)``, so ``M^0 - M^1 = [min(a¹, 0) - min(a⁰, 0)] +
    log(sigmoid(|a¹|) / sigmoid(|a⁰|))`` with the ratio in [1/2, 2]. On CPU the pass before the sigmoid
    (``|a|``, the hinge and the bound check) is one vectorised pass of the native kernel
    (:mod:`jest_trainer.native`) instead of torch's stack, negate-diagonal, clamp, abs and bound check;
    elsewhere, without the kernel, or for inputs that are not contiguous CPU ``dtype`` tensors, it is the
    torch form. Both give S to float rounding (the order of operations differs).
    """
    size = logits[0].shape[0]
    limit = logit_magnitude_limit(dtype, size)
    kernel = native.KERNEL
    if kernel is None or any(
        matrix.device.type != "cpu" or matrix.dtype != dtype or not matrix.is_contiguous() or matrix.is_neg()
        for matrix in logits
    ):
        stacked = torch.stack([matrix.detach().to(dtype) for matrix in logits])
        if not within_magnitude(stacked, limit):
            return None
        return sigmoid_pair_loss_difference_(stacked)
    magnitudes = torch.empty((len(logits), size, size), dtype=dtype)
    hinge = torch.empty((size, size), dtype=dtype)
    arrays = [matrix.detach().numpy() for matrix in logits]
    second = arrays[1] if len(arrays) == 2 else None
    if not kernel.sigmoid_pair_prelude(arrays[0], second, magnitudes.numpy(), hinge.numpy(), limit):
        return None
    sigmoids = magnitudes.sigmoid_()
    if second is None:
        return log_no_grad_(sigmoids[0]).neg_().add_(hinge)
    return log_no_grad_(sigmoids[1].div_(sigmoids[0])).add_(hinge)


def _softplus(x: Tensor) -> Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return functional.softplus(x)
    return softplus_no_grad(x)


def _sigmoid_pair_losses_at(logits: Tensor, positive_offset: int) -> Tensor:
    """``softplus(-z * L)`` where ``z`` is +1 at ``(i, i + positive_offset)`` and -1 elsewhere.

    Computed as ``softplus(L)`` everywhere with the positives overwritten by ``softplus(-L)`` (two passes
    over the matrix, no label matrix); the offset lets one rank's rows sit inside the global columns.
    """
    rows = torch.arange(logits.shape[0], device=logits.device)
    positives = (rows, rows + positive_offset)
    return _softplus(logits).index_put(positives, _softplus(-logits[positives]))


def sigmoid_pair_losses(logits: Tensor) -> Tensor:
    """Per-pair SigLIP losses ``M_ij = softplus(-z_ij * L_ij)``, ``z = +1`` on the diagonal, -1 off it.

    ``M`` is what JEST's pairwise learnability ``S = M^θ - M^θ*`` is built from; its sum divided by
    ``B`` is :func:`sigmoid_batch_loss`. Uses ``functional.softplus`` when a gradient is needed, else the
    faster :func:`softplus_no_grad` (equal to float rounding).
    """
    _require_square("logits", logits)
    return _sigmoid_pair_losses_at(logits, 0)


def sigmoid_batch_loss(logits: Tensor) -> Tensor:
    """SigLIP batch loss ``sigmoid_pair_losses(logits).sum() / B`` (open_clip's normalisation)."""
    return sigmoid_pair_losses(logits).sum() / logits.shape[0]


def softmax_batch_loss(logits: Tensor) -> Tensor:
    """CLIP batch loss: (mean row cross-entropy + mean column cross-entropy) / 2, positives on the diagonal."""
    _require_square("logits", logits)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (functional.cross_entropy(logits, labels) + functional.cross_entropy(logits.T, labels)) / 2


class _GatherWithGradient(torch.autograd.Function):
    """All-gather of equally shaped tensors whose backward returns the *summed* gradient of this rank's slice.

    The backward all-reduces (sums) the gradient of the gathered tensor over ranks and keeps this rank's
    rows, so each input receives the gradient of the sum of every rank's loss. Built on ``all_gather`` and
    ``all_reduce`` only, which gloo, NCCL and XLA all implement (gloo has no reduce-scatter); XLA tensors in a
    gloo group (torch_xla on CPU) go through host memory (``distributed.all_gather_tensor``).
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.rows = tensor.shape[0]
        return torch.cat(all_gather_tensor(tensor, group), dim=0)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = all_reduce_tensor_(grad_output.contiguous().clone(), dist.ReduceOp.SUM, ctx.group)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None


def _distributed_world(group: dist.ProcessGroup | None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _check_equal_local_batches(rows: int, device: torch.device, group: dist.ProcessGroup | None) -> None:
    # gloo gathers CPU tensors; NCCL and XLA need them on the features' device.
    device = torch.device("cpu") if dist.get_backend(group) == "gloo" else device
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size(group))]
    mine = torch.tensor([rows], dtype=torch.long, device=device)
    dist.all_gather(sizes, mine, group=group)
    if any(int(size.item()) != rows for size in sizes):
        raise ValueError(
            f"image: every rank must hold the same local batch size for global negatives, got "
            f"{[int(size.item()) for size in sizes]}"
        )


def contrastive_loss(
    image: Tensor,
    text: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None,
    *,
    kind: LossKind,
    group: dist.ProcessGroup | None = None,
    check_batch_sizes: bool = False,
) -> Tensor:
    """The training loss on this rank's selected batch, with global negatives when distributed.

    Single process (or ``torch.distributed`` not initialised, or world size 1): the SigLIP or CLIP batch
    loss of ``image`` x ``text``. With ``world_size = W > 1`` every rank holds ``b`` rows of a global batch
    of ``W*b`` (rank ``r`` owns global rows ``r*b .. r*b+b-1``, all ranks the same ``b``):

    * sigmoid: this rank's images against all ranks' texts (texts all-gathered with gradient), as
      open_clip's ``SigLipLoss`` exchange does; the rank's share is ``sum(M_local) / b``;
    * softmax: image and text features all-gathered with gradient; the rank's share is its rows' image→text
      and text→image cross-entropies, ``(sum CE_img + sum CE_txt) / (2b)``.

    The mean of the shares over ranks is the global single-process loss; the returned *value* is that
    global loss on every rank (one scalar all-reduce), while the *gradient* is that of the local share,
    which with the gather's summing backward gives local features ``W x`` the global gradient, i.e. exactly
    the single-process gradient after DDP's averaging. ``check_batch_sizes`` adds a collective that turns
    unequal local batches into a clear error instead of a hang or a shape error.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"kind: expected one of {LOSS_KINDS}, got {kind!r}")
    if kind == "sigmoid" and logit_bias is None:
        raise ValueError("logit_bias: required for the sigmoid loss")
    _require_features(image, text)
    if image.shape[0] != text.shape[0]:
        raise ValueError(f"text: {text.shape[0]} texts for {image.shape[0]} images; pairs must align")

    world = _distributed_world(group)
    if world == 1:
        if kind == "sigmoid":
            return sigmoid_batch_loss(sigmoid_logits(image, text, logit_scale, logit_bias))
        return softmax_batch_loss(softmax_logits(image, text, logit_scale))

    if check_batch_sizes:
        _check_equal_local_batches(image.shape[0], image.device, group)
    rows = image.shape[0]
    offset = dist.get_rank(group) * rows
    all_text = _GatherWithGradient.apply(text, group)
    if kind == "sigmoid":
        logits = sigmoid_logits(image, all_text, logit_scale, logit_bias)
        share = _sigmoid_pair_losses_at(logits, offset).sum() / rows
    else:
        all_image = _GatherWithGradient.apply(image, group)
        labels = torch.arange(rows, device=image.device) + offset
        image_to_text = softmax_logits(image, all_text, logit_scale)
        text_to_image = softmax_logits(text, all_image, logit_scale)
        share = (
            functional.cross_entropy(image_to_text, labels, reduction="sum")
            + functional.cross_entropy(text_to_image, labels, reduction="sum")
        ) / (2 * rows)

    global_value = all_reduce_tensor_(share.detach().clone(), dist.ReduceOp.SUM, group)
    global_value /= world
    return share + (global_value - share.detach())
