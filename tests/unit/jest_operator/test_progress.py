"""Reading the trainers' metrics into status fields (jest_operator.progress), against the real TrainerMetrics."""

from __future__ import annotations

import time

import pytest
from jest_operator.progress import (
    METRICS_URL_ANNOTATION,
    combine_ranks,
    least_trustworthy,
    metrics_url,
    parse_metrics,
    read_progress,
    scrape,
    termination_summary,
)
from jest_trainer.config import EnergyConfig
from jest_trainer.energy import create_meter
from jest_trainer.metrics import TERMINATION_MESSAGE_LIMIT_BYTES, JobTotals, TrainerMetrics
from prometheus_client import generate_latest

PHASES = {"data": 0.01, "selection": 0.03, "forward_backward": 0.05, "optimizer": 0.01, "checkpoint": 0.0}


def trainer(rank: int, steps: int, *, examples: int = 32, candidates: int = 160) -> TrainerMetrics:
    """A real rank's metrics after ``steps`` identical steps."""
    metrics = TrainerMetrics(trainingjob="demo", rank=rank)
    for _ in range(steps):
        metrics.observe_step(
            duration_seconds=0.1, phase_seconds=PHASES, examples=examples, candidates=candidates,
            flops={"train": 1e9, "selection_learner": 1e9, "selection_reference": 1e9}, loss=0.5,
            selection_ratio=examples / candidates,
        )
    return metrics


def exposition(metrics: TrainerMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def running_pod(index: int, url: str | None = None, ip: str | None = None) -> dict:
    metadata: dict = {"name": f"demo-node-{index}", "labels": {"jest.training/replica-index": str(index)}}
    if url:
        metadata["annotations"] = {METRICS_URL_ANNOTATION: url}
    status: dict = {"phase": "Running"}
    if ip:
        status["podIP"] = ip
    return {"metadata": metadata, "spec": {"containers": [{"ports": [{"name": "metrics", "containerPort": 9090}]}]},
            "status": status}


def test_two_real_ranks_combine_into_job_progress():
    rank0, rank1 = trainer(0, 10), trainer(1, 10)
    rank0.observe_eval(0.75)
    progress = combine_ranks({0: parse_metrics(exposition(rank0)), 1: parse_metrics(exposition(rank1))},
                             total_steps=100)
    assert progress is not None
    assert progress.step == 10  # steps are per rank: max, not sum
    assert progress.total_steps == 100
    assert progress.examples_trained == 640  # each rank counts its own: sum
    assert progress.examples_scored == 3200
    assert progress.observed_selection_ratio == pytest.approx(0.2)
    assert progress.step_seconds == pytest.approx(0.1)
    assert progress.examples_per_second == pytest.approx(640)  # 64 examples per step / 0.1 s
    assert progress.selection_overhead_fraction == pytest.approx(0.03 / 0.10)
    assert progress.last_eval_accuracy == pytest.approx(0.75)
    assert progress.energy_joules is None  # no meter attached: no energy claimed


def test_modelled_energy_is_summed_over_ranks_and_labelled_modelled():
    config = EnergyConfig(modelled_watts_per_device=100.0, backend="modelled")
    ranks = {}
    meters = []
    for rank in (0, 1):
        metrics = trainer(rank, 2)
        meter = create_meter(config, device_kind="cpu", device_indices=[0], initial_joules=1000.0,
                             interval_seconds=0.01)
        meter.start()
        meters.append(meter)
        metrics.attach_energy(meter)
        ranks[rank] = metrics
    time.sleep(0.05)
    for meter in meters:
        meter.stop()
    progress = combine_ranks({rank: parse_metrics(exposition(m)) for rank, m in ranks.items()})
    assert progress is not None
    expected = sum(meter.total_joules() for meter in meters)
    assert progress.energy_joules == pytest.approx(expected)
    assert progress.energy_joules >= 2000.0  # both ranks' restored totals are included
    assert progress.energy_method == "modelled"
    assert progress.energy_source == "config:modelledWattsPerDevice"


MIXED = """
# TYPE jest_energy_consumed_joules counter
jest_energy_consumed_joules_total{trainingjob="d",rank="0",source="nvml",method="measured"} 300.0
# TYPE jest_accelerator_power_watts gauge
jest_accelerator_power_watts{trainingjob="d",rank="0",device="cuda:0",source="nvml",method="measured"} 250.0
"""
MODELLED = """
# TYPE jest_energy_consumed_joules counter
jest_energy_consumed_joules_total{trainingjob="d",rank="1",source="config:modelledWattsPerDevice",method="modelled"} 200
# TYPE jest_accelerator_power_watts gauge
jest_accelerator_power_watts{trainingjob="d",rank="1",device="tpu:0",source="config:modelledWattsPerDevice",\
method="modelled"} 300
"""


def test_a_partly_modelled_job_is_never_called_measured():
    progress = combine_ranks({0: parse_metrics(MIXED), 1: parse_metrics(MODELLED)})
    assert progress is not None
    assert progress.energy_joules == 500.0
    assert progress.average_watts is None  # latest power readings are no average over the run
    assert progress.energy_method == "modelled"
    assert progress.energy_source == "config:modelledWattsPerDevice+nvml"


@pytest.mark.parametrize(
    ("methods", "expected"),
    [([], None), (["measured"], "measured"), (["measured", "integrated"], "integrated"),
     (["integrated", "modelled", "measured"], "modelled"), (["measured", "guessed"], "guessed")],
)
def test_least_trustworthy(methods, expected):
    assert least_trustworthy(methods) == expected


@pytest.mark.parametrize("text", ["", "garbage {{{", "jest_train_steps_total NaN\n", "# only a comment\n"])
def test_garbage_and_partial_expositions_are_tolerated(text):
    progress = combine_ranks({0: parse_metrics(text)})
    assert progress is not None and progress.step is None and progress.energy_joules is None


def test_no_rank_answering_gives_none():
    assert combine_ranks({}) is None


def test_metrics_url_resolution():
    assert metrics_url(running_pod(0, url="http://127.0.0.1:1234/metrics")) == "http://127.0.0.1:1234/metrics"
    assert metrics_url(running_pod(0, ip="10.0.0.7")) == "http://10.0.0.7:9090/metrics"
    assert metrics_url(running_pod(0, ip="fd00::7")) == "http://[fd00::7]:9090/metrics"
    assert metrics_url(running_pod(0)) is None
    no_named_port = running_pod(0, ip="10.0.0.8")
    no_named_port["spec"] = {}
    assert metrics_url(no_named_port) == "http://10.0.0.8:9090/metrics"


def test_read_progress_scrapes_real_endpoints_and_skips_unreachable_ones(free_port):
    rank0, rank1 = trainer(0, 4), trainer(1, 4)
    port0, port1 = rank0.serve(0), rank1.serve(0)
    try:
        pods = [
            running_pod(0, url=f"http://127.0.0.1:{port0}/metrics"),
            running_pod(1, url=f"http://127.0.0.1:{port1}/metrics"),
        ]
        both = read_progress(pods, total_steps=50)
        assert both is not None and both.step == 4 and both.examples_trained == 256
        pods[1] = running_pod(1, url=f"http://127.0.0.1:{free_port}/metrics")  # nobody listens there
        partial = read_progress(pods, timeout=0.5)
        assert partial is not None and partial.examples_trained == 128
        pods[0] = running_pod(0, url=f"http://127.0.0.1:{free_port}/metrics")
        assert read_progress(pods, timeout=0.5) is None
    finally:
        rank0.close()
        rank1.close()


def test_read_progress_ignores_pods_that_are_not_running():
    pod = running_pod(0, url="http://127.0.0.1:1/metrics")
    pod["status"]["phase"] = "Pending"
    calls: list[str] = []
    assert read_progress([pod], fetch=lambda url, timeout: calls.append(url)) is None
    assert calls == []


def test_scrape_returns_none_for_bad_urls(free_port):
    assert scrape(f"http://127.0.0.1:{free_port}/metrics", timeout=0.5) is None
    assert scrape("not a url") is None


def test_rank0_checkpoint_reaches_the_status_with_the_trainer_file_name():
    """jest_checkpoint_step/timestamp of rank 0 become status.checkpoint {step, path, time} (real plan path)."""
    from jest_operator.status import merge_progress

    rank0, rank1 = trainer(0, 50), trainer(1, 50)
    assert combine_ranks({0: parse_metrics(exposition(rank0))}).checkpoint_step is None  # none written yet
    rank0.observe_checkpoint(50, 1_800_000_000.0)
    rank1.observe_checkpoint(50, 1_800_000_000.0)
    progress = combine_ranks({0: parse_metrics(exposition(rank0)), 1: parse_metrics(exposition(rank1))})
    assert (progress.checkpoint_step, progress.checkpoint_time) == (50, "2027-01-15T08:00:00Z")
    status: dict = {}
    merge_progress(status, progress, total_steps=100, carbon_intensity=None, checkpoint_dir="/checkpoints")
    assert status["checkpoint"] == {"step": 50, "path": "/checkpoints/ckpt-00000050.pt",
                                    "time": "2027-01-15T08:00:00Z"}


def exited_pod(index: int, message: str | None, phase: str = "Succeeded") -> dict:
    """A worker whose trainer container has terminated, leaving ``message`` (None: no message at all)."""
    terminated: dict = {"exitCode": 0 if phase == "Succeeded" else 1}
    if message is not None:
        terminated["message"] = message
    return {"metadata": {"name": f"demo-node-{index}", "labels": {"jest.training/replica-index": str(index)}},
            "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}]}}


def metered_trainer(rank: int, steps: int) -> TrainerMetrics:
    """A real rank with a stopped modelled meter attached (energy > 0) and an evaluation and checkpoint seen."""
    metrics = trainer(rank, steps)
    meter = create_meter(EnergyConfig(modelled_watts_per_device=100.0, backend="modelled"), device_kind="cpu",
                         device_indices=[0], initial_joules=50.0, interval_seconds=0.01)
    meter.start()
    time.sleep(0.03)
    meter.stop()
    metrics.attach_energy(meter)
    metrics.observe_eval(0.5)
    metrics.observe_checkpoint(steps, 1_800_000_000.0)
    return metrics


def test_final_summary_fits_a_termination_message_and_reads_like_the_scrape():
    """The summary keeps every figure the status takes from a scrape, in at most 4 KiB."""
    metrics = metered_trainer(0, 7)
    summary = metrics.final_summary()
    assert 0 < len(summary.encode()) <= TERMINATION_MESSAGE_LIMIT_BYTES
    assert "trainingjob" not in summary and "jest_model_flops" not in summary and "_bucket" not in summary
    assert combine_ranks({0: parse_metrics(summary)}, total_steps=9) == combine_ranks(
        {0: parse_metrics(exposition(metrics))}, total_steps=9)


def test_final_summary_drops_whole_lines_to_fit_a_smaller_limit():
    summary = metered_trainer(0, 3).final_summary(limit_bytes=200)
    assert 0 < len(summary.encode()) <= 200 and summary.endswith("\n")
    assert parse_metrics(summary).steps == 3  # what is kept still parses


def test_exited_workers_report_their_termination_message_and_running_ones_are_scraped():
    """A rank that exited between two scrapes still counts with its final figures (steps, energy)."""
    rank0, rank1 = metered_trainer(0, 30), metered_trainer(1, 30)
    port0 = rank0.serve(0)
    try:
        pods = [running_pod(0, url=f"http://127.0.0.1:{port0}/metrics"),
                exited_pod(1, rank1.final_summary())]
        progress = read_progress(pods, total_steps=30)
        assert progress is not None and progress.step == 30 and progress.examples_trained == 2 * 30 * 32
        expected = float(parse_metrics(exposition(rank0)).consumed_joules) + float(
            parse_metrics(exposition(rank1)).consumed_joules)
        assert progress.energy_joules == pytest.approx(expected) and progress.energy_joules > 100.0
        assert progress.energy_method == "modelled"
    finally:
        rank0.close()
    everyone_exited = read_progress([exited_pod(0, rank0.final_summary()), exited_pod(1, rank1.final_summary())],
                                    fetch=lambda url, timeout: pytest.fail(f"scraped {url}"))
    assert everyone_exited is not None and everyone_exited.step == 30


@pytest.mark.parametrize("message", [
    None,
    "",
    "Traceback (most recent call last):\n  File \"train.py\", line 1\nRuntimeError: CUDA out of memory",
    "jest_train_loss 0.4\n",  # figures without a step are no summary
])
def test_a_crashed_trainers_log_tail_or_no_message_is_no_summary(message):
    pod = exited_pod(0, message, phase="Failed")
    assert termination_summary(pod) is None
    assert read_progress([pod]) is None


def test_only_the_trainer_containers_message_counts():
    summary = metered_trainer(0, 2).final_summary()
    pod = exited_pod(0, summary)
    pod["status"]["containerStatuses"][0]["name"] = "sidecar"
    assert termination_summary(pod) is None


def test_progress_reads_the_container_the_builders_name():
    from jest_operator.builders import CONTAINER_NAME, TERMINATION_MESSAGE_PATH
    from jest_operator.progress import TRAINER_CONTAINER_NAME

    assert TRAINER_CONTAINER_NAME == CONTAINER_NAME
    assert TERMINATION_MESSAGE_PATH == "/dev/termination-log"


def job_totals(steps: int = 30, **changes: object) -> JobTotals:
    """What rank 0 of a 2-pod x 2-process job (world size 4) reports after ``steps`` steps of 32 x 4 examples."""
    values: dict = {"steps": steps, "examples": steps * 128.0, "candidates": steps * 640.0,
                    "joules_by_method": {"measured": 900.0, "modelled": 300.0},
                    "sources": {"measured": "nvml", "modelled": "config:modelledWattsPerDevice"}, "average_watts": 40.0}
    values.update(changes)
    return JobTotals(**values)


def test_rank0s_job_totals_are_the_jobs_figures_whatever_the_processes_per_pod():
    """Local rank 1 of each pod is never scraped (port metrics-1): the job totals still count its examples."""
    rank0 = trainer(0, 30)
    rank0.observe_job(job_totals())
    progress = combine_ranks({0: parse_metrics(exposition(rank0))}, total_steps=30)
    assert progress is not None
    assert (progress.step, progress.examples_trained, progress.examples_scored) == (30, 30 * 128, 30 * 640)
    assert progress.energy_joules == 1200.0 and progress.energy_method == "modelled"  # partly modelled: modelled
    assert progress.energy_source == "config:modelledWattsPerDevice+nvml"
    assert progress.average_watts == 40.0
    assert progress.examples_per_second == pytest.approx(128 / 0.1)  # the job's examples per step / step time
    summary = combine_ranks({0: parse_metrics(rank0.final_summary())}, total_steps=30)
    assert summary == progress  # the termination message carries the same totals


def test_only_rank0_is_scraped_when_it_has_job_totals_and_every_rank_otherwise():
    rank0 = trainer(0, 10)
    rank0.observe_job(job_totals(10))
    texts = {"http://r0/metrics": exposition(rank0), "http://r1/metrics": exposition(trainer(1, 10))}
    fetched: list[str] = []

    def fetch(url: str, timeout: float) -> str:
        fetched.append(url)
        return texts[url]

    pods = [running_pod(0, url="http://r0/metrics"), running_pod(1, url="http://r1/metrics")]
    progress = read_progress(pods, fetch=fetch)
    assert fetched == ["http://r0/metrics"] and progress.examples_trained == 10 * 128
    fetched.clear()
    texts["http://r0/metrics"] = exposition(trainer(0, 10))  # an exposition without totals: every rank is read
    progress = read_progress(pods, fetch=fetch)
    assert sorted(fetched) == ["http://r0/metrics", "http://r1/metrics"] and progress.examples_trained == 640
    fetched.clear()
    finished = trainer(0, 10)
    finished.observe_job(job_totals(10))
    progress = read_progress([exited_pod(0, finished.final_summary()), pods[1]], fetch=fetch)
    assert fetched == [] and progress.step == 10 and progress.examples_trained == 10 * 128
