"""The trainer trains from WebDataset shards written by ``jestctl data digits`` (the LAUNCHER → trainer path).

LAION/DataComp-style shards (``.png`` + ``.txt``, here also ``.cls`` and ``.noise``) are the format real
jobs use; this runs the whole pipeline on them in-process: shards → pool, curated and test tables →
reference training → JEST steps → zero-shot evaluation, and checks the noise kinds survived the round trip.
The streaming tests serve shards from a real ``http.server`` that fails some requests on purpose.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from jest_operator.cli import main as jestctl
from jest_trainer import data
from jest_trainer import train as train_mod
from jest_trainer.config import EnergyConfig, TrainingConfig, WorkerConfig
from jest_trainer.models import hash_tokenize
from jest_trainer.preprocess import build_image_transform
from jest_trainer.shards import read_raw_samples

from tests import shard_factory as sf

SINGLE = train_mod.DistContext(world_size=1, rank=0, local_rank=0, backend=None, device=torch.device("cpu"))


@pytest.mark.slow
def test_trainer_trains_from_jestctl_digits_shards(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    assert jestctl(["data", "digits", "--out", str(shards), "--shard-size", "4000"]) == 0
    pool = sorted(shards.glob("pool-*.tar"))
    curated = sorted(shards.glob("curated-*.tar"))
    test = sorted(shards.glob("test-*.tar"))
    assert len(pool) > 1 and curated and test
    pool_urls = str(shards / f"pool-{{000000..{len(pool) - 1:06d}}}.tar")

    training = TrainingConfig.model_validate(
        {
            "steps": 8,
            "seed": 1,
            "data": {"source": "webdataset", "urls": pool_urls, "evalUrls": str(test[0])},
            "reference": {"train": {"steps": 10, "urls": str(curated[0])}},
            "selection": {"method": "jest", "batchSize": 32, "chunks": 4, "filterRatio": 0.8},
            "checkpoint": {"dir": str(tmp_path / "ckpt"), "intervalSteps": 4},
            "eval": {"intervalSteps": 4},
        }
    )
    summary = train_mod.train(
        WorkerConfig(training=training, energy=EnergyConfig(backend="modelled")),
        env={"JEST_PROGRESS": "plain"}, ctx=SINGLE, install_signal_handlers=False,
    )
    assert summary["completed_steps"] == 8
    assert 0.0 <= summary["final_accuracy"] <= 1.0
    assert summary["examples_trained"] == 8 * 32 and summary["examples_scored"] == 8 * 160
    # the noise kinds recorded in the shards are what the trainer counts in its selected mix
    assert set(summary["selected_mix"]) == {"clean", "wrong", "junk", "duplicate"}
    assert sum(summary["selected_mix"].values()) == 8 * 32
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("ckpt-*.pt")) == ["ckpt-00000004.pt", "ckpt-00000008.pt"]


# --------------------------------------------------------------------------------------------------
# Streaming from HTTP: a real http.server in a thread, with transient failures and a missing shard
# --------------------------------------------------------------------------------------------------


class _FlakyShardServer(http.server.ThreadingHTTPServer):
    """Serves ``root``; the first GET of each name in ``fail_once`` answers 503, of ``drop_once`` breaks mid-body;
    names starting with ``busy-`` always answer 503."""

    def __init__(self, root: Path, *, fail_once: set[str], drop_once: set[str]) -> None:
        self.root, self.fail_once, self.drop_once = root, set(fail_once), set(drop_once)
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", 0), _FlakyHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    server: _FlakyShardServer

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        self.server.requests.append(name)
        path = self.server.root / name
        if name in self.server.fail_once or name.startswith("busy-"):
            self.server.fail_once.discard(name)
            self.send_error(503, "try again")
            return
        if not path.is_file():
            self.send_error(404, "no such shard")
            return
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in self.server.drop_once:
            self.server.drop_once.discard(name)
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test asserts on ``server.requests`` instead."""


@pytest.fixture
def shard_server(tmp_path: Path) -> Iterator[_FlakyShardServer]:
    sf.write_shards(tmp_path / "www", shards=4, per_shard=8)
    server = _FlakyShardServer(tmp_path / "www", fail_once={"s-000001.tar"}, drop_once={"s-000002.tar"})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _stream_keys(urls: str, batches: int, **data_fields: object) -> tuple[list[str], dict[str, int]]:
    fields = {"source": "webdataset", "urls": urls, "shuffleBuffer": 4, "retryBackoffSeconds": 0.01, **data_fields}
    cfg = TrainingConfig.model_validate({"data": fields, "model": {"imageSize": 8}})
    transform = build_image_transform(cfg.model, cfg.data, train=True)
    with data.open_train_stream(cfg, rank=0, world_size=1, local_super_batch=4, transform=transform,
                                tokenizer=hash_tokenize) as stream:  # fmt: skip
        keys = [k for _ in range(batches) for k in next(stream).keys]
        return keys, stream.skipped


@pytest.mark.slow
def test_http_shards_stream_like_local_ones_through_retries(shard_server: _FlakyShardServer, tmp_path: Path) -> None:
    local, _ = _stream_keys(sf.pattern(tmp_path / "www", 4), 16, loaderWorkers=2)
    remote, skipped = _stream_keys(f"{shard_server.url}/s-{{000000..000003}}.tar", 16, loaderWorkers=2)
    assert remote == local and len(set(remote[:32])) == 32
    assert skipped == {}
    # the 503 and the broken body were retried (each shard twice), the rest read once per epoch
    assert shard_server.requests.count("s-000001.tar") >= 2 and shard_server.requests.count("s-000002.tar") >= 2


@pytest.mark.slow
def test_a_shard_missing_on_the_server_is_skipped_and_counted(shard_server: _FlakyShardServer) -> None:
    urls = f"{shard_server.url}/s-000000.tar::{shard_server.url}/gone.tar::{shard_server.url}/s-000003.tar"
    keys, skipped = _stream_keys(urls, 4, loaderWorkers=0, readRetries=2, maxSkipFraction=0.5)
    assert set(keys) == {sf.key(s, r) for s in (0, 3) for r in range(8)}
    assert skipped == {"unreadable_shard": 1}
    assert shard_server.requests.count("gone.tar") == 1  # a 404 is not transient: no retry


@pytest.mark.slow
def test_a_shard_failing_every_retry_is_skipped_after_backing_off(shard_server: _FlakyShardServer) -> None:
    problems: list[str] = []
    waits: list[float] = []
    url = f"{shard_server.url}/busy-000000.tar"
    samples = read_raw_samples(url, retries=3, backoff_seconds=0.5, sleep=waits.append,
                               on_problem=lambda reason, u, k, detail: problems.append(f"{reason}: {detail}"))
    assert list(samples) == []
    assert waits == [0.5, 1.0, 2.0]  # exponential backoff, then give up
    assert shard_server.requests.count("busy-000000.tar") == 4
    assert len(problems) == 1 and problems[0].startswith("unreadable_shard") and "HTTP 503" in problems[0]
