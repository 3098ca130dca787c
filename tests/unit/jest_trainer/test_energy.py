"""Energy meters: NVML against a faithful fake pynvml, RAPL against a fake sysfs tree, modelled for real."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from jest_trainer import energy
from jest_trainer.config import EnergyConfig
from jest_trainer.energy import (
    EnergyBackendUnavailableError,
    ModelledChannel,
    NvmlEnergyChannel,
    NvmlPowerChannel,
    RaplChannel,
    create_meter,
)

from tests.fakes.pynvml import NVML_ERROR_GPU_IS_LOST, FakeGpu, build_fake_pynvml, fake_uuid
from tests.fakes.sysfs import FakeRaplZone, build_powercap_tree, set_energy_uj

#: NVML's and CUDA's enumeration agree: CUDA_VISIBLE_DEVICES integers are NVML indices.
PCI_ORDER = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def drive(meter: energy.EnergyMeter, now: float) -> None:
    """Take one reading on every channel at synthetic time ``now`` (what a sampler thread does)."""
    for channel in meter.channels:
        channel.advance(now)


# --- NVML ---------------------------------------------------------------------------------------------


def test_nvml_energy_counter_is_measured_in_joules_per_device() -> None:
    gpus = [FakeGpu(energy_mj=5_000_000), FakeGpu(energy_mj=9_000_000)]
    nvml = build_fake_pynvml(gpus)
    meter = create_meter(EnergyConfig(), device_kind="cuda", device_indices=[0, 1], nvml=nvml, env=PCI_ORDER)

    assert (meter.method, meter.source) == ("measured", "nvml")
    assert all(isinstance(channel, NvmlEnergyChannel) for channel in meter.channels)
    drive(meter, 100.0)  # baseline: energy since driver load must not count
    gpus[0].energy_mj += 250_000  # 250 J in 1 s
    gpus[1].energy_mj += 125_500
    drive(meter, 101.0)

    samples = {sample.device: sample for sample in meter.samples()}
    assert samples["cuda:0"].joules == pytest.approx(250.0)
    assert samples["cuda:0"].watts == pytest.approx(250.0)
    assert samples["cuda:1"].joules == pytest.approx(125.5)
    assert {(s.method, s.source) for s in samples.values()} == {("measured", "nvml")}
    assert meter.total_joules() == pytest.approx(375.5)


def test_nvml_counter_not_supported_falls_back_to_integrated_power() -> None:
    gpus = [FakeGpu(power_mw=200_000, supports_energy_counter=False)]
    nvml = build_fake_pynvml(gpus)
    meter = create_meter(EnergyConfig(), device_kind="cuda", device_indices=[0], nvml=nvml, env={})

    assert isinstance(meter.channels[0], NvmlPowerChannel)
    assert (meter.method, meter.source) == ("integrated", "nvml")
    drive(meter, 0.0)
    drive(meter, 2.0)  # 200 W flat for 2 s
    gpus[0].power_mw = 300_000
    drive(meter, 3.0)  # ramp 200 -> 300 W over 1 s: trapezoid gives 250 J
    (sample,) = meter.samples()
    assert sample.joules == pytest.approx(400.0 + 250.0)
    assert sample.watts == pytest.approx(300.0)
    assert sample.method == "integrated"


def test_mixed_boards_report_the_weakest_method() -> None:
    nvml = build_fake_pynvml([FakeGpu(), FakeGpu(supports_energy_counter=False)])
    meter = create_meter(EnergyConfig(), device_kind="cuda", device_indices=[0, 1], nvml=nvml, env=PCI_ORDER)
    assert [channel.method for channel in meter.channels] == ["measured", "integrated"]
    assert meter.method == "integrated"


def test_nvml_driver_reload_counter_reset_is_counted_not_negative() -> None:
    gpus = [FakeGpu(energy_mj=10_000_000)]
    meter = create_meter(EnergyConfig(), device_kind="cuda", device_indices=[0], nvml=build_fake_pynvml(gpus),
                         env={})
    drive(meter, 0.0)
    gpus[0].energy_mj = 3_000  # counter restarted from zero, then 3 J
    drive(meter, 1.0)
    assert meter.total_joules() == pytest.approx(3.0)
    assert meter.errors_total() == 1


def test_nvml_without_driver_auto_falls_back_to_modelled() -> None:
    nvml = build_fake_pynvml([FakeGpu()], library_present=False)
    meter = create_meter(EnergyConfig(), device_kind="cuda", device_indices=[0], nvml=nvml, env={})
    assert (meter.method, meter.source) == ("modelled", "config:modelledWattsPerDevice")
    assert [sample.device for sample in meter.samples()] == ["cuda:0"]


def test_forced_nvml_without_driver_names_the_field() -> None:
    nvml = build_fake_pynvml([FakeGpu()], library_present=False)
    with pytest.raises(EnergyBackendUnavailableError, match=r"energy\.backend.*nvml.*Library Not Found"):
        create_meter(EnergyConfig(backend="nvml"), device_kind="cuda", device_indices=[0], nvml=nvml)
    with pytest.raises(EnergyBackendUnavailableError, match=r"energy\.backend: 'nvml' needs CUDA"):
        create_meter(EnergyConfig(backend="nvml"), device_kind="cpu", device_indices=[0], nvml=nvml)


def test_nvml_unexpected_error_is_not_swallowed() -> None:
    """A board that answers its energy probe with an error other than NOT_SUPPORTED is not quietly modelled."""
    nvml = build_fake_pynvml([FakeGpu(fail_with=NVML_ERROR_GPU_IS_LOST)])
    with pytest.raises(nvml.NVMLError_GpuIsLost):
        create_meter(EnergyConfig(), device_kind="cuda", device_indices=[0], nvml=nvml, env={})


def test_nvml_meter_samples_in_threads_and_shuts_nvml_down() -> None:
    gpus = [FakeGpu(energy_mj=0)]
    nvml = build_fake_pynvml(gpus)
    meter = create_meter(EnergyConfig(), device_kind="cuda", device_indices=[0], nvml=nvml, interval_seconds=0.01,
                         env={})
    meter.start()
    gpus[0].energy_mj = 42_000
    deadline = time.monotonic() + 5.0
    while meter.total_joules() < 42.0 and time.monotonic() < deadline:
        time.sleep(0.01)
    meter.stop()
    assert meter.total_joules() == pytest.approx(42.0)
    assert nvml.calls["nvmlDeviceGetTotalEnergyConsumption"] >= 3
    assert not nvml.is_initialised()
    assert meter.sampling_seconds_total() > 0.0


# --- which board: CUDA_VISIBLE_DEVICES, CUDA's device order and UUIDs -----------------------------------


def four_boards(**overrides: object) -> list[FakeGpu]:
    """Four boards in NVML (PCI) order with distinct counters, so a reading says which board was read."""
    return [FakeGpu(energy_mj=1_000_000 * (index + 1), **overrides) for index in range(4)]  # type: ignore[arg-type]


def torch_uuids(physical: dict[int, int]) -> Callable[[int], str | None]:
    """What ``torch.cuda.get_device_properties(i).uuid`` prints: the bare UUID of the board behind cuda:i."""
    return lambda index: fake_uuid(physical[index]).removeprefix("GPU-") if index in physical else None


def meter_one(cuda_index: int, env: dict[str, str], gpus: list[FakeGpu], *,
              cuda_uuid: Callable[[int], str | None] | None = None, backend: str = "auto") -> energy.EnergyMeter:
    return create_meter(EnergyConfig(backend=backend), device_kind="cuda", device_indices=[cuda_index],
                        nvml=build_fake_pynvml(gpus), env=env, cuda_uuid=cuda_uuid)


def read_board(meter: energy.EnergyMeter, gpus: list[FakeGpu]) -> int:
    """Which physical board the meter's one channel reads: add a different amount to each and look."""
    drive(meter, 0.0)
    for index, gpu in enumerate(gpus):
        gpu.energy_mj += 1000 * (index + 1)  # board i: (i + 1) J
    drive(meter, 1.0)
    return round(meter.total_joules()) - 1


def test_visible_devices_stop_at_the_first_invalid_entry_like_cuda() -> None:
    assert energy.visible_devices({}) is None
    assert energy.visible_devices({"CUDA_VISIBLE_DEVICES": "2, 3"}) == ["2", "3"]
    assert energy.visible_devices({"CUDA_VISIBLE_DEVICES": "0,2,-1,1"}) == ["0", "2"]
    assert energy.visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert energy.visible_devices({"CUDA_VISIBLE_DEVICES": "GPU-ab12,MIG-GPU-ab12/1/0"}) == ["GPU-ab12",
                                                                                          "MIG-GPU-ab12/1/0"]


def test_visible_integers_in_pci_order_map_to_nvml_indices() -> None:
    """CUDA_VISIBLE_DEVICES=2,3 and local rank 1 (cuda:1): physical GPU 3."""
    gpus = four_boards()
    meter = meter_one(1, {"CUDA_VISIBLE_DEVICES": "2,3", **PCI_ORDER}, gpus)
    (sample,) = meter.samples()
    assert (sample.device, sample.uuid, sample.method, sample.source) == ("cuda:1", fake_uuid(3), "measured", "nvml")
    assert read_board(meter, gpus) == 3


def test_fastest_first_order_is_resolved_through_the_uuid_torch_reports() -> None:
    """Default order: the integers count CUDA's FASTEST_FIRST enumeration, so ask torch which board it is."""
    gpus = [FakeGpu(name="NVIDIA Fake T4"), FakeGpu(name="NVIDIA Fake T4"), FakeGpu(), FakeGpu()]
    # CUDA ranks the two fast boards first: its device 2 is NVML's 0 and its device 3 is NVML's 1
    torch_order = {0: 2, 1: 3, 2: 0, 3: 1}
    visible = {"CUDA_VISIBLE_DEVICES": "2,3"}  # CUDA's devices 2 and 3 become cuda:0 and cuda:1
    meter = meter_one(1, visible, gpus, cuda_uuid=torch_uuids({0: torch_order[2], 1: torch_order[3]}))
    assert meter.samples()[0].uuid == fake_uuid(1)
    assert read_board(meter, gpus) == 1


def test_fastest_first_without_torch_uuid_on_mixed_boards_is_modelled_with_the_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gpus = [FakeGpu(name="NVIDIA Fake T4"), FakeGpu(), FakeGpu(), FakeGpu()]
    with caplog.at_level("WARNING", logger="jest_trainer.energy"):
        meter = meter_one(1, {"CUDA_VISIBLE_DEVICES": "2,3"}, gpus)
    assert (meter.method, meter.source) == ("modelled", "config:modelledWattsPerDevice")
    assert [(s.device, s.uuid) for s in meter.samples()] == [("cuda:1", "")]
    assert "cuda:1 is modelled" in caplog.text and "CUDA_DEVICE_ORDER=PCI_BUS_ID" in caplog.text


def test_fastest_first_without_torch_uuid_on_identical_boards_keeps_pci_order() -> None:
    gpus = four_boards()
    meter = meter_one(1, {"CUDA_VISIBLE_DEVICES": "2,3"}, gpus)
    assert meter.method == "measured" and read_board(meter, gpus) == 3


def test_uuid_list_is_looked_up_by_uuid_whatever_the_order() -> None:
    gpus = four_boards()
    visible = {"CUDA_VISIBLE_DEVICES": f"{fake_uuid(3)},{fake_uuid(0)}"}
    assert meter_one(0, visible, gpus).samples()[0].uuid == fake_uuid(3)
    second = meter_one(1, visible, gpus)
    assert second.samples()[0].uuid == fake_uuid(0)
    assert read_board(second, gpus) == 0


def test_uuid_prefix_is_accepted_like_cuda_when_unique() -> None:
    gpus = [FakeGpu(uuid="GPU-aaaa1111-0000-0000-0000-000000000000"),
            FakeGpu(uuid="GPU-bbbb2222-0000-0000-0000-000000000000")]
    meter = meter_one(0, {"CUDA_VISIBLE_DEVICES": "GPU-bbbb"}, gpus)
    assert meter.samples()[0].uuid == "GPU-bbbb2222-0000-0000-0000-000000000000"


def test_unset_visible_devices_is_the_identity() -> None:
    gpus = four_boards()
    assert read_board(meter_one(2, PCI_ORDER, gpus), gpus) == 2
    gpus = four_boards()
    assert read_board(meter_one(2, {}, gpus, cuda_uuid=torch_uuids({2: 2})), gpus) == 2


@pytest.mark.parametrize(
    ("visible", "reason"),
    [
        ("0,GPU-deadbeef-0000-0000-0000-000000000000", "no board of this node has the UUID"),
        ("0", "cuda:1 is not among CUDA_VISIBLE_DEVICES='0' (1 visible)"),
        ("0,7", "NVML has no board 7"),
        ("0,MIG-4f7c1f2e-aaaa-bbbb-cccc-000000000001", "MIG instance"),
    ],
)
def test_unknown_device_is_modelled_with_a_logged_reason_never_a_crash(
    visible: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="jest_trainer.energy"):
        meter = meter_one(1, {"CUDA_VISIBLE_DEVICES": visible, **PCI_ORDER}, four_boards())
    assert (meter.method, meter.source) == ("modelled", "config:modelledWattsPerDevice")
    assert [sample.device for sample in meter.samples()] == ["cuda:1"]
    assert reason in caplog.text
    drive(meter, 0.0)
    drive(meter, 1.0)
    assert meter.total_joules() == pytest.approx(EnergyConfig().modelled_watts_per_device)


def test_forced_nvml_on_an_unknown_device_names_the_field_and_the_reason() -> None:
    with pytest.raises(EnergyBackendUnavailableError, match=r"energy\.backend: 'nvml' cannot meter.*UUID"):
        meter_one(0, {"CUDA_VISIBLE_DEVICES": "GPU-deadbeef"}, four_boards(), backend="nvml")


def test_torch_uuid_of_a_mig_instance_is_refused() -> None:
    mig = "MIG-4f7c1f2e-aaaa-bbbb-cccc-000000000001"
    gpus = [FakeGpu(mig_instances=(mig,)), FakeGpu(name="NVIDIA Fake A30")]
    meter = meter_one(0, {}, gpus, cuda_uuid=lambda index: mig.removeprefix("MIG-"))
    assert meter.method == "modelled"


def test_torch_uuid_unknown_to_nvml_is_modelled() -> None:
    meter = meter_one(0, {}, four_boards(), cuda_uuid=lambda index: "0badf00d-0000-0000-0000-000000000000")
    assert meter.method == "modelled"


def test_some_devices_unidentified_mix_methods_and_sources() -> None:
    gpus = four_boards()
    meter = create_meter(EnergyConfig(), device_kind="cuda", device_indices=[0, 1], nvml=build_fake_pynvml(gpus),
                         env={"CUDA_VISIBLE_DEVICES": "3,GPU-unknown", **PCI_ORDER})
    assert [(s.device, s.method, s.uuid) for s in meter.samples()] == [
        ("cuda:0", "measured", fake_uuid(3)), ("cuda:1", "modelled", "")]
    assert (meter.method, meter.source) == ("modelled", "config:modelledWattsPerDevice+nvml")


def test_two_cuda_devices_on_one_board_are_metered_once() -> None:
    gpus = four_boards()
    meter = create_meter(EnergyConfig(), device_kind="cuda", device_indices=[0, 1], nvml=build_fake_pynvml(gpus),
                         env={"CUDA_VISIBLE_DEVICES": f"2,{fake_uuid(2)}", **PCI_ORDER})
    assert [(s.device, s.uuid) for s in meter.samples()] == [("cuda:0", fake_uuid(2))]


def test_torch_cuda_uuid_without_cuda_is_none() -> None:
    assert energy.torch_cuda_uuid(0) is None  # this machine has no CUDA device: no crash, no guess


def test_tpu_is_always_modelled_even_where_nvml_exists() -> None:
    meter = create_meter(
        EnergyConfig(modelledWattsPerDevice=170), device_kind="xla", device_indices=[0, 1, 2, 3],
        nvml=build_fake_pynvml([FakeGpu()]),
    )
    assert meter.method == "modelled"
    assert [sample.device for sample in meter.samples()] == ["tpu:0", "tpu:1", "tpu:2", "tpu:3"]


# --- RAPL ---------------------------------------------------------------------------------------------


def test_rapl_packages_are_measured_and_subzones_ignored(tmp_path: Path) -> None:
    root = build_powercap_tree(tmp_path / "powercap", [FakeRaplZone(0, 1_000_000), FakeRaplZone(1, 0)])
    meter = create_meter(EnergyConfig(), device_kind="cpu", device_indices=[0], powercap_root=root)

    assert (meter.method, meter.source) == ("measured", "rapl:node")
    assert all(isinstance(channel, RaplChannel) for channel in meter.channels)
    assert [sample.device for sample in meter.samples()] == ["rapl:package-0", "rapl:package-1"]
    drive(meter, 10.0)
    set_energy_uj(root, 0, 1_000_000 + 65_000_000)  # 65 J in 0.5 s
    set_energy_uj(root, 1, 20_000_000)
    drive(meter, 10.5)
    samples = {sample.device: sample for sample in meter.samples()}
    assert samples["rapl:package-0"].joules == pytest.approx(65.0)
    assert samples["rapl:package-0"].watts == pytest.approx(130.0)
    assert meter.total_joules() == pytest.approx(85.0)


def test_rapl_is_metered_once_per_node_by_local_rank_zero(tmp_path: Path) -> None:
    root = build_powercap_tree(tmp_path, [FakeRaplZone(0)])
    other_rank = create_meter(EnergyConfig(), device_kind="cpu", device_indices=[1], powercap_root=root)
    assert (other_rank.method, other_rank.source, other_rank.samples()) == ("measured", "rapl:node", [])
    drive(other_rank, 0.0)
    set_energy_uj(root, 0, 9_000_000)
    drive(other_rank, 1.0)
    assert other_rank.total_joules() == 0.0


def test_rapl_wraparound_at_max_energy_range(tmp_path: Path) -> None:
    max_range = 262_143_328_850
    root = build_powercap_tree(tmp_path, [FakeRaplZone(0, max_range - 1_000_000, max_energy_range_uj=max_range)])
    meter = create_meter(EnergyConfig(backend="rapl"), device_kind="cpu", device_indices=[0], powercap_root=root)
    drive(meter, 0.0)
    set_energy_uj(root, 0, 2_000_000)  # wrapped: 1 J before the wrap + 2 J after
    drive(meter, 1.0)
    assert meter.total_joules() == pytest.approx(3.0)
    set_energy_uj(root, 0, 7_000_000)
    drive(meter, 2.0)
    assert meter.total_joules() == pytest.approx(8.0)
    assert meter.errors_total() == 0


def test_forced_rapl_without_zones_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(EnergyBackendUnavailableError, match=r"energy\.backend: 'rapl' is unavailable"):
        create_meter(EnergyConfig(backend="rapl"), device_kind="cpu", device_indices=[0], powercap_root=tmp_path)


def test_unreadable_rapl_counter_is_skipped(tmp_path: Path) -> None:
    root = build_powercap_tree(tmp_path, [FakeRaplZone(0)])
    (root / "intel-rapl:0" / "energy_uj").write_text("not-a-number\n")
    assert energy.rapl_zones(root) == []


# --- auto choice on this machine (no NVML, no RAPL) ------------------------------------------------------


def test_auto_on_this_machine_chooses_modelled_without_nvml_or_rapl() -> None:
    """No fakes: the real pynvml import and the real /sys/class/powercap (absent on CI machines)."""
    has_rapl = bool(energy.rapl_zones())
    has_nvml = energy.load_nvml()[0] is not None
    cpu = create_meter(EnergyConfig(), device_kind="cpu", device_indices=[0])
    modelled = ("modelled", "config:modelledWattsPerDevice")
    assert (cpu.method, cpu.source) == (("measured", "rapl:node") if has_rapl else modelled)
    if not has_nvml:
        gpu = create_meter(EnergyConfig(), device_kind="cuda", device_indices=[0])
        assert (gpu.method, gpu.source) == modelled


def test_forced_modelled_ignores_available_counters(tmp_path: Path) -> None:
    root = build_powercap_tree(tmp_path, [FakeRaplZone(0)])
    meter = create_meter(
        EnergyConfig(backend="modelled"), device_kind="cpu", device_indices=[0], powercap_root=root
    )
    assert meter.method == "modelled"


def test_unknown_device_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="device_kind"):
        create_meter(EnergyConfig(), device_kind="mps", device_indices=[0])


# --- modelled, for real -------------------------------------------------------------------------------


def test_modelled_meter_integrates_configured_watts_over_real_time() -> None:
    meter = create_meter(
        EnergyConfig(modelledWattsPerDevice=100), device_kind="cpu", device_indices=[0, 1], interval_seconds=0.02
    )
    started = time.monotonic()
    meter.start()
    time.sleep(0.3)
    meter.stop()
    elapsed = time.monotonic() - started
    assert not meter.running
    # two devices x 100 W x the sampled window (start..stop, inside [0, elapsed])
    assert 0.8 * 200 * 0.3 <= meter.total_joules() <= 200 * elapsed + 1e-9
    assert {sample.watts for sample in meter.samples()} == {100.0}
    assert meter.sampling_seconds_total() > 0.0


def test_modelled_power_scales_with_clamped_utilisation() -> None:
    utilisation = iter([0.5, 0.5, 2.0, 2.0])
    channel = ModelledChannel("cpu:0", 300.0, lambda: next(utilisation))
    channel.advance(0.0)
    channel.advance(1.0)
    assert channel.sample().joules == pytest.approx(150.0)
    channel.advance(2.0)  # utilisation 2.0 clamps to 1: ramp 150 -> 300 W
    channel.advance(3.0)
    assert channel.sample().joules == pytest.approx(150.0 + 225.0 + 300.0)
    assert channel.sample().watts == pytest.approx(300.0)


def test_failing_utilisation_is_counted_and_totals_kept() -> None:
    values = [1.0, 1.0]

    def utilisation() -> float:
        if not values:
            raise RuntimeError("probe gone")
        return values.pop()

    channel = ModelledChannel("cpu:0", 10.0, utilisation)
    channel.advance(0.0)
    channel.advance(1.0)
    channel.advance(2.0)
    assert channel.sample().joules == pytest.approx(10.0)
    assert channel.errors == 1


def test_initial_joules_count_in_the_total_but_not_per_device() -> None:
    meter = create_meter(EnergyConfig(), device_kind="cpu", device_indices=[0], initial_joules=1234.5)
    assert meter.total_joules() == pytest.approx(1234.5)
    drive(meter, 0.0)
    drive(meter, 1.0)
    assert meter.total_joules() == pytest.approx(1234.5 + 300.0)
    assert meter.samples()[0].joules == pytest.approx(300.0)
    with pytest.raises(ValueError, match="initial_joules"):
        create_meter(EnergyConfig(), device_kind="cpu", device_indices=[0], initial_joules=-1)


def test_budget_is_carried_for_the_metrics() -> None:
    meter = create_meter(EnergyConfig(budgetJoules=5e6), device_kind="cpu", device_indices=[0])
    assert meter.budget_joules == 5e6
    assert create_meter(EnergyConfig(), device_kind="cpu", device_indices=[0]).budget_joules is None


def test_stop_is_prompt_even_with_a_long_interval() -> None:
    meter = create_meter(EnergyConfig(), device_kind="cpu", device_indices=[0], interval_seconds=30.0)
    meter.start()
    assert meter.running
    started = time.monotonic()
    meter.stop()
    assert time.monotonic() - started < 5.0  # Event.wait wakes at once; a sleep() loop would block 30 s
    assert not meter.running


def test_a_process_that_does_not_own_the_node_meters_no_rapl_zone(tmp_path: Path) -> None:
    """``owns_node`` (from the job's node names) overrides the per-pod default of local rank 0."""
    root = build_powercap_tree(tmp_path, [FakeRaplZone(0)])
    second_pod = create_meter(EnergyConfig(), device_kind="cpu", device_indices=[0], powercap_root=root,
                              owns_node=False)
    assert (second_pod.method, second_pod.source, second_pod.samples()) == ("measured", "rapl:node", [])
    owner = create_meter(EnergyConfig(), device_kind="cpu", device_indices=[1], powercap_root=root, owns_node=True)
    assert [sample.device for sample in owner.samples()] == ["rapl:package-0"]
