"""Unit tests of the contrastive losses: formulas, agreement with open_clip, and the JEST sub-batch identity."""

from __future__ import annotations

import math

import numpy
import pytest
import torch
from jest_trainer import native
from jest_trainer.losses import (
    contrastive_loss,
    log_no_grad_,
    logit_magnitude_limit,
    sigmoid_batch_loss,
    sigmoid_logits,
    sigmoid_pair_loss_difference,
    sigmoid_pair_loss_difference_,
    sigmoid_pair_losses,
    softmax_batch_loss,
    softmax_logits,
    softplus_no_grad,
)
from open_clip.loss import ClipLoss, SigLipLoss
from torch.nn import functional


def _features(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = functional.normalize(torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=1)
    text = functional.normalize(image + 0.8 * torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=1)
    return image, text


SCALE = torch.tensor(math.log(10.0), dtype=torch.float64)
BIAS = torch.tensor(-5.0, dtype=torch.float64)


def test_logits_follow_the_documented_formulas() -> None:
    image, text = _features(6, 8, seed=0)
    expected = 10.0 * image @ text.T
    torch.testing.assert_close(softmax_logits(image, text, SCALE), expected)
    torch.testing.assert_close(sigmoid_logits(image, text, SCALE, BIAS), expected - 5.0)


def test_logits_reject_mismatched_widths() -> None:
    image, _ = _features(4, 8, seed=0)
    with pytest.raises(ValueError, match="text: embedding width 5"):
        sigmoid_logits(image, torch.zeros(4, 5, dtype=torch.float64), SCALE, BIAS)


def test_sigmoid_pair_losses_use_plus_one_labels_on_the_diagonal_only() -> None:
    logits = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 4
    labels = 2 * torch.eye(5, dtype=torch.float64) - 1
    torch.testing.assert_close(sigmoid_pair_losses(logits), -functional.logsigmoid(labels * logits))


def test_sigmoid_pair_losses_stay_finite_for_extreme_logits() -> None:
    logits = torch.tensor([[1e4, -1e4], [-1e4, -1e4]], dtype=torch.float32)
    losses = sigmoid_pair_losses(logits)
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses, torch.tensor([[0.0, 0.0], [0.0, 1e4]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_no_grad_softplus_agrees_with_torch(dtype: torch.dtype) -> None:
    extremes = torch.tensor([0.0, 1e-8, -1e-8, 1e4, -1e4], dtype=dtype)
    x = torch.cat([torch.linspace(-120, 120, 2001, dtype=dtype), extremes])
    torch.testing.assert_close(softplus_no_grad(x), functional.softplus(x))
    before = x.clone()
    softplus_no_grad(x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_pair_loss_difference_equals_the_difference_of_pair_loss_matrices(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    learner = torch.randn(64, 64, generator=generator, dtype=dtype) * 30
    reference = torch.randn(64, 64, generator=generator, dtype=dtype) * 30
    learner[0, :4] = torch.tensor([1e4, -1e4, 0.0, -120.0], dtype=dtype)
    reference[0, :4] = torch.tensor([-1e4, 1e4, 0.0, 120.0], dtype=dtype)
    learner[5, 5], reference[6, 6] = -1e4, 1e4  # positives at the extremes
    exact_learner, exact_reference = sigmoid_pair_losses(learner.double()), sigmoid_pair_losses(reference.double())
    tolerance = {"rtol": 1e-6, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-10}

    both = sigmoid_pair_loss_difference_(torch.stack([learner, reference]))
    torch.testing.assert_close(both.double(), exact_learner - exact_reference, **tolerance)
    alone = sigmoid_pair_loss_difference_(learner.unsqueeze(0).clone())
    torch.testing.assert_close(alone.double(), exact_learner, **tolerance)
    assert both.dtype == dtype


@pytest.fixture(params=["native", "torch"])
def signed_pass(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the native signed-logits pass (CPU default) and with the torch ops that replace it."""
    assert native.KERNEL is not None, "the native kernel was not built: setup.py's extension failed"
    if request.param == "torch":
        monkeypatch.setattr(native, "KERNEL", None)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pair_loss_difference_matches_the_exact_losses_for_every_finite_logit(
    dtype: torch.dtype, signed_pass: str
) -> None:
    generator = torch.Generator().manual_seed(4)
    learner = torch.randn(64, 64, generator=generator, dtype=dtype) * 30
    reference = torch.randn(64, 64, generator=generator, dtype=dtype) * 30
    learner[0, :5] = torch.tensor([1e4, -1e4, 0.0, -120.0, 200.0], dtype=dtype)  # sigmoid(z·L) far below tiny
    reference[0, :5] = torch.tensor([-1e4, 1e4, 0.0, 120.0, -90.0], dtype=dtype)
    learner[5, 5], reference[6, 6], learner[7, 7] = -1e4, 1e4, 1e35 if dtype == torch.float32 else 1e300
    originals = learner.clone(), reference.clone()
    exact_learner, exact_reference = sigmoid_pair_losses(learner.double()), sigmoid_pair_losses(reference.double())
    tolerance = {"rtol": 1e-6, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-10}

    both = sigmoid_pair_loss_difference([learner, reference], dtype)
    alone = sigmoid_pair_loss_difference([learner], dtype)
    assert both is not None and alone is not None and both.dtype == alone.dtype == dtype
    torch.testing.assert_close(both.double(), exact_learner - exact_reference, **tolerance)
    torch.testing.assert_close(alone.double(), exact_learner, **tolerance)
    assert torch.equal(learner, originals[0]) and torch.equal(reference, originals[1])


@pytest.mark.parametrize(("row", "column"), [(0, 1), (3, 3), (39, 38), (39, 39), (0, 39)])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1.01, -1.01])
def test_pair_loss_difference_reports_unusable_logits(
    row: int, column: int, value: float, signed_pass: str
) -> None:
    """NaN, ±inf, or beyond the limit (finite ``value``s are multiples of it) anywhere in the matrix: the
    kernel's vectorised body, its tail and the diagonal. ``None`` lets the caller name the input;
    ``sigmoid(+inf) = 1`` would otherwise look harmless, and logits beyond the limit could overflow JEST's
    conditional sums into NaN. Just inside the limit is accepted."""
    for dtype in (torch.float32, torch.float64):
        learner = torch.randn(40, 40, generator=torch.Generator().manual_seed(1), dtype=dtype)
        reference = torch.randn(40, 40, generator=torch.Generator().manual_seed(2), dtype=dtype)
        limit = logit_magnitude_limit(dtype, 40)
        if math.isfinite(value):
            learner[row, column] = 0.99 * math.copysign(limit, value)
            assert sigmoid_pair_loss_difference([learner, reference], dtype) is not None, dtype
            value *= limit
        learner[row, column] = value
        assert sigmoid_pair_loss_difference([learner, reference], dtype) is None, dtype
        assert sigmoid_pair_loss_difference([reference, learner], dtype) is None, dtype
        assert sigmoid_pair_loss_difference([learner], dtype) is None, dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_native_and_torch_passes_agree(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The native pass replaces only torch's stack/negate/clamp/abs; results agree to rounding. Inputs in another
    dtype than the working one (float16 here) or non-contiguous take the torch pass."""
    generator = torch.Generator().manual_seed(8)
    learner = (torch.randn(96, 96, generator=generator) * 8).to(dtype)
    reference = (torch.randn(96, 96, generator=generator) * 8).to(dtype).T
    working = torch.float64 if dtype == torch.float64 else torch.float32
    with_kernel = sigmoid_pair_loss_difference([learner, reference], working)
    contiguous = sigmoid_pair_loss_difference([learner.contiguous(), reference.contiguous()], working)
    monkeypatch.setattr(native, "KERNEL", None)
    without_kernel = sigmoid_pair_loss_difference([learner, reference], working)
    assert with_kernel is not None and without_kernel is not None and contiguous is not None
    tolerance = {"rtol": 0.0, "atol": 2e-6} if working == torch.float32 else {"rtol": 0.0, "atol": 1e-13}
    torch.testing.assert_close(with_kernel, without_kernel, **tolerance)
    torch.testing.assert_close(contiguous, without_kernel, **tolerance)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_native_prelude_writes_magnitudes_and_hinge_of_the_signed_logits(dtype: type) -> None:
    assert native.KERNEL is not None
    learner = numpy.array([[1.5, -2.0, 3.0], [4.0, -5.0, 0.5], [-0.25, 7.0, 2.0]], dtype=dtype)
    reference = numpy.array([[-1.0, 1.0, -3.0], [2.0, 6.0, -0.5], [0.0, -7.0, -2.0]], dtype=dtype)
    signed_learner = numpy.where(numpy.eye(3, dtype=bool), learner, -learner)  # z·L
    signed_reference = numpy.where(numpy.eye(3, dtype=bool), reference, -reference)
    magnitudes, hinge = numpy.empty((2, 3, 3), dtype), numpy.empty((3, 3), dtype)
    assert native.KERNEL.sigmoid_pair_prelude(learner, reference, magnitudes, hinge, 7.0) is True
    numpy.testing.assert_array_equal(magnitudes[0], numpy.abs(signed_learner))
    numpy.testing.assert_array_equal(magnitudes[1], numpy.abs(signed_reference))
    numpy.testing.assert_array_equal(hinge, numpy.minimum(signed_reference, 0) - numpy.minimum(signed_learner, 0))
    alone = numpy.empty((1, 3, 3), dtype)
    assert native.KERNEL.sigmoid_pair_prelude(learner, None, alone, hinge, 7.0) is True
    numpy.testing.assert_array_equal(alone[0], numpy.abs(signed_learner))
    numpy.testing.assert_array_equal(hinge, -numpy.minimum(signed_learner, 0))
    assert native.KERNEL.sigmoid_pair_prelude(learner, reference, magnitudes, hinge, 6.9) is False  # |7| at (2, 1)
    assert native.KERNEL.sigmoid_pair_prelude(reference, None, alone, hinge, 6.9) is False  # |-7| at (2, 1)

    with pytest.raises(TypeError, match="one dtype"):
        native.KERNEL.sigmoid_pair_prelude(learner, reference.astype(numpy.float16), magnitudes, hinge, 1.0)
    with pytest.raises(ValueError, match="magnitudes"):
        native.KERNEL.sigmoid_pair_prelude(learner, reference, alone, hinge, 1.0)
    with pytest.raises(ValueError, match="shape of first"):
        native.KERNEL.sigmoid_pair_prelude(learner, reference[:2].copy(), magnitudes, hinge, 1.0)
    with pytest.raises(ValueError, match="square"):
        native.KERNEL.sigmoid_pair_prelude(learner[:2].copy(), None, alone, hinge, 1.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        native.KERNEL.sigmoid_pair_prelude(learner.T, None, alone, hinge, 1.0)


def test_fused_pair_loss_difference_rejects_other_shapes() -> None:
    with pytest.raises(ValueError, match=r"stacked: expected \[1 or 2, B, B\]"):
        sigmoid_pair_loss_difference_(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match=r"stacked: expected \[1 or 2, B, B\]"):
        sigmoid_pair_loss_difference_(torch.zeros(2, 4, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_grad_log_is_torch_log_in_place(dtype: torch.dtype) -> None:
    values = torch.cat([torch.linspace(0.5, 2.0, 4001, dtype=dtype), torch.logspace(-30, 30, 61, dtype=dtype),
                        torch.tensor([0.0, -1.0, math.inf, math.nan], dtype=dtype)])
    expected = torch.log(values)
    result = log_no_grad_(values)
    assert result.data_ptr() == values.data_ptr()
    torch.testing.assert_close(result, expected, equal_nan=True)
    strided = torch.linspace(1.0, 3.0, 20, dtype=dtype)[::2]  # not contiguous: falls back to Tensor.log_
    expected = torch.log(strided)
    torch.testing.assert_close(log_no_grad_(strided), expected)
    torch.testing.assert_close(strided, expected)


def test_pair_losses_with_and_without_gradient_agree_and_differentiate_correctly_at_zero() -> None:
    logits = torch.tensor([[0.0, 3.0], [-2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    with_grad = sigmoid_pair_losses(logits)
    with torch.no_grad():
        torch.testing.assert_close(with_grad.detach(), sigmoid_pair_losses(logits))
    with_grad.sum().backward()
    # d/dL softplus(-L) = -sigmoid(-L) on the diagonal, d/dL softplus(L) = sigmoid(L) off it.
    expected = torch.tensor([[-0.5, torch.sigmoid(torch.tensor(3.0)).item()],
                             [torch.sigmoid(torch.tensor(-2.0)).item(), -0.5]], dtype=torch.float64)
    torch.testing.assert_close(logits.grad, expected)


def test_sigmoid_batch_loss_matches_open_clip_siglip() -> None:
    image, text = _features(7, 16, seed=2)
    ours = sigmoid_batch_loss(sigmoid_logits(image, text, SCALE, BIAS))
    theirs = SigLipLoss()(image, text, SCALE.exp(), BIAS)
    torch.testing.assert_close(ours, theirs)


def test_softmax_batch_loss_matches_open_clip_clip() -> None:
    image, text = _features(7, 16, seed=3)
    ours = softmax_batch_loss(softmax_logits(image, text, SCALE))
    theirs = ClipLoss()(image, text, SCALE.exp())
    torch.testing.assert_close(ours, theirs)


def test_batch_losses_reject_non_square_logits() -> None:
    with pytest.raises(ValueError, match=r"logits: expected a square"):
        softmax_batch_loss(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"logits: expected a square"):
        sigmoid_batch_loss(torch.zeros(3, 4))


def test_learnability_of_a_sub_batch_is_the_sum_of_pairwise_scores() -> None:
    """Σ_{i,j∈A} S_ij, S = M^θ - M^θ*, equals |A| x (learner - reference SigLIP batch loss on A)."""
    learner_image, learner_text = _features(12, 8, seed=4)
    reference_image, reference_text = _features(12, 8, seed=5)
    learner = sigmoid_logits(learner_image, learner_text, SCALE, BIAS)
    reference_scale, reference_bias = torch.tensor(2.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    reference = sigmoid_logits(reference_image, reference_text, reference_scale, reference_bias)
    scores = sigmoid_pair_losses(learner) - sigmoid_pair_losses(reference)
    for subset in ([0], [3, 7], [1, 2, 5, 9, 11], list(range(12))):
        chosen = torch.tensor(subset)
        pairwise = scores[chosen][:, chosen].sum()
        learner_loss = sigmoid_batch_loss(learner[chosen][:, chosen])
        reference_loss = sigmoid_batch_loss(reference[chosen][:, chosen])
        torch.testing.assert_close(pairwise, (learner_loss - reference_loss) * len(subset))


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_contrastive_loss_without_distributed_is_the_batch_loss(kind: str) -> None:
    image, text = _features(8, 16, seed=6)
    loss = contrastive_loss(image, text, SCALE, BIAS, kind=kind)
    if kind == "sigmoid":
        expected = sigmoid_batch_loss(sigmoid_logits(image, text, SCALE, BIAS))
    else:
        expected = softmax_batch_loss(softmax_logits(image, text, SCALE))
    torch.testing.assert_close(loss, expected)


def test_contrastive_loss_gradients_reach_features_and_temperature() -> None:
    image, text = _features(8, 16, seed=7)
    image.requires_grad_(True)
    scale = SCALE.clone().requires_grad_(True)
    bias = BIAS.clone().requires_grad_(True)
    contrastive_loss(image, text, scale, bias, kind="sigmoid").backward()
    assert image.grad is not None and torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
    assert scale.grad is not None and bias.grad is not None


def test_softmax_contrastive_loss_accepts_no_bias() -> None:
    image, text = _features(4, 8, seed=8)
    assert torch.isfinite(contrastive_loss(image, text, SCALE, None, kind="softmax"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "hinge"}, "kind: expected one of"),
        ({"kind": "sigmoid", "bias": None}, "logit_bias: required"),
        ({"kind": "softmax", "text_rows": 3}, "text: 3 texts for 4 images"),
    ],
)
def test_contrastive_loss_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    image, text = _features(4, 8, seed=9)
    text = text[: kwargs.get("text_rows", 4)]
    with pytest.raises(ValueError, match=message):
        contrastive_loss(image, text, SCALE, kwargs.get("bias", BIAS), kind=kwargs["kind"])
