"""The trainer as a real process: ``python -m jest_trainer.train --config ...``, SIGTERM, restart, resume.

This is what a worker pod does under preemption or a gang restart: the process gets SIGTERM, writes a
checkpoint at the next step boundary and exits 0; the next start resumes from that checkpoint (not
step 0) and keeps the job's counters.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_SECONDS = 240


def _write_config(path: Path, checkpoint_dir: Path) -> None:
    config = {
        "training": {
            "steps": 100_000,  # never finishes on its own: the test stops it
            "seed": 1,
            "reference": {"train": {"steps": 20}},
            "selection": {"method": "jest", "batchSize": 32, "chunks": 4, "filterRatio": 0.8},
            "checkpoint": {"dir": str(checkpoint_dir), "intervalSteps": 1000, "keep": 2},
            "eval": {"intervalSteps": 1000},
        },
        "energy": {"backend": "modelled", "modelledWattsPerDevice": 50},
    }
    path.write_text(json.dumps(config))


def _start(config: Path, workdir: Path, metrics_port: int, reaper: list[subprocess.Popen]) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "JEST_PROGRESS": "plain",
        "JEST_JOB_NAME": "itest",
        "JEST_ATTEMPT": "2",
        "JEST_METRICS_PORT": str(metrics_port),
    }
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "JEST_STATUS_FILE"):
        env.pop(name, None)
    log = (workdir / f"trainer-{len(reaper)}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "jest_trainer.train", "--config", str(config)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    reaper.append(process)
    return process


def _another_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_progress(path: Path, process: subprocess.Popen, predicate) -> dict:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"trainer exited early with {process.returncode}")
        if path.exists():
            progress = json.loads(path.read_text())
            if predicate(progress):
                return progress
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for progress in {path}")


def test_sigterm_checkpoints_and_a_restart_resumes(tmp_path: Path, free_port: int, process_reaper) -> None:
    checkpoint_dir = tmp_path / "checkpoints"
    config = tmp_path / "config.json"
    _write_config(config, checkpoint_dir)
    progress_file = checkpoint_dir / "progress.json"

    first = _start(config, tmp_path, free_port, process_reaper)
    progress = _wait_for_progress(progress_file, first, lambda p: p["step"] >= 20)
    assert progress["phase"] == "Running" and progress["attempt"] == 2
    assert progress["energy"]["method"] == "modelled"
    metrics = requests.get(f"http://127.0.0.1:{free_port}/metrics", timeout=10).text
    assert 'jest_train_steps_total{rank="0",trainingjob="itest"}' in metrics

    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 0, (tmp_path / "trainer-0.log").read_text()[-3000:]
    checkpoints = sorted(checkpoint_dir.glob("ckpt-*.pt"))
    assert len(checkpoints) == 1
    stopped_at = int(checkpoints[0].stem.split("-")[1])
    assert stopped_at >= 20
    after_stop = json.loads(progress_file.read_text())
    assert after_stop["step"] == stopped_at
    assert after_stop["checkpoint"]["step"] == stopped_at
    assert after_stop["phase"] == "Running"  # interrupted, not finished

    second = _start(config, tmp_path, _another_free_port(), process_reaper)
    resumed = _wait_for_progress(progress_file, second, lambda p: p["resumedFromStep"] is not None)
    assert resumed["resumedFromStep"] == stopped_at
    assert resumed["step"] >= stopped_at
    assert resumed["examplesTrained"] >= stopped_at * 32
    assert resumed["energy"]["joules"] >= after_stop["energy"]["joules"]
    later = _wait_for_progress(progress_file, second, lambda p: p["step"] >= stopped_at + 10)
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=120) == 0, (tmp_path / "trainer-1.log").read_text()[-3000:]
    final = json.loads(progress_file.read_text())
    assert final["step"] >= later["step"]
    assert (checkpoint_dir / f"ckpt-{final['step']:08d}.pt").exists()
    assert (checkpoint_dir / "reference.pt").exists()
    log = (tmp_path / "trainer-1.log").read_text()
    assert "loading the reference trained by an earlier attempt" in log
    assert f"resumed from {checkpoints[0]}" in log


def test_invalid_config_exits_non_zero_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"training": {"selection": {"filterRatio": 1.5}}}))
    result = subprocess.run(
        [sys.executable, "-m", "jest_trainer.train", "--config", str(config)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0
    assert "filterRatio" in result.stderr or "filter_ratio" in result.stderr
