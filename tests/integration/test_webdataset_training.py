"""The trainer trains from WebDataset shards written by ``jestctl data digits`` (the LAUNCHER → trainer path).

LAION/DataComp-style shards (``.png`` + ``.txt``, here also ``.cls`` and ``.noise``) are the format real
jobs use; this runs the whole pipeline on them in-process: shards → pool, curated and test tables →
reference training → JEST steps → zero-shot evaluation, and checks the noise kinds survived the round trip.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from jest_operator.cli import main as jestctl
from jest_trainer import train as train_mod
from jest_trainer.config import EnergyConfig, TrainingConfig, WorkerConfig

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
