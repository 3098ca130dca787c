"""bench/gpu_stream.py (the Python half of bench/gpu_stream.sh) on CPU: shards, manifest, NVML monitor, report.

The monitor is driven with a small NVML stand-in (the real library needs a GPU driver); everything else is
the real code. ``test_cpu_smoke_runs_the_whole_script`` runs the shell script itself (3 steps, tiny towers).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import webdataset as wds
from jest_operator.api import parse_job
from PIL import Image

from bench import gpu_stream as gs

REPO = Path(__file__).resolve().parents[3]


def test_shards_decode_and_carry_noise_labels_and_prompts(tmp_path: Path) -> None:
    urls = gs.write_shards(tmp_path, pool=130, curated=20, eval_count=20, size=96, shard_size=50, seed=1)
    assert urls["pool"].endswith("pool-{000000..000002}.tar") and urls["eval"].endswith("eval-000000.tar")
    from webdataset.shardlists import expand_urls

    pool = list(wds.WebDataset(list(expand_urls(urls["pool"])), shardshuffle=False, empty_check=False))
    assert len(pool) == 130 and len({sample["__key__"] for sample in pool}) == 130
    assert {sample["noise"].decode() for sample in pool} <= {"clean", "wrong", "junk", "duplicate"}
    picture = Image.open(io.BytesIO(pool[0]["jpg"]))
    assert (picture.format, picture.size) == ("JPEG", (96, 96))
    names = gs.class_names()
    for label, _background, text, kind in gs.sample_plan(500, noisy=True, seed=0):
        if kind in ("clean", "duplicate"):
            assert names[label] in text
        elif kind == "wrong":
            assert names[label] not in text
    prompts = json.loads((tmp_path / "eval" / "class_prompts.json").read_text())
    assert len(prompts) == len(names) == len(gs.COLOURS) * len(gs.SHAPES)


def test_gpu_manifest_is_a_valid_vitb32_bf16_jest_job() -> None:
    urls = {"pool": "/s/pool-{000000..000099}.tar", "curated": "/s/curated-000000.tar", "eval": "/s/eval-000000.tar"}
    body = gs.job_manifest(urls, arch="openclip:ViT-B-32", steps=300, batch_size=256, filter_ratio=0.8,
                           loader_workers=8, precision="bf16", accelerator="gpu", reference_steps=50)  # fmt: skip
    job = parse_job(body)
    training = job.spec.training
    assert (training.model.arch, training.precision, training.selection.method) == ("openclip:ViT-B-32", "bf16", "jest")
    assert training.selection.filter_ratio == 0.8 and training.data.loader_workers == 8
    assert job.spec.accelerator.type == "gpu" and job.spec.energy.backend == "auto"


class FakeNvml:
    """NVML's calls as the monitor uses them: 100 W constant, energy counter in mJ advancing with time."""

    def __init__(self) -> None:
        self.reads = 0

    def nvmlInit(self) -> None:  # noqa: N802 - NVML's names
        pass

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:  # noqa: N802
        return f"gpu{index}"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:  # noqa: N802
        self.reads += 1
        return 5_000_000 if self.reads == 1 else 5_000_000 + 123_000

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:  # noqa: N802
        return 100_000

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(gpu=80)

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(used=3 * 2**30)

    def nvmlDeviceGetName(self, handle: str) -> bytes:  # noqa: N802
        return b"Fake GPU"


def test_monitor_and_report(tmp_path: Path) -> None:
    ticks = iter(range(6))
    document = gs.monitor(tmp_path / "m.json", interval=0.0, nvml=FakeNvml(), should_stop=lambda: next(ticks) >= 5)
    assert document["available"] and document["samples"] == 5
    assert document["energy_counter_joules"] == pytest.approx(123.0)
    assert json.loads((tmp_path / "m.json").read_text())["device"] == "Fake GPU"
    summary = {"phase": "Succeeded", "examples_per_second": 900.0, "data_wait_fraction": 0.02,
               "energy": {"joules": 120.0, "method": "measured", "source": "nvml"}}  # fmt: skip
    result = gs.report(summary, document, counters={"flops": {"train": 2.0, "selection_learner": 1.0}},
                       settings={"arch": "x"})  # fmt: skip
    assert result["examples_per_second"] == 900.0 and result["flops_total"] == 3.0
    gpu = result["gpu"]
    assert gpu["utilisation_percent"]["median"] == 80.0 and gpu["peak_memory_used_bytes"] == 3 * 2**30
    assert gpu["energy"]["counter_method"] == "measured" and gpu["energy"]["integrated_method"] == "integrated"


def test_integrate_is_the_trapezoid_rule() -> None:
    assert gs.integrate([(0.0, 100.0), (1.0, 200.0), (3.0, 200.0)]) == pytest.approx(150.0 + 400.0)
    assert gs.integrate([(0.0, 5.0)]) == 0.0


def test_monitor_without_nvml_says_why(tmp_path: Path) -> None:
    class NoDriver(FakeNvml):
        def nvmlInit(self) -> None:  # noqa: N802
            raise RuntimeError("NVML Shared Library Not Found")

    document = gs.monitor(tmp_path / "m.json", interval=0.0, nvml=NoDriver())
    assert document == {"available": False, "why": "NVML unavailable: NVML Shared Library Not Found"}
    assert gs.report({"phase": "Succeeded"}, document, counters=None, settings={})["gpu"]["available"] is False


def test_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_stream.sh")], check=True)


@pytest.mark.slow
def test_cpu_smoke_runs_the_whole_script(tmp_path: Path) -> None:
    env = {**os.environ, "PY": sys.executable, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(["bash", str(REPO / "bench" / "gpu_stream.sh"), "--cpu-smoke", "--out", str(tmp_path)],
                               env=env, capture_output=True, text=True, timeout=500, check=False)  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_stream.json").read_text())
    assert result["phase"] == "Succeeded" and result["settings"]["steps"] == 3 and result["settings"]["smoke"] is True
    assert result["examples_per_second"] > 0 and 0.0 <= result["data_wait_fraction"] <= 1.0
    assert result["samples_skipped"] == {} and result["flops_total"] > 0
    assert result["trainer_energy"]["method"] == "modelled"
