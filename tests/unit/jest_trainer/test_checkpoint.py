"""Checkpoint files: atomic writes, rotation, skipping corrupted or partial files, RNG round trips."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from jest_trainer import checkpoint as ckpt


def _state(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((3,), float(step))}, "optimizer": {"state": {}, "lr": 0.1}}


def test_save_then_load_latest_returns_the_newest_complete(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        ckpt.save_checkpoint(tmp_path, step, _state(step), keep=5)
    loaded = ckpt.load_latest_checkpoint(tmp_path)
    assert loaded is not None
    assert loaded.step == 30
    assert loaded.path.name == "ckpt-00000030.pt"
    assert torch.equal(loaded.state["model"]["w"], torch.full((3,), 30.0))


def test_rotation_keeps_only_the_last_n(tmp_path: Path) -> None:
    for step in range(1, 8):
        ckpt.save_checkpoint(tmp_path, step, _state(step), keep=3)
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [5, 6, 7]


def test_no_temporary_files_are_left_behind(tmp_path: Path) -> None:
    ckpt.save_checkpoint(tmp_path, 1, _state(1), keep=1)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000001.pt"]


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path: Path) -> None:
    ckpt.save_checkpoint(tmp_path, 1, _state(1), keep=3)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, {**_state(2), "extra": Unpicklable()}, keep=3)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000001.pt"]
    loaded = ckpt.load_latest_checkpoint(tmp_path)
    assert loaded is not None and loaded.step == 1


def test_corrupted_newest_checkpoint_is_skipped_with_a_warning(tmp_path: Path, caplog) -> None:
    ckpt.save_checkpoint(tmp_path, 10, _state(10), keep=5)
    good = ckpt.save_checkpoint(tmp_path, 20, _state(20), keep=5)
    truncated = ckpt.checkpoint_path(tmp_path, 30)
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    ckpt.checkpoint_path(tmp_path, 40).write_bytes(b"not a checkpoint at all")
    with caplog.at_level(logging.WARNING, logger="jest_trainer.checkpoint"):
        loaded = ckpt.load_latest_checkpoint(tmp_path)
    assert loaded is not None and loaded.step == 20
    assert "ckpt-00000040.pt" in caplog.text and "ckpt-00000030.pt" in caplog.text


def test_checkpoint_missing_required_keys_or_with_a_wrong_step_is_skipped(tmp_path: Path) -> None:
    ckpt.save_checkpoint(tmp_path, 5, _state(5), keep=5)
    torch.save({"step": 6, "model": {}}, ckpt.checkpoint_path(tmp_path, 6))
    torch.save(_state(99), ckpt.checkpoint_path(tmp_path, 7))
    loaded = ckpt.load_latest_checkpoint(tmp_path)
    assert loaded is not None and loaded.step == 5


def test_empty_or_missing_directory_has_no_checkpoint(tmp_path: Path) -> None:
    assert ckpt.load_latest_checkpoint(tmp_path) is None
    assert ckpt.load_latest_checkpoint(tmp_path / "absent") is None


def test_save_rejects_inconsistent_state(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="required keys"):
        ckpt.save_checkpoint(tmp_path, 1, {"step": 1}, keep=1)
    with pytest.raises(ValueError, match="step"):
        ckpt.save_checkpoint(tmp_path, 2, _state(1), keep=1)
    with pytest.raises(ValueError, match="keep"):
        ckpt.save_checkpoint(tmp_path, 1, _state(1), keep=0)


def test_prune_temporaries_removes_leftovers_of_a_killed_writer(tmp_path: Path) -> None:
    (tmp_path / ".ckpt-00000005.pt.abc.tmp").write_bytes(b"partial")
    ckpt.save_checkpoint(tmp_path, 4, _state(4), keep=2)
    assert ckpt.prune_temporaries(tmp_path) == 1
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000004.pt"]


def test_atomic_json_write_replaces_whole_documents(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "progress.json"
    ckpt.atomic_write_json(target, {"step": 1})
    ckpt.atomic_write_json(target, {"step": 2})
    assert target.read_text().strip().endswith("}")
    assert '"step": 2' in target.read_text()
    assert sorted(os.listdir(target.parent)) == ["progress.json"]


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = ckpt.capture_rng_state()
    ckpt.save_checkpoint(tmp_path, 1, {**_state(1), "rng": [state]}, keep=1)
    expected = (random.random(), float(np.random.rand()), torch.rand(2))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    loaded = ckpt.load_latest_checkpoint(tmp_path)
    assert loaded is not None
    ckpt.restore_rng_state(loaded.state["rng"][0])
    assert random.random() == expected[0]
    assert float(np.random.rand()) == expected[1]
    assert torch.equal(torch.rand(2), expected[2])
