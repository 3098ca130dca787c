"""The training input stream: super-batches of image-text pairs with an exact, resumable cursor.

Why: a JEST step scores a per-rank super-batch of ``B/W`` pairs. Real data are millions of samples in
WebDataset shards, so nothing may hold the data set: shards are streamed, decoded in DataLoader worker
processes, and only a shuffle buffer of undecoded samples plus prefetched super-batches live in memory.

Two implementations of one interface (``TrainStream``):

* ``ShardStream`` (``data.source: webdataset``). Per epoch ``e`` the shard list is permuted by
  ``(seed, e)`` and dealt round-robin to ``world_size x K`` *readers* (``K = max(1, loaderWorkers)``;
  reader ``rank * K + worker``), so within an epoch every shard is read by exactly one reader.
  Fewer shards than readers is an error (a reader without shards would stall); uneven counts are
  allowed: a reader with one shard more (or with larger shards) simply takes longer, and every reader
  advances to its next epoch on its own when its shards are done, so no sample is dropped and none is
  repeated within its reader's epoch. Each reader shuffles with a buffer of ``shuffleBuffer``
  undecoded samples (seeded by ``(seed, epoch, reader)``; drained at the end of the epoch), then
  decodes, preprocesses and tokenizes, and emits whole super-batches. (``data.readers_per_rank`` caps
  ``K`` at ``shards // world_size`` so small shard sets read with fewer workers.) The DataLoader hands out the
  workers' batches in strict rotation, so batch ``n`` of a rank comes from reader ``n mod K``.
* ``TableStream`` (the digits demo and other in-memory tables): the rank's disjoint share of a seeded
  permutation, read in seeded epochs, ``B/W`` rows per step (the order the digits demo always had).

**The cursor** (``state_dict``) is, per reader: epoch, shard position and sample offset of its next
read, the positions of the samples sitting in its shuffle buffer, its shuffle RNG state and its skip
counters, as of the last batch the training process received (prefetched batches are not counted).
``load_state_dict`` restarts the workers at those cursors: each re-reads raw tar records (no image is
decoded) from the oldest buffered sample's shard, refills its buffer with exactly those samples and
continues, so a resumed run yields the very same sample keys, batch by batch, as an uninterrupted one.

**Broken data** is skipped and counted by reason (``SKIP_REASONS``): ``decode_error`` (image bytes that
do not decode), ``missing_image``, ``missing_caption``, ``empty_caption``, ``bad_caption`` (not UTF-8),
``bad_label`` (a ``cls`` that is not an integer), ``truncated`` (a shard ending inside a tar member)
``unreadable_shard`` (a shard that cannot be read after retries; counts shards) and
``missing_reference`` (precomputed reference mode: no sidecar embedding for the key). The first problem
of each shard in each epoch is logged with its sample key. ``check_skip_fraction`` raises
``DataQualityError`` once more than ``data.maxSkipFraction`` of what was read is skipped; the stream
calls it after every batch.
"""

from __future__ import annotations

import hashlib
import io
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from jest_trainer.preprocess import ImageDecodeError
from jest_trainer.schedule import mixed_seed, shard_indices, super_batch_positions
from jest_trainer.shards import read_raw_samples

log = logging.getLogger("jest_trainer.data")

SKIP_REASONS: tuple[str, ...] = (
    "decode_error",
    "missing_image",
    "missing_caption",
    "empty_caption",
    "bad_caption",
    "bad_label",
    "truncated",
    "unreadable_shard",
    "missing_reference",
)
IMAGE_FIELDS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
SIDECAR_FIELDS: tuple[str, str] = ("ref_image.npy", "ref_text.npy")  # == reference.SIDECAR_IMAGE/TEXT_FIELD
UNKNOWN_NOISE = "unknown"
MIN_SEEN_FOR_SKIP_CHECK = 200
STATE_VERSION = 1

Tokenizer = Callable[[list[str]], Tensor]


class ImageTransformLike(Protocol):
    """What the stream needs of ``preprocess.ImageTransform``: bytes (+ per-sample seed) -> ``[C, S, S]``."""

    def __call__(self, payload: bytes, *, sample_seed: int | None = None) -> Tensor: ...


class DataQualityError(RuntimeError):
    """More of the data was broken than ``data.maxSkipFraction`` allows (or a reader found nothing usable)."""

    def __init__(self, message: str, *, skipped: Mapping[str, int] | None = None, seen: int = 0) -> None:
        super().__init__(message)  # one-argument construction: DataLoader re-raises worker errors that way
        self.skipped = dict(skipped or {})
        self.seen = int(seen)

    @property
    def deterministic(self) -> bool:
        """Broken samples are broken again after a restart (exit 3, no backoff spent); shards that could not be
        read after retries may be an outage a restart outlives. The message names the reasons, so this also
        holds for the copy a DataLoader re-raises from its worker (built from the message alone)."""
        return "unreadable_shard" not in self.skipped and "unreadable_shard" not in str(self)


def skip_summary(skipped: Mapping[str, int]) -> str:
    """``"12 decode_error, 3 missing_caption"`` (largest first; ``"none"`` when nothing was skipped)."""
    items = sorted(((n, r) for r, n in skipped.items() if n), reverse=True)
    return ", ".join(f"{n} {reason}" for n, reason in items) or "none"


def check_skip_fraction(
    skipped: Mapping[str, int], seen: int, max_fraction: float, *, min_seen: int = MIN_SEEN_FOR_SKIP_CHECK
) -> None:
    """Raise ``DataQualityError`` when more than ``max_fraction`` of the ``seen`` samples were skipped.

    ``seen`` counts every sample read (usable or not, plus one per truncated sample / unreadable shard).
    Below ``min_seen`` samples the fraction is too noisy to judge and nothing is raised.
    """
    total = sum(int(n) for n in skipped.values())
    if seen < min_seen or total <= max_fraction * seen:
        return
    raise DataQualityError(
        f"data: {total} of {seen} samples read ({total / seen:.1%}) were skipped as broken, more than "
        f"data.maxSkipFraction ({max_fraction:g}): {skip_summary(skipped)}. The log names the first broken "
        "sample of each shard; fix or drop those shards, or raise data.maxSkipFraction",
        skipped=skipped,
        seen=seen,
    )


def key_seed(seed: int, epoch: int, key: str) -> int:
    """The augmentation seed of sample ``key`` in ``epoch`` (stable across processes, unlike ``hash``)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class SuperBatch:
    """One rank's super-batch: model-ready images and tokens plus what telemetry and eval need.

    ``images`` ``[n, C, S, S]`` float32 (normalised for the model; the digits source gives its 8x8
    pixels in [0, 1]), ``tokens`` ``[n, L]`` int64, ``keys`` the WebDataset ``__key__`` of each row
    (digits: ``digits-<row>``), ``labels`` int64 (-1 where the shard has no ``cls``), ``noise_kind``
    the ``.noise`` field (``"unknown"`` without one), ``reference`` precomputed reference embeddings
    ``(image_emb, text_emb)`` joined by key, or None.
    """

    images: Tensor
    tokens: Tensor
    keys: list[str]
    labels: Tensor
    noise_kind: list[str]
    captions: list[str]
    reference: tuple[Tensor, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> SuperBatch:
        """The same batch with its tensors on ``device`` (``non_blocking`` pays off from pinned memory)."""
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        reference = None if self.reference is None else (move(self.reference[0]), move(self.reference[1]))
        return replace(self, images=move(self.images), tokens=move(self.tokens), labels=move(self.labels),
                       reference=reference)  # fmt: skip


class TrainStream(ABC):
    """An infinite iterator of this rank's super-batches with a deterministic, restorable cursor."""

    def __iter__(self) -> Iterator[SuperBatch]:
        return self

    @abstractmethod
    def __next__(self) -> SuperBatch:
        """The next super-batch (raises ``DataQualityError`` when too much data is broken)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The cursor as plain Python values (ints, strings, lists, dicts): safe for ``torch.save``/JSON."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a cursor of ``state_dict``; raises ``ValueError`` naming the config field that differs."""

    @property
    @abstractmethod
    def skipped(self) -> dict[str, int]:
        """Samples skipped so far, by reason, over all readers (up to the last batch received)."""

    @property
    @abstractmethod
    def seen(self) -> int:
        """Samples read so far (usable or not), over all readers (up to the last batch received)."""

    def close(self) -> None:  # noqa: B027 (a no-op by default: only worker-backed streams hold processes)
        """Stop any worker processes (idempotent)."""

    def __enter__(self) -> TrainStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_FINGERPRINT_FIELDS: dict[str, str] = {
    "kind": "data.source",
    "shards": "data.urls (the shard list)",
    "rows": "the data set size",
    "seed": "seed",
    "rank": "the rank (each rank restores its own cursor)",
    "world_size": "the world size (numNodes x numProcPerNode)",
    "readers": "data.loaderWorkers",
    "batch_size": "the per-rank super-batch (selection.batchSize / filterRatio / world size)",
    "shuffle_buffer": "data.shuffleBuffer",
}


def _check_fingerprint(expected: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    if int(state.get("version", -1)) != STATE_VERSION:
        raise ValueError(f"data stream state: version {state.get('version')!r}, this trainer reads {STATE_VERSION}")
    found = state.get("fingerprint", {})
    for name, value in expected.items():
        if found.get(name) != value:
            what = _FINGERPRINT_FIELDS.get(name, name)
            raise ValueError(
                f"{what}: the checkpoint's data stream was read with {name}={found.get(name)!r}, this run has "
                f"{value!r}; resume with the same value (or start from a fresh checkpoint directory)"
            )


# --------------------------------------------------------------------------------------------------
# Shard stream: the per-reader pipeline (runs in DataLoader workers)
# --------------------------------------------------------------------------------------------------


def assign_shards(n_shards: int, *, epoch: int, seed: int, reader: int, n_readers: int) -> list[int]:
    """Indices of the shards ``reader`` reads in ``epoch`` (in order): a (seed, epoch) permutation, dealt round-robin.

    Over all ``n_readers`` readers the lists partition ``range(n_shards)``.
    """
    if not 0 <= reader < n_readers:
        raise ValueError(f"reader: must lie in [0, {n_readers}), got {reader}")
    order = np.random.default_rng(mixed_seed(seed, epoch, 0x5A4D)).permutation(n_shards)
    return [int(i) for i in order[reader::n_readers]]


@dataclass(frozen=True)
class StreamSpec:
    """Everything that fixes a shard stream's sample order (picklable; sent to the loader workers)."""

    shards: tuple[str, ...]
    seed: int
    rank: int
    world_size: int
    readers_per_rank: int
    batch_size: int
    shuffle_buffer: int = 1000
    read_retries: int = 3
    retry_backoff_seconds: float = 1.0
    field: str = "data.urls"
    sidecars: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.sidecars and len(self.sidecars) != len(self.shards):
            raise ValueError(
                f"reference.embeddingsUrls: {len(self.sidecars)} sidecar shard(s) for {len(self.shards)} data shard(s)"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank: must lie in [0, {self.world_size}), got {self.rank}")
        readers = self.world_size * self.readers_per_rank
        if len(self.shards) < readers:
            raise ValueError(
                f"{self.field}: {len(self.shards)} shard(s) cannot feed {self.world_size} rank(s) x "
                f"{self.readers_per_rank} loader worker(s) = {readers} readers; every reader needs at least one "
                "shard per epoch. Write more, smaller shards"
                + (f" or lower data.loaderWorkers (at most {len(self.shards) // self.world_size} here)"
                   if len(self.shards) >= self.world_size else "")
            )

    def reader(self, worker: int) -> int:
        """The global reader index of this rank's loader worker ``worker``."""
        return self.rank * self.readers_per_rank + worker

    def fingerprint(self) -> dict[str, Any]:
        """What a saved cursor must match to be restored (see ``_FINGERPRINT_FIELDS``)."""
        digest = hashlib.sha1("\n".join(self.shards).encode()).hexdigest()[:16]
        return {
            "kind": "webdataset", "shards": f"{len(self.shards)}:{digest}", "seed": self.seed,
            "world_size": self.world_size, "readers": self.readers_per_rank, "batch_size": self.batch_size,
            "shuffle_buffer": self.shuffle_buffer, "rank": self.rank,
        }  # fmt: skip

    def fresh_cursor(self, worker: int, epoch: int = 0) -> dict[str, Any]:
        """The cursor of ``worker`` at the start of ``epoch`` (nothing read)."""
        rng = np.random.Generator(np.random.PCG64(mixed_seed(self.seed, epoch, self.reader(worker), 0x5B0F)))
        return {
            "epoch": epoch, "shard": 0, "offset": 0, "buffer": [], "draining": False,
            "rng": rng.bit_generator.state, "seen": 0, "skipped": {}, "epoch_valid": 0,
        }  # fmt: skip


@dataclass
class _Decoded:
    image: Tensor
    caption: str
    key: str
    label: int
    noise: str
    reference: tuple[Tensor, ...] | None = None


class _ReaderPipeline:
    """One reader: raw samples -> shuffle buffer -> decode/preprocess -> super-batches with cursors."""

    def __init__(
        self, spec: StreamSpec, worker: int, cursor: Mapping[str, Any], transform: ImageTransformLike,
        tokenizer: Tokenizer,
    ) -> None:  # fmt: skip
        self.spec = spec
        self.worker = worker
        self.transform = transform
        self.tokenizer = tokenizer
        self.epoch = int(cursor["epoch"])
        self.shard = int(cursor["shard"])
        self.offset = int(cursor["offset"])
        self.positions: list[tuple[int, int]] = [(int(p[0]), int(p[1])) for p in cursor["buffer"]]
        self.draining = bool(cursor["draining"])
        self.rng = np.random.Generator(np.random.PCG64())
        self.rng.bit_generator.state = cursor["rng"]
        self.seen = int(cursor["seen"])
        self.skipped: dict[str, int] = {str(k): int(v) for k, v in cursor["skipped"].items()}
        self.epoch_valid = int(cursor["epoch_valid"])
        self._logged: set[tuple[int, str]] = set()

    # --- bookkeeping --------------------------------------------------------------------------------
    def cursor(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "shard": self.shard, "offset": self.offset,
            "buffer": np.asarray(self.positions, dtype=np.int64).reshape(-1, 2), "draining": self.draining,
            "rng": self.rng.bit_generator.state, "seen": self.seen, "skipped": dict(self.skipped),
            "epoch_valid": self.epoch_valid,
        }  # fmt: skip

    def _count(self, reason: str, url: str, key: str, detail: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if (self.epoch, url) not in self._logged:
            self._logged.add((self.epoch, url))
            log.warning(
                "%s: skipped sample %r (%s: %s); further problems in this shard this epoch are counted, not logged",
                url, key, reason, detail,
            )

    def _problem(self, reason: str, url: str, key: str, detail: str) -> None:
        self.seen += 1
        self._count(reason, url, key, detail)

    # --- stages -------------------------------------------------------------------------------------
    def _shard_urls(self) -> list[str]:
        indices = assign_shards(
            len(self.spec.shards), epoch=self.epoch, seed=self.spec.seed, reader=self.spec.reader(self.worker),
            n_readers=self.spec.world_size * self.spec.readers_per_rank,
        )  # fmt: skip
        return [self.spec.shards[i] for i in indices]

    def _raw(
        self, urls: Sequence[str], shard: int, offset: int, *, quiet: bool = False
    ) -> Iterator[tuple[int, int, dict]]:
        sink = (lambda *args: None) if quiet else self._problem
        sidecar_of = dict(zip(self.spec.shards, self.spec.sidecars, strict=True)) if self.spec.sidecars else {}
        for position in range(shard, len(urls)):
            start = offset if position == shard else 0
            url = urls[position]
            if url in sidecar_of:
                samples = _joined_samples(url, sidecar_of[url], start=start, spec=self.spec, on_problem=sink)
            else:
                samples = read_raw_samples(
                    url, start=start, retries=self.spec.read_retries,
                    backoff_seconds=self.spec.retry_backoff_seconds, on_problem=sink,
                )  # fmt: skip
            for index, sample in samples:
                yield position, index, sample

    def _restore_buffer(self, urls: Sequence[str]) -> list[dict]:
        """Re-read (undecoded) the samples the cursor's buffer holds, in buffer order."""
        if not self.positions:
            return []
        wanted = set(self.positions)
        first = min(wanted)
        end = (self.shard, self.offset)
        found: dict[tuple[int, int], dict] = {}
        for position, index, sample in self._raw(urls, first[0], first[1], quiet=True):
            if (position, index) >= end:
                break
            if (position, index) in wanted:
                found[(position, index)] = sample
                if len(found) == len(wanted):
                    break
        missing = [p for p in self.positions if p not in found]
        if missing:
            log.warning("reader %d: %d buffered sample(s) could not be re-read on resume; skipped", self.worker,
                        len(missing))  # fmt: skip
            for _ in missing:
                self._problem("unreadable_shard", urls[missing[0][0]], "", "shard changed or unreadable on resume")
            self.positions = [p for p in self.positions if p in found]
        return [found[p] for p in self.positions]

    def _shuffled(self, urls: Sequence[str], buffer: list[dict]) -> Iterator[dict]:
        """This epoch's raw samples in shuffle-buffer order; cursor fields are current at every yield."""
        size = self.spec.shuffle_buffer
        if not self.draining:
            for position, index, sample in self._raw(urls, self.shard, self.offset):
                self.shard, self.offset = position, index + 1
                if size == 0:
                    yield sample
                    continue
                if len(buffer) < size:
                    buffer.append(sample)
                    self.positions.append((position, index))
                    continue
                slot = int(self.rng.integers(size))
                out = buffer[slot]
                buffer[slot] = sample
                self.positions[slot] = (position, index)
                yield out
            # end of the epoch: drain in a random order (stored reversed so popping from the end is O(1))
            order = self.rng.permutation(len(buffer))[::-1]
            buffer[:] = [buffer[i] for i in order]
            self.positions = [self.positions[i] for i in order]
            self.draining = True
        while buffer:
            self.positions.pop()
            yield buffer.pop()

    def _decode(self, sample: dict) -> _Decoded | None:
        key = str(sample.get("__key__", "?"))
        url = str(sample.get("__url__", "?"))
        self.seen += 1
        image_field = next((name for name in IMAGE_FIELDS if name in sample), None)
        if image_field is None:
            self._count("missing_image", url, key, f"no {'/'.join(IMAGE_FIELDS)} file")
            return None
        if "txt" not in sample:
            self._count("missing_caption", url, key, "no txt file")
            return None
        try:
            caption = sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as error:
            self._count("bad_caption", url, key, str(error))
            return None
        if not caption:
            self._count("empty_caption", url, key, "txt is empty")
            return None
        label = -1
        if "cls" in sample:
            try:
                label = int(sample["cls"].decode("utf-8").strip())
            except (UnicodeDecodeError, ValueError):
                self._count("bad_label", url, key, f"cls {sample['cls'][:20]!r} is not an integer")
                return None
        noise = sample["noise"].decode("utf-8", "replace").strip() if "noise" in sample else UNKNOWN_NOISE
        reference = None
        if self.spec.sidecars:
            if not all(name in sample for name in SIDECAR_FIELDS):
                self._count("missing_reference", url, key, "no precomputed reference embedding for this key")
                return None
            try:
                reference = tuple(torch.from_numpy(np.load(io.BytesIO(sample[name])).astype(np.float32))
                                  for name in SIDECAR_FIELDS)  # fmt: skip
            except (ValueError, OSError) as error:
                self._count("missing_reference", url, key, f"unreadable embedding ({error})")
                return None
        try:
            image = self.transform(sample[image_field], sample_seed=key_seed(self.spec.seed, self.epoch, key))
        except ImageDecodeError as error:
            self._count("decode_error", url, key, str(error))
            return None
        except Exception as error:  # a transform failing on odd but decodable content
            self._count("decode_error", url, key, f"{type(error).__name__}: {error}")
            return None
        self.epoch_valid += 1
        return _Decoded(image=image, caption=caption or "", key=key, label=label, noise=noise, reference=reference)

    def _batch(self, rows: list[_Decoded]) -> dict[str, Any]:
        captions = [row.caption for row in rows]
        return {
            "images": torch.stack([row.image for row in rows]),
            "tokens": self.tokenizer(captions),
            "keys": [row.key for row in rows],
            "captions": captions,
            "labels": torch.tensor([row.label for row in rows], dtype=torch.long),
            "noise_kind": [row.noise for row in rows],
            "reference": None if rows[0].reference is None else (
                torch.stack([row.reference[0] for row in rows]),  # type: ignore[index]
                torch.stack([row.reference[1] for row in rows]),  # type: ignore[index]
            ),
            "worker": self.worker,
            "cursor": self.cursor(),
        }

    def batches(self) -> Iterator[dict[str, Any]]:
        """Super-batches forever, epoch after epoch; each carries the cursor as of its last sample."""
        rows: list[_Decoded] = []
        urls = self._shard_urls()
        buffer = self._restore_buffer(urls)
        while True:
            for sample in self._shuffled(urls, buffer):
                decoded = self._decode(sample)
                if decoded is None:
                    continue
                rows.append(decoded)
                if len(rows) == self.spec.batch_size:
                    yield self._batch(rows)
                    rows = []
            if self.epoch_valid == 0:
                raise DataQualityError(
                    f"{self.spec.field}: reader {self.spec.reader(self.worker)} found no usable sample in a whole "
                    f"epoch of its {len(urls)} shard(s) ({skip_summary(self.skipped)}); first shard {urls[0]!r}",
                    skipped=self.skipped, seen=self.seen,
                )  # fmt: skip
            fresh = self.spec.fresh_cursor(self.worker, self.epoch + 1)
            self.epoch, self.shard, self.offset = fresh["epoch"], 0, 0
            self.positions, self.draining, self.epoch_valid = [], False, 0
            self.rng.bit_generator.state = fresh["rng"]
            urls = self._shard_urls()
            buffer = []


class EvalReader:
    """Reads shards in order (no shuffle) in this process, decoding up to a bound; broken samples counted."""

    def __init__(self, spec: StreamSpec, transform: ImageTransformLike) -> None:
        self._pipeline = _ReaderPipeline(spec, 0, spec.fresh_cursor(0), transform, lambda captions: torch.zeros(0))

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped so far, by reason."""
        return dict(self._pipeline.skipped)

    def rows_of(self, url: str) -> Iterator[_Decoded]:
        """The usable samples of one shard, in tar order."""
        pipeline = self._pipeline
        for _, _, sample in pipeline._raw([url], 0, 0):
            decoded = pipeline._decode(sample)
            if decoded is not None:
                yield decoded

    def read(self, limit: int) -> list[_Decoded]:
        """The first ``limit`` usable samples of the shards (fewer when the shards hold fewer)."""
        pipeline = self._pipeline
        rows: list[_Decoded] = []
        for _, _, sample in pipeline._raw(list(pipeline.spec.shards), 0, 0):
            decoded = pipeline._decode(sample)
            if decoded is not None:
                rows.append(decoded)
                if len(rows) >= limit:
                    break
        return rows


def _joined_samples(
    url: str, sidecar: str, *, start: int, spec: StreamSpec, on_problem: Any
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Data shard ``url`` merge-joined by key with its sidecar shard (embeddings ``jestctl score`` wrote).

    The sidecar holds a subsequence of the data shard's keys in the same order (samples broken at
    scoring time are absent); each data sample gets the sidecar's ``SIDECAR_FIELDS`` when its key
    matches, else none (the decoder skips it as ``missing_reference``). Streams both in lockstep: no
    index of keys is held.
    """
    options = {"retries": spec.read_retries, "backoff_seconds": spec.retry_backoff_seconds}
    side = read_raw_samples(sidecar, on_problem=on_problem, **options)
    pending = next(side, None)
    for index, sample in read_raw_samples(url, on_problem=on_problem, **options):
        if pending is not None and pending[1]["__key__"] == sample["__key__"]:
            for name in SIDECAR_FIELDS:
                if name in pending[1]:
                    sample[name] = pending[1][name]
            pending = next(side, None)
        if index >= start:
            yield index, sample
    side.close()


def _identity(item: Any) -> Any:
    return item


class _ShardDataset(torch.utils.data.IterableDataset):
    """The DataLoader's view: worker ``p`` of this loader plays reader ``(p + rotation) mod K``."""

    def __init__(
        self, spec: StreamSpec, cursors: Sequence[Mapping[str, Any]], rotation: int, transform: ImageTransformLike,
        tokenizer: Tokenizer,
    ) -> None:  # fmt: skip
        super().__init__()
        self.spec = spec
        self.cursors = [dict(c) for c in cursors]
        self.rotation = rotation
        self.transform = transform
        self.tokenizer = tokenizer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        physical = 0 if info is None else info.id
        worker = (physical + self.rotation) % self.spec.readers_per_rank
        return _ReaderPipeline(self.spec, worker, self.cursors[worker], self.transform, self.tokenizer).batches()


def _plain(value: Any) -> Any:
    """Cursor values as plain Python (numpy arrays -> nested lists, numpy ints -> int)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    return value


class ShardStream(TrainStream):
    """``TrainStream`` over WebDataset shards, read by ``loader_workers`` DataLoader workers (see module doc)."""

    def __init__(
        self,
        spec: StreamSpec,
        *,
        transform: ImageTransformLike,
        tokenizer: Tokenizer,
        loader_workers: int,
        prefetch: int = 2,
        pin_memory: bool = False,
        max_skip_fraction: float = 0.05,
    ) -> None:
        if max(1, loader_workers) != spec.readers_per_rank:
            raise ValueError(
                f"data.loaderWorkers: {loader_workers} workers but the stream spec has {spec.readers_per_rank} readers"
            )
        self.spec = spec
        self.transform = transform
        self.tokenizer = tokenizer
        self.loader_workers = loader_workers
        self.prefetch = prefetch
        self.pin_memory = pin_memory
        self.max_skip_fraction = max_skip_fraction
        self._cursors: list[dict[str, Any]] = [spec.fresh_cursor(w) for w in range(spec.readers_per_rank)]
        self._batches = 0
        self._iterator: Iterator[dict[str, Any]] | None = None
        self._loader: torch.utils.data.DataLoader | None = None

    def _start(self) -> Iterator[dict[str, Any]]:
        readers = self.spec.readers_per_rank
        warm = getattr(self.transform, "warm", None)
        if warm is not None:  # heavy imports once here, inherited by every forked worker
            warm()
        dataset = _ShardDataset(self.spec, self._cursors, self._batches % readers, self.transform, self.tokenizer)
        workers = self.loader_workers
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=workers, collate_fn=_identity, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch if workers else None, persistent_workers=False,
        )  # fmt: skip
        return iter(self._loader)

    def __next__(self) -> SuperBatch:
        if self._iterator is None:
            self._iterator = self._start()
        item = next(self._iterator)
        worker = int(item["worker"])
        expected = self._batches % self.spec.readers_per_rank
        if worker != expected:  # the DataLoader's in-order rotation is what makes the cursor exact
            raise RuntimeError(f"data stream: batch {self._batches} came from reader {worker}, expected {expected}")
        self._cursors[worker] = item["cursor"]
        self._batches += 1
        check_skip_fraction(self.skipped, self.seen, self.max_skip_fraction)
        return SuperBatch(
            images=item["images"], tokens=item["tokens"], keys=list(item["keys"]), labels=item["labels"],
            noise_kind=list(item["noise_kind"]), captions=list(item["captions"]),
            reference=None if item["reference"] is None else (item["reference"][0], item["reference"][1]),
        )  # fmt: skip

    @property
    def batches(self) -> int:
        """Super-batches handed out so far (the step count of the stream)."""
        return self._batches

    @property
    def skipped(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for cursor in self._cursors:
            for reason, count in cursor["skipped"].items():
                total[reason] = total.get(reason, 0) + int(count)
        return total

    @property
    def seen(self) -> int:
        return sum(int(cursor["seen"]) for cursor in self._cursors)

    @property
    def epochs(self) -> list[int]:
        """The epoch each reader of this rank is in."""
        return [int(cursor["epoch"]) for cursor in self._cursors]

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "fingerprint": self.spec.fingerprint(),
            "batches": self._batches,
            "readers": [_plain(cursor) for cursor in self._cursors],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_fingerprint(self.spec.fingerprint(), state)
        readers = state["readers"]
        self.close()
        self._cursors = [dict(cursor) for cursor in readers]
        self._batches = int(state["batches"])

    def close(self) -> None:
        iterator, self._iterator, self._loader = self._iterator, None, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


# --------------------------------------------------------------------------------------------------
# Table stream: in-memory pairs (the digits demo)
# --------------------------------------------------------------------------------------------------


class PairRows(Protocol):
    """What ``TableStream`` reads of a table (``data.PairTable``)."""

    images: Tensor
    captions: list[str]
    labels: Tensor
    noise_kind: list[str]

    def __len__(self) -> int: ...


@dataclass
class TableStream(TrainStream):
    """``TrainStream`` over an in-memory table (the digits demo's pool or curated split).

    Step ``s`` of rank ``r`` takes ``super_batch_positions(..., step=s)`` of the rank's share
    ``shard_indices(...)`` — exactly the order the digits demo trained on before streaming existed.
    Captions are tokenized here, in the training process (the table is small); ``image_fn`` (e.g.
    ``ImageTransform.from_pixels``) turns the table's [0, 1] pixels into model input per batch.
    """

    table: PairRows
    tokenizer: Tokenizer
    rank: int
    world_size: int
    seed: int
    batch_size: int
    key_prefix: str = "digits"
    image_fn: Callable[[Tensor], Tensor] | None = None
    step: int = 0
    _share: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._share = shard_indices(len(self.table), world_size=self.world_size, rank=self.rank, seed=self.seed)
        if self.batch_size > len(self._share):
            raise ValueError(
                f"selection: the per-rank super-batch ({self.batch_size}) exceeds this rank's pool shard "
                f"({len(self._share)}); use a larger pool or a smaller batchSize / filterRatio"
            )

    def __next__(self) -> SuperBatch:
        positions = super_batch_positions(
            len(self._share), local_super_batch=self.batch_size, step=self.step, seed=self.seed, rank=self.rank
        )
        rows = self._share.index_select(0, positions)
        index = rows.tolist()
        captions = [self.table.captions[i] for i in index]
        self.step += 1
        images = self.table.images.index_select(0, rows)
        return SuperBatch(
            images=images if self.image_fn is None else self.image_fn(images),
            tokens=self.tokenizer(captions),
            keys=[f"{self.key_prefix}-{i}" for i in index],
            labels=self.table.labels.index_select(0, rows),
            noise_kind=[self.table.noise_kind[i] for i in index],
            captions=captions,
        )

    def _fingerprint(self) -> dict[str, Any]:
        return {"kind": "table", "rows": len(self.table), "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size, "rank": self.rank}  # fmt: skip

    @property
    def skipped(self) -> dict[str, int]:
        return {}

    @property
    def seen(self) -> int:
        return self.step * self.batch_size

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "fingerprint": self._fingerprint(), "step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_fingerprint(self._fingerprint(), state)
        self.step = int(state["step"])


__all__ = [
    "IMAGE_FIELDS",
    "SIDECAR_FIELDS",
    "SKIP_REASONS",
    "DataQualityError",
    "EvalReader",
    "ShardStream",
    "StreamSpec",
    "SuperBatch",
    "TableStream",
    "TrainStream",
    "assign_shards",
    "check_skip_fraction",
    "key_seed",
    "mixed_seed",
    "shard_indices",
    "skip_summary",
    "super_batch_positions",
]
