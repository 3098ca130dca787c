"""bench/real_data.py: its job manifests are valid JESTTrainingJobs and its summary arithmetic is right."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from jest_operator.api import parse_job
from jest_operator.crd import validate_custom_resource

from bench import real_data as rd

REPO = Path(__file__).resolve().parents[3]
COMMITTED_CRD = yaml.safe_load((REPO / "crds" / "jesttrainingjobs.jest.training.yaml").read_text())

URLS = {"pool": "/d/pool/pool-{000000..000007}.tar", "curated": "/d/curated/curated-000000.tar",
        "test": "/d/test/test-000000.tar"}  # fmt: skip


def manifest(method: str = "jest", reference_checkpoint: str | None = None) -> dict:
    return rd.job_manifest(name=f"real-{method.replace('_', '-')}-0", method=method, seed=0, urls=URLS, steps=60,
                           eval_every=10, filter_ratio=0.8, batch_size=32, chunks=16, image_size=64,
                           loader_workers=1, reference_steps=60,
                           reference_checkpoint=reference_checkpoint)  # fmt: skip


@pytest.mark.parametrize("method", ["jest", "uniform", "learnability_topk"])
def test_manifests_pass_the_crd_and_the_parser(method: str) -> None:
    body = manifest(method, reference_checkpoint=None if method == "jest" else "/w/seed0/reference.pt")
    assert validate_custom_resource(body, COMMITTED_CRD) == []
    training = parse_job(body).spec.training
    assert training.data.source == "webdataset" and training.data.urls == URLS["pool"]
    assert training.model.image_size == 64 and training.selection.method == method
    if method == "jest":
        assert training.reference.train is not None and training.reference.train.urls == URLS["curated"]
    else:
        assert training.reference.checkpoint == "/w/seed0/reference.pt"


def record(final: float, curve: list[tuple[int, float]], mix: dict[str, int] | None = None) -> dict:
    return {"final_accuracy": final, "eval_history": [[step, acc, 0.0] for step, acc in curve],
            "selected_mix": mix or {}, "wall_seconds": 1.0, "data_wait_fraction": 0.1, "samples_skipped": {}}


def test_summary_speedup_chance_and_goals() -> None:
    runs = {
        "uniform": [record(0.2, [(0, 0.01), (50, 0.1), (100, 0.2)]), record(0.3, [(0, 0.01), (50, 0.2), (100, 0.3)])],
        "jest": [record(0.5, [(0, 0.01), (50, 0.3), (100, 0.5)], {"clean": 30, "wrong": 10}),
                 record(0.4, [(0, 0.01), (50, 0.2), (100, 0.4)], {"clean": 10, "junk": 30})],
    }  # fmt: skip
    document = rd.summarise(runs, n_classes=100, reference_accuracy=[0.3, 0.4])
    assert document["chance"] == pytest.approx(0.01)
    uniform, jest = document["methods"]["uniform"], document["methods"]["jest"]
    assert uniform["mean"] == pytest.approx(0.25) and uniform["std"] == pytest.approx(0.0707107, rel=1e-5)
    assert jest["curve"] == [[0.0, 0.01], [50.0, 0.25], [100.0, 0.45]]
    assert jest["selected_mix"] == {"clean": 0.5, "wrong": 0.125, "junk": 0.375, "duplicate": 0.0}
    # uniform ends at 0.25 (step 100); JEST's mean curve reaches 0.25 at step 50: 2x fewer iterations
    assert document["speedup"] == {"uniform_final": 0.25, "jest_steps_to_uniform_final": 50.0,
                                   "iterations_to_uniform_final": 2.0}  # fmt: skip
    assert document["goals"] == {"uniform_over_chance": pytest.approx(25.0), "jest_2x_fewer_iterations": True}


def test_summary_when_jest_never_reaches_uniform() -> None:
    runs = {"uniform": [record(0.3, [(0, 0.0), (100, 0.3)])], "jest": [record(0.1, [(0, 0.0), (100, 0.1)])]}
    document = rd.summarise(runs, n_classes=10, reference_accuracy=[])
    assert document["speedup"]["jest_steps_to_uniform_final"] is None
    assert document["speedup"]["iterations_to_uniform_final"] is None
    assert document["goals"]["jest_2x_fewer_iterations"] is False


def test_a_speedup_over_an_unlearned_uniform_is_flagged() -> None:
    runs = {"uniform": [record(0.015, [(0, 0.01), (60, 0.015)])], "jest": [record(0.02, [(0, 0.01), (30, 0.02)])]}
    document = rd.summarise(runs, n_classes=100, reference_accuracy=[0.01])
    assert document["speedup"]["iterations_to_uniform_final"] is not None
    assert "compares noise" in document["speedup"]["note"]
    learned = rd.summarise({"uniform": [record(0.3, [(0, 0.0), (60, 0.3)])]}, n_classes=100, reference_accuracy=[])
    assert "note" not in learned["speedup"]
