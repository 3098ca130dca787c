"""Batch selection: pick ``b`` of the ``B`` scored super-batch pairs to train on (JEST and baselines).

All functions are pure torch on the device of their inputs, run without gradient, and take an optional
``torch.Generator`` so a selection seeded by (seed, step, rank) is reproducible.

Joint selection (``jest``, ``hard_learner``, ``easy_reference``) samples ``b`` items in ``n_chunks``
chunks (JEST.md). Chunk 1 is drawn with ``p ∝ exp(c(k|∅))``, every later chunk with ``p ∝ exp(c(k|A))``
where ``A`` is everything selected so far; within a chunk items are drawn without replacement by
Gumbel top-k (``topk(c + Gumbel)``), so raw scores are never exponentiated and cannot overflow. Already
selected items are masked to ``-inf``.

* Sigmoid loss: the learnability of ``A`` is ``Σ_{i,j∈A} S_ij`` with ``S = M^θ - M^θ*`` (per-pair losses),
  so ``c(k|A) = S_kk + Σ_{j∈A} S_kj + Σ_{j∈A} S_jk``, kept incrementally with ``index_select`` of the new
  chunk's rows and columns (O(B·k) per chunk). On CPU that loop is dispatch-bound at JEST's shapes, so it
  runs in a small compiled kernel (``_selection_native.c``, built by ``setup.py``; NumPy where it was not
  built); accelerators run it in torch. All draw the same chunks up to float rounding in near-ties.
* Softmax loss: the CLIP loss does not decompose into pairs; :func:`softmax_incremental_cost` is the exact
  change of the *summed* CLIP loss ``Lsum(A) = Σ_{i∈A} CE_row_i + Σ_{j∈A} CE_col_j = 2|A|·softmax_batch_loss``
  when ``k`` joins ``A``: its own positive, the log-sum-exp of its row and column over ``A+{k}``, and the
  growth of every selected row's and column's partition function. ``c(k|A)`` is that change for the
  learner minus that for the reference (O(B·|A|) per chunk). A single pair has zero CLIP loss (the change
  for ``A = ∅`` is 0 for every k), so chunk 1 is instead drawn from each example's learnability in the
  context of the whole super-batch (:func:`super_batch_learnability`: ``CE_row_k + CE_col_k`` over all B,
  learner minus reference; the same summed-loss scale as the later chunks' changes). On CPU the loop runs
  in the native kernel in the exp domain (products of ``1 + E_ik / Z_i`` instead of one log per entry, with
  ``E = exp(L - max L)``; float64 accumulators) whenever no positive logit lies so far below its model's
  maximum that ``E`` would underflow; otherwise, on accelerators, and without the kernel, it runs the torch
  log-domain scorer. Both draw the same chunks up to float rounding in near-ties.

Independent baseline ``learnability_topk`` keeps the top ``b`` of :func:`super_batch_learnability`, each
example scored alone against the whole super-batch (the paper's independent selection): for the sigmoid loss
the sum of example k's row and column of ``S`` (its image against all B texts plus its text against all B
images), for the softmax loss ``CE_row_k + CE_col_k`` over all B, each learner minus reference.
``uniform`` takes a random ``b`` of ``B``.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

import numpy
import torch
from torch import Tensor

from jest_trainer import native
from jest_trainer.config import SELECTION_METHODS
from jest_trainer.losses import (
    LOSS_KINDS,
    logit_magnitude_limit,
    sigmoid_pair_loss_difference,
    softplus_no_grad,
    within_magnitude,
)

METHODS: tuple[str, ...] = SELECTION_METHODS
JOINT_METHODS: tuple[str, ...] = ("jest", "hard_learner", "easy_reference")  # the chunked samplers


class _ConditionalScorer(Protocol):
    """What the chunked sampler needs: c(k|A) for every k (``-inf`` for k already in A), and a way to grow A."""

    def scores(self) -> Tensor: ...

    def add(self, indices: Tensor) -> None: ...


def _validate_square(name: str, matrix: Tensor) -> None:
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{name}: expected a square [B, B] matrix, got shape {tuple(matrix.shape)}")
    if matrix.shape[0] == 0:
        raise ValueError(f"{name}: the super-batch is empty")


def _score_limit(matrix: Tensor) -> float:
    """Largest |entry| a score or logit matrix may hold: each conditional score sums at most ``2B + 1`` of
    them, so below ``max / (2B + 2)`` of the working dtype no such sum can overflow (~5e35 in float32 at
    B = 320, far above any real score; beyond it a NaN could reach the top-k)."""
    return torch.finfo(_working_dtype(matrix)).max / (2 * matrix.shape[0] + 2)


def _unbounded_error(names: list[str], limit: float) -> ValueError:
    return ValueError(
        f"{', '.join(names)}: contains NaN or infinite values, or values too large to sum (|x| > {limit:.3g})"
    )


def _validate_scores(name: str, matrix: Tensor) -> None:
    _validate_square(name, matrix)
    limit = _score_limit(matrix)
    if not within_magnitude(matrix, limit):
        raise _unbounded_error([name], limit)


def _validate_sizes(super_batch: int, batch_size: int, n_chunks: int | None) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if batch_size > super_batch:
        raise ValueError(f"batch_size: {batch_size} exceeds the super-batch size {super_batch}")
    if n_chunks is None:
        return
    if isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 1:
        raise ValueError(f"n_chunks: expected a positive integer, got {n_chunks!r}")
    if batch_size % n_chunks:
        raise ValueError(f"n_chunks: batch_size {batch_size} is not divisible by n_chunks {n_chunks}")


def _working_dtype(matrix: Tensor) -> torch.dtype:
    return torch.float64 if matrix.dtype == torch.float64 else torch.float32


def _gumbel_noise(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard Gumbel noise ``-log(-log U)``; U is clamped away from 0 so every draw is finite.

    Drawn on the generator's device and moved to the scores' device, so a CPU generator seeded by
    (seed, step, rank) gives the same selection whether the logits live on CPU or an accelerator.
    """
    device = generator.device if generator is not None else like.device
    uniform = torch.rand(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)
    return uniform.clamp_(min=torch.finfo(like.dtype).tiny).log_().neg_().log_().neg_()


def _chunked_sample(
    scorer: _ConditionalScorer,
    super_batch: int,
    batch_size: int,
    n_chunks: int,
    like: Tensor,
    generator: torch.Generator | None,
    noise: Tensor | None = None,
) -> Tensor:
    """Draw ``n_chunks`` chunks of ``batch_size // n_chunks`` by Gumbel top-k of c(k|A) (A masked to -inf), with
    ``noise`` (``[n_chunks, B]``) if given, else drawn here from ``generator``."""
    per_chunk = batch_size // n_chunks
    if noise is None:
        noise = _gumbel_noise((n_chunks, super_batch), like, generator)
    chunks: list[Tensor] = []
    for chunk_noise in noise[:-1]:
        indices = torch.topk(scorer.scores().add(chunk_noise), per_chunk, sorted=False)[1]
        chunks.append(indices)
        scorer.add(indices)
    chunks.append(torch.topk(scorer.scores().add(noise[-1]), per_chunk, sorted=False)[1])
    return torch.cat(chunks)


def _pairwise_sample(
    scores: Tensor, batch_size: int, n_chunks: int, generator: torch.Generator | None
) -> Tensor:
    """Chunked sampling from a pairwise score matrix ``S``: the CPU loop on CPU, torch's elsewhere."""
    if scores.device.type != "cpu":
        return _chunked_sample(_PairwiseScorer(scores), scores.shape[0], batch_size, n_chunks, scores, generator)
    noise = _gumbel_noise((n_chunks, scores.shape[0]), scores, generator)
    return _pairwise_chunk_loop_cpu(scores, noise, batch_size // n_chunks)


def _pairwise_chunk_loop_cpu(scores: Tensor, noise: Tensor, per_chunk: int) -> Tensor:
    """The chunk loop of :class:`_PairwiseScorer` for CPU tensors: the native kernel, else NumPy.

    At JEST's shapes (B in the hundreds, chunks of a few items) the loop is bound by per-call overhead, not
    arithmetic: 16 chunks at B = 320 take ~30 µs in the native kernel (one call), ~190 µs in NumPy (11 calls
    a chunk) and more in torch's eager dispatch. All three draw the same chunks, up to float rounding in
    near-ties (they add rows and columns in different orders) and the pick among exact ties.
    """
    matrix = numpy.ascontiguousarray(scores.numpy())
    gumbel = numpy.ascontiguousarray(noise.numpy())
    if native.KERNEL is not None:
        chosen = numpy.empty(gumbel.shape[0] * per_chunk, dtype=numpy.int64)
        native.KERNEL.pairwise_chunk_loop(matrix, gumbel, per_chunk, chosen)
        return torch.from_numpy(chosen)
    return _pairwise_chunk_loop_numpy(matrix, gumbel, per_chunk)


def _pairwise_chunk_loop_numpy(matrix: numpy.ndarray, gumbel: numpy.ndarray, per_chunk: int) -> Tensor:
    """The fallback where the native kernel was not built: the same loop in NumPy.

    ``S + S.T`` is never formed: each chunk adds its rows *and* its columns of ``S`` to ``c`` and masks
    itself to ``-inf``, which costs less than one transposed pass over ``B²``. Each chunk is the top
    ``per_chunk`` of ``c + noise[chunk]`` (``argpartition``), exactly what ``topk`` picks there.
    """
    conditional = numpy.diagonal(matrix).copy()
    perturbed = numpy.empty_like(conditional)
    chosen = numpy.empty(gumbel.shape[0] * per_chunk, dtype=numpy.int64)
    for chunk, chunk_noise in enumerate(gumbel):
        numpy.add(conditional, chunk_noise, out=perturbed)
        indices = numpy.argpartition(perturbed, -per_chunk)[-per_chunk:]
        chosen[chunk * per_chunk:(chunk + 1) * per_chunk] = indices
        if chunk + 1 < gumbel.shape[0]:
            conditional += matrix[indices].sum(axis=0)
            conditional += matrix[:, indices].sum(axis=1)
            conditional[indices] = -math.inf
    return torch.from_numpy(chosen)


class _PairwiseScorer:
    """c(k|A) = S_kk + Σ_{j∈A} (S_kj + S_jk), updated with the new chunk's rows of ``S + S.T`` only.

    The diagonal of ``S + S.T`` is set to ``-inf``: row j's diagonal entry only ever reaches j itself, which
    has just been selected, so adding the chunk's rows both updates every other item and masks the chunk
    (one op fewer per chunk than a separate mask). Once ``-inf``, an item stays there: every other entry is
    finite (scores are validated finite), so no ``inf - inf`` can arise.
    """

    def __init__(self, scores: Tensor) -> None:
        self._symmetric = scores + scores.T
        self._symmetric.diagonal().fill_(-math.inf)
        self._conditional = scores.diagonal().clone()

    def scores(self) -> Tensor:
        return self._conditional

    def add(self, indices: Tensor) -> None:
        self._conditional.add_(self._symmetric.index_select(0, indices).sum(dim=0))


class _SoftmaxCost:
    """Exact change of the summed CLIP loss Lsum(A) when each candidate k joins A, for M stacked models.

    ``logits`` is ``[M, B, B]`` (learner and reference share one set of ops). Keeps, per model and item k,
    ``row_lse[k] = LSE_{j∈A} L_kj`` and ``col_lse[k] = LSE_{i∈A} L_ik`` (for k ∈ A these are the selected
    rows' and columns' log partition functions), plus the selected rows and (transposed) columns of the
    logits as ``lines[M, 2, |A|, B]``, appended chunk by chunk so each chunk costs O(M·B·|A|).
    """

    def __init__(self, logits: Tensor) -> None:
        models, size, _ = logits.shape
        self._logits = logits
        self._logits_t = logits.transpose(1, 2).contiguous()
        self._diagonal = logits.diagonal(dim1=1, dim2=2)
        self._row_lse = torch.full((models, size), -math.inf, dtype=logits.dtype, device=logits.device)
        self._col_lse = torch.full((models, size), -math.inf, dtype=logits.dtype, device=logits.device)
        self._selected = torch.empty(0, dtype=torch.long, device=logits.device)
        self._lines = logits.new_empty((models, 2, 0, size))

    def add(self, indices: Tensor) -> None:
        new_rows = self._logits.index_select(1, indices)  # [M, k, B]: L_ik for i in the chunk, every k
        new_cols = self._logits_t.index_select(1, indices)  # [M, k, B]: L_kj for j in the chunk, every k
        self._row_lse = torch.logaddexp(self._row_lse, new_cols.logsumexp(dim=1))
        self._col_lse = torch.logaddexp(self._col_lse, new_rows.logsumexp(dim=1))
        self._selected = torch.cat([self._selected, indices])
        self._lines = torch.cat([self._lines, torch.stack([new_rows, new_cols], dim=1)], dim=2)

    def cost(self) -> Tensor:
        """``[M, B]``: Lsum(A+{k}) - Lsum(A) for every k (meaningless for k already in A; callers mask those)."""
        own_row = torch.logaddexp(self._row_lse, self._diagonal)
        own_col = torch.logaddexp(self._col_lse, self._diagonal)
        change = own_row + own_col - 2 * self._diagonal
        if self._selected.numel():
            # Row i ∈ A gains column k: its LSE grows by softplus(L_ik - LSE_i); likewise column j ∈ A gains row k.
            partitions = torch.stack(
                [self._row_lse.index_select(1, self._selected), self._col_lse.index_select(1, self._selected)], dim=1
            )
            change = change + softplus_no_grad(self._lines - partitions.unsqueeze(3)).sum(dim=(1, 2))
        return change


def _per_example_softmax_losses(logits: Tensor) -> Tensor:
    """``[M, B, B]`` -> ``[M, B]``: ``CE_row_k + CE_col_k`` over the whole super-batch, per model and example k."""
    diagonal = logits.diagonal(dim1=1, dim2=2)
    return logits.logsumexp(dim=2) + logits.logsumexp(dim=1) - 2 * diagonal


class _SoftmaxScorer:
    """c(k|A) = Σ_m sign_m · (Lsum_m(A+{k}) - Lsum_m(A)) over stacked models (learner +1, reference -1);
    for ``A = ∅`` (chunk 1) each example's super-batch learnability ``Σ_m sign_m · (CE_row_k + CE_col_k)``."""

    def __init__(self, logits: Tensor, signs: Tensor) -> None:
        self.logits = logits
        self._cost = _SoftmaxCost(logits)
        self._signs = signs.to(dtype=logits.dtype, device=logits.device).unsqueeze(1)
        self._selected = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        self._empty = True

    def scores(self) -> Tensor:
        if self._empty:
            return (self._signs * _per_example_softmax_losses(self.logits)).sum(dim=0)
        return (self._signs * self._cost.cost()).sum(dim=0).masked_fill_(self._selected, -math.inf)

    def add(self, indices: Tensor) -> None:
        self._cost.add(indices)
        self._selected[indices] = True
        self._empty = False


def softmax_incremental_cost(logits: Tensor, selected: Tensor) -> Tensor:
    """Exact ``Lsum(A+{k}) - Lsum(A)`` for every k, with Lsum the summed CLIP loss and ``A = selected``.

    ``Lsum(A) = 2|A|·softmax_batch_loss(logits[A][:, A])`` (and ``Lsum(∅) = 0``). Entries for k already in A
    are not meaningful. One model's half of :func:`softmax_conditional_scores`, for tests and diagnostics.
    """
    _validate_scores("logits", logits)
    with torch.no_grad():
        cost = _SoftmaxCost(logits.detach().to(_working_dtype(logits)).unsqueeze(0))
        if selected.numel():
            cost.add(selected.to(device=logits.device, dtype=torch.long))
        return cost.cost()[0]


def softmax_conditional_scores(learner_logits: Tensor, reference_logits: Tensor, selected: Tensor) -> Tensor:
    """The c(k|A) :func:`jest_select_softmax` samples chunk n with, given ``A = selected`` (``-inf`` on A).

    ``c(k|A) = [Lsum^θ(A+{k}) - Lsum^θ(A)] - [Lsum^θ*(A+{k}) - Lsum^θ*(A)]``, computed by the torch scorer
    (exposed so tests can compare it with brute-force CLIP losses). For an empty ``selected`` it is the
    chunk-1 score, :func:`super_batch_learnability` of the softmax loss.
    """
    _validate_scores("learner_logits", learner_logits)
    _validate_scores("reference_logits", reference_logits)
    with torch.no_grad():
        scorer = _softmax_scorer([(1.0, learner_logits), (-1.0, reference_logits)])
        if selected.numel():
            scorer.add(selected.to(device=learner_logits.device, dtype=torch.long))
        return scorer.scores()


def jest_select(
    scores: Tensor, batch_size: int, n_chunks: int, generator: torch.Generator | None = None
) -> Tensor:
    """JEST joint sampling from a pairwise score matrix ``S`` (e.g. ``M^θ - M^θ*``); returns ``b`` unique indices.

    Chunk 1 ∝ ``exp(S_kk)``, chunk n ∝ ``exp(S_kk + Σ_{j∈A} S_kj + Σ_{j∈A} S_jk)`` over unselected k, each
    chunk without replacement (Gumbel top-k). Indices come back chunk by chunk in selection order (order
    within a chunk is arbitrary) as a LongTensor on ``scores.device``; the same generator state gives the
    same selection, and the generator may live on another device than the scores (e.g. CPU).
    """
    _validate_scores("scores", scores)
    _validate_sizes(scores.shape[0], batch_size, n_chunks)
    return _pairwise_joint(scores, batch_size, n_chunks, generator)


def _pairwise_joint(scores: Tensor, batch_size: int, n_chunks: int, generator: torch.Generator | None) -> Tensor:
    with torch.no_grad():
        return _pairwise_sample(scores.detach().to(_working_dtype(scores)), batch_size, n_chunks, generator)


def _softmax_joint(
    terms: list[tuple[float, str, Tensor]], batch_size: int, n_chunks: int, generator: torch.Generator | None
) -> Tensor:
    """Softmax chunked sampling over ``(sign, name, logits)`` models: the native exp-domain loop on CPU where it is
    exact, else the torch scorer. Validates each matrix by name; its one min/max pass also gives the shift."""
    size = terms[0][2].shape[0]
    _validate_sizes(size, batch_size, n_chunks)
    dtype = torch.float64 if any(_working_dtype(logits) == torch.float64 for _, _, logits in terms) else torch.float32
    with torch.no_grad():
        logits = [matrix.detach() for _, _, matrix in terms]
        highs = []
        for (_, name, _), matrix in zip(terms, logits, strict=True):
            low, high = torch.aminmax(matrix)
            limit = _score_limit(matrix)
            if not (float(high) <= limit and float(low) >= -limit):  # NaN fails both
                raise _unbounded_error([name], limit)
            highs.append(float(high))
        signs = [sign for sign, _, _ in terms]
        # the same noise draw on both paths (in the working dtype), so both pick the same chunks
        noise = _gumbel_noise((n_chunks, size), torch.empty(0, dtype=dtype, device=logits[0].device), generator)
        exps = _exps_of(logits, highs, dtype) if logits[0].device.type == "cpu" and native.KERNEL is not None else None
        if exps is None:
            stacked = torch.stack([matrix.to(dtype) for matrix in logits])
            scorer = _SoftmaxScorer(stacked, torch.tensor(signs))
            return _chunked_sample(scorer, size, batch_size, n_chunks, stacked, generator, noise)
        return _softmax_chunk_loop_native(exps, signs, noise.to(exps.dtype), batch_size // n_chunks)


def _softmax_chunk_loop_native(exps: Tensor, signs: list[float], noise: Tensor, per_chunk: int) -> Tensor:
    """The softmax chunk loop in the native kernel, from :func:`_shifted_exps`' ``[M, B, B]`` and one sign each."""
    assert native.KERNEL is not None
    chosen = numpy.empty(noise.shape[0] * per_chunk, dtype=numpy.int64)
    native.KERNEL.softmax_chunk_loop(exps.numpy(), signs, numpy.ascontiguousarray(noise.numpy()), per_chunk, chosen)
    return torch.from_numpy(chosen)


# How far (in logits) a positive may lie below its model's largest logit for the exp-domain kernel: then every
# E_kk = exp(L_kk - max L) is at least e^-gap, far above underflow (float32: e^-60 ≈ 9e-27 against 1e-38, and
# the entries lost to underflow below e^-87 weigh less than 1e-9 of any partition; float64: e^-600 against
# 1e-308), and each partition-growth factor is at most 1 + e^gap, which the kernel's products absorb.
_EXP_DOMAIN_GAP: dict[torch.dtype, float] = {torch.float32: 60.0, torch.float64: 600.0}


def _shifted_exps(stacked: Tensor) -> Tensor | None:
    """:func:`_exps_of` the models of ``[M, B, B]`` logits (``stacked`` is left untouched)."""
    highs = [float(high) for high in stacked.amax(dim=(1, 2))]
    return _exps_of(list(stacked), highs, stacked.dtype)


def _exps_of(logits: list[Tensor], highs: list[float], dtype: torch.dtype) -> Tensor | None:
    """``[M, B, B]`` ``exp(L_m - max L_m)`` for the native softmax loop (``highs[m] = max L_m``), or ``None`` if
    that could underflow where it matters.

    Float32 (for ``dtype`` float32) when every positive lies within 60 of its model's maximum logit, float64
    when within 600 (any CLIP logits with a temperature below ~300), otherwise ``None`` and the caller runs
    the log-domain torch scorer, which handles any finite logits. One subtraction into a fresh buffer and an
    in-place exp per model: no stacked copy of the logits.
    """
    gap = max(high - float(matrix.diagonal().amin()) for matrix, high in zip(logits, highs, strict=True))
    if dtype == torch.float32 and gap <= _EXP_DOMAIN_GAP[torch.float32]:
        exps_dtype = torch.float32
    elif gap <= _EXP_DOMAIN_GAP[torch.float64]:
        exps_dtype = torch.float64
    else:
        return None
    size = logits[0].shape[0]
    exps = torch.empty((len(logits), size, size), dtype=exps_dtype)
    for out, matrix, high in zip(exps, logits, highs, strict=True):
        torch.sub(matrix.to(exps_dtype), high, out=out)
    return exps.exp_()


def _stack_terms(terms: list[tuple[float, Tensor]]) -> Tensor:
    """Stack the models' logits as ``[M, B, B]`` (float32, or float64 if any input is)."""
    dtype = torch.float64 if any(_working_dtype(logits) == torch.float64 for _, logits in terms) else torch.float32
    return torch.stack([logits.detach().to(dtype) for _, logits in terms])


def _softmax_scorer(terms: list[tuple[float, Tensor]]) -> _SoftmaxScorer:
    """The torch scorer of the stacked models with their signs."""
    return _SoftmaxScorer(_stack_terms(terms), torch.tensor([sign for sign, _ in terms]))


def jest_select_softmax(
    learner_logits: Tensor,
    reference_logits: Tensor,
    batch_size: int,
    n_chunks: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """JEST joint sampling for the softmax (CLIP) loss, with the exact incremental learnability.

    ``c(k|A) = Δ^θ(k|A) - Δ^θ*(k|A)`` with Δ from :func:`softmax_incremental_cost`; chunked Gumbel top-k as in
    :func:`jest_select`. Δ is 0 for every k when ``A = ∅``, so chunk 1 is drawn ∝ ``exp`` of each example's
    super-batch learnability (:func:`super_batch_learnability`) instead of uniformly.
    """
    _validate_square("learner_logits", learner_logits)
    _validate_square("reference_logits", reference_logits)
    if learner_logits.shape != reference_logits.shape:
        raise ValueError(
            f"reference_logits: shape {tuple(reference_logits.shape)} differs from learner_logits "
            f"{tuple(learner_logits.shape)}"
        )
    return _softmax_joint([(1.0, "learner_logits", learner_logits), (-1.0, "reference_logits", reference_logits)],
                          batch_size, n_chunks, generator)


def super_batch_learnability(learner_logits: Tensor, reference_logits: Tensor, loss: str) -> Tensor:
    """Each example's learnability in the context of the whole super-batch, ``[B]``, learner minus reference.

    The paper's independent score: example k's own loss terms with every other candidate as a negative. For
    the sigmoid loss the sum of row k and column k of ``S = M^θ - M^θ*`` (``Σ_j S_kj + Σ_i S_ik``: image k
    against all B texts plus text k against all B images, the positive counted in both); for the softmax loss
    ``CE_row_k + CE_col_k`` over all B. ``learnability_topk`` keeps its top ``b``; the softmax JEST sampler
    draws its first chunk from it. Float32 (float64 if either input is); no gradient.
    """
    if loss not in LOSS_KINDS:
        raise ValueError(f"loss: expected one of {LOSS_KINDS}, got {loss!r}")
    _validate_scores("learner_logits", learner_logits)
    _validate_scores("reference_logits", reference_logits)
    if learner_logits.shape != reference_logits.shape:
        raise ValueError(
            f"reference_logits: shape {tuple(reference_logits.shape)} differs from learner_logits "
            f"{tuple(learner_logits.shape)}"
        )
    with torch.no_grad():
        if loss == "sigmoid":
            scores = _sigmoid_pair_scores(learner_logits, reference_logits)
            return scores.sum(dim=0).add_(scores.sum(dim=1))
        per_example = _per_example_softmax_losses(_stack_terms([(1.0, learner_logits), (-1.0, reference_logits)]))
        return per_example[0] - per_example[1]


def _require(method: str, name: str, logits: Tensor | None) -> Tensor:
    """Presence and shape only; each branch checks finiteness where it reads the values (once)."""
    if logits is None:
        raise ValueError(f"{name}: required by selection method {method!r}")
    _validate_square(name, logits)
    return logits


def _sigmoid_pair_scores(learner: Tensor | None, reference: Tensor | None) -> Tensor:
    """S = M^θ - M^θ* (``jest``), M^θ (``hard_learner``) or -M^θ* (``easy_reference``), validated finite.

    Computed by :func:`~jest_trainer.losses.sigmoid_pair_loss_difference` in float32 (float64 if any input
    is), which also reports logits that are NaN, infinite or beyond
    :func:`~jest_trainer.losses.logit_magnitude_limit`; those raise here, naming the matrix.
    """
    named = [(name, logits) for name, logits in (("learner_logits", learner), ("reference_logits", reference))
             if logits is not None]
    dtype = torch.float64 if any(_working_dtype(logits) == torch.float64 for _, logits in named) else torch.float32
    size = named[0][1].shape[0]
    scores = sigmoid_pair_loss_difference([logits for _, logits in named], dtype)
    if scores is None:  # a logit was NaN, infinite or beyond the limit: name the matrix
        limit = logit_magnitude_limit(dtype, size)
        culprits = [name for name, logits in named if not within_magnitude(logits, limit)]
        raise _unbounded_error(culprits or [name for name, _ in named], limit)
    return scores.neg_() if learner is None else scores


def select_batch(
    method: str,
    *,
    learner_logits: Tensor | None,
    reference_logits: Tensor | None,
    loss: Literal["sigmoid", "softmax"],
    batch_size: int,
    n_chunks: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Choose ``batch_size`` indices of a super-batch with the named method (one of :data:`METHODS`).

    ``learner_logits`` / ``reference_logits`` are the super-batch logit matrices (already scaled, and
    biased for the sigmoid loss) of the learner and the frozen reference. Which are required:
    ``jest`` and ``learnability_topk`` both, ``hard_learner`` the learner's, ``easy_reference`` the
    reference's, ``uniform`` neither (it only reads B from whichever is given; with both None it raises).
    ``n_chunks`` is used by the joint methods and must divide ``batch_size`` for them.
    """
    if method not in METHODS:
        raise ValueError(f"method: unknown selection method {method!r}; expected one of {METHODS}")
    if loss not in LOSS_KINDS:
        raise ValueError(f"loss: expected one of {LOSS_KINDS}, got {loss!r}")

    if method == "uniform":
        given = learner_logits if learner_logits is not None else reference_logits
        if given is None:
            raise ValueError(
                "learner_logits: 'uniform' needs learner_logits or reference_logits for the super-batch size"
            )
        if given.dim() != 2 or given.shape[0] != given.shape[1]:
            raise ValueError(f"learner_logits: expected a square [B, B] matrix, got shape {tuple(given.shape)}")
        _validate_sizes(given.shape[0], batch_size, None)
        device = generator.device if generator is not None else given.device
        return torch.randperm(given.shape[0], generator=generator, device=device)[:batch_size].to(given.device)

    learner = _require(method, "learner_logits", learner_logits) if method != "easy_reference" else None
    reference = _require(method, "reference_logits", reference_logits) if method != "hard_learner" else None
    if learner is not None and reference is not None and learner.shape != reference.shape:
        raise ValueError(
            f"reference_logits: shape {tuple(reference.shape)} differs from learner_logits {tuple(learner.shape)}"
        )

    if method == "learnability_topk":
        assert learner is not None and reference is not None
        _validate_sizes(learner.shape[0], batch_size, None)
        scores = super_batch_learnability(learner, reference, loss)
        return torch.topk(scores, batch_size, sorted=True).indices

    size = (learner if learner is not None else reference).shape[0]  # type: ignore[union-attr]
    _validate_sizes(size, batch_size, n_chunks)
    if loss == "softmax":
        terms = [(sign, name, logits) for sign, name, logits in
                 ((1.0, "learner_logits", learner), (-1.0, "reference_logits", reference)) if logits is not None]
        return _softmax_joint(terms, batch_size, n_chunks, generator)
    with torch.no_grad():
        return _pairwise_sample(_sigmoid_pair_scores(learner, reference), batch_size, n_chunks, generator)
