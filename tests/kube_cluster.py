"""Pytest fixtures for a real control plane (etcd + kube-apiserver + kube-controller-manager), one per session.

Why a plugin module: the e2e, Helm and operator tests in several folders share one cluster, started by the
same code as ``make cluster-up`` (:mod:`hack.devcluster.controlplane`). Registered from tests/conftest.py.

Contract: ``control_plane`` runs no node agent (pods stay Pending); ``dev_cluster`` is the same cluster with
the node agent started on it. Tests share the cluster, so each uses its own namespace (see
:func:`unique_namespace`). Every process is stopped by pid at session end, even when tests fail, and the
kernel kills them if pytest itself dies. When the binaries cannot be built the fixtures fail under CI=true
and skip (with the reason) elsewhere.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from hack.devcluster.controlplane import ControlPlane, ControlPlaneError, ensure_binaries, start_control_plane


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"real control plane unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"real control plane unavailable (run `make controlplane`): {reason}")


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A running control plane for the whole session: ``.server``, ``.token``, ``.kubeconfig``, ``.kubectl()``."""
    try:
        bin_dir = ensure_binaries()
    except ControlPlaneError as err:
        _unavailable(str(err))
    workdir = tmp_path_factory.mktemp("devcluster")
    cp = start_control_plane(workdir, bin_dir=bin_dir, die_with_parent=True)
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def dev_cluster(control_plane: ControlPlane) -> ControlPlane:
    """``control_plane`` with the node agent running on it (started once, stopped with the cluster)."""
    if "node-agent" not in control_plane.pids:
        control_plane.start_node_agent()
    return control_plane


def unique_namespace(cp: ControlPlane, prefix: str = "t") -> str:
    """Create a fresh namespace on ``cp`` and return its name (tests share one cluster per session)."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    cp.kubectl("create", "namespace", name)
    return name


@pytest.fixture
def kube_namespace(control_plane: ControlPlane) -> Iterator[str]:
    """A fresh namespace for one test, deleted (without waiting) afterwards."""
    name = unique_namespace(control_plane)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)
