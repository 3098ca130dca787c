"""The user flows on a real API server: ``helm install``, ``kubectl apply`` / ``get`` / ``explain`` / ``delete``.

The cluster is real kube-apiserver + etcd + kube-controller-manager with the dev cluster's node agent as its
only node (tests/e2e/conftest.py). The chart is installed with the real Helm engine (helm-python-sdk's
``install``); the controller manager makes the operator's ReplicaSet and Pod; the node agent runs the operator
in it with the chart's ServiceAccount token, so every call it makes passes RBAC and admission
(OwnerReferencesPermissionEnforcement included). Then the quickstart trains for real, what kubectl shows is
what the API server serves (printer columns, explain), every bad manifest is refused by the server itself,
and the garbage collector removes a deleted job's children. The node agent's own kubelet duties (binding,
unschedulable pods, grace periods, restarts, in-cluster credentials) are checked on the same server.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.e2e.conftest import (
    OPERATOR_NAMESPACE,
    OPERATOR_SERVICE_ACCOUNT,
    RELEASE,
    UserCluster,
    rbac_denials,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

QUICKSTART = REPO_ROOT / "examples" / "quickstart.yaml"
CRD_NAME = "jesttrainingjobs.jest.training"
BAD_MANIFESTS = sorted((REPO_ROOT / "tests" / "fixtures" / "bad_manifests").glob("*.yaml"))
NODE_NAME = "jest-node-0"


def short_quickstart(steps: int = 30) -> dict[str, Any]:
    """examples/quickstart.yaml with a short run (the real 2-worker gloo job then takes well under a minute)."""
    manifest = copy.deepcopy(yaml.safe_load(QUICKSTART.read_text()))
    training = manifest["spec"]["training"]
    training["steps"] = steps
    training["reference"]["train"]["steps"] = 10
    training["checkpoint"]["intervalSteps"] = steps
    training["eval"] = {"intervalSteps": steps}
    return manifest


def job_phase(cluster: UserCluster, namespace: str, name: str) -> str | None:
    job = cluster.get("jtj", name, "-n", namespace) or {}
    return (job.get("status") or {}).get("phase")


def finished_phase(cluster: UserCluster, namespace: str, name: str) -> str | None:
    phase = job_phase(cluster, namespace, name)
    return phase if phase in ("Succeeded", "Failed") else None


def table_row(header: str, line: str) -> dict[str, str]:
    """One row of kubectl's table by the header's column offsets (empty cells stay empty)."""
    starts = [match.start() for match in re.finditer(r"\S+", header)]
    names = header.split()
    ends = [*starts[1:], None]
    return {name: line[start:end].strip() for name, start, end in zip(names, starts, ends, strict=True)}


def children(cluster: UserCluster, namespace: str, name: str) -> list[str]:
    listed = cluster.kubectl("get", "pods,services,configmaps", "-n", namespace, "-l",
                             f"jest.training/job-name={name}", "-o", "name").stdout
    return listed.split()


# ------------------------------------------------------------------------------------------ helm install
def test_helm_install_creates_the_crd_rbac_and_an_operator_pod_running_with_the_charts_token(
        user_cluster: UserCluster) -> None:
    cluster = user_cluster
    assert cluster.release["status"] == "deployed" and cluster.release["name"] == RELEASE
    crd = cluster.get("crd", CRD_NAME)
    established = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert established.get("Established") == "True", crd["status"]
    assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    roles = cluster.kubectl("get", "clusterroles,clusterrolebindings", "-l",
                            f"app.kubernetes.io/instance={RELEASE}", "-o", "name").stdout.split()
    assert any(r.startswith("clusterrole.rbac.authorization.k8s.io/") for r in roles), roles
    assert any(r.startswith("clusterrolebinding.rbac.authorization.k8s.io/") for r in roles), roles

    # the controller manager made the ReplicaSet and the Pod; the node agent bound and runs it
    deployment = cluster.get("deployment", "-n", OPERATOR_NAMESPACE, "-l", f"app.kubernetes.io/instance={RELEASE}")
    assert [d["status"].get("availableReplicas") for d in deployment["items"]] == [1]
    pod = cluster.operator_pod()
    assert pod["spec"]["nodeName"] == NODE_NAME
    assert pod["spec"]["serviceAccountName"] == OPERATOR_SERVICE_ACCOUNT
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"
    ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert ready["Ready"] == "True" and pod["status"]["podIP"].startswith("127.")

    # the process authenticates with a TokenRequest token of the chart's ServiceAccount, bound to this pod
    pod_dir = cluster.pod_dirs(OPERATOR_NAMESPACE, pod["metadata"]["name"])[-1]
    kubeconfig = json.loads((pod_dir / "kubeconfig").read_text())
    token = kubeconfig["users"][0]["user"]["token"]
    review = cluster.kubectl("create", "-o", "json", "-f", "-", input_text=json.dumps({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}))
    status = json.loads(review.stdout)["status"]
    assert status["authenticated"], status
    assert status["user"]["username"] == f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SERVICE_ACCOUNT}"
    assert status["user"]["extra"]["authentication.kubernetes.io/pod-name"] == [pod["metadata"]["name"]]
    # ... so RBAC, not the admin's rights, decides what the operator may do
    can = {verb_resource: cluster.kubectl("auth", "can-i", *verb_resource.split(), "-A", token=token,
                                          check=False).stdout.strip()
           for verb_resource in ("watch jesttrainingjobs.jest.training", "create pods", "list secrets",
                                 "delete nodes")}
    assert can == {"watch jesttrainingjobs.jest.training": "yes", "create pods": "yes", "list secrets": "no",
                   "delete nodes": "no"}, can
    def started() -> str | None:
        text = cluster.operator_log()
        return text if "Activity 'startup' succeeded" in text else None

    log = wait_until(started, timeout=60, what="the operator to log in and start")
    assert "Activity 'login' succeeded" in log, log[-3000:]
    assert rbac_denials(log) == []


# --------------------------------------------------------------------------------- kubectl user flows
def test_quickstart_trains_to_succeeded_and_kubectl_shows_explains_and_deletes_it(user_cluster: UserCluster) -> None:
    cluster = user_cluster
    namespace = cluster.new_namespace("quickstart")
    manifest = short_quickstart()
    name = manifest["metadata"]["name"]
    try:
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input_text=yaml.safe_dump(manifest))
        phase = wait_until(lambda: finished_phase(cluster, namespace, name), timeout=420, interval=2,
                           what="the quickstart to finish")
        assert phase == "Succeeded", cluster.diagnostics(namespace)
        status = cluster.get("jtj", name, "-n", namespace)["status"]
        # the final figures, however short the run: each worker's termination message carries them past
        # its exit (the node agent stands in for the kubelet's file); while running, podIP:9090 is scraped
        assert status["progress"]["step"] == status["progress"]["totalSteps"] == 30, status
        assert status["progress"]["examplesTrained"] > 0, status
        assert status["energy"]["joules"] > 0 and status["energy"]["method"] == "modelled", status

        # printer columns as served by the API server (kubectl asks for a Table)
        # priority-0 columns by default, all of them with -o wide; the server evaluates the JSONPaths
        crd = cluster.get("crd", CRD_NAME)
        declared = crd["spec"]["versions"][0]["additionalPrinterColumns"]
        for flags, shown in (((), [c for c in declared if not c.get("priority")]), (("-o", "wide"), declared)):
            table = cluster.kubectl("get", "jtj", "-n", namespace, *flags).stdout.splitlines()
            assert re.split(r"\s{2,}", table[0].strip()) == ["NAME", *(c["name"].upper() for c in shown)], table
            row = table_row(table[0], table[1])
            assert row["NAME"] == name and row["PHASE"] == "Succeeded", table
            assert row["STEP"] == str(status["progress"]["step"]), (table, status["progress"])

        explained = cluster.kubectl("explain", "jtj.spec.training.selection").stdout
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        selection = schema["properties"]["spec"]["properties"]["training"]["properties"]["selection"]
        assert selection["description"].split(".")[0] in explained
        for field in ("filterRatio", "batchSize", "chunks", "method"):
            assert field in explained
            first_words = " ".join(selection["properties"][field]["description"].split()[:3])
            assert first_words in " ".join(explained.split()), (field, explained)

        assert children(cluster, namespace, name), "the job has no children to garbage-collect"
        cluster.kubectl("delete", "jtj", name, "-n", namespace)
        wait_until(lambda: not children(cluster, namespace, name), timeout=60,
                   what="the garbage collector to remove the job's pods, service and configmap")
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.mark.parametrize("path", BAD_MANIFESTS, ids=[p.stem for p in BAD_MANIFESTS])
def test_every_bad_manifest_is_refused_by_the_api_server(user_cluster: UserCluster, path: Path) -> None:
    """``kubectl apply`` exits non-zero and names the field; nothing is stored (no operator involved)."""
    header = path.read_text()
    fields = re.findall(r"^# (?:crd-)?field: (\S+)", header, re.MULTILINE)
    assert fields, f"{path.name} names no field in its '# field:' / '# crd-field:' header"
    manifest = yaml.safe_load(header)
    namespace = "bad-manifests"
    user_cluster.kubectl("create", "namespace", namespace, check=False)  # shared by the cases; may exist
    result = user_cluster.kubectl("apply", "-n", namespace, "-f", str(path), check=False)
    assert result.returncode != 0, f"the API server accepted {path.name}:\n{result.stdout}"
    reported = [field for field in fields if field.split("[")[0] in result.stderr or field in result.stderr]
    assert reported, f"{path.name}: none of {fields} named in:\n{result.stderr}"
    stored = user_cluster.kubectl("get", "jtj", manifest["metadata"]["name"], "-n", namespace, check=False)
    assert stored.returncode != 0 and "NotFound" in stored.stderr


def test_server_side_dry_run_accepts_the_quickstart_and_stores_nothing(user_cluster: UserCluster) -> None:
    namespace = user_cluster.new_namespace("dry-run")
    try:
        result = user_cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(QUICKSTART))
        assert "created (server dry run)" in result.stdout
        assert user_cluster.get("jtj", "-n", namespace)["items"] == []
        assert children(user_cluster, namespace, "quickstart") == []
    finally:
        user_cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


# --------------------------------------------------------------------------- the node agent's duties
def pod_manifest(name: str, command: list[str], **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"restartPolicy": "Never",
                            "containers": [{"name": "main", "image": "local", "command": command}]}
    body.update(spec)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": body}


def apply(cluster: UserCluster, namespace: str, *documents: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input_text=yaml.safe_dump_all(documents))


def pod_status(cluster: UserCluster, namespace: str, name: str) -> dict[str, Any]:
    return (cluster.get("pod", name, "-n", namespace) or {}).get("status") or {}


@pytest.fixture
def agent_namespace(user_cluster: UserCluster) -> Any:
    namespace = user_cluster.new_namespace("agent")
    yield namespace
    user_cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_the_node_is_ready_and_keeps_renewing_its_lease(user_cluster: UserCluster) -> None:
    cluster = user_cluster
    node = cluster.get("node", NODE_NAME)
    conditions = {c["type"]: c for c in node["status"]["conditions"]}
    assert conditions["Ready"]["status"] == "True" and conditions["Ready"]["reason"] == "KubeletReady"
    assert node["status"]["allocatable"]["pods"] == "110" and int(node["status"]["allocatable"]["cpu"]) >= 1
    assert node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] > 0  # where kubectl logs is proxied
    lease = cluster.get("lease", NODE_NAME, "-n", "kube-node-lease")
    assert lease["spec"]["holderIdentity"] == NODE_NAME
    first = lease["spec"]["renewTime"]
    wait_until(lambda: cluster.get("lease", NODE_NAME, "-n", "kube-node-lease")["spec"]["renewTime"] != first,
               timeout=30, what="the node agent to renew its Lease")


def test_node_agent_binds_what_fits_and_explains_what_does_not(user_cluster: UserCluster, agent_namespace: str) -> None:
    cluster, namespace = user_cluster, agent_namespace
    apply(cluster, namespace,
          pod_manifest("fits", ["python3", "-c", "print('ok')"], nodeSelector={"kubernetes.io/os": "linux"}),
          pod_manifest("gpu", ["python3", "-c", "pass"], containers=[
              {"name": "main", "image": "local", "command": ["python3"],
               "resources": {"limits": {"nvidia.com/gpu": 1}}}]),
          pod_manifest("elsewhere", ["python3", "-c", "pass"], nodeSelector={"pool": "tpu"}))
    done = wait_until(lambda: pod_status(cluster, namespace, "fits").get("phase") == "Succeeded" and pod_status(
        cluster, namespace, "fits"), timeout=60, what="the fitting pod to succeed")
    assert done["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert cluster.pod_log(namespace, "fits", "main").strip() == "ok"
    for name, message in (("gpu", "Insufficient nvidia.com/gpu"), ("elsewhere", "didn't match Pod's node affinity")):
        status = wait_until(lambda n=name: next((c for c in pod_status(cluster, namespace, n).get("conditions", [])
                                                 if c["type"] == "PodScheduled"), None), timeout=30,
                            what=f"{name}'s PodScheduled condition")
        assert (status["status"], status["reason"]) == ("False", "Unschedulable") and message in status["message"]
        assert not cluster.get("pod", name, "-n", namespace)["spec"].get("nodeName")


def test_node_agent_honours_the_grace_period_then_deletes_the_pod(user_cluster: UserCluster,
                                                                   agent_namespace: str) -> None:
    cluster, namespace = user_cluster, agent_namespace
    stubborn = ("import signal, time\n"
                "signal.signal(signal.SIGTERM, lambda *_: print('TERM received', flush=True))\n"
                "print('up', flush=True)\n"
                "while True: time.sleep(0.1)\n")
    apply(cluster, namespace, pod_manifest("stubborn", ["python3", "-c", stubborn], terminationGracePeriodSeconds=2))
    status = wait_until(lambda: pod_status(cluster, namespace, "stubborn").get("phase") == "Running"
                        and pod_status(cluster, namespace, "stubborn"), timeout=60, what="the pod to run")
    pid = int(status["containerStatuses"][0]["containerID"].removeprefix("local://"))
    wait_until(lambda: "up" in cluster.pod_log(namespace, "stubborn", "main"), timeout=30, what="the process to start")
    cluster.kubectl("delete", "pod", "stubborn", "-n", namespace, "--wait=true", timeout=60)
    assert cluster.get("pod", "stubborn", "-n", namespace) is None
    assert "TERM received" in cluster.pod_log(namespace, "stubborn", "main")  # SIGTERM first ...
    with pytest.raises(ProcessLookupError):  # ... then SIGKILL after the 2 s grace: the process is gone
        os.kill(pid, 0)


def test_node_agent_restarts_always_pods_and_counts_restarts(user_cluster: UserCluster, agent_namespace: str) -> None:
    cluster, namespace = user_cluster, agent_namespace
    apply(cluster, namespace, pod_manifest("crashy", ["python3", "-c", "import sys; sys.exit(3)"],
                                           restartPolicy="Always"))
    status = wait_until(lambda: (s := pod_status(cluster, namespace, "crashy")).get("containerStatuses")
                        and s["containerStatuses"][0]["restartCount"] >= 2 and s, timeout=60,
                        what="two restarts")
    container = status["containerStatuses"][0]
    assert status["phase"] == "Running"
    assert container["lastState"]["terminated"]["exitCode"] == 3


def test_in_cluster_clients_authenticate_as_the_pods_service_account(user_cluster: UserCluster,
                                                                      agent_namespace: str) -> None:
    cluster, namespace = user_cluster, agent_namespace
    cluster.kubectl("create", "serviceaccount", "reader", "-n", namespace)
    cluster.kubectl("create", "role", "pod-reader", "--verb=list", "--resource=pods", "-n", namespace)
    cluster.kubectl("create", "rolebinding", "reader", "--role=pod-reader", f"--serviceaccount={namespace}:reader",
                    "-n", namespace)
    script = ("import kubernetes as k\n"
              "k.config.load_kube_config()\n"
              "api = k.client.CoreV1Api()\n"
              f"print('pods', len(api.list_namespaced_pod('{namespace}').items))\n"
              "try:\n"
              f"    api.list_namespaced_secret('{namespace}')\n"
              "except k.client.ApiException as error:\n"
              "    print('secrets', error.status)\n")
    apply(cluster, namespace, pod_manifest("client", ["python3", "-c", script], serviceAccountName="reader"))
    wait_until(lambda: pod_status(cluster, namespace, "client").get("phase") in ("Succeeded", "Failed"),
               timeout=60, what="the client pod to finish")
    log = cluster.pod_log(namespace, "client", "main")
    assert "pods 1" in log and "secrets 403" in log, log


def process_group_members(pgid: int) -> list[int]:
    """Live pids in process group ``pgid`` (from /proc; zombies excluded)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def test_node_agent_shutdown_kills_every_process_group_it_started(user_cluster: UserCluster, agent_namespace: str,
                                                                  tmp_path: Path) -> None:
    """A second agent (its own Node) runs a pod whose process has a child; SIGTERM to the agent ends both."""
    import subprocess
    import sys

    cluster, namespace, node = user_cluster, agent_namespace, "jest-node-shutdown"
    agent = subprocess.Popen([sys.executable, "-m", "hack.devcluster.node_agent", "--kubeconfig",
                              str(cluster.cp.kubeconfig), "--workdir", str(tmp_path), "--node-name", node],
                             cwd=REPO_ROOT, stdout=(tmp_path / "agent.log").open("w"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        family = "import subprocess, time\nsubprocess.Popen(['sleep', '300'])\ntime.sleep(300)\n"
        apply(cluster, namespace, pod_manifest("family", ["python3", "-c", family],
                                               nodeSelector={"kubernetes.io/hostname": node}))
        status = wait_until(lambda: (s := pod_status(cluster, namespace, "family")).get("phase") == "Running" and s,
                            timeout=60, what="the pod to run on the second node")
        leader = int(status["containerStatuses"][0]["containerID"].removeprefix("local://"))
        wait_until(lambda: len(process_group_members(leader)) == 2, timeout=30, what="the child process to start")
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0, (tmp_path / "agent.log").read_text()
        assert process_group_members(leader) == []
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait(timeout=10)
        # nothing runs this node any more: finish the pod's deletion ourselves, then drop the Node
        cluster.kubectl("delete", "pod", "family", "-n", namespace, "--grace-period=0", "--force", check=False)
        cluster.kubectl("delete", "node", node, "--wait=false", check=False)


def test_kubectl_logs_reaches_the_node_agent_through_the_api_server(user_cluster: UserCluster,
                                                                    agent_namespace: str) -> None:
    cluster, namespace = user_cluster, agent_namespace
    talk = "import time\nfor i in range(3):\n    print('line', i, flush=True)\n    time.sleep(1)\n"
    apply(cluster, namespace, pod_manifest("talker", ["python3", "-c", talk]))
    wait_until(lambda: pod_status(cluster, namespace, "talker").get("phase") in ("Running", "Succeeded"),
               timeout=60, what="the pod to start")
    followed = cluster.kubectl("logs", "-f", "talker", "-n", namespace, timeout=60)  # ends when the process does
    assert followed.stdout.splitlines() == ["line 0", "line 1", "line 2"], followed
    wait_until(lambda: pod_status(cluster, namespace, "talker").get("phase") == "Succeeded", timeout=30,
               what="the pod to succeed")
    assert cluster.kubectl("logs", "talker", "-n", namespace, "--tail=1").stdout == "line 2\n"
    assert cluster.kubectl("logs", "talker", "-n", namespace, "--limit-bytes=4").stdout == "line"
