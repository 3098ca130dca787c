"""Trainer metrics: names and labels of DESIGN.md §5, restore across restarts, energy at scrape time."""

from __future__ import annotations

import math
import re
import urllib.request
from collections.abc import Iterator

import pytest
from jest_trainer.config import EnergyConfig
from jest_trainer.energy import create_meter
from jest_trainer.metrics import FLOP_KINDS, JOB_METRIC_NAMES, PHASES, TRAINER_METRIC_NAMES, JobTotals, TrainerMetrics
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.pynvml import FakeGpu, build_fake_pynvml

DESIGN_NAMES = {
    "jest_train_steps_total", "jest_train_examples_total", "jest_selection_candidates_total",
    "jest_step_duration_seconds", "jest_step_phase_seconds_total", "jest_model_flops_total", "jest_train_loss",
    "jest_eval_accuracy", "jest_selection_ratio", "jest_accelerator_energy_joules_total",
    "jest_accelerator_power_watts", "jest_energy_backend_info",
}


def step(metrics: TrainerMetrics, **overrides: object) -> None:
    kwargs: dict = {
        "duration_seconds": 0.2,
        "phase_seconds": {"data": 0.01, "selection": 0.05, "forward_backward": 0.1, "optimizer": 0.04},
        "examples": 32,
        "candidates": 160,
        "flops": {"train": 3e9, "selection_learner": 2e9, "selection_reference": 2e9},
        "loss": 0.7,
        "selection_ratio": 0.2,
    }
    kwargs.update(overrides)
    metrics.observe_step(**kwargs)


def samples(metrics: TrainerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every exposed sample as {(name, sorted labels): value}, parsed from the text exposition."""
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: TrainerMetrics, name: str, **labels: str) -> float:
    full = {"trainingjob": metrics.trainingjob, "rank": str(metrics.rank), **labels}
    return samples(metrics)[(name, tuple(sorted(full.items())))]


@pytest.fixture
def metrics() -> Iterator[TrainerMetrics]:
    trainer_metrics = TrainerMetrics(trainingjob="demo", rank=1)
    yield trainer_metrics
    trainer_metrics.close()


def test_every_design_metric_is_exported_with_trainingjob_and_rank(metrics: TrainerMetrics) -> None:
    metrics.attach_energy(create_meter(EnergyConfig(budgetJoules=1e6), device_kind="cpu", device_indices=[0]))
    step(metrics)
    metrics.observe_eval(0.5)
    metrics.observe_checkpoint(1, 1_800_000_000.0)
    assert not {name for name, _ in samples(metrics)} & set(JOB_METRIC_NAMES)  # job totals only once observed
    metrics.observe_job(JobTotals(steps=1, examples=64.0, candidates=320.0, joules_by_method={"modelled": 5.0},
                                  sources={"modelled": "config:modelledWattsPerDevice"}, average_watts=2.5))
    exposed = samples(metrics)
    names = {name for name, _ in exposed}
    for name in DESIGN_NAMES | set(TRAINER_METRIC_NAMES):
        family = name
        assert family in names or f"{family}_bucket" in names, f"{name} is not exported"
    for (name, labels), _ in exposed.items():
        label_names = dict(labels)
        assert "job" not in label_names, name
        assert label_names["trainingjob"] == "demo", name
        if name in JOB_METRIC_NAMES:
            assert "rank" not in label_names, name  # the whole job: nothing to sum over ranks
        elif name != "jest_energy_budget_joules":
            assert label_names["rank"] == "1", name
    energy_labels = (("method", "modelled"), ("source", "config:modelledWattsPerDevice"), ("trainingjob", "demo"))
    assert exposed[("jest_job_energy_joules_total", energy_labels)] == 5.0


def test_observe_step_counts_this_ranks_share(metrics: TrainerMetrics) -> None:
    step(metrics)
    step(metrics, duration_seconds=3.0, examples=16, loss=0.5, selection_ratio=0.25)
    assert value(metrics, "jest_train_steps_total") == 2
    assert value(metrics, "jest_train_examples_total") == 48
    assert value(metrics, "jest_selection_candidates_total") == 320
    assert value(metrics, "jest_step_phase_seconds_total", phase="selection") == pytest.approx(0.1)
    assert value(metrics, "jest_step_phase_seconds_total", phase="checkpoint") == 0.0
    assert value(metrics, "jest_model_flops_total", kind="train") == pytest.approx(6e9)
    assert value(metrics, "jest_train_loss") == 0.5
    assert value(metrics, "jest_selection_ratio") == 0.25
    assert value(metrics, "jest_step_duration_seconds_count") == 2
    assert value(metrics, "jest_step_duration_seconds_sum") == pytest.approx(3.2)
    assert value(metrics, "jest_step_duration_seconds_bucket", le="0.25") == 1


def test_series_exist_at_zero_before_the_first_step(metrics: TrainerMetrics) -> None:
    assert value(metrics, "jest_train_steps_total") == 0
    for phase in PHASES:
        assert value(metrics, "jest_step_phase_seconds_total", phase=phase) == 0
    for kind in FLOP_KINDS:
        assert value(metrics, "jest_model_flops_total", kind=kind) == 0


def test_bad_observations_name_the_field(metrics: TrainerMetrics) -> None:
    with pytest.raises(ValueError, match=r"phase_seconds.*comm"):
        step(metrics, phase_seconds={"comm": 1.0})
    with pytest.raises(ValueError, match=r"flops.*backward"):
        step(metrics, flops={"backward": 1.0})
    with pytest.raises(ValueError, match="examples"):
        step(metrics, examples=-1)
    with pytest.raises(ValueError, match="accuracy"):
        metrics.observe_eval(1.5)
    assert value(metrics, "jest_train_steps_total") == 0  # rejected steps change nothing


def test_counters_continue_across_a_restart() -> None:
    before = TrainerMetrics(trainingjob="demo", rank=0)
    step(before)
    step(before)
    state = before.counter_state()
    assert state["steps"] == 2 and state["examples"] == 64 and state["flops.selection_reference"] == 4e9

    after = TrainerMetrics(trainingjob="demo", rank=0)
    after.restore(state)
    step(after)
    assert value(after, "jest_train_steps_total") == 3
    assert value(after, "jest_train_examples_total") == 96
    assert value(after, "jest_step_phase_seconds_total", phase="forward_backward") == pytest.approx(0.3)
    assert after.counter_state()["candidates"] == 480


def test_restore_rejects_bad_state_and_late_calls() -> None:
    fresh = TrainerMetrics(trainingjob="demo", rank=0)
    with pytest.raises(ValueError, match=r"unknown key.*'step'"):
        fresh.restore({"step": 3})
    with pytest.raises(ValueError, match="examples must be >= 0"):
        fresh.restore({"examples": -5})
    fresh.restore({"steps": 4})  # missing keys are 0 (older checkpoints)
    assert fresh.counter_state()["examples"] == 0
    with pytest.raises(RuntimeError, match="before any step"):
        fresh.restore({"steps": 1})


def test_energy_is_read_from_the_meter_at_scrape_time(metrics: TrainerMetrics) -> None:
    gpus = [FakeGpu(energy_mj=0), FakeGpu(energy_mj=0, supports_energy_counter=False, power_mw=100_000)]
    meter = create_meter(
        EnergyConfig(), device_kind="cuda", device_indices=[0, 1], nvml=build_fake_pynvml(gpus), initial_joules=1000
    )
    metrics.attach_energy(meter)
    for channel in meter.channels:
        channel.advance(0.0)
    gpus[0].energy_mj = 250_000
    for channel in meter.channels:
        channel.advance(1.0)

    assert value(metrics, "jest_accelerator_energy_joules_total", device="cuda:0", source="nvml",
                 method="measured", scope="device") == pytest.approx(250.0)
    assert value(metrics, "jest_accelerator_energy_joules_total", device="cuda:1", source="nvml",
                 method="integrated", scope="device") == pytest.approx(100.0)
    assert value(metrics, "jest_accelerator_power_watts", device="cuda:0", source="nvml",
                 method="measured", scope="device") == pytest.approx(250.0)
    assert value(metrics, "jest_energy_backend_info", source="nvml", method="integrated") == 1
    assert value(metrics, "jest_energy_consumed_joules_total", source="nvml",
                 method="integrated") == pytest.approx(1350.0)
    assert value(metrics, "jest_energy_sampling_seconds_total", source="nvml") > 0
    assert ("jest_energy_budget_joules", (("trainingjob", "demo"),)) not in samples(metrics)


def test_budget_gauge_and_modelled_labels_here(metrics: TrainerMetrics) -> None:
    metrics.attach_energy(create_meter(EnergyConfig(budgetJoules=3.6e9), device_kind="cpu", device_indices=[0]))
    exposed = samples(metrics)
    assert exposed[("jest_energy_budget_joules", (("trainingjob", "demo"),))] == 3.6e9
    methods = {dict(labels).get("method") for name, labels in exposed if name.startswith("jest_accelerator_")}
    assert methods == {"modelled"}


def test_attaching_a_new_meter_replaces_the_old_one(metrics: TrainerMetrics) -> None:
    metrics.attach_energy(create_meter(EnergyConfig(), device_kind="cpu", device_indices=[0, 1]))
    metrics.attach_energy(create_meter(EnergyConfig(), device_kind="cpu", device_indices=[0]))
    devices = {dict(labels)["device"] for name, labels in samples(metrics) if name == "jest_accelerator_power_watts"}
    assert devices == {"cpu:0"}


def test_serve_exposes_metrics_over_http_and_closes(metrics: TrainerMetrics) -> None:
    port = metrics.serve(0)
    assert port > 0
    step(metrics)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert re.search(r'^jest_train_steps_total\{rank="1",trainingjob="demo"\} 1\.0$', body, re.MULTILINE)
    with pytest.raises(RuntimeError, match="already served"):
        metrics.serve(0)
    metrics.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_serve_binds_the_address_in_jest_metrics_host(metrics: TrainerMetrics,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The dev cluster's node agent gives each pod its own loopback IP: 9090 must be bindable per pod."""
    monkeypatch.setenv("JEST_METRICS_HOST", "127.0.0.23")
    port = metrics.serve(0)
    try:
        assert urllib.request.urlopen(f"http://127.0.0.23:{port}/metrics", timeout=5).status == 200
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.24:{port}/metrics", timeout=2)
    finally:
        metrics.close()


def test_identity_is_validated() -> None:
    with pytest.raises(ValueError, match="trainingjob"):
        TrainerMetrics(trainingjob="", rank=0)
    with pytest.raises(ValueError, match="rank"):
        TrainerMetrics(trainingjob="x", rank=-1)


def test_every_design_metric_exists_from_the_first_scrape(metrics: TrainerMetrics) -> None:
    """A probe scraping before the first step sees every name; per-step gauges read NaN, not a made-up 0."""
    metrics.attach_energy(create_meter(EnergyConfig(), device_kind="cpu", device_indices=[0]))
    names = {name for name, _ in samples(metrics)}
    for name in DESIGN_NAMES - {"jest_eval_accuracy"}:  # accuracy appears with the first evaluation
        assert name in names or f"{name}_bucket" in names, f"{name} is missing before the first step"
    assert math.isnan(value(metrics, "jest_train_loss")) and math.isnan(value(metrics, "jest_selection_ratio"))
    step(metrics)
    assert (value(metrics, "jest_train_loss"), value(metrics, "jest_selection_ratio")) == (0.7, 0.2)
