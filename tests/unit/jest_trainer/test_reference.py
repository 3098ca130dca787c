"""The frozen reference: training on curated data, save/load, the restart cache, and both scoring modes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from jest_trainer import losses
from jest_trainer import reference as ref_mod
from jest_trainer.config import TrainingConfig
from jest_trainer.data import load_digits_demo
from jest_trainer.models import to_model_input
from jest_trainer.train import zero_shot_accuracy

CPU = torch.device("cpu")
# The module fixture loads the digits demo and trains a 300-step reference: 5-20 s on a busy 2-core host.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo():
    cfg = TrainingConfig()
    return load_digits_demo(cfg.data.noise, seed=0, pool_copies=1)


@pytest.fixture(scope="module")
def cfg() -> TrainingConfig:
    return TrainingConfig.model_validate({"reference": {"train": {"steps": 300, "batchSize": 64, "lr": 2e-3}}})


@pytest.fixture(scope="module")
def reference(cfg: TrainingConfig, demo) -> torch.nn.Module:
    return ref_mod.build_reference(cfg, demo.curated, image_shape=demo.pool.image_shape, device=CPU)


def _batch(model: torch.nn.Module, demo, rows: list[int]) -> SimpleNamespace:
    subset = demo.pool.subset(torch.tensor(rows))
    return SimpleNamespace(images=to_model_input(subset.images, model.image_spec),
                           tokens=model.tokenize(subset.captions), keys=[f"pool-{row}" for row in rows],
                           reference=None)


def test_reference_is_frozen_and_learns_from_the_curated_split(reference, demo) -> None:
    assert not reference.training
    assert all(not parameter.requires_grad for parameter in reference.parameters())
    accuracy = zero_shot_accuracy(reference, demo.test, demo.class_prompts, device=CPU)
    assert accuracy > 0.15  # ten classes: chance is 0.1 (300 steps only; the benchmark reports the real figure)


def test_online_scoring_embeds_the_super_batch_with_the_frozen_model(cfg, reference, demo) -> None:
    scorer = ref_mod.make_scorer(cfg, reference, input_spec=reference.image_spec)
    assert scorer.mode == "online"
    batch = _batch(reference, demo, [3, 1, 4, 1, 5])
    with torch.no_grad():
        image, text = reference.encode_image(batch.images), reference.encode_text(batch.tokens)
    sigmoid = scorer.logits(batch, loss="sigmoid")
    assert sigmoid.shape == (5, 5)
    expected = losses.sigmoid_logits(image, text, reference.logit_scale, reference.logit_bias)
    assert torch.allclose(sigmoid, expected, atol=1e-5)
    softmax = scorer.logits(batch, loss="softmax")
    assert torch.allclose(softmax, sigmoid - reference.logit_bias, atol=1e-5)


def test_precomputed_scoring_uses_the_joined_embeddings_and_never_the_model(tmp_path, reference, demo) -> None:
    cfg = TrainingConfig.model_validate({"reference": {"mode": "precomputed", "checkpoint": str(tmp_path / "r.pt"),
                                                       "embeddingsUrls": str(tmp_path / "ref-000000.tar")}})
    scorer = ref_mod.make_scorer(cfg, reference, input_spec=reference.image_spec)
    batch = _batch(reference, demo, [0, 2, 7])
    with pytest.raises(ValueError, match=r"training\.reference\.mode"):
        scorer.logits(batch, loss="sigmoid")
    image = torch.nn.functional.normalize(torch.randn(3, reference.embed_dim), dim=1)
    text = torch.nn.functional.normalize(torch.randn(3, reference.embed_dim), dim=1)
    batch.reference = (image, text)
    batch.images = torch.full_like(batch.images, float("nan"))  # the model must not be consulted
    expected = losses.sigmoid_logits(image, text, reference.logit_scale, reference.logit_bias)
    assert torch.allclose(scorer.logits(batch, loss="sigmoid"), expected)


def test_precomputed_mode_needs_sidecars_and_the_reference_checkpoint() -> None:
    with pytest.raises(ValueError, match="embeddingsUrls"):
        TrainingConfig.model_validate({"reference": {"mode": "precomputed", "checkpoint": "/r.pt"}})
    with pytest.raises(ValueError, match=r"reference\.checkpoint"):
        TrainingConfig.model_validate({"reference": {"mode": "precomputed", "embeddingsUrls": "/e.tar"}})


def test_sidecars_hold_the_online_embeddings_keyed_by_sample(tmp_path: Path, reference, demo) -> None:
    """One sidecar per data shard, named like it, keys in data order; an empty shard still gets one."""
    from types import SimpleNamespace

    import webdataset as wds

    batch = _batch(reference, demo, list(range(10)))
    shards = ["/data/pool-000000.tar", "/data/pool-000001.tar", "/data/pool-000002.tar"]
    scanned = [
        SimpleNamespace(url=shards[0], keys=batch.keys[:4], images=batch.images[:4], tokens=batch.tokens[:4]),
        SimpleNamespace(url=shards[0], keys=batch.keys[4:6], images=batch.images[4:6], tokens=batch.tokens[4:6]),
        SimpleNamespace(url=shards[1], keys=batch.keys[6:], images=batch.images[6:], tokens=batch.tokens[6:]),
    ]
    out = tmp_path / "emb"
    manifest = ref_mod.write_sidecars(reference, scanned, shards=shards, out_dir=out, input_spec=reference.image_spec)
    assert manifest["samples"] == 10 and manifest["shards"] == 3 and manifest["embedDim"] == reference.embed_dim
    assert sorted(p.name for p in out.glob("*.tar")) == ["pool-000000.tar", "pool-000001.tar", "pool-000002.tar"]
    image, text = ref_mod.embed_batch(reference, batch.images, batch.tokens)
    expected_keys = [batch.keys[:6], batch.keys[6:], []]
    for name, keys in zip(["pool-000000.tar", "pool-000001.tar", "pool-000002.tar"], expected_keys, strict=True):
        rows = list(wds.WebDataset(str(out / name), shardshuffle=False, empty_check=False).decode())
        assert [row["__key__"] for row in rows] == keys
        for row in rows:
            index = batch.keys.index(row["__key__"])
            assert torch.allclose(torch.from_numpy(row[ref_mod.SIDECAR_IMAGE_FIELD]).float(), image[index], atol=2e-3)
            assert torch.allclose(torch.from_numpy(row[ref_mod.SIDECAR_TEXT_FIELD]).float(), text[index], atol=2e-3)
    with pytest.raises(ValueError, match="share a file name"):
        ref_mod.write_sidecars(reference, [], shards=["/a/x.tar", "/b/x.tar"], out_dir=tmp_path / "dup")


def test_training_is_deterministic_for_a_seed(demo) -> None:
    short = TrainingConfig.model_validate({"reference": {"train": {"steps": 8, "batchSize": 32}}})
    first, second = (
        ref_mod.train_reference(short, demo.curated, image_shape=demo.pool.image_shape, device=CPU) for _ in range(2)
    )
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name


def test_save_and_load_round_trip(tmp_path: Path, cfg, demo, reference) -> None:
    path = tmp_path / "reference.pt"
    ref_mod.save_reference(reference, path, ref_mod.reference_model_config(cfg))
    loaded, model_config = ref_mod.load_reference(path, cfg, image_shape=demo.pool.image_shape, device=CPU)
    assert model_config == ref_mod.reference_model_config(cfg)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])
    assert all(not parameter.requires_grad for parameter in loaded.parameters())


def test_explicit_checkpoint_is_loaded_instead_of_training(tmp_path: Path, cfg, demo, reference, monkeypatch) -> None:
    path = tmp_path / "ref.pt"
    ref_mod.save_reference(reference, path, ref_mod.reference_model_config(cfg))
    monkeypatch.setattr(ref_mod, "train_reference", _must_not_train)
    with_checkpoint = cfg.model_copy(update={"reference": cfg.reference.model_copy(update={"checkpoint": str(path)})})
    loaded = ref_mod.build_reference(with_checkpoint, demo.curated, image_shape=demo.pool.image_shape, device=CPU)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])


def test_a_restart_reuses_the_cached_reference(tmp_path: Path, cfg, demo, reference, monkeypatch) -> None:
    ref_mod.save_reference(reference, tmp_path / ref_mod.REFERENCE_FILE_NAME, ref_mod.reference_model_config(cfg))
    monkeypatch.setattr(ref_mod, "train_reference", _must_not_train)
    again = ref_mod.build_reference(cfg, demo.curated, image_shape=demo.pool.image_shape, device=CPU,
                                    cache_dir=tmp_path)
    assert torch.equal(again.logit_scale, reference.logit_scale)


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
