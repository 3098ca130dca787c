"""bench/real_data.py end to end on a few emoji classes: shards -> `jestctl run` per method -> JSON + PNG.

Small on purpose (4 classes, 4 steps): it checks the benchmark's plumbing through the product path (the
reference trained by the JEST run is the one the other methods load, curves come from the checkpoints,
nothing is skipped), not what the methods reach; the numbers are bench/results/real_data.json's job.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import real_data as rd
from bench import real_data_shards as rds


@pytest.mark.slow
@pytest.mark.skipif(not rds.DEFAULT_FONT.is_file(), reason=f"needs {rds.FONT_PACKAGE} (make test installs it)")
def test_benchmark_runs_every_method_through_jestctl(tmp_path: Path) -> None:
    rds.build(tmp_path / "shards", n_classes=4, pool_per_class=40, curated_per_class=4, test_per_class=3, seed=1)
    out, picture = tmp_path / "real_data.json", tmp_path / "real_data.png"
    assert rd.main(["--data", str(tmp_path / "shards"), "--workdir", str(tmp_path / "runs"), "--seeds", "1",
                    "--steps", "4", "--eval-every", "2", "--reference-steps", "4", "--batch-size", "16",
                    "--methods", "uniform,jest", "--out", str(out), "--plot", str(picture)]) == 0  # fmt: skip
    document = json.loads(out.read_text())
    assert picture.stat().st_size > 0
    assert document["chance"] == pytest.approx(0.25) and document["data"]["classes"] == 4
    assert list(document["methods"]) == ["jest", "uniform"]  # JEST first: it trains the shared reference
    for result in document["methods"].values():
        assert [point[0] for point in result["curve"]] == [0.0, 2.0, 4.0]
        assert len(result["final_accuracy"]) == 1 and 0.0 <= result["mean"] <= 1.0
        assert result["samples_skipped"] == [{}]
        assert sum(result["selected_mix"].values()) == pytest.approx(1.0)
    assert len(document["reference_accuracy"]) == 1
    uniform_job = (tmp_path / "runs" / "seed0" / "uniform" / "job.yaml").read_text()
    assert str(tmp_path / "runs" / "seed0" / "reference.pt") in uniform_job
