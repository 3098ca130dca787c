"""Both reference modes end to end on WebDataset shards: ``online`` and ``jestctl score`` -> ``precomputed``.

``jestctl score`` trains (or loads) the reference exactly as training would, writes ``reference.pt`` and one
sidecar shard of embeddings per data shard; a precomputed run joins them by key, spends no reference
forward FLOPs and reports its mode in the summary, and draws the same selection as the online run up to
the float16 rounding of the stored embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from jest_operator.cli import main as jestctl
from jest_trainer import flops as flops_mod
from jest_trainer import train as train_mod
from jest_trainer.config import EnergyConfig, TrainingConfig, WorkerConfig

SINGLE = train_mod.DistContext(world_size=1, rank=0, local_rank=0, backend=None, device=torch.device("cpu"))
pytestmark = pytest.mark.slow


def _training(shards: Path, checkpoint_dir: Path, **reference: object) -> dict:
    pool = sorted(shards.glob("pool-*.tar"))
    return {
        "steps": 4,
        "seed": 1,
        "data": {"source": "webdataset", "urls": str(shards / f"pool-{{000000..{len(pool) - 1:06d}}}.tar"),
                 "evalUrls": str(sorted(shards.glob("test-*.tar"))[0]), "loaderWorkers": 0},
        "reference": {"train": {"steps": 30, "urls": str(sorted(shards.glob("curated-*.tar"))[0])}, **reference},
        "selection": {"method": "jest", "batchSize": 32, "chunks": 4, "filterRatio": 0.8},
        "checkpoint": {"dir": str(checkpoint_dir), "intervalSteps": 4},
        "eval": {"intervalSteps": 4},
    }


def _run(training: dict, env: dict | None = None) -> dict:
    config = WorkerConfig(training=TrainingConfig.model_validate(training), energy=EnergyConfig(backend="modelled"))
    return train_mod.train(config, env={"JEST_PROGRESS": "plain", **(env or {})}, ctx=SINGLE,
                           install_signal_handlers=False)


def test_jestctl_score_then_a_precomputed_run_spends_no_reference_forward(tmp_path: Path, capsys) -> None:
    shards = tmp_path / "shards"
    assert jestctl(["data", "digits", "--out", str(shards), "--shard-size", "3000"]) == 0
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "jest.training/v1alpha1", "kind": "JESTTrainingJob", "metadata": {"name": "score"},
        "spec": {"image": "jest-trainer:test", "numNodes": 1, "accelerator": {"type": "cpu"},
                 "training": _training(shards, tmp_path / "unused")},
    }))
    out = tmp_path / "emb"
    capsys.readouterr()
    assert jestctl(["score", str(manifest), "--out", str(out), "--batch-size", "500"]) == 0
    printed = capsys.readouterr().out
    assert "--set spec.training.reference.mode=precomputed" in printed
    written = json.loads((out / "reference.json").read_text())
    pool = sorted(shards.glob("pool-*.tar"))
    assert sorted(p.name for p in out.glob("pool-*.tar")) == [p.name for p in pool]
    assert written["shards"] == len(pool) and written["samples"] > 9000
    reference_pt = out / "reference.pt"
    assert reference_pt.is_file()

    keys = tmp_path / "keys"
    online = _run(_training(shards, tmp_path / "online", checkpoint=str(reference_pt)),
                  env={"JEST_DEBUG_KEYS_DIR": str(keys / "online")})
    precomputed = _run(_training(shards, tmp_path / "pre", checkpoint=str(reference_pt), mode="precomputed",
                                 embeddingsUrls=str(out / f"pool-{{000000..{len(pool) - 1:06d}}}.tar")),
                       env={"JEST_DEBUG_KEYS_DIR": str(keys / "pre")})
    assert online["reference_mode"] == "online" and precomputed["reference_mode"] == "precomputed"
    assert precomputed["completed_steps"] == 4 and precomputed["samples_skipped"] == {}
    # online pays a reference forward per candidate; precomputed only the B x B logit product
    logits_only = flops_mod.logits_flops(160, 160, written["embedDim"])
    assert precomputed["flops_per_step"]["selection_reference"] == pytest.approx(logits_only)
    assert online["flops_per_step"]["selection_reference"] > 10 * logits_only
    # the same candidates; the selection agrees up to the float16 rounding of the stored embeddings
    rows = {name: [json.loads(line) for line in (keys / name / "keys-rank0.jsonl").read_text().splitlines()]
            for name in ("online", "pre")}
    assert [r["candidates"] for r in rows["online"]] == [r["candidates"] for r in rows["pre"]]
    agree = [len(set(a["selected"]) & set(b["selected"])) / len(a["selected"])
             for a, b in zip(rows["online"], rows["pre"], strict=True)]
    assert min(agree) > 0.8


def test_precomputed_mode_without_sidecars_for_the_shards_is_a_clear_error(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    assert jestctl(["data", "digits", "--out", str(shards), "--shard-size", "3000"]) == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "unrelated-000000.tar").write_bytes(b"")
    # the reference file does not exist: the data check must come first, before any reference is loaded
    training = _training(shards, tmp_path / "ck", checkpoint=str(tmp_path / "absent.pt"), mode="precomputed",
                         embeddingsUrls=str(tmp_path / "other" / "unrelated-000000.tar"))
    with pytest.raises(ValueError, match=r"reference\.embeddingsUrls"):
        _run(training)
