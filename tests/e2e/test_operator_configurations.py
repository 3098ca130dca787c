"""The configurations the examples advertise, through the operator on the real control plane.

``tests/integration/test_distributed_training.py`` runs each configuration through ``jestctl run``; here the
same trainer runs in pods the Helm-installed operator creates and the node agent executes, so what is
checked is what a user reads from ``kubectl get jtj -o yaml``:

- two torchrun pods of two processes each (``numProcPerNode: 2``, world size 4) with the CLIP (softmax)
  loss reach Succeeded, and the status counts all four ranks' examples and the last step (rank 0's job
  totals, read from one endpoint or its termination message; no N-fold undercount);
- a worker error that a restart would raise again (a shard that does not exist) fails the job at once with
  the worker's message and no gang restart spent.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import UserCluster, wait_until
from tests.e2e.test_real_cluster import finished_phase, short_quickstart

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

STEPS = 12


def apply_and_wait(cluster: UserCluster, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """``kubectl apply`` the job and wait until it is Succeeded or Failed; returns its status."""
    name = manifest["metadata"]["name"]
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input_text=yaml.safe_dump(manifest))
    wait_until(lambda: finished_phase(cluster, namespace, name), timeout=420, interval=1.0,
               what=f"job {name} to finish")
    return cluster.get("jtj", name, "-n", namespace)["status"]


def test_torchrun_pods_with_the_softmax_loss_train_to_succeeded_with_job_totals(user_cluster: UserCluster) -> None:
    cluster = user_cluster
    namespace = cluster.new_namespace("torchrun")
    manifest = short_quickstart(STEPS)
    manifest["metadata"]["name"] = "torchrun-clip"
    manifest["spec"]["numProcPerNode"] = 2
    selection = manifest["spec"]["training"]["selection"]
    selection.update(loss="softmax", chunks=4)  # per-rank batch 64 / 4 ranks = 16, divisible by 4
    status = apply_and_wait(cluster, namespace, manifest)

    assert status["phase"] == "Succeeded", json.dumps(status, indent=1) + cluster.diagnostics(namespace)
    assert status["restarts"] == 0
    progress = status["progress"]
    assert (progress["step"], progress["totalSteps"]) == (STEPS, STEPS), progress
    batch, ratio = selection["batchSize"], selection["filterRatio"]
    assert progress["examplesTrained"] == STEPS * batch, progress  # all 4 ranks, not local rank 0's quarter
    assert progress["examplesScored"] == STEPS * round(batch / (1 - ratio)), progress
    assert status["energy"]["method"] == "modelled" and status["energy"]["joules"] > 0


def test_a_deterministic_worker_error_fails_the_job_at_once_through_the_operator(user_cluster: UserCluster) -> None:
    cluster = user_cluster
    namespace = cluster.new_namespace("deterministic")
    manifest = short_quickstart(STEPS)
    manifest["metadata"]["name"] = "missing-shards"
    missing = "/nonexistent/pool-{000000..000003}.tar"
    manifest["spec"]["training"]["data"] = {"source": "webdataset", "urls": missing, "evalUrls": missing}
    manifest["spec"]["runPolicy"]["backoffLimit"] = 3
    status = apply_and_wait(cluster, namespace, manifest)

    assert status["phase"] == "Failed", json.dumps(status, indent=1)
    assert status["restarts"] == 0, status
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "NonRetryableError", failed
    assert "/nonexistent/pool-000000.tar" in failed["message"] and "does not exist" in failed["message"], failed
