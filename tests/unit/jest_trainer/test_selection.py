"""Unit tests of batch selection: JEST's conditional scores, its sampling distribution and the dispatcher.

The brute-force references here recompute every conditional score from scratch (sigmoid: the pairwise
sums; softmax: the CLIP loss on A+{k} minus on A), so the incremental bookkeeping in the module is
checked against the definitions in JEST.md, not against itself.
"""

from __future__ import annotations

import math

import numpy
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jest_trainer import native
from jest_trainer.losses import sigmoid_pair_losses, softmax_batch_loss
from jest_trainer.selection import (
    METHODS,
    _chunked_sample,
    _gumbel_noise,
    _pairwise_chunk_loop_cpu,
    _pairwise_chunk_loop_numpy,
    _PairwiseScorer,
    _shifted_exps,
    _softmax_chunk_loop_native,
    _SoftmaxScorer,
    _stack_terms,
    jest_select,
    jest_select_softmax,
    select_batch,
    softmax_conditional_scores,
    softmax_incremental_cost,
    super_batch_learnability,
)
from scipy.stats import chisquare
from torch.nn import functional


def _matrix(size: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _summed_clip_loss(logits: torch.Tensor, members: list[int]) -> torch.Tensor:
    """Lsum(A) = 2|A| · CLIP batch loss on A (0 for the empty set): the normalisation selection documents."""
    if not members:
        return torch.tensor(0.0, dtype=logits.dtype)
    chosen = torch.tensor(members)
    return 2 * len(members) * softmax_batch_loss(logits[chosen][:, chosen])


def _brute_sigmoid_conditional(scores: torch.Tensor, selected: list[int]) -> torch.Tensor:
    chosen = torch.tensor(selected, dtype=torch.long)
    return scores.diagonal() + scores[:, chosen].sum(dim=1) + scores[chosen, :].sum(dim=0)


def _super_batch_clip_terms(logits: torch.Tensor) -> torch.Tensor:
    """CE of row k + CE of column k over the whole super-batch, per example k (torch's cross-entropy)."""
    labels = torch.arange(logits.shape[0])
    rows = functional.cross_entropy(logits, labels, reduction="none")
    return rows + functional.cross_entropy(logits.T, labels, reduction="none")


def _brute_softmax_conditional(learner: torch.Tensor, reference: torch.Tensor, selected: list[int]) -> torch.Tensor:
    """c(k|A) from CLIP losses computed from scratch; for A = ∅ (chunk 1) the super-batch learnability."""
    if not selected:
        return _super_batch_clip_terms(learner) - _super_batch_clip_terms(reference)
    learner_base, reference_base = _summed_clip_loss(learner, selected), _summed_clip_loss(reference, selected)
    values = []
    for candidate in range(learner.shape[0]):
        if candidate in selected:
            values.append(0.0)
            continue
        grown = [*selected, candidate]
        learner_gain = _summed_clip_loss(learner, grown) - learner_base
        reference_gain = _summed_clip_loss(reference, grown) - reference_base
        values.append(float(learner_gain - reference_gain))
    return torch.tensor(values, dtype=torch.float64)


def _chunks(indices: list[int], n_chunks: int) -> list[list[int]]:
    """Selection split into its chunks, each sorted: order inside a chunk carries no meaning."""
    per_chunk = len(indices) // n_chunks
    return [sorted(indices[start : start + per_chunk]) for start in range(0, len(indices), per_chunk)]


def _reference_sampler(conditional, size: int, batch_size: int, n_chunks: int, seed: int) -> list[int]:
    """Naive chunked Gumbel top-k with from-scratch conditional scores.

    It draws the noise exactly as the module documents its layout (one uniform [n_chunks, B] draw from
    the generator, in float64 for float64 inputs), so the two must pick identical indices.
    """
    uniform = torch.rand((n_chunks, size), generator=_seeded(seed), dtype=torch.float64)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=torch.finfo(torch.float64).tiny)))
    selected: list[int] = []
    for chunk in range(n_chunks):
        scores = conditional(selected).clone()
        scores[selected] = -math.inf
        picked = torch.topk(scores + gumbel[chunk], batch_size // n_chunks).indices.tolist()
        selected.extend(picked)
    return selected


# ---------------------------------------------------------------------------------------------------------
# Exactness of the conditional scores


@pytest.mark.parametrize("selected", [[], [4], [0, 5, 2], [1, 3, 6, 7, 8]])
def test_softmax_incremental_cost_equals_the_brute_force_loss_difference(selected: list[int]) -> None:
    logits = _matrix(9, seed=1, scale=3.0)
    cost = softmax_incremental_cost(logits, torch.tensor(selected, dtype=torch.long))
    for candidate in range(9):
        if candidate in selected:
            continue
        expected = _summed_clip_loss(logits, [*selected, candidate]) - _summed_clip_loss(logits, selected)
        torch.testing.assert_close(cost[candidate], expected)


@settings(max_examples=15, deadline=None)
@given(
    size=st.integers(min_value=2, max_value=7),
    members=st.lists(st.integers(min_value=0, max_value=7), max_size=6, unique=True),
    learner_scale=st.floats(min_value=0.1, max_value=60.0),
    reference_scale=st.floats(min_value=0.1, max_value=60.0),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_softmax_conditional_score_is_learner_minus_reference_clip_loss_gain(
    size: int, members: list[int], learner_scale: float, reference_scale: float, seed: int
) -> None:
    """c(k|A) = [Lsum^θ(A+{k}) - Lsum^θ(A)] - [Lsum^θ*(A+{k}) - Lsum^θ*(A)], also for large logits."""
    selected = [member for member in members if member < size][: size - 1]
    learner, reference = _matrix(size, seed, learner_scale), _matrix(size, seed + 1, reference_scale)
    scores = softmax_conditional_scores(learner, reference, torch.tensor(selected, dtype=torch.long))
    expected = _brute_softmax_conditional(learner, reference, selected)  # chunk 1's score when A is empty
    outside = [k for k in range(size) if k not in selected]
    torch.testing.assert_close(scores[outside], expected[outside], rtol=1e-9, atol=1e-9)
    assert torch.all(scores[selected] == -math.inf)


def test_jest_select_matches_the_naive_sampler_with_from_scratch_scores() -> None:
    scores = _matrix(24, seed=2)
    ours = jest_select(scores, 12, 4, generator=_seeded(7)).tolist()
    naive = _reference_sampler(lambda chosen: _brute_sigmoid_conditional(scores, chosen), 24, 12, 4, seed=7)
    assert _chunks(ours, 4) == _chunks(naive, 4)


@pytest.mark.parametrize("kernel", ["native", "torch"])
@pytest.mark.parametrize("scale", [4.0, 60.0])
def test_jest_select_softmax_matches_the_naive_sampler_with_brute_force_losses(
    kernel: str, scale: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both CPU paths (the exp-domain native loop; the log-domain torch scorer) against from-scratch CLIP losses,
    chunk 1 from the super-batch learnability; scale 60 puts positives hundreds of logits below the maximum."""
    if kernel == "torch":
        monkeypatch.setattr(native, "KERNEL", None)
    learner, reference = _matrix(12, seed=3, scale=scale), _matrix(12, seed=4, scale=scale)
    for seed in range(3):
        ours = jest_select_softmax(learner, reference, 10, 5, generator=_seeded(seed)).tolist()
        naive = _reference_sampler(
            lambda chosen: _brute_softmax_conditional(learner, reference, chosen), 12, 10, 5, seed=seed
        )
        assert _chunks(ours, 5) == _chunks(naive, 5), seed


# ---------------------------------------------------------------------------------------------------------
# Properties of the sampler


@settings(max_examples=40, deadline=None)
@given(
    super_batch=st.integers(min_value=1, max_value=48),
    n_chunks=st.integers(min_value=1, max_value=6),
    per_chunk=st.integers(min_value=1, max_value=6),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    softmax=st.booleans(),
)
def test_selection_is_unique_sized_in_range_and_deterministic(
    super_batch: int, n_chunks: int, per_chunk: int, seed: int, softmax: bool
) -> None:
    batch_size = n_chunks * per_chunk
    if batch_size > super_batch:
        batch_size = n_chunks * (super_batch // n_chunks)
        if batch_size == 0:
            return

    def run() -> torch.Tensor:
        if softmax:
            return jest_select_softmax(
                _matrix(super_batch, seed % 1000, 3.0), _matrix(super_batch, seed % 997, 3.0),
                batch_size, n_chunks, generator=_seeded(seed),
            )
        return jest_select(_matrix(super_batch, seed % 1000, 3.0), batch_size, n_chunks, generator=_seeded(seed))

    first, second = run(), run()
    assert first.dtype == torch.long and first.shape == (batch_size,)
    assert first.unique().numel() == batch_size
    assert int(first.min()) >= 0 and int(first.max()) < super_batch
    assert torch.equal(first, second)


@pytest.mark.parametrize("softmax", [False, True])
def test_different_seeds_give_different_selections(softmax: bool) -> None:
    learner, reference = _matrix(64, seed=5), _matrix(64, seed=6)
    selections = set()
    for seed in range(8):
        if softmax:
            indices = jest_select_softmax(learner, reference, 16, 4, generator=_seeded(seed))
        else:
            indices = jest_select(learner - reference, 16, 4, generator=_seeded(seed))
        selections.add(tuple(sorted(indices.tolist())))
    assert len(selections) == 8


def test_huge_scores_neither_overflow_nor_break_uniqueness() -> None:
    scores = _matrix(40, seed=8, scale=1e6).float()
    indices = jest_select(scores, 20, 5, generator=_seeded(0))
    assert indices.unique().numel() == 20


def test_float32_scores_are_accepted_and_give_long_indices() -> None:
    indices = jest_select(_matrix(10, seed=9).float(), 4, 2, generator=_seeded(0))
    assert indices.dtype == torch.long


def test_two_chunk_draws_follow_the_jest_distribution() -> None:
    """5 items, 1 per chunk: P(i first) = softmax(diag)_i and P(k second | i) ∝ exp(S_kk + S_ik + S_ki).

    Chi-square over the 20 ordered pairs from 6,000 seeded draws; as a power check the same counts must
    clearly reject the distribution that ignores the pairwise terms.
    """
    scores = _matrix(5, seed=10, scale=1.2)
    draws = 6_000
    generator = _seeded(123)
    counts = torch.zeros(5, 5)
    first_counts = torch.zeros(5)
    for _ in range(draws):
        first, second = jest_select(scores, 2, 2, generator=generator).tolist()
        counts[first, second] += 1
        first_counts[first] += 1

    diagonal = scores.diagonal()
    first_probability = torch.softmax(diagonal, dim=0)
    joint = torch.zeros(5, 5, dtype=torch.float64)
    independent = torch.zeros(5, 5, dtype=torch.float64)
    for first in range(5):
        conditional = diagonal + scores[first, :] + scores[:, first]
        conditional[first] = -math.inf
        joint[first] = first_probability[first] * torch.softmax(conditional, dim=0)
        marginal_only = diagonal.clone()
        marginal_only[first] = -math.inf
        independent[first] = first_probability[first] * torch.softmax(marginal_only, dim=0)

    sigma = torch.sqrt(first_probability * (1 - first_probability) / draws)
    assert torch.all((first_counts / draws - first_probability).abs() < 4 * sigma)

    off_diagonal = ~torch.eye(5, dtype=torch.bool)
    observed = counts[off_diagonal].numpy()
    assert chisquare(observed, (joint[off_diagonal] * draws).numpy()).pvalue > 1e-3
    assert chisquare(observed, (independent[off_diagonal] * draws).numpy()).pvalue < 1e-6


def test_joint_selection_prefers_a_jointly_learnable_pair_over_individually_good_items() -> None:
    """Items 0 and 1 are unremarkable alone (S_kk = 0) but learnable together (S_01 = S_10 = 5); items 2..9 are
    individually better (S_kk = 0.5) and look best in the context of the whole super-batch, through their mild
    learnability with ten decoys 10..19 (S = 1.5 both ways) that are themselves unlearnable (S_kk = -20). The
    independent baseline, which scores each example against the whole super-batch, keeps six of 2..9 and never
    the pair; JEST, which scores what it has actually selected, usually finds the pair and so reaches a higher
    batch learnability."""
    scores = torch.zeros(20, 20, dtype=torch.float64)
    scores.diagonal()[2:10] = 0.5
    scores.diagonal()[10:] = -20.0
    scores[2:10, 10:] = scores[10:, 2:10] = 1.5
    scores[0, 1] = scores[1, 0] = 5.0
    # Logits whose per-pair losses differ by exactly ``scores`` keep the dispatcher in the loop.
    learner_pair_losses = scores + 21.0
    reference_pair_losses = torch.full_like(scores, 21.0)
    learner, reference = _logits_with_pair_losses(learner_pair_losses), _logits_with_pair_losses(reference_pair_losses)
    torch.testing.assert_close(sigmoid_pair_losses(learner) - sigmoid_pair_losses(reference), scores)

    topk = select_batch("learnability_topk", learner_logits=learner, reference_logits=reference, loss="sigmoid",
                        batch_size=6, n_chunks=6)
    assert set(topk.tolist()) <= set(range(2, 10))

    trials, with_pair, learnability = 300, 0, 0.0
    generator = _seeded(0)
    for _ in range(trials):
        chosen = select_batch("jest", learner_logits=learner, reference_logits=reference, loss="sigmoid",
                              batch_size=6, n_chunks=6, generator=generator)
        with_pair += {0, 1} <= set(chosen.tolist())
        learnability += float(scores[chosen][:, chosen].sum())
    assert with_pair / trials > 0.5
    assert learnability / trials > float(scores[topk][:, topk].sum()) + 2.0


def _logits_with_pair_losses(pair_losses: torch.Tensor) -> torch.Tensor:
    """Invert softplus(-z·L) = M: L = z · -softplus⁻¹(M), with softplus⁻¹(m) = log(expm1(m))."""
    labels = 2 * torch.eye(pair_losses.shape[0], dtype=pair_losses.dtype) - 1
    return -labels * torch.log(torch.expm1(pair_losses))


# ---------------------------------------------------------------------------------------------------------
# The dispatcher


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_dispatches_for_both_losses(method: str, loss: str) -> None:
    learner, reference = _matrix(40, seed=11, scale=3.0), _matrix(40, seed=12, scale=3.0)
    first = select_batch(method, learner_logits=learner, reference_logits=reference, loss=loss, batch_size=16,
                         n_chunks=4, generator=_seeded(3))
    again = select_batch(method, learner_logits=learner, reference_logits=reference, loss=loss, batch_size=16,
                         n_chunks=4, generator=_seeded(3))
    assert first.shape == (16,) and first.unique().numel() == 16 and first.dtype == torch.long
    assert torch.equal(first, again)


def test_sigmoid_methods_are_jest_select_on_their_documented_scores() -> None:
    learner, reference = _matrix(30, seed=13, scale=3.0), _matrix(30, seed=14, scale=3.0)
    learner_losses, reference_losses = sigmoid_pair_losses(learner), sigmoid_pair_losses(reference)
    expected_scores = {
        "jest": learner_losses - reference_losses,
        "hard_learner": learner_losses,
        "easy_reference": -reference_losses,
    }
    for method, scores in expected_scores.items():
        chosen = select_batch(method, learner_logits=learner, reference_logits=reference, loss="sigmoid",
                              batch_size=10, n_chunks=5, generator=_seeded(4))
        assert torch.equal(chosen, jest_select(scores, 10, 5, generator=_seeded(4))), method


def test_softmax_jest_dispatches_to_jest_select_softmax() -> None:
    learner, reference = _matrix(30, seed=15, scale=3.0), _matrix(30, seed=16, scale=3.0)
    chosen = select_batch("jest", learner_logits=learner, reference_logits=reference, loss="softmax",
                          batch_size=10, n_chunks=5, generator=_seeded(5))
    assert torch.equal(chosen, jest_select_softmax(learner, reference, 10, 5, generator=_seeded(5)))


def _brute_super_batch_learnability(learner: torch.Tensor, reference: torch.Tensor, loss: str) -> torch.Tensor:
    """Each example against the whole super-batch, from the definitions: sigmoid, row k plus column k of
    M^θ - M^θ* (pair losses written out as softplus(-z·L)); softmax, CE_row_k + CE_col_k."""
    if loss == "softmax":
        return _super_batch_clip_terms(learner) - _super_batch_clip_terms(reference)
    labels = 2 * torch.eye(learner.shape[0], dtype=learner.dtype) - 1
    difference = functional.softplus(-labels * learner) - functional.softplus(-labels * reference)
    return torch.tensor([float(difference[k, :].sum() + difference[:, k].sum()) for k in range(learner.shape[0])],
                        dtype=learner.dtype)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("kernel", ["native", "fallback"])
def test_super_batch_learnability_is_each_examples_loss_terms_learner_minus_reference(
    loss: str, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kernel == "fallback":
        monkeypatch.setattr(native, "KERNEL", None)
    learner, reference = _matrix(30, seed=17, scale=3.0), _matrix(30, seed=18, scale=3.0)
    torch.testing.assert_close(super_batch_learnability(learner, reference, loss),
                               _brute_super_batch_learnability(learner, reference, loss), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_learnability_topk_keeps_the_top_super_batch_learnability(loss: str) -> None:
    """The independent baseline scores each example against the whole super-batch, not alone (for the sigmoid
    loss it differs from the diagonal S_kk on these logits)."""
    learner, reference = _matrix(30, seed=17, scale=3.0), _matrix(30, seed=18, scale=3.0)
    chosen = select_batch("learnability_topk", learner_logits=learner, reference_logits=reference, loss=loss,
                          batch_size=7, n_chunks=7)
    expected = torch.topk(_brute_super_batch_learnability(learner, reference, loss), 7).indices
    assert set(chosen.tolist()) == set(expected.tolist())
    if loss == "sigmoid":
        diagonal = sigmoid_pair_losses(learner).diagonal() - sigmoid_pair_losses(reference).diagonal()
        assert set(chosen.tolist()) != set(torch.topk(diagonal, 7).indices.tolist())


def test_super_batch_learnability_rejects_bad_input_by_name() -> None:
    with pytest.raises(ValueError, match="loss: expected one of"):
        super_batch_learnability(torch.zeros(4, 4), torch.zeros(4, 4), "hinge")
    with pytest.raises(ValueError, match="reference_logits: shape"):
        super_batch_learnability(torch.zeros(4, 4), torch.zeros(5, 5), "softmax")
    with pytest.raises(ValueError, match="learner_logits: contains NaN"):
        super_batch_learnability(torch.full((4, 4), math.nan), torch.zeros(4, 4), "sigmoid")


def test_uniform_needs_only_the_super_batch_size() -> None:
    learner = _matrix(20, seed=19)
    from_learner = select_batch("uniform", learner_logits=learner, reference_logits=None, loss="sigmoid",
                                batch_size=5, n_chunks=1, generator=_seeded(0))
    from_reference = select_batch("uniform", learner_logits=None, reference_logits=learner, loss="softmax",
                                  batch_size=5, n_chunks=1, generator=_seeded(0))
    assert torch.equal(from_learner, from_reference) and from_learner.unique().numel() == 5
    with pytest.raises(ValueError, match="'uniform' needs learner_logits or reference_logits"):
        select_batch("uniform", learner_logits=None, reference_logits=None, loss="sigmoid", batch_size=5,
                     n_chunks=1)


def test_uniform_covers_the_super_batch_evenly() -> None:
    counts = torch.zeros(10)
    generator = _seeded(1)
    draws = 2_000
    for _ in range(draws):
        counts[select_batch("uniform", learner_logits=torch.zeros(10, 10), reference_logits=None, loss="sigmoid",
                            batch_size=3, n_chunks=1, generator=generator)] += 1
    sigma = math.sqrt(draws * 0.3 * 0.7)
    assert torch.all((counts - draws * 0.3).abs() < 4 * sigma)


@pytest.mark.parametrize(
    ("method", "missing", "message"),
    [
        ("jest", "reference", "reference_logits: required by selection method 'jest'"),
        ("learnability_topk", "reference", "reference_logits: required by selection method 'learnability_topk'"),
        ("easy_reference", "reference", "reference_logits: required by selection method 'easy_reference'"),
        ("jest", "learner", "learner_logits: required by selection method 'jest'"),
        ("hard_learner", "learner", "learner_logits: required by selection method 'hard_learner'"),
    ],
)
def test_missing_logits_name_the_argument(method: str, missing: str, message: str) -> None:
    logits = _matrix(8, seed=20)
    kwargs = {"learner_logits": None if missing == "learner" else logits,
              "reference_logits": None if missing == "reference" else logits}
    with pytest.raises(ValueError, match=message):
        select_batch(method, loss="sigmoid", batch_size=4, n_chunks=2, **kwargs)


def test_single_model_methods_do_not_need_the_other_model() -> None:
    logits = _matrix(8, seed=21)
    select_batch("hard_learner", learner_logits=logits, reference_logits=None, loss="softmax", batch_size=4,
                 n_chunks=2)
    select_batch("easy_reference", learner_logits=None, reference_logits=logits, loss="sigmoid", batch_size=4,
                 n_chunks=2)


def test_unknown_method_and_loss_are_rejected_by_name() -> None:
    logits = _matrix(8, seed=22)
    with pytest.raises(ValueError, match="method: unknown selection method 'random'"):
        select_batch("random", learner_logits=logits, reference_logits=logits, loss="sigmoid", batch_size=4,
                     n_chunks=2)
    with pytest.raises(ValueError, match="loss: expected one of"):
        select_batch("jest", learner_logits=logits, reference_logits=logits, loss="hinge",  # type: ignore[arg-type]
                     batch_size=4, n_chunks=2)


@pytest.mark.parametrize(
    ("scores", "batch_size", "n_chunks", "message"),
    [
        (torch.zeros(4, 5), 2, 1, r"scores: expected a square \[B, B\] matrix"),
        (torch.zeros(4), 2, 1, r"scores: expected a square \[B, B\] matrix"),
        (torch.zeros(4, 4), 5, 1, "batch_size: 5 exceeds the super-batch size 4"),
        (torch.zeros(4, 4), 0, 1, "batch_size: expected a positive integer"),
        (torch.zeros(4, 4), 3, 2, "n_chunks: batch_size 3 is not divisible by n_chunks 2"),
        (torch.zeros(4, 4), 2, 0, "n_chunks: expected a positive integer"),
        (torch.full((4, 4), math.nan), 2, 1, "scores: contains NaN or infinite values"),
    ],
)
def test_jest_select_rejects_bad_arguments(scores: torch.Tensor, batch_size: int, n_chunks: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        jest_select(scores, batch_size, n_chunks)


def test_jest_select_softmax_rejects_mismatched_models() -> None:
    with pytest.raises(ValueError, match="reference_logits: shape"):
        jest_select_softmax(torch.zeros(4, 4), torch.zeros(5, 5), 2, 1)


# ---------------------------------------------------------------------------------------------------------
# The fast sigmoid path against the formulation it replaced


def _previous_sigmoid_select(
    learner: torch.Tensor | None, reference: torch.Tensor | None, batch_size: int, n_chunks: int, seed: int
) -> torch.Tensor:
    """The pre-optimisation select_batch for the sigmoid joint methods, kept verbatim in spirit: S from two
    ``sigmoid_pair_losses`` matrices, ``S + S.T`` rows added per chunk, the chunk masked by index assignment."""
    scores = None
    for sign, logits in ((1.0, learner), (-1.0, reference)):
        if logits is not None:
            term = sign * sigmoid_pair_losses(logits)
            scores = term if scores is None else scores + term
    assert scores is not None
    symmetric, conditional = scores + scores.T, scores.diagonal().clone()
    uniform = torch.rand((n_chunks, scores.shape[0]), generator=_seeded(seed), dtype=scores.dtype)
    noise = -torch.log(-torch.log(uniform.clamp(min=torch.finfo(scores.dtype).tiny)))
    chunks = []
    for chunk in range(n_chunks):
        indices = torch.topk(conditional + noise[chunk], batch_size // n_chunks, sorted=False).indices
        chunks.append(indices)
        conditional += symmetric.index_select(0, indices).sum(dim=0)
        conditional[indices] = -math.inf
    return torch.cat(chunks)


def _siglip_like_logits(size: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Scaled, biased logits of correlated unit embeddings, as the trainer hands to select_batch."""
    generator = _seeded(seed)
    image = functional.normalize(torch.randn(size, 32, generator=generator, dtype=dtype), dim=1)
    text = functional.normalize(image + torch.randn(size, 32, generator=generator, dtype=dtype), dim=1)
    return 10.0 * image @ text.T - 5.0


@pytest.mark.parametrize(
    ("size", "batch_size", "n_chunks", "dtype"),
    [(320, 64, 16, torch.float32), (128, 32, 8, torch.float32), (40, 12, 3, torch.float64)],
)
@pytest.mark.parametrize("method", ["jest", "hard_learner", "easy_reference"])
def test_sigmoid_joint_selection_is_identical_to_the_previous_formulation(
    method: str, size: int, batch_size: int, n_chunks: int, dtype: torch.dtype
) -> None:
    """Same generator, same chunks: the native prelude of S and the native chunk loop change only float rounding
    of the scores, never which items each chunk draws (at these shapes and seeds); order within a chunk is
    arbitrary by contract."""
    for seed in range(5):
        learner, reference = _siglip_like_logits(size, 2 * seed, dtype), _siglip_like_logits(size, 2 * seed + 1, dtype)
        learner_in = None if method == "easy_reference" else learner
        reference_in = None if method == "hard_learner" else reference
        ours = select_batch(method, learner_logits=learner_in, reference_logits=reference_in, loss="sigmoid",
                            batch_size=batch_size, n_chunks=n_chunks, generator=_seeded(seed))
        previous = _previous_sigmoid_select(learner_in, reference_in, batch_size, n_chunks, seed)
        assert _chunks(ours.tolist(), n_chunks) == _chunks(previous.tolist(), n_chunks), (method, seed)


def test_sigmoid_selection_with_logits_of_hundreds_matches_the_previous_formulation() -> None:
    """Logits of a few hundred (sigmoid(z·L) far below float32's smallest normal) still draw what the previous
    formulation draws: the pair-loss difference is exact for every finite logit."""
    for seed in range(3):
        learner, reference = 40 * _siglip_like_logits(96, 2 * seed), 40 * _siglip_like_logits(96, 2 * seed + 1)
        assert float(learner.abs().max()) > 200
        ours = select_batch("jest", learner_logits=learner, reference_logits=reference, loss="sigmoid",
                            batch_size=32, n_chunks=8, generator=_seeded(seed))
        previous = _previous_sigmoid_select(learner, reference, 32, 8, seed)
        assert _chunks(ours.tolist(), 8) == _chunks(previous.tolist(), 8), seed


@pytest.mark.parametrize(
    ("size", "batch_size", "n_chunks"), [(320, 64, 16), (50, 50, 5), (33, 12, 1), (200, 160, 8), (7, 7, 7)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_numpy_and_torch_chunk_loops_draw_the_same_chunks(size: int, batch_size: int, n_chunks: int,
                                                                 dtype: torch.dtype) -> None:
    """CPU selection runs the native kernel (NumPy where it was not built); accelerators run the torch
    ``_PairwiseScorer`` loop, which cannot run on an accelerator here, so all three are compared on CPU with
    the same S and the same generator (chunks of 1 to 20 items, the whole super-batch at the end)."""
    assert native.KERNEL is not None, "the native kernel was not built: setup.py's extension failed"
    per_chunk = batch_size // n_chunks
    for seed in range(4):
        scores = _matrix(size, seed=seed, scale=3.0).to(dtype)
        noise = _gumbel_noise((n_chunks, size), scores, _seeded(seed))
        compiled = _pairwise_chunk_loop_cpu(scores, noise, per_chunk)
        fallback = _pairwise_chunk_loop_numpy(scores.numpy(), noise.numpy(), per_chunk)
        torch_loop = _chunked_sample(_PairwiseScorer(scores), size, batch_size, n_chunks, scores, _seeded(seed))
        assert compiled.dtype == fallback.dtype == torch.long and compiled.shape == fallback.shape == (batch_size,)
        expected = _chunks(torch_loop.tolist(), n_chunks)
        assert _chunks(compiled.tolist(), n_chunks) == expected, seed
        assert _chunks(fallback.tolist(), n_chunks) == expected, seed


def test_selection_without_the_native_kernel_draws_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """An install without a C compiler falls back to the NumPy loop: same select_batch result, chunk by chunk."""
    learner, reference = _siglip_like_logits(320, 0), _siglip_like_logits(320, 1)

    def select() -> list[list[int]]:
        indices = select_batch("jest", learner_logits=learner, reference_logits=reference, loss="sigmoid",
                               batch_size=64, n_chunks=16, generator=_seeded(3))
        return _chunks(indices.tolist(), 16)

    with_native = select()
    monkeypatch.setattr(native, "KERNEL", None)
    assert select() == with_native


@pytest.mark.parametrize(
    ("scores", "noise", "per_chunk", "out", "error", "message"),
    [
        (numpy.zeros((4, 4), numpy.float32), numpy.zeros((2, 4), numpy.float64), 2, numpy.zeros(4, numpy.int64),
         TypeError, "same dtype"),
        (numpy.zeros((4, 4), numpy.int32), numpy.zeros((2, 4), numpy.int32), 2, numpy.zeros(4, numpy.int64),
         TypeError, "float32 or float64"),
        (numpy.zeros((4, 5), numpy.float32), numpy.zeros((2, 5), numpy.float32), 2, numpy.zeros(4, numpy.int64),
         ValueError, "square"),
        (numpy.zeros((4, 4), numpy.float32), numpy.zeros((2, 3), numpy.float32), 2, numpy.zeros(4, numpy.int64),
         ValueError, "noise"),
        (numpy.zeros((4, 4), numpy.float32), numpy.zeros((2, 4), numpy.float32), 3, numpy.zeros(6, numpy.int64),
         ValueError, "per_chunk"),
        (numpy.zeros((4, 4), numpy.float32), numpy.zeros((2, 4), numpy.float32), 0, numpy.zeros(0, numpy.int64),
         ValueError, "per_chunk"),
        (numpy.zeros((4, 4), numpy.float32), numpy.zeros((2, 4), numpy.float32), 2, numpy.zeros(3, numpy.int64),
         ValueError, "out"),
        (numpy.zeros((4, 4), numpy.float32), numpy.zeros((2, 4), numpy.float32), 2, numpy.zeros(4, numpy.int32),
         TypeError, "int64"),
        (numpy.zeros((4, 8), numpy.float32)[:, ::2], numpy.zeros((2, 4), numpy.float32), 2,
         numpy.zeros(4, numpy.int64), ValueError, "scores: expected a C-contiguous array"),
        ([[0.0] * 4] * 4, numpy.zeros((2, 4), numpy.float32), 2, numpy.zeros(4, numpy.int64), ValueError,
         r"scores: expected a C-contiguous array \(.*list"),
        (numpy.zeros((4, 4), ">f4"), numpy.zeros((2, 4), ">f4"), 2, numpy.zeros(4, numpy.int64), TypeError,
         "float32 or float64"),
        # chunks * per_chunk wraps around in 64 bits; the check must not multiply
        (numpy.zeros((64, 64), numpy.float32), numpy.zeros((4, 64), numpy.float32), 2**62 + 1,
         numpy.zeros(4, numpy.int64), ValueError, "per_chunk"),
    ],
)
def test_native_kernel_refuses_buffers_it_cannot_read_safely(
    scores: object, noise: numpy.ndarray, per_chunk: int, out: numpy.ndarray, error: type, message: str
) -> None:
    assert native.KERNEL is not None
    with pytest.raises(error, match=message):
        native.KERNEL.pairwise_chunk_loop(scores, noise, per_chunk, out)
    read_only = numpy.zeros(4, numpy.int64)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        native.KERNEL.pairwise_chunk_loop(
            numpy.zeros((4, 4), numpy.float32), numpy.zeros((2, 4), numpy.float32), 2, read_only
        )


def test_selected_indices_drive_an_autograd_forward_and_backward() -> None:
    """The trainer indexes the super-batch with the selection and backpropagates through it."""
    learner, reference = _siglip_like_logits(48, 0), _siglip_like_logits(48, 1)
    selected = select_batch("jest", learner_logits=learner, reference_logits=reference, loss="sigmoid",
                            batch_size=16, n_chunks=4, generator=_seeded(0))
    features = torch.randn(48, 8, generator=_seeded(1))
    weight = torch.randn(8, 8, generator=_seeded(2), requires_grad=True)
    batch = features.index_select(0, selected) @ weight
    sigmoid_pair_losses(batch @ batch.T).sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kernel", ["native", "fallback"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e307, -1e307])
@pytest.mark.parametrize("which", ["learner_logits", "reference_logits"])
def test_unusable_logits_are_rejected_by_name_in_the_sigmoid_joint_path(
    which: str, bad: float, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NaN, ±inf, and finite logits so large that JEST's conditional sums could overflow (1e307 in float64)."""
    if kernel == "fallback":
        monkeypatch.setattr(native, "KERNEL", None)
    logits = {"learner_logits": _matrix(8, seed=23), "reference_logits": _matrix(8, seed=24)}
    logits[which][2, 5] = bad
    with pytest.raises(ValueError, match=f"^{which}: contains NaN or infinite values, or values too large"):
        select_batch("jest", loss="sigmoid", batch_size=4, n_chunks=2, **logits)


def test_float32_logits_near_the_float32_maximum_are_rejected_not_turned_into_duplicates() -> None:
    """3e38 is finite in float32, but pair scores of that size would overflow the conditional sums."""
    huge = torch.randn(16, 16, generator=_seeded(0)).sign() * 3e38
    for kernel in (native.KERNEL, None):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(native, "KERNEL", kernel)
            with pytest.raises(ValueError, match="values too large"):
                select_batch("jest", learner_logits=huge, reference_logits=-huge, loss="sigmoid", batch_size=8,
                             n_chunks=4, generator=_seeded(1))
    with pytest.raises(ValueError, match=r"^scores: contains NaN or infinite values, or values too large"):
        jest_select(huge, 8, 4, generator=_seeded(1))


def test_native_chunk_loop_stays_unique_even_if_the_conditional_sums_overflow() -> None:
    """Callers keep scores below the overflow limit; the kernel still never repeats an index if they do not."""
    assert native.KERNEL is not None
    scores = (numpy.sign(numpy.random.default_rng(0).standard_normal((16, 16))) * 3e38).astype(numpy.float32)
    out = numpy.empty(8, numpy.int64)
    native.KERNEL.pairwise_chunk_loop(scores, numpy.zeros((4, 16), numpy.float32), 2, out)
    assert len(set(out.tolist())) == 8 and out.min() >= 0 and out.max() < 16


# ---------------------------------------------------------------------------------------------------------
# Softmax (CLIP) selection: chunk 1, the native exp-domain loop against the torch log-domain scorer


@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_softmax_first_chunk_follows_the_super_batch_learnability(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """6 items, one drawn: P(k) = softmax(CE_row_k + CE_col_k, learner minus reference). Chi-square over 6,000
    seeded draws; as a power check the same counts must clearly reject the uniform first chunk of before."""
    if kernel == "torch":
        monkeypatch.setattr(native, "KERNEL", None)
    learner, reference = _matrix(6, seed=30, scale=0.8), _matrix(6, seed=31, scale=0.8)
    probability = torch.softmax(_super_batch_clip_terms(learner) - _super_batch_clip_terms(reference), dim=0)
    assert float(probability.max() / probability.min()) > 3  # far from uniform, so the power check means something
    draws, generator = 6_000, _seeded(5)
    counts = numpy.zeros(6)
    for _ in range(draws):
        counts[int(jest_select_softmax(learner, reference, 1, 1, generator=generator))] += 1
    assert chisquare(counts, (probability * draws).numpy()).pvalue > 1e-3
    assert chisquare(counts, numpy.full(6, draws / 6)).pvalue < 1e-6


def _clip_like_logits(size: int, seed: int, temperature: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Scaled CLIP logits of correlated unit embeddings, as the trainer hands to select_batch."""
    generator = _seeded(seed)
    image = functional.normalize(torch.randn(size, 32, generator=generator, dtype=dtype), dim=1)
    text = functional.normalize(image + torch.randn(size, 32, generator=generator, dtype=dtype), dim=1)
    return temperature * image @ text.T


def _softmax_both_paths(learner: torch.Tensor | None, reference: torch.Tensor | None, batch_size: int,
                        n_chunks: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """(native exp-domain kernel, torch log-domain scorer) chunks for the same models and generator seed."""
    terms = [(sign, logits) for sign, logits in ((1.0, learner), (-1.0, reference)) if logits is not None]
    stacked = _stack_terms(terms)
    size = stacked.shape[1]
    noise = _gumbel_noise((n_chunks, size), stacked, _seeded(seed))
    scorer = _SoftmaxScorer(stacked.clone(), torch.tensor([sign for sign, _ in terms]))
    torch_loop = _chunked_sample(scorer, size, batch_size, n_chunks, stacked, None, noise)
    exps = _shifted_exps(stacked)
    assert exps is not None
    compiled = _softmax_chunk_loop_native(exps, [sign for sign, _ in terms], noise.to(exps.dtype),
                                          batch_size // n_chunks)
    assert compiled.dtype == torch.long and compiled.unique().numel() == batch_size
    return _chunks(compiled.tolist(), n_chunks), _chunks(torch_loop.tolist(), n_chunks)


@pytest.mark.parametrize(
    ("size", "batch_size", "n_chunks"), [(320, 64, 16), (50, 50, 5), (33, 12, 1), (200, 160, 8), (7, 7, 7)]
)
@pytest.mark.parametrize(
    ("temperature", "dtype"),
    [(10.0, torch.float32), (100.0, torch.float32), (10.0, torch.float64), (300.0, torch.float64)],
)
def test_native_and_torch_softmax_loops_draw_the_same_chunks(
    size: int, batch_size: int, n_chunks: int, temperature: float, dtype: torch.dtype
) -> None:
    """CPU softmax selection runs the native exp-domain loop; accelerators (and installs without the kernel) run
    the torch log-domain scorer. Same logits and noise, same chunks: temperature 10 keeps float32 exps; 100
    (a trained CLIP) needs float64 exps for float32 logits; 300 in float64 makes partition-growth factors of
    ~e^300, so the kernel's products are renormalised and some totals overflow to the per-factor logs."""
    assert native.KERNEL is not None, "the native kernel was not built: setup.py's extension failed"
    for seed in range(3):
        learner = _clip_like_logits(size, 2 * seed, temperature, dtype)
        reference = _clip_like_logits(size, 2 * seed + 1, temperature, dtype)
        compiled, torch_loop = _softmax_both_paths(learner, reference, batch_size, n_chunks, seed)
        assert compiled == torch_loop, seed


@pytest.mark.parametrize("model", ["learner", "reference"])
def test_native_and_torch_softmax_loops_agree_for_single_model_methods(model: str) -> None:
    """hard_learner (+1 · learner) and easy_reference (-1 · reference) run the same loops with one model."""
    logits = _clip_like_logits(128, 7, 20.0)
    learner, reference = (logits, None) if model == "learner" else (None, logits)
    for seed in range(3):
        compiled, torch_loop = _softmax_both_paths(learner, reference, 32, 8, seed)
        assert compiled == torch_loop, seed


@pytest.mark.parametrize("method", ["jest", "hard_learner", "easy_reference"])
def test_softmax_selection_without_the_native_kernel_draws_the_same(method: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    learner, reference = _clip_like_logits(320, 0, 30.0), _clip_like_logits(320, 1, 30.0)

    def select() -> list[list[int]]:
        indices = select_batch(method, learner_logits=learner, reference_logits=reference, loss="softmax",
                               batch_size=64, n_chunks=16, generator=_seeded(3))
        return _chunks(indices.tolist(), 16)

    with_native = select()
    monkeypatch.setattr(native, "KERNEL", None)
    assert select() == with_native


def test_shifted_exps_picks_the_exp_domain_only_where_it_is_exact() -> None:
    """Float32 exps while every positive is within 60 of the model's largest logit, float64 within 600, and no
    exp domain beyond (the torch log-domain scorer takes over, which handles any finite logits)."""
    logits = torch.zeros(2, 4, 4)
    logits[:, 0, 1] = 50.0
    exps = _shifted_exps(logits.clone())
    assert exps is not None and exps.dtype == torch.float32 and float(exps.max()) == 1.0
    logits[:, 0, 1] = 100.0
    exps = _shifted_exps(logits.clone())
    assert exps is not None and exps.dtype == torch.float64
    logits[:, 0, 1] = 700.0
    assert _shifted_exps(logits.clone()) is None
    far = _matrix(12, seed=32, scale=1.0) * 0.0
    far[0, 1] = 700.0
    chosen = jest_select_softmax(far, _matrix(12, seed=33), 8, 4, generator=_seeded(0))
    naive = _reference_sampler(lambda selected: _brute_softmax_conditional(far, _matrix(12, seed=33), selected),
                               12, 8, 4, seed=0)
    assert _chunks(chosen.tolist(), 4) == _chunks(naive, 4)


@pytest.mark.parametrize(
    ("exps", "signs", "noise", "per_chunk", "out", "error", "message"),
    [
        (numpy.ones((1, 4, 4), numpy.float32), [1.0], numpy.zeros((2, 4), numpy.float64), 2,
         numpy.zeros(4, numpy.int64), TypeError, "same dtype"),
        (numpy.ones((3, 4, 4), numpy.float32), [1.0] * 3, numpy.zeros((2, 4), numpy.float32), 2,
         numpy.zeros(4, numpy.int64), ValueError, "M = 1 or 2"),
        (numpy.ones((4, 4), numpy.float32), [1.0], numpy.zeros((2, 4), numpy.float32), 2,
         numpy.zeros(4, numpy.int64), ValueError, r"\[M, B, B\]"),
        (numpy.ones((2, 4, 4), numpy.float32), [1.0], numpy.zeros((2, 4), numpy.float32), 2,
         numpy.zeros(4, numpy.int64), ValueError, "one sign per model"),
        (numpy.ones((1, 4, 4), numpy.float32), [0.5], numpy.zeros((2, 4), numpy.float32), 2,
         numpy.zeros(4, numpy.int64), ValueError, r"\+1 or -1"),
        (numpy.ones((1, 4, 4), numpy.float32), 1.0, numpy.zeros((2, 4), numpy.float32), 2,
         numpy.zeros(4, numpy.int64), TypeError, "signs: expected a sequence"),
        (numpy.ones((1, 4, 4), numpy.float32), [1.0], numpy.zeros((2, 3), numpy.float32), 2,
         numpy.zeros(4, numpy.int64), ValueError, "noise"),
        (numpy.ones((1, 4, 4), numpy.float32), [1.0], numpy.zeros((2, 4), numpy.float32), 3,
         numpy.zeros(6, numpy.int64), ValueError, "per_chunk"),
        (numpy.ones((1, 4, 4), numpy.float32), [1.0], numpy.zeros((2, 4), numpy.float32), 2,
         numpy.zeros(3, numpy.int64), ValueError, "out"),
        (numpy.ones((1, 4, 4), numpy.float32), [1.0], numpy.zeros((2, 4), numpy.float32), 2,
         numpy.zeros(4, numpy.int32), TypeError, "int64"),
        (numpy.ones((1, 4, 8), numpy.float32)[:, :, ::2], [1.0], numpy.zeros((2, 4), numpy.float32), 2,
         numpy.zeros(4, numpy.int64), ValueError, "exps: expected a C-contiguous array"),
    ],
)
def test_native_softmax_kernel_refuses_arguments_it_cannot_use_safely(
    exps: numpy.ndarray, signs: object, noise: numpy.ndarray, per_chunk: int, out: numpy.ndarray, error: type,
    message: str,
) -> None:
    assert native.KERNEL is not None
    with pytest.raises(error, match=message):
        native.KERNEL.softmax_chunk_loop(exps, signs, noise, per_chunk, out)


def test_native_softmax_kernel_stays_unique_on_degenerate_exps() -> None:
    """Callers pass exps with a positive diagonal; zeros (log 0, 0/0) still never repeat an index."""
    assert native.KERNEL is not None
    out = numpy.empty(8, numpy.int64)
    native.KERNEL.softmax_chunk_loop(numpy.zeros((2, 16, 16), numpy.float32), [1.0, -1.0],
                                     numpy.zeros((4, 16), numpy.float32), 2, out)
    assert len(set(out.tolist())) == 8 and out.min() >= 0 and out.max() < 16


@pytest.mark.parametrize("kernel", ["native", "fallback"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e307])
@pytest.mark.parametrize("which", ["learner_logits", "reference_logits"])
def test_unusable_logits_are_rejected_by_name_in_the_softmax_joint_path(
    which: str, bad: float, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kernel == "fallback":
        monkeypatch.setattr(native, "KERNEL", None)
    logits = {"learner_logits": _matrix(8, seed=23), "reference_logits": _matrix(8, seed=24)}
    logits[which][2, 5] = bad
    with pytest.raises(ValueError, match=f"^{which}: contains NaN or infinite values, or values too large"):
        select_batch("jest", loss="softmax", batch_size=4, n_chunks=2, **logits)
