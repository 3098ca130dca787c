"""Distributed training through ``jestctl run``: real worker processes, real gloo, no mocks.

One uninterrupted 2-worker run (module fixture) is the reference for everything here:
- each rank's selection equals single-process ``select_batch`` on that rank's own shard with the
  generator ``selection_generator(seed, step, rank)`` (the trainer's ``JEST_DEBUG_DUMP_DIR`` dumps),
  rank shards are disjoint, and parameters are identical across ranks after training;
- a worker SIGKILLed after a checkpoint exists makes the gang restart and resume from that checkpoint,
  finishing Succeeded with the same accuracy as the uninterrupted run (tolerance explained below);
- a worker that always fails exhausts ``backoffLimit`` and the run ends Failed with its error.
Sizes are tiny (global batch 32, 60 steps) so the whole module takes well under two minutes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from tests.conftest import find_free_port_pair

pytestmark = pytest.mark.slow

JESTCTL = str(Path(sys.executable).parent / "jestctl")
STEPS = 60
CHECKPOINT_INTERVAL = 10
# Resume restores model, optimizer, every rank's RNG state and the data position, and data order is a
# pure function of (seed, rank, step), so a resumed run retraces the uninterrupted one; the only
# admissible difference is floating-point reduction order. 0.02 is ~7 of the ~360 test images.
ACCURACY_TOLERANCE = 0.02

MANIFEST = {
    "apiVersion": "jest.training/v1alpha1",
    "kind": "JESTTrainingJob",
    "metadata": {"name": "dist", "namespace": "default"},
    "spec": {
        "image": "jest-trainer:test",
        "numNodes": 2,
        "numProcPerNode": 1,
        "accelerator": {"type": "cpu"},
        "energy": {"backend": "modelled", "modelledWattsPerDevice": 20},
        "runPolicy": {"backoffLimit": 2},
        "training": {
            "model": {"arch": "tiny", "embedDim": 16},
            "reference": {"train": {"steps": 20, "batchSize": 32}},
            "data": {"source": "digits"},
            "selection": {"method": "jest", "filterRatio": 0.5, "chunks": 4, "batchSize": 32, "loss": "sigmoid"},
            "steps": STEPS,
            "seed": 7,
            "checkpoint": {"dir": "/checkpoints", "intervalSteps": CHECKPOINT_INTERVAL},
            "eval": {"intervalSteps": 30},
        },
    },
}




def thread_limited_env() -> dict[str, str]:
    """Our environment with one compute thread per worker (2 shared cores)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def start_jestctl(tmp: Path, workdir: Path, *overrides: str, extra_args: tuple[str, ...] = ()
                  ) -> tuple[subprocess.Popen, Path]:
    """Start ``jestctl run`` on MANIFEST (plus ``--set`` overrides); returns the process and summary path."""
    manifest = tmp / "job.yaml"
    manifest.write_text(yaml.safe_dump(MANIFEST))
    summary = workdir.parent / f"{workdir.name}-summary.json"
    argv = [JESTCTL, "run", str(manifest), "--workdir", str(workdir), "--json", str(summary), "--no-progress",
            *extra_args]
    for override in overrides:
        argv += ["--set", override]
    process = subprocess.Popen(argv, env=thread_limited_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    return process, summary


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL jestctl and every worker it started (workers run in their own sessions)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        descendants = psutil.Process(process.pid).children(recursive=True)
        for child in descendants:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


@contextlib.contextmanager
def jestctl(tmp: Path, workdir: Path, *overrides: str, extra_args: tuple[str, ...] = ()
            ) -> Iterator[tuple[subprocess.Popen, Path]]:
    """``start_jestctl`` that always cleans up its process tree."""
    process, summary = start_jestctl(tmp, workdir, *overrides, extra_args=extra_args)
    try:
        yield process, summary
    finally:
        if process.poll() is None:
            kill_tree(process)


def finish(process: subprocess.Popen, timeout: float = 240) -> str:
    """Wait for jestctl and return its combined output."""
    output, _ = process.communicate(timeout=timeout)
    return output


def checkpoint_steps(workdir: Path) -> list[int]:
    """Steps of the complete checkpoints in the local checkpoint directory."""
    return sorted(int(path.stem.split("-")[1]) for path in (workdir / "checkpoints").glob("ckpt-*.pt"))


def worker_pid(process: subprocess.Popen, rank: int) -> int:
    """PID of the worker of ``rank`` among jestctl's children (by its RANK variable)."""
    for child in psutil.Process(process.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.environ().get("RANK") == str(rank):
                return child.pid
    raise AssertionError(f"no worker with RANK={rank} is running")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted 2-worker run with selection dumps: summary, workdir, dump dir."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    workdir = tmp / "work"
    dumps = tmp / "dumps"
    with jestctl(tmp, workdir, extra_args=("--env", f"JEST_DEBUG_DUMP_DIR={dumps}")) as (process, summary_path):
        output = finish(process)
    assert process.returncode == 0, output
    return {"summary": json.loads(summary_path.read_text()), "workdir": workdir, "dumps": dumps, "output": output}


def test_uninterrupted_run_succeeds_with_rank_prefixed_logs(uninterrupted: dict) -> None:
    summary = uninterrupted["summary"]
    assert (summary["phase"], summary["world_size"], summary["steps"], summary["restarts"]) == (
        "Succeeded", 2, STEPS, 0)
    assert summary["examples_trained"] == 32 * STEPS and summary["examples_scored"] == 64 * STEPS
    assert summary["energy"]["method"] == "modelled"
    assert "[rank 0]" in uninterrupted["output"] and "[rank 1]" in uninterrupted["output"]


def test_each_rank_selects_like_one_process_on_its_own_shard(uninterrupted: dict) -> None:
    from jest_trainer.config import WorkerConfig
    from jest_trainer.data import load_training_data
    from jest_trainer.selection import select_batch
    from jest_trainer.train import selection_generator, shard_indices, super_batch_positions

    dumps = {(d["step"], d["rank"]): d for d in (torch.load(p) for p in uninterrupted["dumps"].glob("sel-*.pt"))}
    assert set(dumps) == {(step, rank) for step in range(3) for rank in range(2)}
    config = WorkerConfig.model_validate_json((uninterrupted["workdir"] / "config.json").read_text()).training
    pool_size = len(load_training_data(config).pool)
    shards = [shard_indices(pool_size, world_size=2, rank=rank, seed=config.seed) for rank in range(2)]
    assert not set(shards[0].tolist()) & set(shards[1].tolist())

    for (step, rank), dump in sorted(dumps.items()):
        assert dump["world_size"] == 2 and dump["batch_size"] == 16 and dump["seed"] == config.seed
        positions = super_batch_positions(len(shards[rank]), local_super_batch=32, step=step, seed=config.seed,
                                          rank=rank)
        rows = shards[rank].index_select(0, positions).tolist()
        assert dump["candidate_keys"] == [f"digits-{row}" for row in rows]
        single_process = select_batch(
            dump["method"], learner_logits=dump["learner_logits"], reference_logits=dump["reference_logits"],
            loss=dump["loss"], batch_size=dump["batch_size"], n_chunks=dump["chunks"],
            generator=selection_generator(config.seed, step, rank),
        )
        assert torch.equal(single_process, dump["selected"]), (step, rank)
        assert dump["selected"].unique().numel() == 16
    for step in range(3):
        assert not set(dumps[step, 0]["candidate_keys"]) & set(dumps[step, 1]["candidate_keys"])
        assert not torch.equal(dumps[step, 0]["learner_logits"], dumps[step, 1]["learner_logits"])


def test_parameters_are_identical_across_ranks_after_training(uninterrupted: dict) -> None:
    rank0 = torch.load(uninterrupted["dumps"] / "params-rank0.pt")
    rank1 = torch.load(uninterrupted["dumps"] / "params-rank1.pt")
    assert rank0.keys() == rank1.keys() and rank0
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), name


def trained_steps(metrics_port: int) -> int:
    """``jest_train_steps_total`` of the worker serving ``metrics_port`` (the step it has reached)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "jest_train_steps_total":
                return int(sample.value)
    raise AssertionError("jest_train_steps_total not exported")


def test_killed_worker_restarts_the_gang_from_the_last_checkpoint(tmp_path: Path, uninterrupted: dict) -> None:
    workdir = tmp_path / "work"
    free_port = find_free_port_pair()
    with jestctl(tmp_path, workdir, extra_args=("--metrics-port", str(free_port))) as (process, summary_path):
        deadline = time.monotonic() + 180
        while not checkpoint_steps(workdir):
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        victim = worker_pid(process, rank=1)
        # the step counter moves after the step's checkpoint is written: the checkpoint is a lower bound
        reached = max(trained_steps(free_port + 1), checkpoint_steps(workdir)[-1])
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        output = finish(process)
    assert process.returncode == 0, output
    summary = json.loads(summary_path.read_text())
    assert (summary["phase"], summary["steps"], summary["restarts"]) == ("Succeeded", STEPS, 1)
    assert summary["resumed_from_step"] is not None and summary["resumed_from_step"] >= CHECKPOINT_INTERVAL
    assert summary["resumed_from_step"] % CHECKPOINT_INTERVAL == 0
    steps_lost = reached - summary["resumed_from_step"]
    assert 0 <= steps_lost <= CHECKPOINT_INTERVAL
    print(f"kill at step {reached}, resumed from {summary['resumed_from_step']} ({steps_lost} steps lost), "
          f"restart-to-resume {summary['restart_to_resume_seconds']} s, wall {summary['wall_seconds']} s, "
          f"accuracy {summary['final_accuracy']} vs uninterrupted {uninterrupted['summary']['final_accuracy']}")
    assert "worker rank 1 failed with signal SIGKILL" in output
    assert "restarting the gang (restart 1" in output
    # counters continue across the restart instead of double counting the replayed steps
    assert summary["examples_trained"] == 32 * STEPS
    assert abs(summary["final_accuracy"] - uninterrupted["summary"]["final_accuracy"]) <= ACCURACY_TOLERANCE
    assert summary["restart_to_resume_seconds"] and summary["restart_to_resume_seconds"][0] > 0
    assert time.monotonic() - killed_at > summary["restart_to_resume_seconds"][0]


def test_a_deterministic_worker_error_fails_the_job_at_once_with_the_error(tmp_path: Path) -> None:
    """A shard that does not exist will not exist on a retry either: exit 3, no gang restart spent on it."""
    missing = tmp_path / "no-such-data" / "pool-000000.tar"
    with jestctl(tmp_path, tmp_path / "work", "spec.runPolicy.backoffLimit=2",
                 "spec.training.data.source=webdataset", f"spec.training.data.urls={missing}",
                 f"spec.training.data.evalUrls={missing}") as (process, summary):
        output = finish(process)
    assert process.returncode == 1, output
    result = json.loads(summary.read_text())
    assert (result["phase"], result["restarts"]) == ("Failed", 0)
    assert result["message"].startswith("NonRetryableError: worker rank"), result["message"]
    assert "exit code 3" in result["message"] and "not retried" in result["message"]
    assert str(missing) in result["message"] and "does not exist" in result["message"]


def test_torchrun_pod_runs_its_processes_as_one_local_node(tmp_path: Path) -> None:
    """numProcPerNode=2: the builders' torchrun command with PET_* variables, rewritten to loopback.

    With a metrics port, local rank r serves on port + r (two ranks in one pod must not share a port).
    """
    metrics_port = find_free_port_pair()
    with jestctl(tmp_path, tmp_path / "work", "spec.numNodes=1", "spec.numProcPerNode=2",
                 "spec.training.steps=12", extra_args=("--metrics-port", str(metrics_port))
                 ) as (process, summary_path):
        output = finish(process)
    assert process.returncode == 0, output
    summary = json.loads(summary_path.read_text())
    assert (summary["phase"], summary["world_size"], summary["steps"]) == ("Succeeded", 2, 12)
    assert "[node 0]" in output and "[rank 1]" in output  # torchrun's second local rank logs through node 0


def test_two_workers_train_with_the_softmax_loss(tmp_path: Path) -> None:
    """CLIP's softmax loss never reads the bias; DDP must not wait for its gradient (it used to hang/crash)."""
    workdir = tmp_path / "work"
    with jestctl(tmp_path, workdir, "spec.training.selection.loss=softmax", "spec.training.steps=4",
                 "spec.training.eval.intervalSteps=4") as (process, summary_path):
        output = finish(process)
    assert process.returncode == 0, output
    summary = json.loads(summary_path.read_text())
    assert (summary["phase"], summary["steps"]) == ("Succeeded", 4)


def run_to_success(tmp_path: Path, *overrides: str, timeout: float = 240) -> dict:
    """``jestctl run`` MANIFEST with ``overrides``; asserts it exits 0 and returns its summary."""
    with jestctl(tmp_path, tmp_path / "work", *overrides) as (process, summary_path):
        output = finish(process, timeout=timeout)
    assert process.returncode == 0, output
    summary = json.loads(summary_path.read_text())
    assert summary["phase"] == "Succeeded", summary
    return summary


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("method", ["learnability_topk", "easy_reference", "hard_learner"])
def test_every_baseline_method_trains_on_two_workers_with_either_loss(tmp_path: Path, method: str, loss: str) -> None:
    """The baselines the examples and benchmarks advertise run distributed with both losses, not only JEST."""
    summary = run_to_success(tmp_path, f"spec.training.selection.method={method}",
                             f"spec.training.selection.loss={loss}", "spec.training.steps=3",
                             "spec.training.eval.intervalSteps=3", "spec.training.reference.train.steps=5")
    assert summary["configuration"] == {"method": method, "loss": loss, "precision": "fp32", "device": "cpu",
                                        "backend": "gloo"}
    assert (summary["world_size"], summary["steps"]) == (2, 3)
    assert summary["examples_trained"] == 3 * 32 and summary["examples_scored"] == 3 * 64  # filterRatio 0.5


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_bf16_trains_on_cpu_with_either_loss(tmp_path: Path, loss: str) -> None:
    """``precision: bf16`` (autocast on CPU) runs to the end on 2 workers; scoring stays fp32 (tested in unit)."""
    summary = run_to_success(tmp_path, "spec.training.precision=bf16", f"spec.training.selection.loss={loss}",
                             "spec.training.steps=4", "spec.training.eval.intervalSteps=4",
                             "spec.training.reference.train.steps=5")
    assert summary["configuration"]["precision"] == "bf16" and summary["configuration"]["loss"] == loss
    assert summary["steps"] == 4
    assert summary["final_accuracy"] is not None and 0.0 <= summary["final_accuracy"] <= 1.0


def test_two_torchrun_pods_of_two_processes_form_one_world_of_four(tmp_path: Path) -> None:
    """numNodes=2 x numProcPerNode=2: two torchrun agents rendezvous into WORLD_SIZE 4, and rank 0's job
    totals count all four ranks' examples (no N-fold undercount for multi-process pods)."""
    summary = run_to_success(tmp_path, "spec.numNodes=2", "spec.numProcPerNode=2", "spec.training.steps=3",
                             "spec.training.eval.intervalSteps=3", "spec.training.reference.train.steps=5")
    assert (summary["world_size"], summary["steps"]) == (4, 3)
    assert summary["examples_trained"] == 3 * 32 and summary["examples_scored"] == 3 * 64
