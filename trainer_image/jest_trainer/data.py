"""Image-text pair data: the built-in digits demo source and WebDataset (tar shard) I/O.

Why a built-in source: JEST only shows its value on *noisy* web-like data with a small *clean* curated
set for the reference model. scikit-learn ships 1,797 real 8x8 handwritten digits inside its wheel
(``load_digits``, no network), so this module turns them into a miniature web-scale curation problem:

* **Captions are fine-grained** so the task is not trivial: digit x stroke-thickness tertile x slant
  tertile = 90 caption classes (``N_CAPTION_CLASSES``), written with several templates. Thickness is
  the total ink mass of the image and slant the intensity-weighted shear ``-cov(x, y) / var(y)``;
  both are cut into tertiles over the whole dataset (so some digits are mostly one tertile: e.g. a
  "7" is almost always "slanted right").
* **Splits** (stratified by digit, deterministic for a seed): ~20 % test (``TEST_FRACTION``),
  ``CURATED_SIZE`` = 300 clean curated pairs for the reference, and the remaining ~1,138 source
  images feed the noisy **pool**.
* **The pool is enlarged** ``pool_copies`` times (default 8 -> ~9,100 pairs) by light augmentation
  (random pixel shift of at most one pixel with zero fill, Gaussian pixel noise sigma 0.05, clamped to
  [0, 1]) so that a few hundred training steps of 64 examples do not memorise it.
* **Noise mimics web data** with exact counts from ``NoiseConfig`` (largest-remainder rounding):
  ``wrong`` = correct thickness/slant but a wrong digit; ``junk`` = unrelated text; ``duplicate`` =
  lightly perturbed copies (pixel noise sigma 0.02, no shift) of a *few* source images (about one
  source image per 64 duplicates), each carrying that image's correct caption; the rest is ``clean``.
  Every example's kind is recorded in ``PairTable.noise_kind``; ``labels`` always hold the *true*
  digit of the image (not the digit the caption claims).

WebDataset is the LAION/DataComp layout: ``<key>.jpg|png|webp`` + ``<key>.txt`` with optional
``<key>.cls`` (integer class) and ``<key>.noise`` (noise kind).

**What the training loop uses** (the streaming interface): ``open_train_stream`` / ``open_curated_stream``
return a ``TrainStream`` of per-rank super-batches — a ``ShardStream`` over shards (``jest_trainer.stream``:
split by rank and loader worker, shuffle buffer, decoding in workers, broken samples skipped and
counted, exact resume cursor) or a ``TableStream`` over the digits tables; ``load_eval_set`` returns a
bounded ``EvalSet``; ``ShardScanner`` walks shards in order for ``jestctl score``. ``read_webdataset`` and
``load_training_data`` are the older whole-table readers (every sample in memory), kept for small tools.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from jest_trainer.config import NoiseConfig, TrainingConfig
from jest_trainer.stream import (
    DataQualityError,
    EvalReader,
    ImageTransformLike,
    ShardStream,
    StreamSpec,
    SuperBatch,
    TableStream,
    Tokenizer,
    TrainStream,
    check_skip_fraction,
    mixed_seed,
    skip_summary,
)

NOISE_KINDS: tuple[str, ...] = ("clean", "wrong", "junk", "duplicate")
UNKNOWN_NOISE = "unknown"  # noise kind of WebDataset samples without a ``.noise`` field
DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THICKNESS_WORDS: tuple[str, ...] = ("thin", "medium", "thick")
SLANT_WORDS: tuple[str, ...] = ("slanted left", "upright", "slanted right")
N_CAPTION_CLASSES = len(DIGIT_WORDS) * len(THICKNESS_WORDS) * len(SLANT_WORDS)  # 90
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a handwritten {word} with {thickness} strokes, {slant}",
    "a photo of the digit {numeral}, {thickness} and {slant}",
    "{slant} {thickness} number {word}",
    "scan of a {thickness} {numeral} written {slant}",
    "the numeral {numeral} in {thickness} ink, {slant}",
)
JUNK_WORDS: tuple[str, ...] = (
    "free", "shipping", "sale", "click", "here", "subscribe", "sunset", "beach", "pizza", "recipe",
    "wedding", "dress", "cheap", "flights", "logo", "banner", "download", "now", "cat", "sofa",
    "vintage", "car", "poster", "best", "price", "guaranteed", "img", "jpg", "thumbnail", "icon",
    "holiday", "deals", "mountain", "lake", "coffee", "mug", "shoes", "kitchen", "garden", "party",
)  # fmt: skip
TEST_FRACTION = 0.2
CURATED_SIZE = 300
POOL_COPIES = 8
AUGMENT_NOISE_STD = 0.05
DUPLICATE_NOISE_STD = 0.02
DUPLICATES_PER_SOURCE = 64
IMAGE_EXTENSIONS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp")
CLASS_PROMPTS_FILE = "class_prompts.json"
log = logging.getLogger("jest_trainer.data")


@dataclass
class PairTable:
    """An in-memory table of image-text pairs (column-oriented, index-aligned).

    ``images`` is float32 ``[N, C, H, W]`` in [0, 1]; ``labels`` is the true class index of the image
    (the digit; -1 when unknown); ``noise_kind`` is one of ``NOISE_KINDS`` (or ``"unknown"`` for
    shards that do not record it); ``source_index`` (optional) is the row of the original dataset the
    image was derived from (-1 when unknown), which lets tests and benchmarks check split disjointness.
    """

    images: Tensor
    captions: list[str]
    labels: Tensor
    noise_kind: list[str]
    source_index: Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise ValueError(f"images: expected [N, C, H, W], got shape {tuple(self.images.shape)}")
        n = self.images.shape[0]
        for name, size in (
            ("captions", len(self.captions)),
            ("labels", int(self.labels.shape[0])),
            ("noise_kind", len(self.noise_kind)),
        ):
            if size != n:
                raise ValueError(f"{name}: has {size} rows but images has {n}")
        if self.source_index is not None and int(self.source_index.shape[0]) != n:
            raise ValueError(f"source_index: has {int(self.source_index.shape[0])} rows but images has {n}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image (what ``build_model`` needs)."""
        _, channels, height, width = self.images.shape
        return int(channels), int(height), int(width)

    def subset(self, index: Tensor) -> PairTable:
        """The rows at ``index`` (a 1-D LongTensor; order and repeats are kept)."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        rows = index.tolist()
        return PairTable(
            images=self.images.index_select(0, index),
            captions=[self.captions[i] for i in rows],
            labels=self.labels.index_select(0, index),
            noise_kind=[self.noise_kind[i] for i in rows],
            source_index=None if self.source_index is None else self.source_index.index_select(0, index),
        )

    @classmethod
    def empty(cls, image_shape: tuple[int, int, int]) -> PairTable:
        """A table with no rows (e.g. the curated split when the reference comes from a checkpoint)."""
        return cls(
            images=torch.zeros((0, *image_shape), dtype=torch.float32),
            captions=[],
            labels=torch.zeros(0, dtype=torch.long),
            noise_kind=[],
        )


@dataclass
class DigitsDemo:
    """The three splits a JEST run needs plus the zero-shot class prompts.

    ``class_prompts[c]`` lists the caption texts whose mean (normalised) text embedding is the
    zero-shot prototype of class ``c``; for the digits demo these are all 9 thickness x slant
    variants of digit ``c`` in every template.
    """

    pool: PairTable
    curated: PairTable
    test: PairTable
    class_prompts: list[list[str]]


def caption(digit: int, thickness: int, slant: int, template: int) -> str:
    """The caption of a digit with the given thickness and slant tertiles (0..2) in one template."""
    return CAPTION_TEMPLATES[template].format(
        word=DIGIT_WORDS[digit],
        numeral=str(digit),
        thickness=THICKNESS_WORDS[thickness],
        slant=SLANT_WORDS[slant],
    )


def caption_class(digit: int, thickness: int, slant: int) -> int:
    """The fine caption class ``0..89`` of a (digit, thickness tertile, slant tertile) triple."""
    return (digit * len(THICKNESS_WORDS) + thickness) * len(SLANT_WORDS) + slant


def digit_class_prompts() -> list[list[str]]:
    """Zero-shot prompts per digit: every thickness x slant combination in every template."""
    return [
        [
            caption(digit, thickness, slant, template)
            for template in range(len(CAPTION_TEMPLATES))
            for thickness in range(len(THICKNESS_WORDS))
            for slant in range(len(SLANT_WORDS))
        ]
        for digit in range(len(DIGIT_WORDS))
    ]


def stroke_features(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image (ink mass, slant) of ``[N, 1, H, W]`` images; slant > 0 leans right (top to the right)."""
    pixels = images[:, 0].double()
    _, height, width = pixels.shape
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )
    mass = pixels.sum(dim=(1, 2)).clamp_min(1e-9)
    centre_x = (pixels * cols).sum(dim=(1, 2)) / mass
    centre_y = (pixels * rows).sum(dim=(1, 2)) / mass
    dx = cols - centre_x[:, None, None]
    dy = rows - centre_y[:, None, None]
    covariance = (pixels * dx * dy).sum(dim=(1, 2)) / mass
    variance_y = ((pixels * dy * dy).sum(dim=(1, 2)) / mass).clamp_min(1e-9)
    # image rows grow downwards, so a stroke leaning right has negative cov(x, row)
    return mass, -covariance / variance_y


def tertiles(values: Tensor) -> Tensor:
    """Tertile index 0/1/2 of each value, with cut points at the 1/3 and 2/3 quantiles of ``values``."""
    cuts = torch.quantile(values.double(), torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    return torch.bucketize(values.double(), cuts, right=True)


def _largest_remainder(total: int, fractions: Sequence[float]) -> list[int]:
    """Integer counts summing to ``total`` whose shares are closest to ``fractions`` (which sum to 1)."""
    raw = [total * f for f in fractions]
    counts = [math.floor(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _shift_images(images: Tensor, shifts: Tensor) -> Tensor:
    """Shift each image by its ``(dy, dx)`` in {-1, 0, 1}, filling the vacated border with zeros."""
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    _, _, height, width = images.shape
    out = torch.empty_like(images)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            mask = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            if mask.any():
                out[mask] = padded[mask, :, 1 - dy : 1 - dy + height, 1 - dx : 1 - dx + width]
    return out


def _load_digit_images() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as float32 ``[1797, 1, 8, 8]`` in [0, 1] and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(np.asarray(digits.images, dtype=np.float32) / 16.0).unsqueeze(1)
    return images.contiguous(), torch.from_numpy(np.asarray(digits.target, dtype=np.int64))


def _stratified_split(labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(test, curated, pool) source indices, stratified by label, each sorted."""
    test, curated, pool = [], [], []
    n_classes = int(labels.max()) + 1
    curated_per_class = _largest_remainder(CURATED_SIZE, [1 / n_classes] * n_classes)
    for digit in range(n_classes):
        members = torch.nonzero(labels == digit).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_test = round(len(members) * TEST_FRACTION)
        n_curated = curated_per_class[digit]
        test.append(members[:n_test])
        curated.append(members[n_test : n_test + n_curated])
        pool.append(members[n_test + n_curated :])
    return (
        torch.sort(torch.cat(test)).values,
        torch.sort(torch.cat(curated)).values,
        torch.sort(torch.cat(pool)).values,
    )


def _junk_caption(rng: np.random.Generator) -> str:
    words = rng.choice(len(JUNK_WORDS), size=int(rng.integers(3, 7)), replace=False)
    return " ".join(JUNK_WORDS[i] for i in words)


def _clean_table(
    images: Tensor, labels: Tensor, thickness: Tensor, slant: Tensor, sources: Tensor, rng: np.random.Generator
) -> PairTable:
    """Correctly captioned, unaugmented pairs of the given source rows (test and curated splits)."""
    captions = [
        caption(int(labels[s]), int(thickness[s]), int(slant[s]), int(rng.integers(len(CAPTION_TEMPLATES))))
        for s in sources.tolist()
    ]
    return PairTable(
        images=images.index_select(0, sources),
        captions=captions,
        labels=labels.index_select(0, sources),
        noise_kind=["clean"] * len(sources),
        source_index=sources.clone(),
    )


def _noisy_pool(
    images: Tensor,
    labels: Tensor,
    thickness: Tensor,
    slant: Tensor,
    pool_sources: Tensor,
    noise: NoiseConfig,
    pool_copies: int,
    generator: torch.Generator,
    rng: np.random.Generator,
) -> PairTable:
    """The augmented, noisy pool (see the module docstring for the recipe)."""
    total = len(pool_sources) * pool_copies
    n_wrong, n_junk, n_duplicate, n_clean = _largest_remainder(
        total, [noise.wrong, noise.junk, noise.duplicate, noise.clean]
    )
    n_unique = total - n_duplicate
    # non-duplicates: every pool source the same number of times (+-1), augmented independently
    repeats = math.ceil(n_unique / len(pool_sources))
    unique_sources = torch.cat(
        [pool_sources[torch.randperm(len(pool_sources), generator=generator)] for _ in range(repeats)]
    )[:n_unique]
    unique_kinds = ["wrong"] * n_wrong + ["junk"] * n_junk + ["clean"] * n_clean
    unique_kinds = [unique_kinds[i] for i in torch.randperm(n_unique, generator=generator).tolist()]
    shifts = torch.randint(-1, 2, (n_unique, 2), generator=generator)
    unique_images = _shift_images(images.index_select(0, unique_sources), shifts)
    unique_images += AUGMENT_NOISE_STD * torch.randn(unique_images.shape, generator=generator)
    # duplicates: a few source images, many lightly perturbed copies each, with their own caption
    n_dup_sources = min(len(pool_sources), max(1, math.ceil(n_duplicate / DUPLICATES_PER_SOURCE)))
    dup_source_set = pool_sources[torch.randperm(len(pool_sources), generator=generator)[:n_dup_sources]]
    dup_sources = dup_source_set.repeat(math.ceil(n_duplicate / n_dup_sources) if n_duplicate else 0)[:n_duplicate]
    dup_template = {int(s): int(rng.integers(len(CAPTION_TEMPLATES))) for s in dup_source_set.tolist()}
    dup_images = images.index_select(0, dup_sources)
    dup_images = dup_images + DUPLICATE_NOISE_STD * torch.randn(dup_images.shape, generator=generator)

    captions: list[str] = []
    for source, kind in zip(unique_sources.tolist(), unique_kinds, strict=True):
        digit = int(labels[source])
        if kind == "junk":
            captions.append(_junk_caption(rng))
            continue
        if kind == "wrong":
            digit = (digit + int(rng.integers(1, len(DIGIT_WORDS)))) % len(DIGIT_WORDS)
        captions.append(
            caption(digit, int(thickness[source]), int(slant[source]), int(rng.integers(len(CAPTION_TEMPLATES))))
        )
    for source in dup_sources.tolist():
        captions.append(caption(int(labels[source]), int(thickness[source]), int(slant[source]), dup_template[source]))

    all_sources = torch.cat([unique_sources, dup_sources])
    table = PairTable(
        images=torch.cat([unique_images, dup_images]).clamp_(0.0, 1.0),
        captions=captions,
        labels=labels.index_select(0, all_sources),
        noise_kind=unique_kinds + ["duplicate"] * n_duplicate,
        source_index=all_sources,
    )
    return table.subset(torch.randperm(total, generator=generator))


@functools.lru_cache(maxsize=8)
def _cached_digits_demo(wrong: float, junk: float, duplicate: float, seed: int, pool_copies: int) -> DigitsDemo:
    noise = NoiseConfig(wrong=wrong, junk=junk, duplicate=duplicate)
    images, labels = _load_digit_images()
    mass, shear = stroke_features(images)
    thickness, slant = tertiles(mass), tertiles(shear)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    test_sources, curated_sources, pool_sources = _stratified_split(labels, generator)
    return DigitsDemo(
        pool=_noisy_pool(images, labels, thickness, slant, pool_sources, noise, pool_copies, generator, rng),
        curated=_clean_table(images, labels, thickness, slant, curated_sources, rng),
        test=_clean_table(images, labels, thickness, slant, test_sources, rng),
        class_prompts=digit_class_prompts(),
    )


def load_digits_demo(noise: NoiseConfig, *, seed: int, pool_copies: int = POOL_COPIES) -> DigitsDemo:
    """The digits demo splits for a noise mix and seed (deterministic; cached in-process).

    Sizes with the defaults: test 359, curated 300, pool 1,138 source images x ``pool_copies`` (8)
    = 9,104 pairs. The returned object is shared by every caller with the same arguments: treat its
    tensors as read-only (use ``subset`` to take rows).
    """
    if pool_copies < 1:
        raise ValueError(f"pool_copies: must be >= 1, got {pool_copies}")
    return _cached_digits_demo(float(noise.wrong), float(noise.junk), float(noise.duplicate), int(seed), pool_copies)


def _encode_png(image: Tensor) -> bytes:
    """PNG bytes of one ``[C, H, W]`` image in [0, 1] (C = 1 grey, C = 3 RGB), quantised to 8 bits."""
    channels = image.shape[0]
    if channels not in (1, 3):
        raise ValueError(f"images: PNG needs 1 or 3 channels, got {channels}")
    pixels = (image.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels[:, :, 0], mode="L") if channels == 1 else Image.fromarray(pixels, mode="RGB")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _decode_image(payload: bytes, key: str) -> Tensor:
    """A ``[C, H, W]`` float32 image in [0, 1] from PNG/JPEG/WebP bytes (grey stays 1 channel)."""
    try:
        picture = Image.open(io.BytesIO(payload))
        picture.load()
    except Exception as error:  # PIL raises many types for bad bytes
        raise ValueError(f"sample {key!r}: cannot decode its image ({error})") from error
    if picture.mode not in ("L", "RGB"):
        picture = picture.convert("RGB")
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)
    return pixels.unsqueeze(0) if pixels.dim() == 2 else pixels.permute(2, 0, 1).contiguous()


def write_webdataset(table: PairTable, out_dir: Path, *, prefix: str, shard_size: int = 1000) -> list[Path]:
    """Write ``table`` as WebDataset shards ``<out_dir>/<prefix>-NNNNNN.tar`` and return their paths.

    Each sample has ``png``, ``txt``, ``cls`` (the label) and ``noise`` (the noise kind); keys are
    ``<prefix>-<row:08d>``. Shards are byte-for-byte deterministic (fixed mtime).
    """
    import webdataset as wds

    if shard_size < 1:
        raise ValueError(f"shard_size: must be >= 1, got {shard_size}")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", prefix):
        raise ValueError(f"prefix: use letters, digits, '-' and '_' only, got {prefix!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for shard, start in enumerate(range(0, max(len(table), 1), shard_size)):
        path = out_dir / f"{prefix}-{shard:06d}.tar"
        with open(path, "wb") as stream, wds.TarWriter(stream, mtime=0.0) as writer:
            for row in range(start, min(start + shard_size, len(table))):
                writer.write(
                    {
                        "__key__": f"{prefix}-{row:08d}",
                        "png": _encode_png(table.images[row]),
                        "txt": table.captions[row],
                        "cls": str(int(table.labels[row])),
                        "noise": table.noise_kind[row],
                    }
                )
        paths.append(path)
    return paths


def shard_pattern(paths: Sequence[Path]) -> str:
    """A brace pattern (``/d/pool-{000000..000003}.tar``) for consecutive shards written by this module."""
    if not paths:
        raise ValueError("paths: no shards")
    first, last = Path(paths[0]), Path(paths[-1])
    if len(paths) == 1:
        return str(first)
    match_first = re.fullmatch(r"(.*-)(\d{6})\.tar", first.name)
    match_last = re.fullmatch(r"(.*-)(\d{6})\.tar", last.name)
    if not (match_first and match_last) or int(match_last.group(2)) - int(match_first.group(2)) != len(paths) - 1:
        return "::".join(str(p) for p in paths)
    return str(first.parent / f"{match_first.group(1)}{{{match_first.group(2)}..{match_last.group(2)}}}.tar")


def _expand_urls(urls: str) -> list[str]:
    from webdataset.shardlists import expand_urls

    return list(expand_urls(urls))


def read_webdataset(urls: str) -> PairTable:
    """Read every sample of the shards named by ``urls`` (brace patterns, ``::``-separated lists).

    Needs an image (png/jpg/jpeg/webp) and ``txt`` per sample; ``cls`` defaults to -1 and ``noise``
    to ``"unknown"``. All images must share one shape. Sample order is shard order, then tar order.
    """
    import webdataset as wds

    expanded = _expand_urls(urls)
    if not expanded:
        raise ValueError(f"urls: {urls!r} names no shards")
    missing = [url for url in expanded if "://" not in url and not Path(url).exists()]
    if missing:
        raise ValueError(f"urls: shard {missing[0]!r} does not exist ({len(missing)} of {len(expanded)} missing)")
    dataset = wds.WebDataset(
        expanded, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
    )
    images: list[Tensor] = []
    captions: list[str] = []
    labels: list[int] = []
    kinds: list[str] = []
    for sample in dataset:
        key = sample.get("__key__", "?")
        image_field = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if image_field is None or "txt" not in sample:
            raise ValueError(f"sample {key!r} in {sample.get('__url__', urls)!r}: needs an image and a txt field")
        image = _decode_image(sample[image_field], key)
        if images and image.shape != images[0].shape:
            raise ValueError(
                f"sample {key!r}: image shape {tuple(image.shape)} differs from {tuple(images[0].shape)}"
            )
        images.append(image)
        captions.append(sample["txt"].decode("utf-8").strip())
        labels.append(int(sample["cls"].decode("utf-8").strip()) if "cls" in sample else -1)
        kinds.append(sample["noise"].decode("utf-8").strip() if "noise" in sample else UNKNOWN_NOISE)
    if not images:
        raise ValueError(f"urls: {urls!r} contains no samples")
    return PairTable(
        images=torch.stack(images),
        captions=captions,
        labels=torch.tensor(labels, dtype=torch.long),
        noise_kind=kinds,
    )


def write_digits_webdataset(
    out_dir: Path, *, noise: NoiseConfig, seed: int, shard_size: int = 1000, pool_copies: int = POOL_COPIES
) -> dict[str, list[Path]]:
    """Write the digits demo's pool, curated and test splits as shards (plus ``class_prompts.json``).

    Returns ``{"pool": [...], "curated": [...], "test": [...]}``. The class prompts file lets
    ``load_training_data`` rebuild the zero-shot prototypes from the test shards' directory.
    """
    demo = load_digits_demo(noise, seed=seed, pool_copies=pool_copies)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {
        split: write_webdataset(getattr(demo, split), out_dir, prefix=split, shard_size=shard_size)
        for split in ("pool", "curated", "test")
    }
    (out_dir / CLASS_PROMPTS_FILE).write_text(json.dumps(demo.class_prompts, indent=1) + "\n")
    return written


def class_prompts_from_table(table: PairTable) -> list[list[str]]:
    """Zero-shot prompts from labelled pairs: for each class 0..max, its distinct captions (sorted)."""
    known = table.labels[table.labels >= 0]
    if known.numel() == 0:
        raise ValueError("data.evalUrls: the eval shards carry no 'cls' labels, so no class prompts can be built")
    prompts: list[list[str]] = [[] for _ in range(int(known.max()) + 1)]
    for text, label in zip(table.captions, table.labels.tolist(), strict=True):
        if label >= 0:
            prompts[label].append(text)
    empty = [c for c, texts in enumerate(prompts) if not texts]
    if empty:
        raise ValueError(
            f"data.evalUrls: no caption for class(es) {empty}; add {CLASS_PROMPTS_FILE} next to the shards"
        )
    return [sorted(set(texts)) for texts in prompts]


def _class_prompts_for(eval_urls: str, test: PairTable) -> list[list[str]]:
    """``class_prompts.json`` next to the first eval shard when present, else prompts from cls + txt."""
    first = _expand_urls(eval_urls)[0]
    candidate = Path(first).parent / CLASS_PROMPTS_FILE
    if "://" not in first and candidate.is_file():
        prompts = json.loads(candidate.read_text())
        if not (isinstance(prompts, list) and prompts and all(isinstance(p, list) and p for p in prompts)):
            raise ValueError(f"{candidate}: expected a non-empty list of non-empty lists of prompts")
        return [[str(text) for text in texts] for texts in prompts]
    return class_prompts_from_table(test)


def load_training_data(cfg: TrainingConfig) -> DigitsDemo:
    """The pool / curated / test splits a run trains and evaluates on, from its ``TrainingConfig``.

    ``data.source=digits`` -> ``load_digits_demo(data.noise, seed=seed)``. ``webdataset`` -> pool from
    ``data.urls``, curated from ``reference.train.urls`` (empty when the reference is a checkpoint),
    test from ``data.evalUrls``; class prompts from ``class_prompts.json`` beside the eval shards or
    else from their ``cls`` + ``txt`` fields.
    """
    if cfg.data.source == "digits":
        return load_digits_demo(cfg.data.noise, seed=cfg.seed)
    if not cfg.data.urls:
        raise ValueError("data.urls: required when data.source is 'webdataset'")
    if not cfg.data.eval_urls:
        raise ValueError("data.evalUrls: required when data.source is 'webdataset' (zero-shot evaluation)")
    pool = read_webdataset(cfg.data.urls)
    test = read_webdataset(cfg.data.eval_urls)
    if cfg.reference.checkpoint is not None:
        curated = PairTable.empty(pool.image_shape)
    elif cfg.reference.train is not None and cfg.reference.train.urls:
        curated = read_webdataset(cfg.reference.train.urls)
    else:
        raise ValueError(
            "reference.train.urls: required when data.source is 'webdataset' and the reference is trained "
            "(or set reference.checkpoint)"
        )
    for name, table in (("reference.train.urls", curated), ("data.evalUrls", test)):
        if len(table) and table.image_shape != pool.image_shape:
            raise ValueError(f"{name}: images are {table.image_shape} but data.urls images are {pool.image_shape}")
    return DigitsDemo(pool=pool, curated=curated, test=test, class_prompts=_class_prompts_for(cfg.data.eval_urls, test))



# --------------------------------------------------------------------------------------------------
# Streaming interface (what the training loop consumes): train / curated streams and a bounded eval set
# --------------------------------------------------------------------------------------------------

DIGITS_IMAGE_SHAPE: tuple[int, int, int] = (1, 8, 8)


def model_input_shape(cfg: TrainingConfig) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images the streams deliver: digits ``(1, 8, 8)``, else preprocessing's ``(3, S, S)``."""
    if cfg.data.source == "digits":
        return DIGITS_IMAGE_SHAPE
    from jest_trainer.preprocess import preprocess_spec

    return preprocess_spec(cfg.model).image_shape


def readers_per_rank(loader_workers: int, *, shards: int, world_size: int, field: str = "data.urls") -> int:
    """How many loader workers (shard readers) each rank runs: ``data.loaderWorkers``, capped so each gets a shard.

    The rule: ``max(1, min(loaderWorkers, shards // worldSize))``. A small shard set (a curated split in
    one tar) therefore reads with fewer workers instead of failing; fewer shards than ranks is an error
    (``StreamSpec``). The cap depends only on the config and the shard count, so resume stays exact.
    """
    readers = max(1, min(loader_workers, shards // max(1, world_size)))
    if readers < max(1, loader_workers):
        log.info("%s: %d shard(s) over %d rank(s): %d loader worker(s) per rank instead of data.loaderWorkers=%d",
                 field, shards, world_size, readers, loader_workers)  # fmt: skip
    return readers


def pair_sidecars(shards: Sequence[str], embeddings_urls: str) -> tuple[str, ...]:
    """The sidecar shard of each data shard: ``reference.embeddingsUrls`` resolved, paired by file name.

    ``jestctl score`` writes one sidecar per data shard under the data shard's own file name
    (``iter_shard_batches`` yields batches that never span shards), so pairing needs no key index.
    """
    from jest_trainer.shards import resolve_shards

    sidecars = resolve_shards(embeddings_urls, field="reference.embeddingsUrls")
    by_name = {url.rsplit("/", 1)[-1]: url for url in sidecars}
    missing = [url for url in shards if url.rsplit("/", 1)[-1] not in by_name]
    if missing:
        raise ValueError(
            f"reference.embeddingsUrls: no sidecar named like data shard {missing[0]!r} ({len(missing)} of "
            f"{len(shards)} missing); run `jestctl score` over the same data.urls"
        )
    return tuple(by_name[url.rsplit("/", 1)[-1]] for url in shards)


def _stream_spec(cfg: TrainingConfig, urls: str, field: str, *, seed: int, rank: int, world_size: int,
                 batch_size: int, sidecars: str | None = None) -> StreamSpec:  # fmt: skip
    from jest_trainer.shards import resolve_shards

    shards = resolve_shards(urls, field=field)
    return StreamSpec(
        sidecars=pair_sidecars(shards, sidecars) if sidecars else (),
        shards=tuple(shards),
        seed=seed,
        rank=rank,
        world_size=world_size,
        readers_per_rank=readers_per_rank(cfg.data.loader_workers, shards=len(shards), world_size=world_size,
                                          field=field),
        batch_size=batch_size,
        shuffle_buffer=cfg.data.shuffle_buffer,
        read_retries=cfg.data.read_retries,
        retry_backoff_seconds=cfg.data.retry_backoff_seconds,
        field=field,
    )


def _shard_stream(cfg: TrainingConfig, spec: StreamSpec, transform: ImageTransformLike, tokenizer: Tokenizer,
                  pin_memory: bool) -> ShardStream:  # fmt: skip
    return ShardStream(
        spec,
        transform=transform,
        tokenizer=tokenizer,
        loader_workers=min(cfg.data.loader_workers, spec.readers_per_rank),
        prefetch=cfg.data.prefetch,
        pin_memory=pin_memory,
        max_skip_fraction=cfg.data.max_skip_fraction,
    )


def open_train_stream(
    cfg: TrainingConfig,
    *,
    rank: int,
    world_size: int,
    local_super_batch: int,
    transform: ImageTransformLike,
    tokenizer: Tokenizer,
    pin_memory: bool = False,
) -> TrainStream:
    """This rank's infinite stream of ``local_super_batch``-row super-batches of the training pool.

    ``digits`` -> ``TableStream`` over the digits pool (images through ``transform.from_pixels`` when the
    transform has it, else the raw [0, 1] pixels); ``webdataset`` ->
    ``ShardStream`` over ``data.urls`` (resolved here: a pattern naming no shard raises ``ValueError``
    before any worker starts). ``transform`` and ``tokenizer`` must be picklable (loader workers).
    With ``reference.mode: precomputed`` every batch carries ``reference`` = (image, text) embeddings
    joined by key from the sidecar shards of ``reference.embeddingsUrls`` (``pair_sidecars``).
    """
    if cfg.data.source == "digits":
        pool = load_digits_demo(cfg.data.noise, seed=cfg.seed).pool
        return TableStream(pool, tokenizer, rank=rank, world_size=world_size, seed=cfg.seed,
                           batch_size=local_super_batch, key_prefix="digits",
                           image_fn=getattr(transform, "from_pixels", None))  # fmt: skip
    if not cfg.data.urls:
        raise ValueError("data.urls: required when data.source is 'webdataset'")
    precomputed = getattr(cfg.reference, "mode", "online") == "precomputed"
    spec = _stream_spec(cfg, cfg.data.urls, "data.urls", seed=cfg.seed, rank=rank, world_size=world_size,
                        batch_size=local_super_batch,
                        sidecars=cfg.reference.embeddings_urls if precomputed else None)  # fmt: skip
    return _shard_stream(cfg, spec, transform, tokenizer, pin_memory)


CURATED_SEED_SALT = 0xC0A7ED


def open_curated_stream(
    cfg: TrainingConfig,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    transform: ImageTransformLike,
    tokenizer: Tokenizer,
    pin_memory: bool = False,
) -> TrainStream | None:
    """The curated stream the reference trains on, or None when the reference comes from a checkpoint.

    ``digits`` -> ``TableStream`` over the curated split (keys ``curated-<row>``); ``webdataset`` ->
    ``ShardStream`` over ``reference.train.urls`` (seeded apart from the pool stream).
    """
    if cfg.reference.checkpoint is not None:
        return None
    if cfg.data.source == "digits":
        curated = load_digits_demo(cfg.data.noise, seed=cfg.seed).curated
        return TableStream(curated, tokenizer, rank=rank, world_size=world_size, seed=cfg.seed,
                           batch_size=batch_size, key_prefix="curated",
                           image_fn=getattr(transform, "from_pixels", None))  # fmt: skip
    urls = cfg.reference.train.urls if cfg.reference.train is not None else None
    if not urls:
        raise ValueError(
            "reference.train.urls: required when data.source is 'webdataset' and the reference is trained "
            "(or set reference.checkpoint)"
        )
    spec = _stream_spec(cfg, urls, "reference.train.urls", seed=mixed_seed(cfg.seed, CURATED_SEED_SALT) % (2**31),
                        rank=rank, world_size=world_size, batch_size=batch_size)  # fmt: skip
    return _shard_stream(cfg, spec, transform, tokenizer, pin_memory)


@dataclass
class EvalSet:
    """A bounded evaluation set, decoded and preprocessed like training images.

    ``labels`` are -1 where the shards carry no ``cls``; ``class_prompts`` is None when no class
    prompts exist (then only retrieval metrics apply). ``skipped`` counts broken samples by reason.
    """

    images: Tensor
    tokens: Tensor
    captions: list[str]
    keys: list[str]
    labels: Tensor
    class_prompts: list[list[str]] | None
    skipped: dict[str, int]

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def has_labels(self) -> bool:
        """True when at least one sample has a class label."""
        return bool((self.labels >= 0).any())


def _prompts_file(first_url: str) -> list[list[str]] | None:
    from jest_trainer.shards import url_scheme

    if url_scheme(first_url) != "file":
        return None
    candidate = Path(first_url.removeprefix("file://")).parent / CLASS_PROMPTS_FILE
    if not candidate.is_file():
        return None
    prompts = json.loads(candidate.read_text())
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, list) and p for p in prompts)):
        raise ValueError(f"{candidate}: expected a non-empty list of non-empty lists of prompts")
    return [[str(text) for text in texts] for texts in prompts]


def _prompts_from_labels(captions: Sequence[str], labels: Sequence[int]) -> list[list[str]] | None:
    """Each class's distinct captions (sorted); None when no label is known or some class has no caption."""
    known = [label for label in labels if label >= 0]
    if not known:
        return None
    prompts: list[set[str]] = [set() for _ in range(max(known) + 1)]
    for text, label in zip(captions, labels, strict=True):
        if label >= 0:
            prompts[label].add(text)
    if any(not texts for texts in prompts):
        log.warning("data.evalUrls: some class ids have no caption in the eval set; no zero-shot class prompts")
        return None
    return [sorted(texts) for texts in prompts]


def load_eval_set(
    cfg: TrainingConfig,
    *,
    transform: ImageTransformLike,
    tokenizer: Tokenizer,
    max_samples: int | None = None,
) -> EvalSet:
    """At most ``max_samples`` (default ``data.evalMaxSamples``) eval pairs, in shard order, with class prompts.

    ``digits`` -> the digits test split (prompts: every caption variant of each digit). ``webdataset``
    -> ``data.evalUrls`` read in this process, broken samples skipped and counted; class prompts from
    ``class_prompts.json`` beside the first (local) eval shard, else from the ``cls`` + ``txt`` fields,
    else None. ``transform`` should be the eval transform (no random crop).
    """
    limit = cfg.data.eval_max_samples if max_samples is None else max_samples
    if limit < 1:
        raise ValueError(f"max_samples: must be >= 1, got {limit}")
    if cfg.data.source == "digits":
        demo = load_digits_demo(cfg.data.noise, seed=cfg.seed)
        test = demo.test.subset(torch.arange(min(limit, len(demo.test))))
        to_input = getattr(transform, "from_pixels", None)
        return EvalSet(
            images=test.images if to_input is None else to_input(test.images),
            tokens=tokenizer(list(test.captions)), captions=list(test.captions),
            keys=[f"test-{i}" for i in range(len(test))], labels=test.labels, class_prompts=demo.class_prompts,
            skipped={},
        )  # fmt: skip
    if not cfg.data.eval_urls:
        raise ValueError("data.evalUrls: required when data.source is 'webdataset'")
    from jest_trainer.shards import resolve_shards

    shards = resolve_shards(cfg.data.eval_urls, field="data.evalUrls")
    spec = StreamSpec(shards=tuple(shards), seed=cfg.seed, rank=0, world_size=1, readers_per_rank=1, batch_size=1,
                      shuffle_buffer=0, read_retries=cfg.data.read_retries,
                      retry_backoff_seconds=cfg.data.retry_backoff_seconds, field="data.evalUrls")  # fmt: skip
    reader = EvalReader(spec, transform)
    rows = reader.read(limit)
    if not rows:
        raise ValueError(f"data.evalUrls: no usable sample in {len(shards)} shard(s) ({skip_summary(reader.skipped)})")
    captions = [row.caption for row in rows]
    labels = [row.label for row in rows]
    prompts = _prompts_file(shards[0]) or _prompts_from_labels(captions, labels)
    return EvalSet(
        images=torch.stack([row.image for row in rows]), tokens=tokenizer(captions), captions=captions,
        keys=[row.key for row in rows], labels=torch.tensor(labels, dtype=torch.long), class_prompts=prompts,
        skipped=dict(reader.skipped),
    )  # fmt: skip

@dataclass
class ShardBatch:
    """Up to ``batch_size`` consecutive usable samples of one shard (what ``jestctl score`` embeds)."""

    url: str
    keys: list[str]
    images: Tensor
    tokens: Tensor


class ShardScanner:
    """Every usable sample of the shards, in shard and tar order, batched within each shard; broken ones counted.

    Why: precomputed reference embeddings are written one sidecar shard per data shard, keys in data
    order, which is what lets training join them without a key index (``pair_sidecars``).
    """

    def __init__(self, urls: str, *, transform: ImageTransformLike, tokenizer: Tokenizer, batch_size: int,
                 cfg: TrainingConfig | None = None, field: str = "data.urls") -> None:  # fmt: skip
        from jest_trainer.shards import resolve_shards

        data_cfg = (cfg or TrainingConfig()).data
        self.shards = resolve_shards(urls, field=field)
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        spec = StreamSpec(shards=tuple(self.shards), seed=0, rank=0, world_size=1, readers_per_rank=1, batch_size=1,
                          shuffle_buffer=0, read_retries=data_cfg.read_retries,
                          retry_backoff_seconds=data_cfg.retry_backoff_seconds, field=field)  # fmt: skip
        self._reader = EvalReader(spec, transform)

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped so far, by reason."""
        return self._reader.skipped

    def __iter__(self) -> Iterator[ShardBatch]:
        for url in self.shards:
            rows = []
            for row in self._reader.rows_of(url):
                rows.append(row)
                if len(rows) == self.batch_size:
                    yield self._batch(url, rows)
                    rows = []
            if rows:
                yield self._batch(url, rows)

    def _batch(self, url: str, rows: list) -> ShardBatch:
        return ShardBatch(url=url, keys=[row.key for row in rows], images=torch.stack([row.image for row in rows]),
                          tokens=self.tokenizer([row.caption for row in rows]))  # fmt: skip


__all__ = [
    "CAPTION_TEMPLATES",
    "DIGITS_IMAGE_SHAPE",
    "NOISE_KINDS",
    "N_CAPTION_CLASSES",
    "DataQualityError",
    "DigitsDemo",
    "EvalSet",
    "PairTable",
    "ShardBatch",
    "ShardScanner",
    "ShardStream",
    "SuperBatch",
    "TableStream",
    "TrainStream",
    "caption",
    "caption_class",
    "check_skip_fraction",
    "class_prompts_from_table",
    "digit_class_prompts",
    "load_digits_demo",
    "load_eval_set",
    "load_training_data",
    "model_input_shape",
    "open_curated_stream",
    "open_train_stream",
    "pair_sidecars",
    "read_webdataset",
    "readers_per_rank",
    "shard_pattern",
    "stroke_features",
    "tertiles",
    "write_digits_webdataset",
    "write_webdataset",
]
