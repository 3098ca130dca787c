"""Shard URLs: pattern resolution, the opener each scheme gets, pipe: and fsspec reads, broken shards."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import fsspec
import pytest
from jest_trainer.shards import MissingExtraError, read_raw_samples, resolve_shards, url_scheme

from tests import shard_factory as sf


def test_url_scheme_picks_the_opener() -> None:
    assert url_scheme("/data/a.tar") == "file"
    assert url_scheme("file:///data/a.tar") == "file"
    assert url_scheme("http://host/a.tar") == url_scheme("https://host/a.tar") == "http"
    assert url_scheme("pipe:curl -s http://host/a.tar") == "pipe"
    assert url_scheme("s3://bucket/a.tar") == url_scheme("gs://bucket/a.tar") == "fsspec"


def test_resolve_expands_braces_lists_and_globs_in_order(tmp_path: Path) -> None:
    paths = [str(p) for p in sf.write_shards(tmp_path, shards=3, per_shard=1)]
    assert resolve_shards(sf.pattern(tmp_path, 3)) == paths
    assert resolve_shards(f"{paths[2]}::{paths[0]}") == [paths[2], paths[0]]
    assert resolve_shards(str(tmp_path / "s-*.tar")) == paths
    assert resolve_shards("http://host/p-{0..2}.tar") == [f"http://host/p-{i}.tar" for i in range(3)]


def test_resolve_fails_clearly_before_training(tmp_path: Path) -> None:
    sf.write_shards(tmp_path, shards=2, per_shard=1)
    with pytest.raises(ValueError, match=r"data\.urls: shard .*s-000002\.tar' does not exist"):
        resolve_shards(sf.pattern(tmp_path, 3))
    with pytest.raises(ValueError, match=r"reference\.train\.urls: .*matches no file"):
        resolve_shards(str(tmp_path / "nothing-*.tar"), field="reference.train.urls")
    with pytest.raises(ValueError, match="empty shard pattern"):
        resolve_shards("  ")
    with pytest.raises(ValueError, match="named more than once"):
        resolve_shards(f"{tmp_path / 's-000000.tar'}::{tmp_path / 's-000000.tar'}")


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed here")
def test_object_storage_without_the_extra_says_what_to_install() -> None:
    with pytest.raises(MissingExtraError, match=r"s3fs.*pip install 'jest-operator\[remote\]'"):
        resolve_shards("s3://bucket/pool-{000000..000009}.tar")


def test_fsspec_urls_stream_through_fsspec(tmp_path: Path) -> None:
    local = sf.write_shards(tmp_path, shards=2, per_shard=3)
    memory = fsspec.filesystem("memory")
    for path in local:
        memory.pipe(f"/jest-test/{path.name}", path.read_bytes())
    urls = resolve_shards("memory://jest-test/s-*.tar")
    assert urls == ["memory:///jest-test/s-000000.tar", "memory:///jest-test/s-000001.tar"]
    keys = [sample["__key__"] for url in urls for _, sample in read_raw_samples(url)]
    assert keys == [sf.key(s, r) for s in range(2) for r in range(3)]


def test_pipe_shards_and_a_failing_command(tmp_path: Path) -> None:
    (path,) = sf.write_shards(tmp_path, shards=1, per_shard=4)
    samples = list(read_raw_samples(f"pipe:cat {path}", start=1))
    assert [index for index, _ in samples] == [1, 2, 3]
    assert samples[0][1]["__key__"] == sf.key(0, 1) and samples[0][1]["png"].startswith(b"\x89PNG")
    problems: list[tuple[str, str]] = []
    failing = read_raw_samples(f"pipe:cat {tmp_path}/absent.tar", on_problem=lambda r, u, k, d: problems.append((r, d)))
    assert not list(failing)
    assert problems and problems[0][0] == "unreadable_shard" and "exited with status" in problems[0][1]


def test_a_truncated_local_shard_keeps_what_precedes_the_damage_and_is_not_retried(tmp_path: Path) -> None:
    (path,) = sf.write_shards(tmp_path, shards=1, per_shard=5)
    sf.truncate_inside_member(path, member_index=3 * 2 + 1)
    problems: list[tuple[str, str]] = []
    waits: list[float] = []
    samples = list(
        read_raw_samples(
            str(path), retries=3, on_problem=lambda r, u, k, d: problems.append((r, k)), sleep=waits.append
        )
    )
    assert [s["__key__"] for _, s in samples] == [sf.key(0, 0), sf.key(0, 1)]
    assert problems == [("truncated", sf.key(0, 2))]
    assert waits == []  # local bytes do not change: no retry


def test_stopping_early_on_a_pipe_is_not_an_error(tmp_path: Path) -> None:
    (path,) = sf.write_shards(tmp_path, shards=1, per_shard=50)
    problems: list[str] = []
    samples = read_raw_samples(f"pipe:cat {path}", on_problem=lambda r, u, k, d: problems.append(r))
    assert next(samples)[0] == 0
    samples.close()
    assert problems == []
