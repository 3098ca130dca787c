"""The shard stream on real WebDataset shards: splitting, epochs, the exact resume cursor, broken data."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from jest_trainer import data
from jest_trainer.config import TrainingConfig
from jest_trainer.models import hash_tokenize
from jest_trainer.preprocess import ImageTransform, PreprocessSpec, build_image_transform
from jest_trainer.shards import read_raw_samples
from jest_trainer.stream import (
    DataQualityError,
    ShardStream,
    StreamSpec,
    assign_shards,
    check_skip_fraction,
    skip_summary,
)

from tests import shard_factory as sf

SPEC = PreprocessSpec(size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _cfg(urls: str, **data_fields: Any) -> TrainingConfig:
    fields = {"source": "webdataset", "urls": urls, "loaderWorkers": 0, "shuffleBuffer": 8, **data_fields}
    return TrainingConfig.model_validate({"data": fields, "model": {"imageSize": 8}})


def _open(
    cfg: TrainingConfig, *, rank: int = 0, world: int = 1, batch: int = 6, transform: Any = None
) -> data.TrainStream:
    return data.open_train_stream(
        cfg, rank=rank, world_size=world, local_super_batch=batch,
        transform=transform or ImageTransform(SPEC), tokenizer=hash_tokenize,
    )  # fmt: skip


def _keys(stream: data.TrainStream, batches: int) -> list[list[str]]:
    return [next(stream).keys for _ in range(batches)]


def test_assign_shards_partitions_every_epoch_and_reshuffles() -> None:
    lists = {e: [assign_shards(10, epoch=e, seed=3, reader=r, n_readers=4) for r in range(4)] for e in range(3)}
    for epoch, per_reader in lists.items():
        flat = sorted(i for shards in per_reader for i in shards)
        assert flat == list(range(10)), epoch
        assert sorted(len(s) for s in per_reader) == [2, 2, 3, 3]
    assert lists[0] != lists[1] != lists[2]
    assert lists[0] == [assign_shards(10, epoch=0, seed=3, reader=r, n_readers=4) for r in range(4)]
    assert lists[0] != [assign_shards(10, epoch=0, seed=4, reader=r, n_readers=4) for r in range(4)]


def test_fewer_shards_than_readers_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"data\.urls: 3 shard\(s\) cannot feed 2 rank\(s\) x 2 loader.*loaderWorkers"):
        StreamSpec(shards=("a", "b", "c"), seed=0, rank=0, world_size=2, readers_per_rank=2, batch_size=4)


def test_one_epoch_over_ranks_and_workers_reads_every_sample_exactly_once(tmp_path: Path) -> None:
    sf.write_shards(tmp_path, shards=8, per_shard=12)
    cfg = _cfg(sf.pattern(tmp_path, 8), loaderWorkers=2)
    # 2 ranks x 2 workers = 4 readers, 2 shards = 24 samples each = 4 super-batches of 6 per reader per epoch
    epochs: list[list[str]] = [[], []]
    for rank in range(2):
        with _open(cfg, rank=rank, world=2) as stream:
            batches = _keys(stream, 16)
            assert isinstance(stream, ShardStream) and stream.epochs == [1, 1]
        epochs[0] += [k for b in batches[:8] for k in b]
        epochs[1] += [k for b in batches[8:] for k in b]
    everything = {sf.key(s, r) for s in range(8) for r in range(12)}
    for keys in epochs:
        assert len(keys) == len(set(keys)) == 96
        assert set(keys) == everything
    assert epochs[0] != epochs[1]  # the second epoch is reshuffled, not replayed


def test_uneven_shards_never_drop_or_repeat_within_a_readers_epoch(tmp_path: Path) -> None:
    sf.write_shards(tmp_path, shards=3, per_shard=[10, 7, 5])
    with _open(_cfg(sf.pattern(tmp_path, 3)), batch=11) as stream:  # one reader: 22 samples per epoch
        keys = [k for b in _keys(stream, 4) for k in b]
    assert len(keys) == 44
    assert len(set(keys[:22])) == 22 and set(keys[:22]) == set(keys[22:44])


def _run(cfg: TrainingConfig, *, rank: int, world: int, total: int, split: int | None, **kw: Any) -> list[Any]:
    """Batches 0..total-1 of one rank, optionally stopping after ``split`` batches and resuming from state."""
    first = _open(cfg, rank=rank, world=world, **kw)
    if split is None:
        with first:
            return [next(first) for _ in range(total)]
    with first:
        head = [next(first) for _ in range(split)]
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint keeps: plain values
    with _open(cfg, rank=rank, world=world, **kw) as second:
        second.load_state_dict(state)
        return head + [next(second) for _ in range(total - split)]


@pytest.mark.parametrize("split", [3, 7])
def test_resume_yields_exactly_the_same_batches_with_two_ranks_and_two_workers(tmp_path: Path, split: int) -> None:
    sf.write_shards(tmp_path, shards=8, per_shard=[9, 11, 10, 12, 9, 11, 10, 12])
    cfg = _cfg(sf.pattern(tmp_path, 8), loaderWorkers=2, shuffleBuffer=7, randomResizedCrop=True, cropMinScale=0.3)
    transform = build_image_transform(cfg.model, cfg.data, train=True)
    for rank in range(2):
        # each reader gets 6 of 12 batches = 36 samples, more than any reader's epoch (at most 24): the resumed part
        # crosses an epoch boundary; split 7 stops one reader inside its end-of-epoch drain
        whole = _run(cfg, rank=rank, world=2, total=12, split=None, transform=transform)
        resumed = _run(cfg, rank=rank, world=2, total=12, split=split, transform=transform)
        assert [b.keys for b in resumed] == [b.keys for b in whole]
        for a, b in zip(resumed, whole, strict=True):
            assert torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)


class CountingTransform(ImageTransform):
    """An ImageTransform that counts how many images it decodes (in-process streams only)."""

    calls = 0

    def __call__(self, payload: bytes, *, sample_seed: int | None = None) -> torch.Tensor:
        CountingTransform.calls += 1
        return super().__call__(payload, sample_seed=sample_seed)


def test_resume_skips_ahead_without_decoding_any_image(tmp_path: Path) -> None:
    sf.write_shards(tmp_path, shards=2, per_shard=30)
    cfg = _cfg(sf.pattern(tmp_path, 2), shuffleBuffer=10)
    counting = CountingTransform(SPEC)
    with _open(cfg, transform=counting) as stream:
        whole = _keys(stream, 8)
    with _open(cfg, transform=counting) as stream:
        _keys(stream, 5)
        state = stream.state_dict()
    CountingTransform.calls = 0
    with _open(cfg, transform=counting) as stream:
        stream.load_state_dict(state)
        assert next(stream).keys == whole[5]
    assert CountingTransform.calls == 6  # exactly one super-batch decoded: the skipped 30 samples were not


def test_state_dict_is_plain_and_refuses_a_different_stream(tmp_path: Path) -> None:
    sf.write_shards(tmp_path, shards=4, per_shard=6)
    cfg = _cfg(sf.pattern(tmp_path, 4))
    with _open(cfg) as stream:
        next(stream)
        state = stream.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == json.loads(json.dumps(state))
    for changed, field in (
        (_cfg(sf.pattern(tmp_path, 4), loaderWorkers=2), r"data\.loaderWorkers"),
        (_cfg(sf.pattern(tmp_path, 4), shuffleBuffer=3), r"data\.shuffleBuffer"),
        (_cfg(sf.pattern(tmp_path, 3)), r"data\.urls"),
    ):
        with _open(changed) as other, pytest.raises(ValueError, match=field):
            other.load_state_dict(state)
    with _open(cfg, batch=5) as other, pytest.raises(ValueError, match="super-batch"):
        other.load_state_dict(state)


BROKEN = {
    sf.key(0, 1): "decode_error",
    sf.key(0, 4): "decode_error",
    sf.key(1, 0): "missing_caption",
    sf.key(1, 2): "empty_caption",
    sf.key(2, 3): "missing_image",
    sf.key(2, 5): "bad_label",
}


def test_broken_samples_are_skipped_counted_by_reason_and_logged_once_per_shard(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = sf.write_shards(tmp_path, shards=4, per_shard=10, broken=BROKEN)
    truncated = sf.truncate_inside_member(paths[3], member_index=3 * 7 + 1)  # sample 7's png (3 files a sample)
    assert truncated.startswith(sf.key(3, 7))
    good = {sf.key(s, r) for s in range(4) for r in range(10)} - set(BROKEN) - {sf.key(3, r) for r in range(7, 10)}
    cfg = _cfg(sf.pattern(tmp_path, 4), maxSkipFraction=0.5)
    with caplog.at_level(logging.WARNING, logger="jest_trainer.data"), _open(cfg, batch=len(good)) as stream:
        batch = next(stream)
        assert set(batch.keys) == good
        assert stream.skipped == {"decode_error": 2, "missing_caption": 1, "empty_caption": 1, "missing_image": 1,
                                  "bad_label": 1, "truncated": 1}  # fmt: skip
        assert stream.seen == len(good) + 7
    logged = [r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()]
    assert len(logged) == 4  # one line per damaged shard, naming the first broken sample
    shard0 = next(line for line in logged if "s-000000.tar" in line)  # shuffled: either broken sample comes first
    assert "decode_error" in shard0 and (sf.key(0, 1) in shard0 or sf.key(0, 4) in shard0)
    assert any("truncated" in line and "s-000003.tar" in line for line in logged)


def test_too_many_broken_samples_fail_the_stream_saying_how_many_and_why(tmp_path: Path) -> None:
    broken = {sf.key(s, r): "decode_error" for s in range(4) for r in range(0, 60, 5)}  # 20 % broken
    sf.write_shards(tmp_path, shards=4, per_shard=60, broken=broken)
    with (
        _open(_cfg(sf.pattern(tmp_path, 4), maxSkipFraction=0.1), batch=32) as stream,
        pytest.raises(DataQualityError, match=r"data\.maxSkipFraction \(0\.1\).*decode_error") as failure,
    ):
        for _ in range(20):
            next(stream)
    assert failure.value.skipped["decode_error"] > 0.1 * failure.value.seen
    with _open(_cfg(sf.pattern(tmp_path, 4), maxSkipFraction=0.25), batch=32) as stream:
        _keys(stream, 12)  # within the allowance: the run goes on


def test_a_reader_with_nothing_usable_is_an_error_not_a_hang(tmp_path: Path) -> None:
    sf.write_shards(tmp_path, shards=1, per_shard=5, broken={sf.key(0, r): "decode_error" for r in range(5)})
    with (
        _open(_cfg(sf.pattern(tmp_path, 1), maxSkipFraction=1.0), batch=2) as stream,
        pytest.raises(DataQualityError, match="no usable sample in a whole epoch"),
    ):
        next(stream)


def test_check_skip_fraction_bounds() -> None:
    check_skip_fraction({"decode_error": 10}, 100, 0.05, min_seen=200)  # too few samples to judge
    check_skip_fraction({"decode_error": 10}, 200, 0.05)  # exactly 5 %
    with pytest.raises(DataQualityError, match="11 of 200 samples"):
        check_skip_fraction({"decode_error": 10, "truncated": 1}, 200, 0.05)
    assert skip_summary({"truncated": 1, "decode_error": 3, "bad_label": 0}) == "3 decode_error, 1 truncated"
    assert skip_summary({}) == "none"


def test_eval_set_is_bounded_and_labels_are_optional(tmp_path: Path) -> None:
    labelled, unlabelled = tmp_path / "a", tmp_path / "b"
    sf.write_shards(labelled, shards=2, per_shard=10, broken={sf.key(0, 0): "decode_error"})
    sf.write_shards(unlabelled, shards=1, per_shard=10, with_cls=False)
    transform = ImageTransform(SPEC)
    cfg = _cfg(sf.pattern(labelled, 2), evalUrls=sf.pattern(labelled, 2))
    bounded = data.load_eval_set(cfg, transform=transform, tokenizer=hash_tokenize, max_samples=12)
    assert len(bounded) == 12 and bounded.images.shape == (12, 3, 8, 8) and bounded.tokens.shape[0] == 12
    assert bounded.keys[0] == sf.key(0, 1) and bounded.skipped == {"decode_error": 1}
    assert bounded.has_labels and bounded.class_prompts is not None and len(bounded.class_prompts) == 3
    cfg = _cfg(sf.pattern(unlabelled, 1), evalUrls=sf.pattern(unlabelled, 1))
    plain = data.load_eval_set(cfg, transform=transform, tokenizer=hash_tokenize)
    assert len(plain) == 10 and not plain.has_labels and plain.class_prompts is None
    assert plain.labels.tolist() == [-1] * 10
    (unlabelled / "class_prompts.json").write_text(json.dumps([["a cat"], ["a dog"]]))
    assert data.load_eval_set(cfg, transform=transform, tokenizer=hash_tokenize).class_prompts == [["a cat"], ["a dog"]]


def test_open_train_stream_rejects_a_pattern_naming_no_shard(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.urls: shard .*missing-000000.tar' does not exist"):
        _open(_cfg(str(tmp_path / "missing-{000000..000003}.tar")))


def _write_sidecars(out: Path, shards: list[Path], *, dim: int, drop: set[str]) -> None:
    """One sidecar per data shard (same file name), keys in data order: what ``jestctl score`` writes."""
    import numpy as np
    import webdataset as wds

    out.mkdir()
    for path in shards:
        with wds.TarWriter(str(out / path.name)) as writer:
            for _, sample in read_raw_samples(str(path)):
                name = sample["__key__"]
                if name in drop:
                    continue
                seed = int(name[1:4]) * 100 + int(name[5:])
                writer.write({"__key__": name, "ref_image.npy": np.full(dim, seed, dtype=np.float16),
                              "ref_text.npy": np.full(dim, -seed, dtype=np.float16)})  # fmt: skip


def test_precomputed_reference_embeddings_are_joined_by_key(tmp_path: Path) -> None:
    shards = sf.write_shards(tmp_path / "data", shards=2, per_shard=6)
    _write_sidecars(tmp_path / "emb", shards, dim=4, drop={sf.key(1, 2)})
    cfg = TrainingConfig.model_validate({
        "data": {"source": "webdataset", "urls": sf.pattern(tmp_path / "data", 2), "loaderWorkers": 0},
        "model": {"imageSize": 8},
        "reference": {"mode": "precomputed", "checkpoint": str(tmp_path / "reference.pt"),
                      "embeddingsUrls": str(tmp_path / "emb" / "*.tar")},
    })  # fmt: skip
    with _open(cfg, batch=11) as stream:
        batch = next(stream)
        assert stream.skipped == {"missing_reference": 1}
    assert sf.key(1, 2) not in batch.keys and len(set(batch.keys)) == 11
    assert batch.reference is not None
    image, text = batch.reference
    assert image.shape == text.shape == (11, 4) and image.dtype == torch.float32
    for row, name in enumerate(batch.keys):
        seed = int(name[1:4]) * 100 + int(name[5:])
        assert float(image[row, 0]) == seed and float(text[row, 3]) == -seed
    (tmp_path / "emb" / "s-000001.tar").unlink()
    with pytest.raises(ValueError, match=r"reference\.embeddingsUrls: no sidecar named like data shard"):
        _open(cfg)


def test_shard_scanner_batches_within_shards_in_order(tmp_path: Path) -> None:
    sf.write_shards(tmp_path, shards=2, per_shard=5, broken={sf.key(0, 1): "decode_error"})
    scanner = data.ShardScanner(sf.pattern(tmp_path, 2), transform=ImageTransform(SPEC), tokenizer=hash_tokenize,
                                batch_size=3)  # fmt: skip
    batches = list(scanner)
    assert [(Path(b.url).name, b.keys) for b in batches] == [
        ("s-000000.tar", [sf.key(0, 0), sf.key(0, 2), sf.key(0, 3)]),
        ("s-000000.tar", [sf.key(0, 4)]),
        ("s-000001.tar", [sf.key(1, 0), sf.key(1, 1), sf.key(1, 2)]),
        ("s-000001.tar", [sf.key(1, 3), sf.key(1, 4)]),
    ]
    assert batches[0].images.shape == (3, 3, 8, 8) and batches[0].tokens.shape[0] == 3
    assert scanner.skipped == {"decode_error": 1}


def test_a_small_shard_set_reads_with_fewer_workers_by_an_explicit_rule(tmp_path: Path) -> None:
    assert data.readers_per_rank(4, shards=10, world_size=2) == 4
    assert data.readers_per_rank(4, shards=5, world_size=2) == 2
    assert data.readers_per_rank(2, shards=1, world_size=1) == 1
    assert data.readers_per_rank(0, shards=8, world_size=2) == 1
    sf.write_shards(tmp_path, shards=1, per_shard=9)
    with _open(_cfg(sf.pattern(tmp_path, 1), loaderWorkers=2), batch=3) as stream:
        assert [k for b in _keys(stream, 3) for k in b] and stream.state_dict()["fingerprint"]["readers"] == 1
    with pytest.raises(ValueError, match=r"1 shard\(s\) cannot feed 2 rank"):
        _open(_cfg(sf.pattern(tmp_path, 1)), rank=0, world=2)
