"""Write a real image-text data set to WebDataset shards: Noto Color Emoji glyphs captioned with their names.

Why this data set: the benchmark needs real pictures with real captions that a package registry ships,
so that no network, hub or generator of ours is involved. Debian's ``fonts-noto-color-emoji`` holds
colour bitmaps (CBDT, drawn by people, 136 x 128 px at size 109) of some 1,400 single-code-point emoji,
and every one has an official name in the Unicode Character Database (``unicodedata.name``, Python's
stdlib): "dog face", "hot pepper", "fire engine". Those are natural-ish RGB images (shading, outlines,
many colours, varied shapes) with short human-written captions, unlike the digits demo's zero background.
The font itself is not copied into the repo; this script renders it on the user's machine.

Splits, with ``--classes`` C emoji (default 100, spread evenly over the pictographic blocks):

* ``pool/``: the noisy training pool, ``--pool-per-class`` augmented renders per class (default 80), with
  caption noise mixed in the way the digits demo pool does it (``jest_trainer.data``): ``wrong`` (50 %)
  the name of another class, ``junk`` (15 %) unrelated shopping/web words, ``duplicate`` (15 %) many
  lightly perturbed copies of a few renders (one source per 64 copies) with their correct caption, the
  rest ``clean``. Every sample records its kind in ``.noise`` and its true class in ``.cls``.
* ``curated/``: ``--curated-per-class`` clean, independently augmented renders per class (the reference's data).
* ``test/``: ``--test-per-class`` clean renders per class with ``.cls`` labels, plus ``class_prompts.json``
  (every caption template of every class name) for zero-shot classification.

Each render: the glyph's alpha-cropped bitmap scaled to 45-80 % of the frame, rotated by up to 20 degrees,
placed at a random position inside the central square of an 88 x 72 frame on a random light background
colour, with brightness jitter and pixel noise, saved as JPEG (quality 90). The 88 x 72 frame makes the
trainer's preprocessing resize and centre crop to ``model.imageSize``. Everything is seeded (``--seed``);
shards are byte-for-byte reproducible (fixed tar mtime).

Usage: ``python bench/real_data_shards.py --out /tmp/emoji`` (``make bench-real-data`` installs the font).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DEFAULT_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_PACKAGE = "fonts-noto-color-emoji"
CBDT_SIZE = 109  # the only size the font's colour bitmaps exist at
# pictographic blocks with single-code-point emoji: misc symbols & pictographs, transport, supplemental
PICTOGRAPH_RANGES: tuple[tuple[int, int], ...] = ((0x1F300, 0x1F5FF), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF))
FRAME_WIDTH, FRAME_HEIGHT = 88, 72
JPEG_QUALITY = 90
NOISE_MIX: dict[str, float] = {"wrong": 0.5, "junk": 0.15, "duplicate": 0.15}
DUPLICATES_PER_SOURCE = 64
DUPLICATE_NOISE = 0.02
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{name}",
    "an emoji of a {name}",
    "a {name} icon",
    "a small picture of a {name}",
    "the {name} emoji",
)


@dataclass(frozen=True)
class EmojiClass:
    """One class: its code point, its Unicode name (lower case) and its alpha-cropped RGBA glyph."""

    codepoint: int
    name: str
    glyph: Image.Image


def caption(name: str, template: int) -> str:
    """The caption of a class name in one template."""
    return CAPTION_TEMPLATES[template].format(name=name)


def class_prompts(names: Sequence[str]) -> list[list[str]]:
    """Zero-shot prompts per class: the name in every template (what ``class_prompts.json`` holds)."""
    return [[caption(name, template) for template in range(len(CAPTION_TEMPLATES))] for name in names]


def largest_remainder(total: int, fractions: Sequence[float]) -> list[int]:
    """Integer counts summing to ``total`` whose shares are closest to ``fractions`` (which sum to 1)."""
    raw = [total * fraction for fraction in fractions]
    counts = [math.floor(value) for value in raw]
    for index in sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[index] += 1
    return counts


def render_glyph(font: ImageFont.FreeTypeFont, codepoint: int) -> Image.Image | None:
    """The colour glyph of ``codepoint`` cropped to its alpha box, or None when the font has no picture for it."""
    canvas = Image.new("RGBA", (CBDT_SIZE * 2, CBDT_SIZE * 2), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), chr(codepoint), font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    pixels = np.asarray(glyph.convert("RGB"), dtype=np.int16)
    if glyph.width < 32 or glyph.height < 32 or int(pixels.std()) < 8:  # notdef boxes and blank glyphs
        return None
    return glyph


def load_classes(font_path: Path, n_classes: int) -> list[EmojiClass]:
    """``n_classes`` emoji spread evenly (by code point) over the pictographic blocks the font draws.

    Raises ``FileNotFoundError`` naming the Debian package when the font is missing.
    """
    if not font_path.is_file():
        raise FileNotFoundError(f"--font: {font_path} does not exist (apt-get install -y {FONT_PACKAGE})")
    font = ImageFont.truetype(str(font_path), CBDT_SIZE)
    candidates: list[tuple[int, str]] = []
    names_seen: set[str] = set()
    for low, high in PICTOGRAPH_RANGES:
        for codepoint in range(low, high + 1):
            name = unicodedata.name(chr(codepoint), "").lower()
            if not name or name in names_seen or unicodedata.category(chr(codepoint)) != "So":
                continue
            candidates.append((codepoint, name))
            names_seen.add(name)
    stride = max(1, len(candidates) // (n_classes * 2))
    chosen: list[EmojiClass] = []
    drawable = []
    for codepoint, name in candidates[::stride]:
        glyph = render_glyph(font, codepoint)
        if glyph is not None:
            drawable.append(EmojiClass(codepoint=codepoint, name=name, glyph=glyph))
    if len(drawable) < n_classes:
        raise ValueError(f"--classes: the font draws only {len(drawable)} usable emoji at this spacing")
    picks = np.linspace(0, len(drawable) - 1, n_classes).round().astype(int)
    chosen = [drawable[i] for i in picks]
    return chosen


def augmented_render(glyph: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """One ``FRAME_HEIGHT x FRAME_WIDTH x 3`` float render of a glyph in [0, 1] (see the module docstring)."""
    background = tuple(int(value) for value in rng.integers(170, 256, size=3))
    frame = Image.new("RGB", (FRAME_WIDTH, FRAME_HEIGHT), background)
    side = FRAME_HEIGHT
    target = int(side * rng.uniform(0.45, 0.8))
    scale = target / max(glyph.width, glyph.height)
    picture = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))), Image.LANCZOS)
    picture = picture.rotate(float(rng.uniform(-20, 20)), resample=Image.BICUBIC, expand=True)
    left0 = (FRAME_WIDTH - side) // 2
    x = left0 + int(rng.integers(0, max(1, side - picture.width + 1)))
    y = int(rng.integers(0, max(1, side - picture.height + 1)))
    frame.paste(picture, (x, y), picture)
    pixels = np.asarray(frame, dtype=np.float32) / 255.0
    pixels = pixels * rng.uniform(0.85, 1.1) + rng.normal(0.0, 0.02, size=pixels.shape)
    return np.clip(pixels, 0.0, 1.0)


def encode_jpeg(pixels: np.ndarray) -> bytes:
    """JPEG bytes (quality ``JPEG_QUALITY``) of a float RGB image in [0, 1]."""
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255.0).round().astype(np.uint8), mode="RGB").save(buffer, format="JPEG",
                                                                                 quality=JPEG_QUALITY)
    return buffer.getvalue()


def junk_caption(rng: np.random.Generator) -> str:
    """Unrelated web text (the digits pool's junk words)."""
    from jest_trainer.data import JUNK_WORDS

    words = rng.choice(len(JUNK_WORDS), size=int(rng.integers(3, 7)), replace=False)
    return " ".join(JUNK_WORDS[i] for i in words)


@dataclass
class Sample:
    """One pair before encoding: image bytes, caption, true class, noise kind."""

    jpg: bytes
    txt: str
    cls: int
    noise: str


def clean_split(classes: Sequence[EmojiClass], per_class: int, rng: np.random.Generator) -> list[Sample]:
    """``per_class`` clean, independently augmented renders of every class, shuffled."""
    samples = []
    for label, item in enumerate(classes):
        for _ in range(per_class):
            image = encode_jpeg(augmented_render(item.glyph, rng))
            samples.append(Sample(image, caption(item.name, int(rng.integers(len(CAPTION_TEMPLATES)))), label, "clean"))
    return [samples[i] for i in rng.permutation(len(samples))]


def noisy_pool(classes: Sequence[EmojiClass], per_class: int, rng: np.random.Generator,
               mix: dict[str, float] | None = None) -> list[Sample]:  # fmt: skip
    """The noisy pool: exact noise counts by largest remainder, duplicates of a few renders, shuffled."""
    mix = dict(NOISE_MIX if mix is None else mix)
    clean_share = 1.0 - sum(mix.values())
    if clean_share < -1e-9:
        raise ValueError(f"noise mix {mix}: the fractions exceed 1")
    total = len(classes) * per_class
    n_wrong, n_junk, n_duplicate, n_clean = largest_remainder(
        total, [mix["wrong"], mix["junk"], mix["duplicate"], max(0.0, clean_share)]
    )
    n_unique = total - n_duplicate
    labels = np.resize(np.arange(len(classes)), n_unique)[rng.permutation(n_unique)]
    kinds = np.array(["wrong"] * n_wrong + ["junk"] * n_junk + ["clean"] * n_clean)[rng.permutation(n_unique)]
    samples: list[Sample] = []
    for label, kind in zip(labels.tolist(), kinds.tolist(), strict=True):
        pixels = augmented_render(classes[label].glyph, rng)
        if kind == "junk":
            text = junk_caption(rng)
        else:
            named = label if kind == "clean" else (label + int(rng.integers(1, len(classes)))) % len(classes)
            text = caption(classes[named].name, int(rng.integers(len(CAPTION_TEMPLATES))))
        samples.append(Sample(encode_jpeg(pixels), text, label, kind))
    n_sources = max(1, math.ceil(n_duplicate / DUPLICATES_PER_SOURCE)) if n_duplicate else 0
    for source in range(n_sources):
        label = int(rng.integers(len(classes)))
        base = augmented_render(classes[label].glyph, rng)
        text = caption(classes[label].name, int(rng.integers(len(CAPTION_TEMPLATES))))
        copies = min(DUPLICATES_PER_SOURCE, n_duplicate - source * DUPLICATES_PER_SOURCE)
        for _ in range(copies):
            pixels = np.clip(base + rng.normal(0.0, DUPLICATE_NOISE, size=base.shape), 0.0, 1.0)
            samples.append(Sample(encode_jpeg(pixels), text, label, "duplicate"))
    return [samples[i] for i in rng.permutation(len(samples))]


def write_shards(samples: Sequence[Sample], out_dir: Path, *, prefix: str, shard_size: int) -> list[Path]:
    """``<out_dir>/<prefix>-NNNNNN.tar`` shards (jpg, txt, cls, noise; keys ``<prefix>-<row:08d>``)."""
    import webdataset as wds

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, len(samples), shard_size)):
        path = out_dir / f"{prefix}-{shard:06d}.tar"
        with open(path, "wb") as stream, wds.TarWriter(stream, mtime=0.0) as writer:
            for row in range(start, min(start + shard_size, len(samples))):
                sample = samples[row]
                writer.write({"__key__": f"{prefix}-{row:08d}", "jpg": sample.jpg, "txt": sample.txt,
                              "cls": str(sample.cls), "noise": sample.noise})  # fmt: skip
        paths.append(path)
    return paths


def pattern(paths: Sequence[Path]) -> str:
    """The brace pattern of consecutive shards written by ``write_shards``."""
    if len(paths) == 1:
        return str(paths[0])
    stem = paths[0].name.rsplit("-", 1)[0]
    return str(paths[0].parent / f"{stem}-{{000000..{len(paths) - 1:06d}}}.tar")


def build(out: Path, *, font: Path = DEFAULT_FONT, n_classes: int = 100, pool_per_class: int = 80,
          curated_per_class: int = 8, test_per_class: int = 5, seed: int = 0,
          shard_size: int = 1000) -> dict[str, object]:  # fmt: skip
    """Write the three splits under ``out`` and ``out/manifest.json``; returns the manifest."""
    for name, value in (("--classes", n_classes), ("--pool-per-class", pool_per_class),
                        ("--curated-per-class", curated_per_class), ("--test-per-class", test_per_class),
                        ("--shard-size", shard_size)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")
    if n_classes < 2:
        raise ValueError(f"--classes: need at least 2 classes, got {n_classes}")
    classes = load_classes(font, n_classes)
    rng = np.random.default_rng(seed)
    pool = noisy_pool(classes, pool_per_class, np.random.default_rng(rng.integers(2**63)))
    curated = clean_split(classes, curated_per_class, np.random.default_rng(rng.integers(2**63)))
    test = clean_split(classes, test_per_class, np.random.default_rng(rng.integers(2**63)))
    out = Path(out)
    urls = {
        "pool": pattern(write_shards(pool, out / "pool", prefix="pool", shard_size=shard_size)),
        "curated": pattern(write_shards(curated, out / "curated", prefix="curated", shard_size=shard_size)),
        "test": pattern(write_shards(test, out / "test", prefix="test", shard_size=shard_size)),
    }
    names = [item.name for item in classes]
    (out / "test" / "class_prompts.json").write_text(json.dumps(class_prompts(names), indent=1) + "\n")
    kinds = [sample.noise for sample in pool]
    manifest: dict[str, object] = {
        "source": f"{font} (Debian package {FONT_PACKAGE}), names from unicodedata {unicodedata.unidata_version}",
        "seed": seed,
        "classes": [{"codepoint": f"U+{item.codepoint:04X}", "name": item.name} for item in classes],
        "sizes": {"pool": len(pool), "curated": len(curated), "test": len(test)},
        "pool_mix": {kind: kinds.count(kind) / len(kinds) for kind in ("clean", "wrong", "junk", "duplicate")},
        "urls": urls,
        "frame": [FRAME_WIDTH, FRAME_HEIGHT],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """CLI (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True, help="directory of the pool/, curated/, test/ shards")
    parser.add_argument("--font", type=Path, default=DEFAULT_FONT, help=f"NotoColorEmoji.ttf (default {DEFAULT_FONT})")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--pool-per-class", type=int, default=80)
    parser.add_argument("--curated-per-class", type=int, default=8)
    parser.add_argument("--test-per-class", type=int, default=5)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        manifest = build(args.out, font=args.font, n_classes=args.classes, pool_per_class=args.pool_per_class,
                         curated_per_class=args.curated_per_class, test_per_class=args.test_per_class,
                         seed=args.seed, shard_size=args.shard_size)  # fmt: skip
    except (FileNotFoundError, ValueError) as error:
        print(f"real_data_shards: {error}", file=sys.stderr)
        return 2
    print(json.dumps({key: manifest[key] for key in ("sizes", "pool_mix", "urls")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
