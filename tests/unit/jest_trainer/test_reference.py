"""The frozen reference: training on curated data, cached embeddings, save/load and the restart cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from jest_trainer import losses
from jest_trainer import reference as ref_mod
from jest_trainer.config import TrainingConfig
from jest_trainer.data import load_digits_demo
from jest_trainer.train import zero_shot_accuracy

CPU = torch.device("cpu")
# The module fixture loads the digits demo and trains a 60-step reference: 5-20 s on a busy 2-core host.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo():
    cfg = TrainingConfig()
    return load_digits_demo(cfg.data.noise, seed=0, pool_copies=1)


@pytest.fixture(scope="module")
def cfg() -> TrainingConfig:
    return TrainingConfig.model_validate({"reference": {"train": {"steps": 60, "batchSize": 64, "lr": 3e-3}}})


@pytest.fixture(scope="module")
def reference(cfg: TrainingConfig, demo) -> ref_mod.ReferenceModel:
    return ref_mod.build_reference(cfg, demo, image_shape=demo.pool.image_shape, device=CPU)


def test_reference_is_frozen_and_learns_from_the_curated_split(reference, demo) -> None:
    assert not reference.model.training
    assert all(not parameter.requires_grad for parameter in reference.model.parameters())
    accuracy = zero_shot_accuracy(reference.model, demo.test, demo.class_prompts, device=CPU)
    assert accuracy > 0.15  # ten classes: chance is 0.1 (60 steps only; the benchmark reports the real figure)


def test_cached_embeddings_cover_the_pool_and_match_the_model(reference, demo) -> None:
    assert reference.image_embeddings.shape == (len(demo.pool), reference.embed_dim)
    rows = torch.tensor([0, 5, 17])
    subset = demo.pool.subset(rows)
    with torch.no_grad():
        image = reference.model.encode_image(subset.images)
        text = reference.model.encode_text(reference.model.tokenize(subset.captions))
    assert torch.allclose(reference.image_embeddings[rows], image, atol=1e-6)
    assert torch.allclose(reference.text_embeddings[rows], text, atol=1e-6)


def test_reference_logits_are_one_product_of_cached_embeddings(reference) -> None:
    rows = torch.tensor([3, 1, 4, 1, 5])
    sigmoid = reference.logits(rows, loss="sigmoid")
    expected = losses.sigmoid_logits(
        reference.image_embeddings[rows], reference.text_embeddings[rows], reference.logit_scale, reference.logit_bias
    )
    assert sigmoid.shape == (5, 5)
    assert torch.allclose(sigmoid, expected)
    softmax = reference.logits(rows, loss="softmax")
    assert torch.allclose(softmax, sigmoid - reference.logit_bias)


def test_training_is_deterministic_for_a_seed(demo) -> None:
    short = TrainingConfig.model_validate({"reference": {"train": {"steps": 8, "batchSize": 32}}})
    first, second = (
        ref_mod.train_reference(short, demo.curated, image_shape=demo.pool.image_shape, device=CPU) for _ in range(2)
    )
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name


def test_save_and_load_round_trip(tmp_path: Path, cfg, demo, reference) -> None:
    path = tmp_path / "reference.pt"
    ref_mod.save_reference(reference.model, path, ref_mod.reference_model_config(cfg))
    loaded, model_config = ref_mod.load_reference(path, cfg, image_shape=demo.pool.image_shape, device=CPU)
    assert model_config == ref_mod.reference_model_config(cfg)
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])
    assert all(not parameter.requires_grad for parameter in loaded.parameters())


def test_explicit_checkpoint_is_loaded_instead_of_training(tmp_path: Path, cfg, demo, reference, monkeypatch) -> None:
    path = tmp_path / "ref.pt"
    ref_mod.save_reference(reference.model, path, ref_mod.reference_model_config(cfg))
    monkeypatch.setattr(ref_mod, "train_reference", _must_not_train)
    with_checkpoint = cfg.model_copy(update={"reference": cfg.reference.model_copy(update={"checkpoint": str(path)})})
    loaded = ref_mod.build_reference(with_checkpoint, demo, image_shape=demo.pool.image_shape, device=CPU)
    assert torch.equal(loaded.image_embeddings, reference.image_embeddings)


def test_a_restart_reuses_the_cached_reference(tmp_path: Path, cfg, demo, reference, monkeypatch) -> None:
    ref_mod.save_reference(reference.model, tmp_path / ref_mod.REFERENCE_FILE_NAME, ref_mod.reference_model_config(cfg))
    monkeypatch.setattr(ref_mod, "train_reference", _must_not_train)
    again = ref_mod.build_reference(cfg, demo, image_shape=demo.pool.image_shape, device=CPU, cache_dir=tmp_path)
    assert torch.equal(again.text_embeddings, reference.text_embeddings)


def test_mismatched_checkpoint_names_the_field(tmp_path: Path, cfg, demo) -> None:
    path = tmp_path / "wrong.pt"
    torch.save({"model": {"nonsense": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match=r"training\.reference\.checkpoint"):
        ref_mod.load_reference(path, cfg, image_shape=demo.pool.image_shape, device=CPU)
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"training\.reference\.checkpoint"):
        ref_mod.load_reference(tmp_path / "garbage.pt", cfg, image_shape=demo.pool.image_shape, device=CPU)


def _must_not_train(*_args, **_kwargs):
    raise AssertionError("the reference must be loaded, not trained again")


def test_a_stop_request_interrupts_reference_training(demo) -> None:
    long = TrainingConfig.model_validate({"reference": {"train": {"steps": 100_000}}})
    polls = iter(range(1_000_000))
    with pytest.raises(ref_mod.ReferenceTrainingInterruptedError, match="reference step 3 "):
        ref_mod.train_reference(long, demo.curated, image_shape=demo.pool.image_shape, device=CPU,
                                should_stop=lambda: next(polls) >= 3)
