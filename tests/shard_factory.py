"""Real WebDataset shards for the data tests: written with webdataset's TarWriter, broken on purpose where asked.

Every good sample ``k<shard>-<row>`` holds a small PNG (its colour encodes shard and row), a caption and
optionally a ``cls``; ``broken`` maps a sample key to how it is damaged, so the tests know exactly
which samples a stream must skip and why.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image


def png_bytes(shard: int, row: int, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> bytes:
    """A small image whose pixels depend on (shard, row), encoded as PNG."""
    rng = np.random.default_rng(shard * 1000 + row)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    picture = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode=mode)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def key(shard: int, row: int) -> str:
    """The ``__key__`` of sample ``row`` of shard ``shard``."""
    return f"k{shard:03d}-{row:04d}"


def write_shards(
    out: Path,
    *,
    shards: int,
    per_shard: int | list[int],
    with_cls: bool = True,
    broken: Mapping[str, str] | None = None,
    prefix: str = "s",
) -> list[Path]:
    """Write ``shards`` shards ``<prefix>-NNNNNN.tar``; ``broken[key]`` is one of
    ``decode_error`` (garbage image bytes), ``missing_caption``, ``empty_caption``, ``missing_image``,
    ``bad_label``. Returns the shard paths in order."""
    broken = dict(broken or {})
    out.mkdir(parents=True, exist_ok=True)
    sizes = per_shard if isinstance(per_shard, list) else [per_shard] * shards
    paths = []
    for shard in range(shards):
        path = out / f"{prefix}-{shard:06d}.tar"
        with wds.TarWriter(str(path), mtime=0.0) as writer:
            for row in range(sizes[shard]):
                name = key(shard, row)
                sample: dict[str, object] = {"__key__": name, "png": png_bytes(shard, row), "txt": f"caption {name}"}
                if with_cls:
                    sample["cls"] = str(row % 3)
                damage = broken.get(name)
                if damage == "decode_error":
                    sample["png"] = b"\x89PNG not really an image"
                elif damage == "missing_caption":
                    del sample["txt"]
                elif damage == "empty_caption":
                    sample["txt"] = "   "
                elif damage == "missing_image":
                    del sample["png"]
                elif damage == "bad_label":
                    sample["cls"] = "seven"
                elif damage is not None:
                    raise ValueError(f"unknown damage {damage!r}")
                writer.write(sample)
        paths.append(path)
    return paths


def truncate_inside_member(path: Path, *, member_index: int) -> str:
    """Cut ``path`` in the middle of its ``member_index``-th tar member's data; returns that member's name."""
    with tarfile.open(path) as archive:
        members = archive.getmembers()
    member = members[member_index]
    cut = member.offset_data + max(1, member.size // 2)
    data = path.read_bytes()[:cut]
    path.write_bytes(data)
    return member.name


def pattern(out: Path, shards: int, prefix: str = "s") -> str:
    """The brace pattern naming shards 0..shards-1 written by ``write_shards``."""
    return str(out / f"{prefix}-{{000000..{shards - 1:06d}}}.tar")
