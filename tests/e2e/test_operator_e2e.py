"""The full loop on a real control plane: kubectl apply -> the Helm-installed operator -> pods -> real training.

The cluster is tests/e2e/conftest.py's: kube-apiserver + etcd + kube-controller-manager, the operator
installed by ``helm install`` and running in its Deployment's pod under the chart's ServiceAccount, and the
dev cluster's node agent as the only node. The agent binds the worker pods, runs each through
``jest_operator.local`` with its own loopback IP (so both trainers serve ``:9090`` and the operator scrapes
``podIP:9090`` exactly as on a cluster, no annotation override) and reports their phases through the status
subresource. Nothing here is emulated: the job's status is what the operator derived from real trainers.
"""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.e2e.conftest import UserCluster, rbac_denials, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def quickstart_for_the_test() -> dict:
    """examples/quickstart.yaml with few steps, so the real 2-worker gloo run takes seconds, not minutes."""
    manifest = copy.deepcopy(yaml.safe_load((REPO_ROOT / "examples" / "quickstart.yaml").read_text()))
    training = manifest["spec"]["training"]
    # long enough that the operator scrapes several times after the energy meter's first 1 s sample: it only
    # sees what the workers expose while they run
    training["steps"] = 150
    training["reference"] = {"train": {"steps": 20, "batchSize": 64, "lr": 2.0e-3}}
    training["checkpoint"] = {**training.get("checkpoint", {}), "intervalSteps": 50}
    training["eval"] = {"intervalSteps": 50}
    return manifest


def test_quickstart_trains_for_real_and_ends_succeeded(user_cluster: UserCluster) -> None:
    cluster = user_cluster
    namespace = cluster.new_namespace("e2e")
    manifest = quickstart_for_the_test()
    name = manifest["metadata"]["name"]
    try:
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input_text=yaml.safe_dump(manifest))

        def finished() -> str | None:
            phase = ((cluster.get("jtj", name, "-n", namespace) or {}).get("status") or {}).get("phase")
            return phase if phase in ("Succeeded", "Failed") else None

        def pod_ips() -> dict[str, str] | None:
            pods = (cluster.get("pods", "-n", namespace, "-l", f"jest.training/job-name={name}") or {}).get("items")
            ips = {p["metadata"]["name"]: p["status"].get("podIP") for p in pods or []}
            return ips if len(ips) == 2 and all(ips.values()) else None

        ips = wait_until(pod_ips, timeout=120, what="both workers to get a pod IP")
        phase = wait_until(finished, timeout=420, interval=1.0, what="the quickstart job to finish")
        status = cluster.get("jtj", name, "-n", namespace)["status"]
        assert phase == "Succeeded", json.dumps(status, indent=1) + cluster.diagnostics(namespace)
        assert len(set(ips.values())) == 2, ips  # one loopback address per pod
        assert status["restarts"] == 0
        assert status["progress"]["totalSteps"] == 150
        assert status["progress"]["step"] >= 1, status
        assert status["progress"]["examplesTrained"] > 0
        assert 0 < status["progress"]["observedSelectionRatio"] <= 1
        assert "energy" in status, status
        energy = status["energy"]
        assert energy["joules"] > 0 and energy["method"] == "modelled"
        assert energy["source"] == "config:modelledWattsPerDevice"
        assert energy["co2eGrams"] > 0  # the quickstart sets carbonIntensityGramsPerKWh
        assert status["throughput"]["examplesPerSecond"] > 0
        assert next(c for c in status["conditions"] if c["type"] == "Succeeded")["status"] == "True"

        # rank 0 wrote its checkpoints into its own /checkpoints emptyDir (the node agent's per-pod directory)
        rank0_dir = cluster.pod_dirs(namespace, f"{name}-node-0")[-1]
        checkpoints = sorted((rank0_dir / "volumes" / "checkpoints").glob("ckpt-*.pt"))
        assert checkpoints, f"rank 0 wrote no checkpoint under {rank0_dir}"
        checkpoint = status["checkpoint"]  # from rank 0's jest_checkpoint_* gauges, path in the pod's volume
        assert checkpoint["step"] in (50, 100, 150), checkpoint
        assert checkpoint["path"] == f"/checkpoints/ckpt-{checkpoint['step']:08d}.pt" and checkpoint["time"]
        assert (rank0_dir / "volumes" / "checkpoints" / f"ckpt-{checkpoint['step']:08d}.pt").exists()

        table = cluster.kubectl("get", "jtj", name, "-n", namespace).stdout.splitlines()
        assert table[1].split()[1] == "Succeeded"
        assert rbac_denials(cluster.operator_log()) == []
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
