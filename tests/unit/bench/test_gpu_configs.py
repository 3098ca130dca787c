"""bench/gpu_configs.py (the Python half of bench/gpu_configs.sh) on CPU: monitor, arithmetic timing, report.

The monitor is driven by the faithful fake pynvml (tests/fakes) with a synthetic clock; the arithmetic runs for
real on CPU. ``test_cpu_smoke_runs_the_whole_script`` runs the shell script itself: both losses through
``jestctl run`` with 2 torchrun workers, bf16, 2 steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jest_operator.cli import load_job_documents, parse_manifest

from bench import gpu_configs as gc
from tests.fakes.pynvml import FakeGpu, build_fake_pynvml, fake_uuid

REPO = Path(__file__).resolve().parents[3]


class Hardware:
    """Four boards; each tick of ``should_stop`` lets one second pass at constant power and counter rates."""

    def __init__(self, *, watts: float, counter_watts: float, seconds: int) -> None:
        self.gpus = [FakeGpu(energy_mj=1_000_000, power_mw=int(watts * 1000)) for _ in range(4)]
        self.counter_watts = counter_watts
        self.seconds = seconds
        self.now = 100.0

    def clock(self) -> float:
        return self.now

    def should_stop(self) -> bool:
        if self.now - 100.0 >= self.seconds:
            return True
        self.now += 1.0
        for gpu in self.gpus:
            gpu.energy_mj += int(self.counter_watts * 1000)
        return False


def test_integrate_is_the_trapezoid_rule() -> None:
    assert gc.integrate([(0.0, 100.0), (1.0, 200.0), (3.0, 200.0)]) == pytest.approx(150.0 + 400.0)
    assert gc.integrate([(0.0, 5.0)]) == 0.0


def test_monitor_reads_the_boards_behind_the_cuda_devices_and_compares_both_figures(tmp_path: Path) -> None:
    hardware = Hardware(watts=200.0, counter_watts=205.0, seconds=10)
    nvml = build_fake_pynvml(hardware.gpus)
    env = {"CUDA_VISIBLE_DEVICES": f"{fake_uuid(3)},{fake_uuid(1)}"}
    document = gc.monitor(tmp_path / "m.json", devices=2, interval=0.0, nvml=nvml, env=env,
                          should_stop=hardware.should_stop, clock=hardware.clock)  # fmt: skip
    assert document["available"] and json.loads((tmp_path / "m.json").read_text())["within_goal"]
    assert [(board["device"], board["uuid"]) for board in document["boards"]] == [
        ("cuda:0", fake_uuid(3)), ("cuda:1", fake_uuid(1))]
    assert document["measured"]["joules"] == pytest.approx(2 * 205.0 * 10)
    assert document["integrated"]["joules"] == pytest.approx(2 * 200.0 * 10)
    assert document["relative_difference"] == pytest.approx(200 / 205 - 1)
    assert (document["measured"]["method"], document["integrated"]["method"]) == ("measured", "integrated")
    assert not nvml.is_initialised()


def test_monitor_flags_a_difference_beyond_the_goal(tmp_path: Path) -> None:
    hardware = Hardware(watts=200.0, counter_watts=250.0, seconds=4)
    document = gc.monitor(tmp_path / "m.json", devices=1, interval=0.0, nvml=build_fake_pynvml(hardware.gpus),
                          env={}, should_stop=hardware.should_stop, clock=hardware.clock)  # fmt: skip
    assert document["relative_difference"] == pytest.approx(-0.2) and document["within_goal"] is False


def test_monitor_without_nvml_or_with_an_unknown_device_says_why(tmp_path: Path) -> None:
    absent = gc.monitor(tmp_path / "a.json", devices=1, interval=0.0, env={},
                        nvml=build_fake_pynvml([FakeGpu()], library_present=False))  # fmt: skip
    assert absent == {"available": False, "why": "NVML unavailable: nvmlInit failed (NVML Shared Library Not Found)"}
    unknown = gc.monitor(tmp_path / "u.json", devices=2, interval=0.0, env={"CUDA_VISIBLE_DEVICES": "0"},
                         nvml=build_fake_pynvml([FakeGpu(), FakeGpu()]))  # fmt: skip
    assert unknown["available"] is False and "cuda:1 is not among CUDA_VISIBLE_DEVICES" in unknown["why"]
    no_counter = gc.monitor(tmp_path / "n.json", devices=1, interval=0.0, env={},
                            nvml=build_fake_pynvml([FakeGpu(supports_energy_counter=False)]))  # fmt: skip
    assert no_counter == {"available": False, "why": "NVML cannot read the boards' energy and power: Not Supported"}


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_selection_arithmetic_is_timed_at_one_ranks_shape(loss: str) -> None:
    document = gc.arithmetic(device="cpu", super_batch=640, batch_size=128, world_size=2, chunks=4, losses=[loss],
                             embed_dim=16, repeats=3, warmup=1)  # fmt: skip
    assert document["per_rank"] == {"super_batch": 320, "batch_size": 64, "chunks": 4, "embed_dim": 16}
    timing = document["timings"][loss]
    assert 0 < timing["p10_seconds"] <= timing["median_seconds"] <= timing["p90_seconds"]


def test_report_folds_runs_monitor_and_arithmetic(tmp_path: Path) -> None:
    (tmp_path / "sigmoid" / "run").mkdir(parents=True)
    summary = {"phase": "Succeeded", "world_size": 1, "steps": 10, "examples_per_second": 2048.0,
               "configuration": {"device": "cuda", "precision": "bf16", "loss": "sigmoid", "backend": None},
               "energy": {"joules": 900.0, "method": "measured", "source": "nvml"}}  # fmt: skip
    (tmp_path / "sigmoid" / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "sigmoid" / "run" / "progress.json").write_text(json.dumps(
        {"selectionOverheadFraction": 0.3, "energy": {"averageWatts": 310.0}}))
    monitor_doc = {"available": True, "seconds": 30.0, "interval_seconds": 0.1, "relative_difference": -0.01,
                   "within_goal": True, "measured": {"joules": 1000.0}, "integrated": {"joules": 990.0},
                   "boards": [{"device": "cuda:0", "uuid": fake_uuid(0), "power_watts": [[0.0, 300.0]]}]}
    (tmp_path / "sigmoid" / "monitor.json").write_text(json.dumps(monitor_doc))
    (tmp_path / "arithmetic.json").write_text(json.dumps({
        "per_rank": {"super_batch": 5120, "batch_size": 1024, "chunks": 16},
        "timings": {"sigmoid": {"median_seconds": 0.025}, "softmax": {"median_seconds": 0.05}}}))
    document = gc.report(tmp_path, losses=["sigmoid", "softmax"], batch_size=1024, settings={"smoke": False})
    sigmoid, softmax = document["runs"]
    assert sigmoid["step_seconds"] == pytest.approx(0.5)  # 1024 examples at 2048 examples/s
    assert sigmoid["selection_arithmetic"]["fraction_of_step"] == pytest.approx(0.05)
    assert sigmoid["selection_arithmetic"]["super_batch"] == 5 * sigmoid["selection_arithmetic"]["batch_size"]
    assert sigmoid["selection_phase_fraction"] == 0.3 and sigmoid["trainer_energy"]["average_watts"] == 310.0
    assert sigmoid["nvml"]["boards"] == [{"device": "cuda:0", "uuid": fake_uuid(0)}]  # samples left out
    assert softmax["phase"] is None and softmax["nvml"]["why"] == "no monitor file"
    assert document["all_succeeded"] is False


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_the_gpu_overrides_make_a_valid_quickstart_job(gpus: int) -> None:
    """The --set list bench/gpu_configs.sh applies on a machine with ``gpus`` GPUs (kept in step by hand)."""
    (document,) = load_job_documents(REPO / "examples" / "quickstart.yaml")
    sets = ["spec.accelerator.type=gpu", f"spec.accelerator.count={gpus}", "spec.numNodes=1",
            f"spec.numProcPerNode={gpus}", "spec.training.precision=bf16", "spec.training.selection.batchSize=1024",
            "spec.training.selection.filterRatio=0.8", "spec.training.steps=1000", "spec.energy.backend=nvml",
            "spec.runPolicy.backoffLimit=0"]  # fmt: skip
    script = (REPO / "bench" / "gpu_configs.sh").read_text()
    for item in sets:
        key = item.split("=", 1)[0]
        assert f"--set {key}=" in script, key
    for loss in ("sigmoid", "softmax"):
        job = parse_manifest(document, [*sets, f"spec.training.selection.loss={loss}"])
        training = job.spec.training
        assert (job.spec.num_proc_per_node, training.precision, training.selection.loss) == (gpus, "bf16", loss)
        assert training.selection.batch_size == 1024 and training.selection.filter_ratio == 0.8


def test_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_configs.sh")], check=True)


def test_script_rejects_unknown_arguments(tmp_path: Path) -> None:
    completed = subprocess.run(["bash", str(REPO / "bench" / "gpu_configs.sh"), "--nope"], capture_output=True,
                               text=True, check=False)  # fmt: skip
    assert completed.returncode == 2 and "unknown argument --nope" in completed.stderr


@pytest.mark.slow
def test_cpu_smoke_runs_the_whole_script(tmp_path: Path) -> None:
    env = {**os.environ, "PY": sys.executable, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_configs.sh"), "--cpu-smoke", "--out", str(tmp_path), "--steps", "2"],
        env=env, capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_configs.json").read_text())
    assert result["all_succeeded"] and result["settings"]["smoke"] is True and result["settings"]["processes"] == 2
    assert [run["loss"] for run in result["runs"]] == ["sigmoid", "softmax"]
    for run in result["runs"]:
        assert run["phase"] == "Succeeded" and run["steps"] == 2 and run["world_size"] == 2
        assert run["configuration"] == {"backend": "gloo", "device": "cpu", "loss": run["loss"], "method": "jest",
                                        "precision": "bf16"}  # fmt: skip
        assert run["trainer_energy"]["method"] == "modelled"  # no NVML on a CPU machine, and it says so
        assert run["nvml"]["available"] is False and run["nvml"]["why"]
        arithmetic = run["selection_arithmetic"]
        assert arithmetic["super_batch"] == 5 * arithmetic["batch_size"] == 160
        assert 0 < arithmetic["fraction_of_step"] < 1
