"""ControlPlane.restart, the fault-injection hook: the API server and etcd come back on the same port with
the same data, and clients (kubectl) reconnect. Uses its own cluster so the shared one is never disturbed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hack.devcluster.controlplane import ControlPlane, ControlPlaneError, start_control_plane

pytestmark = pytest.mark.slow


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[ControlPlane]:
    cp = start_control_plane(tmp_path / "cluster", die_with_parent=True)
    try:
        yield cp
    finally:
        cp.stop()


def test_restarted_components_keep_their_port_and_data(own_cluster: ControlPlane) -> None:
    cp = own_cluster
    cp.kubectl("create", "configmap", "survivor", "--from-literal=k=v", "-n", "default")
    before = dict(cp.pids)

    new = cp.restart("kube-apiserver")
    assert new.pid != before["kube-apiserver"]
    assert cp.kubectl("get", "configmap", "survivor", "-o", "jsonpath={.data.k}").stdout == "v"

    cp.restart("etcd", crash=True, down_for=1.0)
    assert cp.kubectl("get", "configmap", "survivor", "-o", "jsonpath={.data.k}").stdout == "v"
    cp.kubectl("create", "configmap", "after-crash", "-n", "default")

    cp.restart("kube-controller-manager")
    assert set(cp.pids) == set(before)
    assert all(cp.alive().values())
    assert [p.name for p in cp.processes] == list(before)


def test_restart_refuses_unknown_or_foreign_processes(own_cluster: ControlPlane) -> None:
    with pytest.raises(ControlPlaneError, match="no process named"):
        own_cluster.restart("kube-scheduler")
    foreign = ControlPlane.load(own_cluster.workdir)
    with pytest.raises(ControlPlaneError, match="command line is unknown"):
        foreign.restart("etcd")
