"""bench/real_data_shards.py writes the emoji data set as the trainer reads it.

The font comes from Debian's ``fonts-noto-color-emoji`` (``make test`` installs it, like Prometheus).
Checked: exact noise counts, what each noise kind's caption says, duplicates, labels, byte-for-byte
reproducibility, and that the trainer's own eval reader takes the test split with its class prompts.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from bench import real_data_shards as rds

pytestmark = pytest.mark.skipif(
    not rds.DEFAULT_FONT.is_file(), reason=f"needs {rds.FONT_PACKAGE} (make test installs it)"
)


def read(pattern_or_path: str) -> list[dict]:
    from webdataset.shardlists import expand_urls

    return list(wds.WebDataset(list(expand_urls(pattern_or_path)), shardshuffle=False, empty_check=False))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("emoji")
    manifest = rds.build(out, n_classes=6, pool_per_class=40, curated_per_class=2, test_per_class=3, seed=3,
                         shard_size=100)  # fmt: skip
    return out, manifest


def test_the_font_draws_distinct_named_colour_glyphs() -> None:
    classes = rds.load_classes(rds.DEFAULT_FONT, 100)
    assert len(classes) == 100
    assert len({item.name for item in classes}) == 100 and all(item.name == item.name.lower() for item in classes)
    for item in classes[:10]:
        colours = [colour for _, colour in item.glyph.convert("RGB").getcolors(maxcolors=1_000_000) or []]
        assert len(colours) >= 8  # a picture, not a one-colour notdef box
        assert any(max(colour) - min(colour) > 60 for colour in colours)  # in colour, not grey


def test_pool_noise_counts_and_captions(built: tuple[Path, dict]) -> None:
    _, manifest = built
    names = [item["name"] for item in manifest["classes"]]
    pool = read(manifest["urls"]["pool"])
    assert len(pool) == manifest["sizes"]["pool"] == 240
    kinds = [sample["noise"].decode() for sample in pool]
    assert {kind: kinds.count(kind) for kind in set(kinds)} == {"wrong": 120, "junk": 36, "duplicate": 36, "clean": 48}
    by_caption: dict[str, set[str]] = {}
    for sample in pool:
        label, text, kind = int(sample["cls"]), sample["txt"].decode(), sample["noise"].decode()
        named = [name for name in names if name in text]
        if kind in ("clean", "duplicate"):
            assert names[label] in text
        elif kind == "wrong":
            assert named and names[label] not in named
        else:
            assert not named
        if kind == "duplicate":
            by_caption.setdefault(text, set()).add(hashlib.sha1(sample["jpg"]).hexdigest())
    assert len(by_caption) == 1  # 36 duplicates = one source picture (64 per source) with one caption
    assert len(next(iter(by_caption.values()))) > 30  # ... lightly perturbed, not byte copies
    picture = Image.open(io.BytesIO(pool[0]["jpg"]))
    assert (picture.format, picture.mode, picture.size) == ("JPEG", "RGB", (rds.FRAME_WIDTH, rds.FRAME_HEIGHT))
    assert len({sample["__key__"] for sample in pool}) == 240


def test_curated_and_test_are_clean_and_labelled(built: tuple[Path, dict]) -> None:
    out, manifest = built
    names = [item["name"] for item in manifest["classes"]]
    for split, per_class in (("curated", 2), ("test", 3)):
        samples = read(manifest["urls"][split])
        labels = sorted(int(sample["cls"]) for sample in samples)
        assert labels == sorted(list(range(6)) * per_class)
        assert all(sample["noise"] == b"clean" and names[int(sample["cls"])] in sample["txt"].decode()
                   for sample in samples)  # fmt: skip
    prompts = json.loads((out / "test" / "class_prompts.json").read_text())
    assert prompts == rds.class_prompts(names)


def test_shards_are_reproducible(built: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = built
    again = rds.build(tmp_path, n_classes=6, pool_per_class=40, curated_per_class=2, test_per_class=3, seed=3,
                      shard_size=100)  # fmt: skip
    for first in sorted(out.glob("*/*.tar")):
        second = tmp_path / first.parent.name / first.name
        assert first.read_bytes() == second.read_bytes(), first.name
    assert again["classes"] == json.loads((out / "manifest.json").read_text())["classes"]


def test_the_trainer_reads_the_test_split_with_its_prompts(built: tuple[Path, dict]) -> None:
    from jest_trainer.config import TrainingConfig
    from jest_trainer.data import load_eval_set
    from jest_trainer.models import hash_tokenize
    from jest_trainer.preprocess import build_image_transform

    _, manifest = built
    cfg = TrainingConfig.model_validate({"model": {"arch": "tiny", "imageSize": 64},
                                         "data": {"source": "webdataset", "urls": manifest["urls"]["pool"],
                                                  "evalUrls": manifest["urls"]["test"]}})  # fmt: skip
    eval_set = load_eval_set(cfg, transform=build_image_transform(cfg.model, cfg.data, train=False),
                             tokenizer=hash_tokenize)  # fmt: skip
    assert tuple(eval_set.images.shape) == (18, 3, 64, 64) and eval_set.skipped == {}
    assert eval_set.class_prompts == rds.class_prompts([item["name"] for item in manifest["classes"]])


def test_bad_arguments_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--pool-per-class"):
        rds.build(tmp_path, pool_per_class=0)
    with pytest.raises(FileNotFoundError, match=rds.FONT_PACKAGE):
        rds.load_classes(tmp_path / "missing.ttf", 10)
    assert rds.main(["--out", str(tmp_path), "--font", str(tmp_path / "missing.ttf")]) == 2
