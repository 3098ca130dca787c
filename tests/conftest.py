"""Fixtures shared by every test folder: free ports, process clean-up and the repository root."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from jest_operator.local import find_free_port

REPO_ROOT = Path(__file__).resolve().parents[1]

# The real control plane fixtures (control_plane, dev_cluster, kube_namespace) live in tests/kube_cluster.py.
pytest_plugins = ["tests.kube_cluster"]


def find_free_port_pair() -> int:
    """A free port P with P + 1 free too (``jestctl run --metrics-port P`` serves worker r on P + r)."""
    for _ in range(100):
        base = find_free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    raise AssertionError("no pair of free ports")


@pytest.fixture
def free_port() -> int:
    """A free loopback port."""
    return find_free_port()


@pytest.fixture
def repo_root() -> Path:
    """The checkout root (examples/, crds/, charts/ live here)."""
    return REPO_ROOT


@pytest.fixture
def process_reaper() -> Iterator[list[subprocess.Popen]]:
    """Collects processes a test starts and kills their whole process groups afterwards, even on failure.

    Start children with ``start_new_session=True`` so the group kill also reaches grandchildren.
    """
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def require_tool(name: str) -> str:
    """Path of a required external tool; fails (never skips) when it is missing, as CI must notice."""
    import shutil

    path = shutil.which(name)
    if path is None:
        pytest.fail(f"required tool {name!r} is not installed (make test installs it)")
    return path
