"""Telemetry: the loop's own series (retrieval recall, skipped samples, the board behind each energy series) and
which devices a rank meters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from jest_trainer import energy
from jest_trainer.config import EnergyConfig, WorkerConfig
from jest_trainer.distributed import DistContext, single_process
from jest_trainer.telemetry import Telemetry, energy_device_kind, metered_devices
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.pynvml import FakeGpu, build_fake_pynvml, fake_uuid


def _samples(telemetry: Telemetry, name: str) -> dict[tuple, float]:
    text = generate_latest(telemetry.metrics.registry).decode()
    return {tuple(sorted(sample.labels.items())): sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name}


def test_retrieval_recall_and_skipped_samples_are_exported(tmp_path: Path) -> None:
    config = WorkerConfig(energy=EnergyConfig(backend="modelled"))
    telemetry = Telemetry(config, {"JEST_JOB_NAME": "unit"}, single_process(), status_file=tmp_path / "p.json",
                          total_steps=10, restored_joules=0.0)
    try:
        skipped = {"decode_error": 3}
        telemetry.watch_skipped(lambda: skipped)
        telemetry.observe_eval(0.5, {"image_to_text": {1: 0.25, 5: 0.75}, "text_to_image": {1: 0.2, 5: 0.6}})
        recall = _samples(telemetry, "jest_eval_retrieval_recall")
        base = (("rank", "0"), ("trainingjob", "unit"))
        assert recall[tuple(sorted((*base, ("direction", "image_to_text"), ("k", "5"))))] == 0.75
        assert len(recall) == 4
        skipped["empty_caption"] = 1  # read at scrape time: no push from the loop
        counts = _samples(telemetry, "jest_data_samples_skipped_total")
        assert counts[tuple(sorted((*base, ("reason", "decode_error"))))] == 3
        assert counts[tuple(sorted((*base, ("reason", "empty_caption"))))] == 1
        assert _samples(telemetry, "jest_eval_accuracy")[base] == 0.5
    finally:
        telemetry.close()


# --- which devices a rank meters, and the board behind each -------------------------------------------


def _context(device: str, *, local_rank: int) -> DistContext:
    return DistContext(world_size=4, rank=local_rank, local_rank=local_rank, backend="nccl",
                       device=torch.device(device))


def test_a_cuda_rank_meters_the_device_torch_uses_and_shared_boards_once() -> None:
    assert metered_devices(_context("cuda:1", local_rank=1), lambda: 2) == [1]
    assert metered_devices(_context("cuda:0", local_rank=1), lambda: 2) == [0]  # the device, not the rank
    assert metered_devices(_context("cuda:1", local_rank=3), lambda: 2) == []  # local rank 1 meters cuda:1
    assert metered_devices(_context("cpu", local_rank=3)) == [3]


def test_the_board_uuid_is_exported_beside_the_energy_series(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cuda:0 of a process that sees only NVML board 2 (CUDA_VISIBLE_DEVICES by UUID) is labelled as that board."""
    gpus = [FakeGpu(), FakeGpu(), FakeGpu()]
    nvml = build_fake_pynvml(gpus)
    monkeypatch.setattr(energy, "load_nvml", lambda module=None: (nvml.nvmlInit(), (nvml, ""))[1])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", fake_uuid(2))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    telemetry = Telemetry(WorkerConfig(), {"JEST_JOB_NAME": "unit"}, single_process("cuda:0"),
                          status_file=tmp_path / "p.json", total_steps=10, restored_joules=0.0)
    try:
        base = (("device", "cuda:0"), ("rank", "0"), ("source", "nvml"), ("trainingjob", "unit"))
        info = _samples(telemetry, "jest_accelerator_info")
        assert info == {tuple(sorted((*base, ("uuid", fake_uuid(2))))): 1.0}
        for channel in telemetry.meter.channels:
            channel.advance(0.0)
        gpus[2].energy_mj += 7_000
        for channel in telemetry.meter.channels:
            channel.advance(1.0)
        energy_series = _samples(telemetry, "jest_accelerator_energy_joules_total")
        assert energy_series == {tuple(sorted((*base, ("method", "measured"), ("scope", "device")))): 7.0}
    finally:
        telemetry.close()
    assert not nvml.is_initialised()


def test_no_board_info_without_a_known_board(tmp_path: Path) -> None:
    telemetry = Telemetry(WorkerConfig(energy=EnergyConfig(backend="modelled")), {}, single_process(),
                          status_file=tmp_path / "p.json", total_steps=1, restored_joules=0.0)
    try:
        assert _samples(telemetry, "jest_accelerator_info") == {}
    finally:
        telemetry.close()


def test_an_xla_device_is_metered_as_a_tpu_only_under_pjrt_tpu() -> None:
    """torch_xla on CPU (PJRT_DEVICE=CPU, the CI path) must never report TPU energy."""
    xla = DistContext(world_size=2, rank=0, local_rank=0, backend="gloo", device=torch.device("xla", 0))
    assert energy_device_kind(xla, {"PJRT_DEVICE": "TPU"}) == "xla"
    assert energy_device_kind(xla, {"PJRT_DEVICE": "CPU"}) == "cpu"
    cuda = DistContext(world_size=1, rank=0, local_rank=0, backend=None, device=torch.device("cuda", 0))
    assert energy_device_kind(cuda, {"PJRT_DEVICE": "CPU"}) == "cuda"


def test_one_rank_per_node_meters_the_nodes_counters() -> None:
    """RAPL counts a whole node: of the ranks on one node (pods sharing it, or jestctl's local workers), only
    the job's lowest rank there meters it."""
    from jest_trainer.telemetry import node_name, owns_node_energy

    nodes = ["node-a", "node-a", "node-b", "node-a", "node-b"]
    assert [owns_node_energy(rank, nodes) for rank in range(5)] == [True, False, True, False, False]
    assert node_name({"JEST_NODE_NAME": "node-a"}) == "node-a" and node_name({})  # else this host's name
