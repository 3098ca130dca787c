"""Broken samples through the whole loop: counted in the summary and progress file, and fatal past the limit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from jest_trainer import train as train_mod
from jest_trainer.config import EnergyConfig, TrainingConfig, WorkerConfig

from tests import shard_factory as sf

SINGLE = train_mod.DistContext(world_size=1, rank=0, local_rank=0, backend=None, device=torch.device("cpu"))
pytestmark = pytest.mark.slow
SHARDS, PER_SHARD = 4, 100


def _train(tmp_path: Path, broken: dict[str, str], max_skip: float) -> dict:
    pool = tmp_path / "pool"
    sf.write_shards(pool, shards=SHARDS, per_shard=PER_SHARD, broken=broken)
    sf.write_shards(tmp_path / "eval", shards=1, per_shard=40, prefix="e")
    training = TrainingConfig.model_validate({
        "steps": 6, "seed": 0,
        "model": {"imageSize": 16},
        "data": {"source": "webdataset", "urls": sf.pattern(pool, SHARDS),
                 "evalUrls": sf.pattern(tmp_path / "eval", 1, "e"), "loaderWorkers": 0, "shuffleBuffer": 0,
                 "maxSkipFraction": max_skip},
        "reference": {"train": {"steps": 2, "batchSize": 16, "urls": sf.pattern(pool, SHARDS)}},
        "selection": {"method": "jest", "batchSize": 16, "chunks": 4, "filterRatio": 0.5},
        "checkpoint": {"dir": str(tmp_path / "ck"), "intervalSteps": 6},
        "eval": {"intervalSteps": 6},
    })
    return train_mod.train(WorkerConfig(training=training, energy=EnergyConfig(backend="modelled")),
                           env={"JEST_PROGRESS": "plain"}, ctx=SINGLE, install_signal_handlers=False)


def test_skipped_samples_are_counted_by_reason_in_summary_and_progress(tmp_path: Path) -> None:
    broken = {sf.key(0, 3): "decode_error", sf.key(1, 5): "empty_caption", sf.key(2, 7): "missing_caption"}
    summary = _train(tmp_path, broken, max_skip=0.05)
    assert summary["completed_steps"] == 6
    assert set(summary["samples_skipped"]) <= {"decode_error", "empty_caption", "missing_caption"}
    assert sum(summary["samples_skipped"].values()) >= 1
    progress = json.loads((tmp_path / "ck" / "progress.json").read_text())
    assert progress["samplesSkipped"] == summary["samples_skipped"]
    assert set(progress["lastEvalRetrieval"]) == {"image_to_text", "text_to_image"}


def test_more_broken_samples_than_allowed_fail_the_run_saying_how_many_and_why(tmp_path: Path) -> None:
    broken = {sf.key(shard, row): "decode_error" for shard in range(SHARDS) for row in range(0, PER_SHARD, 4)}
    with pytest.raises(RuntimeError, match=r"decode_error") as raised:
        _train(tmp_path, broken, max_skip=0.05)
    assert "maxSkipFraction" in str(raised.value)
    progress = json.loads((tmp_path / "ck" / "progress.json").read_text())
    assert progress["phase"] == "Failed"
