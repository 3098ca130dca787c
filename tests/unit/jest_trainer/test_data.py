"""Tests of the digits demo source and the WebDataset round trip (real scikit-learn data, real tar shards)."""

from __future__ import annotations

import io
import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from jest_trainer import data
from jest_trainer import stream as stream_mod
from jest_trainer.config import NoiseConfig, TrainingConfig
from jest_trainer.data import (
    CAPTION_TEMPLATES,
    DIGIT_WORDS,
    N_CAPTION_CLASSES,
    PairTable,
    caption,
    caption_class,
    digit_class_prompts,
    load_digits_demo,
    load_training_data,
    read_webdataset,
    shard_pattern,
    stroke_features,
    tertiles,
    write_digits_webdataset,
    write_webdataset,
)
from jest_trainer.models import hash_tokenize
from jest_trainer.preprocess import ImageTransform, PreprocessSpec
from PIL import Image

N_DIGITS_IMAGES = 1797


def _digits_named(text: str) -> set[int]:
    """Every digit a caption names, as a word or a numeral."""
    tokens = re.findall(r"[a-z0-9]+", text.lower())
    return {DIGIT_WORDS.index(t) for t in tokens if t in DIGIT_WORDS} | {int(t) for t in tokens if t.isdigit()}


@pytest.fixture(scope="module")
def demo() -> data.DigitsDemo:
    return load_digits_demo(NoiseConfig(), seed=0)


def test_same_seed_gives_identical_data_and_other_seed_differs() -> None:
    data._cached_digits_demo.cache_clear()
    first = load_digits_demo(NoiseConfig(), seed=3)
    data._cached_digits_demo.cache_clear()
    again = load_digits_demo(NoiseConfig(), seed=3)
    other = load_digits_demo(NoiseConfig(), seed=4)
    assert first is not again
    for split in ("pool", "curated", "test"):
        a, b = getattr(first, split), getattr(again, split)
        assert torch.equal(a.images, b.images)
        assert a.captions == b.captions and a.noise_kind == b.noise_kind
        assert torch.equal(a.labels, b.labels) and torch.equal(a.source_index, b.source_index)
    assert first.pool.captions != other.pool.captions
    assert not torch.equal(first.test.source_index, other.test.source_index)


def test_load_is_cached_in_process() -> None:
    assert load_digits_demo(NoiseConfig(), seed=0) is load_digits_demo(NoiseConfig(), seed=0)


def test_split_sizes_and_image_format(demo: data.DigitsDemo) -> None:
    assert len(demo.curated) == data.CURATED_SIZE
    assert abs(len(demo.test) - data.TEST_FRACTION * N_DIGITS_IMAGES) <= 10  # per-digit rounding
    n_pool_sources = N_DIGITS_IMAGES - len(demo.test) - len(demo.curated)
    assert len(demo.pool) == n_pool_sources * data.POOL_COPIES
    for table in (demo.pool, demo.curated, demo.test):
        assert table.images.dtype == torch.float32
        assert table.image_shape == (1, 8, 8)
        assert float(table.images.min()) >= 0.0 and float(table.images.max()) <= 1.0
        assert table.labels.dtype == torch.long
        assert set(table.labels.tolist()) == set(range(10))


def test_test_split_is_stratified(demo: data.DigitsDemo) -> None:
    counts = Counter(demo.test.labels.tolist())
    assert all(30 <= counts[d] <= 40 for d in range(10)), counts
    assert set(Counter(demo.curated.labels.tolist()).values()) == {30}


@pytest.mark.parametrize(
    ("noise", "copies"),
    [
        (NoiseConfig(), 8),
        (NoiseConfig(wrong=0.2, junk=0.1, duplicate=0.0), 3),
        (NoiseConfig(wrong=0.0, junk=0.0, duplicate=0.0), 1),
    ],
)
def test_pool_noise_fractions_match_config_within_rounding(noise: NoiseConfig, copies: int) -> None:
    pool = load_digits_demo(noise, seed=1, pool_copies=copies).pool
    counts = Counter(pool.noise_kind)
    assert sum(counts.values()) == len(pool)
    for kind, fraction in (("wrong", noise.wrong), ("junk", noise.junk), ("duplicate", noise.duplicate)):
        assert abs(counts[kind] - fraction * len(pool)) <= 1, (kind, counts)
    assert abs(counts["clean"] - noise.clean * len(pool)) <= 1


def test_captions_agree_with_the_recorded_noise_kind(demo: data.DigitsDemo) -> None:
    for text, label, kind in zip(demo.pool.captions, demo.pool.labels.tolist(), demo.pool.noise_kind, strict=True):
        named = _digits_named(text)
        if kind in ("clean", "duplicate"):
            assert named == {label}, (text, label)
        elif kind == "wrong":
            assert len(named) == 1 and label not in named, (text, label)
        else:
            assert kind == "junk" and not named, text
    for table in (demo.curated, demo.test):
        assert set(table.noise_kind) == {"clean"}
        assert all(_digits_named(t) == {y} for t, y in zip(table.captions, table.labels.tolist(), strict=True))


def test_curated_and_test_are_disjoint_from_the_pool_sources(demo: data.DigitsDemo) -> None:
    pool_sources = set(demo.pool.source_index.tolist())
    curated_sources = set(demo.curated.source_index.tolist())
    test_sources = set(demo.test.source_index.tolist())
    assert len(curated_sources) == len(demo.curated) and len(test_sources) == len(demo.test)
    assert not pool_sources & curated_sources
    assert not pool_sources & test_sources
    assert not curated_sources & test_sources
    assert len(pool_sources | curated_sources | test_sources) == N_DIGITS_IMAGES


def test_duplicates_are_perturbed_copies_of_a_few_images_with_one_caption_each(demo: data.DigitsDemo) -> None:
    is_dup = torch.tensor([k == "duplicate" for k in demo.pool.noise_kind])
    dup = demo.pool.subset(torch.nonzero(is_dup).flatten())
    sources = dup.source_index.tolist()
    assert len(set(sources)) == math.ceil(len(dup) / data.DUPLICATES_PER_SOURCE)
    captions_by_source: dict[int, set[str]] = {}
    for source, text in zip(sources, dup.captions, strict=True):
        captions_by_source.setdefault(source, set()).add(text)
    assert all(len(texts) == 1 for texts in captions_by_source.values())
    originals, _ = data._load_digit_images()
    difference = (dup.images - originals[dup.source_index]).abs()
    assert float(difference.max()) < 0.15  # light perturbation
    assert float(difference.mean()) > 0.0  # but not exact copies


def test_pool_is_augmented_not_copied(demo: data.DigitsDemo) -> None:
    originals, _ = data._load_digit_images()
    unique = torch.nonzero(torch.tensor([k != "duplicate" for k in demo.pool.noise_kind])).flatten()
    table = demo.pool.subset(unique)
    source_counts = Counter(table.source_index.tolist())
    assert max(source_counts.values()) - min(source_counts.values()) <= 1  # sources used evenly
    same = (table.images == originals[table.source_index]).flatten(1).all(dim=1)
    assert int(same.sum()) == 0


def test_there_are_90_caption_classes_and_the_data_realises_almost_all() -> None:
    assert N_CAPTION_CLASSES == 90
    classes = {caption_class(d, t, s) for d in range(10) for t in range(3) for s in range(3)}
    assert classes == set(range(90))
    for template in range(len(CAPTION_TEMPLATES)):
        assert len({caption(d, t, s, template) for d in range(10) for t in range(3) for s in range(3)}) == 90
    images, labels = data._load_digit_images()
    mass, shear = stroke_features(images)
    thickness, slant = tertiles(mass), tertiles(shear)
    realised = {caption_class(int(d), int(t), int(s)) for d, t, s in zip(labels, thickness, slant, strict=True)}
    # tertiles are dataset-wide, so a few combinations (e.g. a "7" slanted left) do not occur: 84 of 90 do
    assert len(realised) >= 80


def test_class_prompts_cover_each_digit_in_every_variant(demo: data.DigitsDemo) -> None:
    assert len(demo.class_prompts) == 10
    for digit, prompts in enumerate(demo.class_prompts):
        assert len(set(prompts)) == len(CAPTION_TEMPLATES) * 9
        assert all(_digits_named(p) == {digit} for p in prompts)
    assert demo.class_prompts == digit_class_prompts()


def test_stroke_features_measure_thickness_and_slant() -> None:
    canvas = torch.zeros(3, 1, 8, 8)
    for row in range(8):
        canvas[0, 0, row, 3] = 1.0  # thin vertical stroke
        canvas[1, 0, row, 3:5] = 1.0  # thick vertical stroke
        canvas[2, 0, row, 7 - row] = 1.0  # leans right: top of the stroke is further right
    mass, shear = stroke_features(canvas)
    assert mass[1] > mass[0]
    assert abs(float(shear[0])) < 1e-9 and shear[2] > 0.5
    assert tertiles(torch.arange(9.0)).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_pair_table_rejects_misaligned_columns_naming_the_field() -> None:
    with pytest.raises(ValueError, match="captions"):
        PairTable(torch.zeros(2, 1, 8, 8), ["a"], torch.zeros(2, dtype=torch.long), ["clean", "clean"])
    with pytest.raises(ValueError, match="images"):
        PairTable(torch.zeros(2, 8, 8), ["a", "b"], torch.zeros(2, dtype=torch.long), ["clean", "clean"])


def test_subset_keeps_rows_aligned(demo: data.DigitsDemo) -> None:
    index = torch.tensor([5, 0, 5])
    part = demo.test.subset(index)
    assert len(part) == 3
    assert part.captions == [demo.test.captions[5], demo.test.captions[0], demo.test.captions[5]]
    assert torch.equal(part.images[1], demo.test.images[0])
    assert torch.equal(part.source_index, demo.test.source_index[index])


def test_webdataset_round_trip_over_several_shards(tmp_path: Path, demo: data.DigitsDemo) -> None:
    table = demo.pool.subset(torch.arange(150))
    paths = write_webdataset(table, tmp_path, prefix="pool", shard_size=64)
    assert [p.name for p in paths] == ["pool-000000.tar", "pool-000001.tar", "pool-000002.tar"]
    pattern = shard_pattern(paths)
    assert pattern == str(tmp_path / "pool-{000000..000002}.tar")
    back = read_webdataset(pattern)
    assert back.captions == table.captions
    assert torch.equal(back.labels, table.labels)
    assert back.noise_kind == table.noise_kind
    assert back.images.shape == table.images.shape
    assert float((back.images - table.images).abs().max()) <= 0.5 / 255 + 1e-6  # PNG 8-bit quantisation
    rewritten = write_webdataset(table, tmp_path / "again", prefix="pool", shard_size=64)
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(paths, rewritten, strict=True))


def test_webdataset_rgb_and_minimal_samples(tmp_path: Path) -> None:
    import webdataset as wds

    rgb = PairTable(torch.rand(3, 3, 5, 4), ["a", "b", "c"], torch.tensor([0, 1, 2]), ["clean"] * 3)
    back = read_webdataset(str(write_webdataset(rgb, tmp_path, prefix="rgb")[0]))
    assert back.image_shape == (3, 5, 4)
    assert float((back.images - rgb.images).abs().max()) <= 0.5 / 255 + 1e-6

    buffer = io.BytesIO()
    Image.new("L", (8, 8), color=255).save(buffer, format="JPEG")
    with wds.TarWriter(str(tmp_path / "web-000000.tar")) as writer:
        writer.write({"__key__": "x0", "jpg": buffer.getvalue(), "txt": "  a scraped caption\n"})
    minimal = read_webdataset(str(tmp_path / "web-000000.tar"))
    assert minimal.captions == ["a scraped caption"]
    assert minimal.labels.tolist() == [-1] and minimal.noise_kind == [data.UNKNOWN_NOISE]
    with pytest.raises(ValueError, match="cls"):
        data.class_prompts_from_table(minimal)


def test_read_webdataset_names_missing_shards(tmp_path: Path, demo: data.DigitsDemo) -> None:
    write_webdataset(demo.test.subset(torch.arange(3)), tmp_path, prefix="pool")
    with pytest.raises(ValueError, match=r"urls: shard .*pool-000001\.tar"):
        read_webdataset(str(tmp_path / "pool-{000000..000001}.tar"))


def test_digits_shards_feed_load_training_data(tmp_path: Path) -> None:
    noise = NoiseConfig(wrong=0.3, junk=0.2, duplicate=0.1)
    written = write_digits_webdataset(tmp_path, noise=noise, seed=2, shard_size=500, pool_copies=1)
    demo = load_digits_demo(noise, seed=2, pool_copies=1)
    assert len(written["pool"]) == math.ceil(len(demo.pool) / 500)
    cfg = TrainingConfig.model_validate(
        {
            "seed": 2,
            "data": {
                "source": "webdataset",
                "urls": shard_pattern(written["pool"]),
                "evalUrls": shard_pattern(written["test"]),
            },
            "reference": {"train": {"urls": shard_pattern(written["curated"])}},
        }
    )
    loaded = load_training_data(cfg)
    assert loaded.class_prompts == digit_class_prompts()
    for split in ("pool", "curated", "test"):
        ours, theirs = getattr(loaded, split), getattr(demo, split)
        assert ours.captions == theirs.captions and ours.noise_kind == theirs.noise_kind
        assert torch.equal(ours.labels, theirs.labels)
    (tmp_path / data.CLASS_PROMPTS_FILE).unlink()
    fallback = load_training_data(cfg).class_prompts
    assert len(fallback) == 10
    assert all(set(p) <= set(digit_class_prompts()[d]) for d, p in enumerate(fallback))

    with_checkpoint = cfg.model_copy(update={"reference": cfg.reference.model_copy(update={"checkpoint": "r.pt"})})
    assert len(load_training_data(with_checkpoint).curated) == 0
    no_eval = cfg.model_copy(update={"data": cfg.data.model_copy(update={"eval_urls": None})})
    with pytest.raises(ValueError, match=r"data\.evalUrls"):
        load_training_data(no_eval)
    no_curated = cfg.model_copy(update={"reference": cfg.reference.model_copy(update={"train": None})})
    with pytest.raises(ValueError, match=r"reference\.train\.urls"):
        load_training_data(no_curated)


def test_load_training_data_digits_uses_the_seed_and_noise() -> None:
    cfg = TrainingConfig.model_validate({"seed": 5, "data": {"noise": {"wrong": 0.1, "junk": 0.1, "duplicate": 0.1}}})
    assert load_training_data(cfg) is load_digits_demo(NoiseConfig(wrong=0.1, junk=0.1, duplicate=0.1), seed=5)


# --------------------------------------------------------------------------------------------------
# The digits demo behind the streaming interface
# --------------------------------------------------------------------------------------------------


def _grey_transform() -> ImageTransform:
    return ImageTransform(PreprocessSpec(size=8, mean=(0.5,), std=(0.5,), channels=1))


def test_digits_stream_reads_the_demo_pool_in_its_seeded_order(demo: data.DigitsDemo) -> None:
    cfg = TrainingConfig()
    transform = _grey_transform()
    def open_rank(rank: int, world: int = 2) -> data.TrainStream:
        return data.open_train_stream(
            cfg, rank=rank, world_size=world, local_super_batch=40, transform=transform, tokenizer=hash_tokenize
        )

    streams = [open_rank(r) for r in range(2)]
    share = stream_mod.shard_indices(len(demo.pool), world_size=2, rank=1, seed=0)
    for step in range(3):
        batches = [next(s) for s in streams]
        rows = share[stream_mod.super_batch_positions(len(share), local_super_batch=40, step=step, seed=0, rank=1)]
        assert batches[1].keys == [f"digits-{i}" for i in rows.tolist()]
        assert torch.equal(batches[1].images, (demo.pool.images[rows] - 0.5) / 0.5)
        assert torch.equal(batches[1].tokens, hash_tokenize([demo.pool.captions[i] for i in rows.tolist()]))
        assert batches[1].noise_kind == [demo.pool.noise_kind[i] for i in rows.tolist()]
        assert torch.equal(batches[1].labels, demo.pool.labels[rows])
        assert not set(batches[0].keys) & set(batches[1].keys)  # ranks read disjoint shares
    state = streams[1].state_dict()
    again = open_rank(1)
    again.load_state_dict(state)
    assert next(again).keys == next(streams[1]).keys
    with pytest.raises(ValueError, match="world size"):
        open_rank(0, world=1).load_state_dict(state)


def test_digits_curated_stream_eval_set_and_input_shape(demo: data.DigitsDemo) -> None:
    cfg = TrainingConfig()
    transform = _grey_transform()
    curated = data.open_curated_stream(cfg, rank=0, world_size=1, batch_size=64, transform=transform,
                                       tokenizer=hash_tokenize)  # fmt: skip
    assert curated is not None
    batch = next(curated)
    assert all(k.startswith("curated-") for k in batch.keys) and set(batch.noise_kind) == {"clean"}
    assert data.open_curated_stream(TrainingConfig.model_validate({"reference": {"checkpoint": "/x.pt"}}), rank=0,
                                    world_size=1, batch_size=8, transform=transform, tokenizer=hash_tokenize) is None
    full = data.load_eval_set(cfg, transform=transform, tokenizer=hash_tokenize)
    assert len(full) == len(demo.test) and full.class_prompts == demo.class_prompts and full.has_labels
    assert torch.equal(full.images, (demo.test.images - 0.5) / 0.5)
    assert len(data.load_eval_set(cfg, transform=transform, tokenizer=hash_tokenize, max_samples=50)) == 50
    assert data.model_input_shape(cfg) == (1, 8, 8)
    shards = TrainingConfig.model_validate(
        {"data": {"source": "webdataset", "urls": "/x.tar"}, "model": {"imageSize": 32}}
    )
    assert data.model_input_shape(shards) == (3, 32, 32)
