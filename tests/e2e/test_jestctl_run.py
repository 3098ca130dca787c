"""``jestctl run`` the way users drive it: the console script, a manifest, signals, a second run.

- Ctrl-C/SIGTERM to ``jestctl run`` forwards SIGTERM to every worker; they checkpoint at the next step
  boundary and exit 0; jestctl prints its summary and exits 128+15; the next run resumes from that
  checkpoint and finishes (the counters continue, nothing is trained twice).
- While it trains, worker r serves Prometheus metrics on ``--metrics-port`` + r.
- A bad manifest stops before any process starts, naming the field.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import find_free_port_pair

pytestmark = [pytest.mark.e2e]

JESTCTL = str(Path(sys.executable).parent / "jestctl")
STEPS = 60
CHECKPOINT_INTERVAL = 10

MANIFEST = {
    "apiVersion": "jest.training/v1alpha1",
    "kind": "JESTTrainingJob",
    "metadata": {"name": "e2e-local", "namespace": "default"},
    "spec": {
        "image": "jest-trainer:test",
        "numNodes": 2,
        "accelerator": {"type": "cpu"},
        "energy": {"modelledWattsPerDevice": 25},
        "runPolicy": {"backoffLimit": 1},
        "training": {
            "model": {"arch": "tiny", "embedDim": 16},
            "reference": {"train": {"steps": 20, "batchSize": 32}},
            "selection": {"method": "jest", "filterRatio": 0.5, "chunks": 4, "batchSize": 32, "loss": "sigmoid"},
            "steps": STEPS,
            "checkpoint": {"dir": "/checkpoints", "intervalSteps": CHECKPOINT_INTERVAL},
            "eval": {"intervalSteps": 30},
        },
    },
}




def jestctl_argv(manifest: Path, workdir: Path, summary: Path, *extra: str) -> list[str]:
    return [JESTCTL, "run", str(manifest), "--workdir", str(workdir), "--json", str(summary), *extra]


def run_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "120"}


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL jestctl and its workers (they run in their own sessions)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(process.pid).children(recursive=True):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def metric_samples(port: int, name: str) -> dict[str, float]:
    """``rank`` label -> value of metric ``name`` scraped from one worker."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {sample.labels.get("rank", ""): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples if sample.name == name}


def newest_checkpoint_step(workdir: Path) -> int | None:
    steps = [int(path.stem.split("-")[1]) for path in (workdir / "checkpoints").glob("ckpt-*.pt")]
    return max(steps) if steps else None


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_next_run_resumes(tmp_path: Path) -> None:
    free_port = find_free_port_pair()
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(MANIFEST))
    workdir, first_summary, second_summary = tmp_path / "work", tmp_path / "first.json", tmp_path / "second.json"

    process = subprocess.Popen(jestctl_argv(manifest, workdir, first_summary, "--metrics-port", str(free_port)),
                               env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while newest_checkpoint_step(workdir) is None:
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        per_rank = {**metric_samples(free_port, "jest_train_steps_total"),
                    **metric_samples(free_port + 1, "jest_train_steps_total")}
        # the step counter moves after the step's checkpoint is written, so it may still read one less
        assert set(per_rank) == {"0", "1"} and min(per_rank.values()) >= CHECKPOINT_INTERVAL - 1
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            kill_tree(process)
    assert process.returncode == 0, stderr  # a graceful stop: every worker checkpointed
    assert not any(line.startswith("Traceback") for line in stderr.splitlines()), "jestctl itself must not crash"
    assert "forwarding SIGTERM to every worker" in stderr
    first = json.loads(first_summary.read_text())
    assert first["phase"] == "Suspended" and first["restarts"] == 0
    assert CHECKPOINT_INTERVAL <= first["steps"] < STEPS
    assert newest_checkpoint_step(workdir) == first["steps"], "the stop step was checkpointed"
    assert "run again to resume" in first["message"]
    assert "Suspended" in stdout
    assert not any(proc.info["pid"] for proc in psutil.process_iter(["pid", "environ"])
                   if (proc.info["environ"] or {}).get("JEST_STATUS_FILE") == str(workdir / "progress.json"))

    resumed = subprocess.run(jestctl_argv(manifest, workdir, second_summary), env=run_env(), capture_output=True,
                             text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    second = json.loads(second_summary.read_text())
    assert (second["phase"], second["steps"], second["resumed_from_step"]) == ("Succeeded", STEPS, first["steps"])
    assert second["examples_trained"] == 32 * STEPS, "no step was trained twice"
    assert second["energy"]["joules"] > first["energy"]["joules"] > 0, "energy continues across the restart"
    assert second["energy"]["method"] == "modelled"
    for label in ("final accuracy (zero-shot)", "examples trained", "throughput", "not measured"):
        assert label in resumed.stdout
    assert "[rank 0]" in resumed.stderr and "[rank 1]" in resumed.stderr


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("spec.training.selection.filterRatio=1.0", "spec.training.selection.filterRatio"),
        ("spec.training.selection.batchSize=34", "batchSize"),
        ("spec.training.optimiser={}", "optimiser"),
        ("spec.numNodes=3", "divisible by numNodes"),
    ],
)
def test_bad_manifest_stops_before_any_process_starts(tmp_path: Path, override: str, field: str) -> None:
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(MANIFEST))
    workdir = tmp_path / "work"
    result = subprocess.run(jestctl_argv(manifest, workdir, tmp_path / "summary.json", "--set", override),
                            env=run_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert field in result.stderr and "e2e-local" in result.stderr
    assert not workdir.exists(), "nothing may start on a bad manifest"
    assert json.loads((tmp_path / "summary.json").read_text())["phase"] == "Failed"


# --------------------------------------------------------------------------------------------------
# Exact resume on streamed WebDataset shards: SIGKILL mid-epoch, rerun, the same keys step by step
# --------------------------------------------------------------------------------------------------

STREAM_STEPS = 30
STREAM_CHECKPOINT_INTERVAL = 10


def _stream_manifest(shards: Path) -> dict:
    pool = sorted(shards.glob("pool-*.tar"))
    manifest = json.loads(json.dumps(MANIFEST))
    manifest["metadata"]["name"] = "e2e-stream"
    manifest["spec"]["training"].update({
        "steps": STREAM_STEPS,
        "seed": 3,
        "data": {"source": "webdataset", "urls": str(shards / f"pool-{{000000..{len(pool) - 1:06d}}}.tar"),
                 "evalUrls": str(sorted(shards.glob("test-*.tar"))[0]), "loaderWorkers": 2, "shuffleBuffer": 200},
        "reference": {"train": {"steps": 20, "batchSize": 32, "urls": str(sorted(shards.glob("curated-*.tar"))[0])}},
        "checkpoint": {"dir": "/checkpoints", "intervalSteps": STREAM_CHECKPOINT_INTERVAL},
        "eval": {"intervalSteps": STREAM_STEPS},
    })
    return manifest


def _keys_by_step(directory: Path, rank: int) -> dict[int, dict]:
    """The last record per step of a rank's key log (a resumed run re-logs the steps it replays)."""
    records: dict[int, dict] = {}
    for line in (directory / f"keys-rank{rank}.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return records


@pytest.mark.slow
def test_a_sigkilled_streaming_run_resumes_on_exactly_the_same_keys(tmp_path: Path) -> None:
    from jest_operator.cli import main as jestctl_main

    shards = tmp_path / "shards"
    assert jestctl_main(["data", "digits", "--out", str(shards), "--shard-size", "700"]) == 0
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(_stream_manifest(shards)))

    whole_keys = tmp_path / "keys-whole"
    whole = subprocess.run(jestctl_argv(manifest, tmp_path / "whole", tmp_path / "whole.json", "--no-progress",
                                        "--env", f"JEST_DEBUG_KEYS_DIR={whole_keys}"),
                           env=run_env(), capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr

    split_keys, workdir = tmp_path / "keys-split", tmp_path / "split"
    argv = jestctl_argv(manifest, workdir, tmp_path / "split.json", "--no-progress",
                        "--env", f"JEST_DEBUG_KEYS_DIR={split_keys}")
    process = subprocess.Popen(argv, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while (newest_checkpoint_step(workdir) or 0) < STREAM_CHECKPOINT_INTERVAL:
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        logged = len((split_keys / "keys-rank0.jsonl").read_text().splitlines())
        while logged < STREAM_CHECKPOINT_INTERVAL + 3:  # kill a few steps past the checkpoint, mid-epoch
            assert process.poll() is None and time.monotonic() < deadline, "training stopped early"
            time.sleep(0.01)
            logged = len((split_keys / "keys-rank0.jsonl").read_text().splitlines())
    finally:
        kill_tree(process)  # SIGKILL: jestctl, both workers and their loader processes; no checkpoint on the way out
    killed_at = newest_checkpoint_step(workdir)
    assert killed_at is not None and killed_at < STREAM_STEPS

    resumed = subprocess.run(argv, env=run_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((tmp_path / "split.json").read_text())
    assert summary["resumed_from_step"] == killed_at and summary["steps"] == STREAM_STEPS
    assert summary["samples_skipped"] == {} and summary["reference_mode"] == "online"
    assert set(summary["retrieval"]) == {"image_to_text", "text_to_image"}
    for rank in (0, 1):
        expected, got = _keys_by_step(whole_keys, rank), _keys_by_step(split_keys, rank)
        assert sorted(got) == sorted(expected) == list(range(STREAM_STEPS))
        for step in range(STREAM_STEPS):
            assert got[step]["candidates"] == expected[step]["candidates"], (rank, step)
            assert got[step]["selected"] == expected[step]["selected"], (rank, step)
    # no sample is trained twice within the epoch across the two ranks
    candidates = [key for rank in (0, 1) for record in _keys_by_step(whole_keys, rank).values()
                  for key in record["candidates"]]
    assert len(candidates) == len(set(candidates))
