"""The node agent's pure parts: fit, env, volumes, the local command, address localization, status derivation.

The agent's behaviour against a real API server is covered by tests/e2e/test_real_cluster.py; here each
translation rule a pod goes through is pinned on plain dicts, with the operator's own builders producing the
worker pods, so a change in the pod contract shows up as a failing rule rather than a hung e2e test.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import pytest
from jest_operator.api import parse_job
from jest_operator.builders import build_children

from hack.devcluster.node_agent import (
    SERVICE_ACCOUNT_MOUNT,
    ContainerState,
    Fit,
    IpPool,
    Mount,
    MountTable,
    NodeSpec,
    PlanError,
    PodAddress,
    PodInputs,
    default_pod_ip_base,
    exit_details,
    fit,
    localize_addresses,
    log_slice,
    node_status,
    parse_quantity,
    plan_pod,
    pod_phase,
    pod_status,
    process_environment,
    referenced_objects,
    service_account_tokens,
    unschedulable_status,
    wants_binding,
)

NOW = dt.datetime(2026, 12, 2, 17, 0, tzinfo=dt.UTC)
NODE = NodeSpec(name="jest-node-0", labels={"pool": "cpu"}, capacity={"cpu": "2", "memory": "8Gi", "pods": "110"})


def pod(**spec: object) -> dict:
    """A minimal pod in namespace ``ns`` with one container ``main``."""
    base = {"containers": [{"name": "main", "image": "x", "command": ["python3", "-c", "pass"]}]}
    base.update(spec)
    return {"apiVersion": "v1", "kind": "Pod", "spec": base,
            "metadata": {"name": "p", "namespace": "ns", "uid": "0123456789abcdef", "labels": {"app": "a"},
                         "annotations": {"note": "n"}}}


def inputs(tmp_path: Path, **overrides: object) -> PodInputs:
    values: dict = {"pod_ip": "127.0.0.10", "pod_dir": tmp_path / "pod", "pvc_root": tmp_path / "pvc",
                    "api_server": "https://127.0.0.1:6443", "ca_pem": "CA", "node": NODE}
    values.update(overrides)
    return PodInputs(**values)


# ------------------------------------------------------------------------------------------ scheduling
def test_only_unscheduled_live_default_scheduler_pods_are_bound() -> None:
    assert wants_binding(pod())
    assert not wants_binding(pod(nodeName="other"))
    assert not wants_binding(pod(schedulerName="volcano"))
    assert not wants_binding(pod(schedulingGates=[{"name": "kueue.x-k8s.io/admission"}]))
    deleting = pod()
    deleting["metadata"]["deletionTimestamp"] = "2026-12-02T17:00:00Z"
    assert not wants_binding(deleting)


def test_fit_checks_node_selector_affinity_taints_and_extended_resources() -> None:
    assert fit(pod(nodeSelector={"pool": "cpu", "kubernetes.io/os": "linux"}), NODE) == Fit(True)
    assert "didn't match Pod's node affinity/selector" in fit(pod(nodeSelector={"pool": "gpu"}), NODE).message
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["tpu"]}]}]}}}
    assert not fit(pod(affinity=affinity), NODE).ok
    affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"].append(
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["jest-node-0"]}]})
    assert fit(pod(affinity=affinity), NODE).ok

    tainted = NodeSpec(name="n", taints=({"key": "dedicated", "value": "train", "effect": "NoSchedule"},),
                       capacity={"cpu": "2"})
    assert fit(pod(), tainted).message == "0/1 nodes are available: 1 node(s) had untolerated taint {dedicated: train}."
    tolerated = pod(tolerations=[{"key": "dedicated", "operator": "Equal", "value": "train", "effect": "NoSchedule"}])
    assert fit(tolerated, tainted).ok
    assert fit(pod(tolerations=[{"operator": "Exists"}]), tainted).ok

    gpu = pod(containers=[{"name": "main", "command": ["x"], "resources": {"limits": {"nvidia.com/gpu": "1"}}}])
    assert fit(gpu, NODE).message == "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    assert fit(gpu, NodeSpec(capacity={"nvidia.com/gpu": "1"})).ok
    # CPU and memory are shared by every pod on the host (no cgroups): a big request still fits
    big = pod(containers=[{"name": "main", "command": ["x"], "resources": {"requests": {"cpu": "64"}}}])
    assert fit(big, NODE).ok


def test_unschedulable_condition_is_written_once_per_message() -> None:
    result = Fit(False, "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.")
    patch = unschedulable_status(pod(), result, NOW)
    assert patch is not None
    condition = patch["conditions"][0]
    assert (condition["type"], condition["status"], condition["reason"]) == ("PodScheduled", "False", "Unschedulable")
    already = pod()
    already["status"] = {"conditions": [condition]}
    assert unschedulable_status(already, result, NOW) is None


def test_quantities() -> None:
    assert parse_quantity("500m") == 0.5
    assert parse_quantity("2Gi") == 2 * 2**30
    assert parse_quantity(3) == 3
    with pytest.raises(PlanError, match="not a resource quantity"):
        parse_quantity("lots")


def test_node_status_is_ready_with_capacity_equal_to_allocatable() -> None:
    status = node_status(NODE, NOW, NOW)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True" and ready["reason"] == "KubeletReady"
    assert status["allocatable"] == status["capacity"] == dict(NODE.capacity)
    assert {"type": "InternalIP", "address": "127.0.0.1"} in status["addresses"]


# ------------------------------------------------------------------------------------------ the plan
def test_env_field_refs_config_map_and_secret_refs_and_expansion(tmp_path: Path) -> None:
    container = {"name": "main", "command": ["python3", "-c", "$(GREETING) $$(KEEP)"], "env": [
        {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "level"}}},
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
        {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
        {"name": "GREETING", "value": "hello $(NAME)"},
    ], "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}]}
    plan = plan_pod(pod(containers=[container]), inputs(
        tmp_path, config_maps={"settings": {"data": {"level": "debug"}}},
        secrets={"creds": {"data": {"password": "c2VjcmV0"}}}))
    env = plan.containers[0].command.env
    assert (env["NAME"], env["IP"], env["APP"], env["LEVEL"], env["PASSWORD"]) == (
        "p", "127.0.0.10", "a", "debug", "secret")
    assert env["CPU"] == "2"  # no limit: the node's allocatable, as the kubelet reports it
    assert env["CFG_level"] == "debug"
    assert env["GREETING"] == "hello p"
    assert plan.containers[0].command.argv == [sys.executable, "-c", "hello p $(KEEP)"]
    assert env["JEST_METRICS_HOST"] == "127.0.0.10" and env["GLOO_SOCKET_IFNAME"] == "lo"
    assert env["KUBERNETES_SERVICE_HOST"] == "127.0.0.1" and env["KUBERNETES_SERVICE_PORT"] == "6443"


def test_missing_config_map_waits_and_unsupported_sources_do_not(tmp_path: Path) -> None:
    missing = pod(containers=[{"name": "main", "command": ["x"], "env": [
        {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "later", "key": "k"}}}]}])
    with pytest.raises(PlanError) as waiting:
        plan_pod(missing, inputs(tmp_path))
    assert waiting.value.retry and waiting.value.field == "spec.containers[0].env[0].valueFrom.configMapKeyRef"
    assert 'configmap "later" not found' in str(waiting.value)
    host_path = pod(volumes=[{"name": "h", "hostPath": {"path": "/"}}])
    with pytest.raises(PlanError, match=r"spec.volumes\[0\]: volume type \['hostPath'\] is not supported") as error:
        plan_pod(host_path, inputs(tmp_path))
    assert not error.value.retry
    no_command = pod(containers=[{"name": "main", "image": "x"}])
    with pytest.raises(PlanError, match="no command"):
        plan_pod(no_command, inputs(tmp_path))


def test_volumes_are_materialised_and_mount_paths_rewritten(tmp_path: Path) -> None:
    spec = {
        "containers": [{"name": "main", "command": ["python3", "/etc/app/run.py", "--out=/data/x"],
                        "workingDir": "/data",
                        "env": [{"name": "CACHE", "value": "/tmp/.cache"}, {"name": "PATHS", "value": "/etc/app:/usr"}],
                        "volumeMounts": [{"name": "app", "mountPath": "/etc/app"},
                                         {"name": "data", "mountPath": "/data"},
                                         {"name": "tmp", "mountPath": "/tmp"},
                                         {"name": "info", "mountPath": "/etc/podinfo"},
                                         {"name": "claim", "mountPath": "/ckpt"}]}],
        "volumes": [{"name": "app", "configMap": {"name": "app", "items": [{"key": "run", "path": "run.py"}]}},
                    {"name": "data", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}},
                    {"name": "info", "downwardAPI": {"items": [{"path": "name",
                                                                "fieldRef": {"fieldPath": "metadata.name"}}]}},
                    {"name": "claim", "persistentVolumeClaim": {"claimName": "ckpt"}}],
    }
    plan = plan_pod(pod(**spec), inputs(tmp_path, config_maps={"app": {"data": {"run": "print(1)"}}}))
    volumes = tmp_path / "pod" / "volumes"
    command = plan.containers[0].command
    assert command.argv[1:] == [str(volumes / "app" / "run.py"), f"--out={volumes / 'data' / 'x'}"]
    assert command.cwd == volumes / "data"
    assert command.env["CACHE"] == str(volumes / "tmp" / ".cache")
    assert command.env["PATHS"] == f"{volumes / 'app'}:/usr"  # /usr is no mount: untouched
    assert command.env["TMPDIR"] == str(volumes / "tmp")
    assert plan.files[volumes / "app" / "run.py"] == b"print(1)"
    assert plan.files[volumes / "info" / "name"] == b"p"
    assert tmp_path / "pvc" / "ns" / "ckpt" in plan.directories  # a claim outlives its pods


def test_mount_table_prefers_the_longest_mount_and_respects_boundaries(tmp_path: Path) -> None:
    table = MountTable.of([Mount("/etc", tmp_path / "etc"), Mount("/etc/jest", tmp_path / "jest")])
    assert table.rewrite_path("/etc/jest/config.json") == str(tmp_path / "jest" / "config.json")
    assert table.rewrite_path("/etc/hosts") == str(tmp_path / "etc" / "hosts")
    assert table.rewrite_path("/etcetera") is None
    assert table.rewrite("http://example.com/etc") == "http://example.com/etc"


def test_a_trainer_pod_of_the_builders_runs_from_its_pod_directory(tmp_path: Path, repo_root: Path) -> None:
    """The operator's own worker pod: config.json's checkpoint dir follows the /checkpoints emptyDir."""
    import yaml

    manifest = yaml.safe_load((repo_root / "examples" / "quickstart.yaml").read_text())
    manifest["metadata"].update(namespace="team", uid="4c1f7e0a-0000-0000-0000-000000000001")
    children = build_children(parse_job(manifest), attempt=0)
    config_map = next(c for c in children if c["kind"] == "ConfigMap")
    pods = [c for c in children if c["kind"] == "Pod"]
    rank1 = pods[1]
    rank1["metadata"]["uid"] = "rank-1-uid"
    addresses = {"quickstart-node-0": PodAddress("team", "quickstart-node-0", "quickstart", "127.0.0.20", "rank-0")}
    mapped: list[tuple[str, int]] = []

    def map_port(address: PodAddress, port: int) -> int:
        mapped.append((address.uid, port))
        return 40000 + port % 1000

    plan = plan_pod(rank1, inputs(
        tmp_path, pod_ip="127.0.0.21", config_maps={config_map["metadata"]["name"]: config_map},
        resolve=lambda ns, host, sub: addresses.get(host) if (ns, sub) == ("team", "quickstart") else None,
        map_port=map_port))
    env = plan.containers[0].command.env
    volumes = tmp_path / "pod" / "volumes"
    assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"] == "127.0.0.20"
    assert env["MASTER_PORT"] == env["PET_MASTER_PORT"] == "40500"  # torch's TCPStore listens on every interface
    assert mapped == [("rank-0", 29500), ("rank-0", 29500)]
    assert env["JEST_CONFIG"] == str(volumes / "jest-config" / "config.json")
    assert env["JEST_METRICS_PORT"] == "9090" and env["JEST_METRICS_HOST"] == "127.0.0.21"
    assert env["OMP_NUM_THREADS"] == "1"  # the quickstart requests one CPU per pod
    assert "KUBECONFIG" not in env  # automountServiceAccountToken: false on worker pods
    written = json.loads(plan.files[volumes / "jest-config" / "config.json"])
    assert written["training"]["checkpoint"]["dir"] == str(volumes / "checkpoints")
    assert plan.containers[0].command.argv[0].endswith("jest-trainer")
    # the kubelet's termination file: the trainer's JEST_TERMINATION_MESSAGE_PATH names the file read back
    assert env["JEST_TERMINATION_MESSAGE_PATH"] == str(plan.containers[0].termination_message_file)
    assert plan.containers[0].termination_message_file == tmp_path / "pod" / "termination" / "containers-trainer"

    with pytest.raises(PlanError) as unresolved:  # rank 0 not on this node yet: wait, as for DNS
        plan_pod(rank1, inputs(tmp_path, config_maps={config_map["metadata"]["name"]: config_map}))
    assert unresolved.value.retry and "quickstart-node-0.quickstart.team.svc" in unresolved.value.message


def test_termination_message_path_is_a_per_container_file_or_stays_in_its_volume(tmp_path: Path) -> None:
    """Like the kubelet's bind mount: the path names one file per container, wherever the container says it."""
    spec = pod(volumes=[{"name": "tmp", "emptyDir": {}}])
    main = spec["spec"]["containers"][0]
    main["env"] = [{"name": "WHERE", "value": "/dev/termination-log"}]
    main["args"] = ["/dev/termination-log"]
    spec["spec"]["containers"].append({"name": "side", "image": "x", "command": ["python3"],
                                       "terminationMessagePath": "/tmp/done",
                                       "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]})
    plan = plan_pod(spec, inputs(tmp_path))
    first, second = plan.containers
    assert first.termination_message_file == tmp_path / "pod" / "termination" / "containers-main"
    assert first.command.env["WHERE"] == first.command.argv[-1] == str(first.termination_message_file)
    assert first.termination_message_file.parent in plan.directories
    assert second.termination_message_file == tmp_path / "pod" / "volumes" / "tmp" / "done"


def test_rendezvous_port_is_only_remapped_beside_a_pod_address() -> None:
    address = PodAddress("ns", "a", "b", "127.0.0.30", "uid-a")
    env = {"MASTER_ADDR": "a.b.ns.svc.cluster.local", "MASTER_PORT": "29500", "OTHER_PORT": "29500",
           "URL": "http://a.b.ns.svc:9090/metrics", "SERVICE": "b.ns.svc"}
    out = localize_addresses(env, lambda ns, host, sub: address if (ns, host, sub) == ("ns", "a", "b") else None,
                             lambda target, port: port + 1)
    assert out == {"MASTER_ADDR": "127.0.0.30", "MASTER_PORT": "29501", "OTHER_PORT": "29500",
                   "URL": "http://127.0.0.30:9090/metrics", "SERVICE": "b.ns.svc"}


def test_service_account_token_becomes_a_kubeconfig_for_in_cluster_clients(tmp_path: Path) -> None:
    spec = {
        "serviceAccountName": "operator",
        "containers": [{"name": "main", "command": ["python3"],
                        "volumeMounts": [{"name": "kube-api-access-x", "mountPath": SERVICE_ACCOUNT_MOUNT}]}],
        "volumes": [{"name": "kube-api-access-x", "projected": {"sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}]}}],
    }
    the_pod = pod(**spec)
    assert service_account_tokens(the_pod) == [("kube-api-access-x", "token", None, 3607)]
    assert referenced_objects(the_pod) == ({"kube-root-ca.crt"}, set())
    with pytest.raises(PlanError, match="no token issued"):
        plan_pod(the_pod, inputs(tmp_path, config_maps={"kube-root-ca.crt": {"data": {"ca.crt": "PEM"}}}))
    plan = plan_pod(the_pod, inputs(tmp_path, config_maps={"kube-root-ca.crt": {"data": {"ca.crt": "PEM"}}},
                                    tokens={("kube-api-access-x", "token"): "jwt"}))
    directory = tmp_path / "pod" / "volumes" / "kube-api-access-x"
    assert plan.files[directory / "token"] == b"jwt"
    assert plan.files[directory / "namespace"] == b"ns"
    assert plan.files[directory / "ca.crt"] == b"PEM"
    env = plan.containers[0].command.env
    assert env["KUBECONFIG"] == str(plan.kubeconfig)
    kubeconfig = json.loads(plan.files[plan.kubeconfig])
    user = kubeconfig["users"][0]["user"]
    assert user == {"token": "jwt", "tokenFile": str(directory / "token")}
    assert kubeconfig["clusters"][0]["cluster"] == {"server": "https://127.0.0.1:6443",
                                                    "certificate-authority": str(directory / "ca.crt")}
    assert kubeconfig["contexts"][0]["context"]["namespace"] == "ns"


def test_pods_never_inherit_the_agents_credentials() -> None:
    inherited = process_environment({"PATH": "/bin", "KUBECONFIG": "/admin", "HOME": "/root", "LANG": "C.UTF-8",
                                     "OMP_NUM_THREADS": "1", "AWS_SECRET_ACCESS_KEY": "x"})
    assert inherited == {"PATH": "/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}


def test_init_containers_are_planned_before_containers(tmp_path: Path) -> None:
    plan = plan_pod(pod(initContainers=[{"name": "setup", "command": ["python3", "-c", "1"]}]), inputs(tmp_path))
    assert [c.name for c in plan.init_containers] == ["setup"] and plan.init_containers[0].init
    assert [c.name for c in plan.containers] == ["main"]


# ------------------------------------------------------------------------------------------- status
def running(name: str = "main", ready: bool = True) -> ContainerState:
    return ContainerState(name=name, state="running", reason="", started_at=NOW, ready=ready, pid=42)


def exited(code: int, name: str = "main") -> ContainerState:
    return ContainerState(name=name, state="terminated", exit_code=code,
                          reason="Completed" if code == 0 else "Error", started_at=NOW, finished_at=NOW)


def test_phase_follows_the_kubelet_rules() -> None:
    waiting = ContainerState(name="main")
    assert pod_phase("Never", [], [waiting]) == "Pending"
    assert pod_phase("Never", [], [running()]) == "Running"
    assert pod_phase("Never", [], [exited(0)]) == "Succeeded"
    assert pod_phase("Never", [], [exited(0), exited(1, "b")]) == "Failed"
    assert pod_phase("Always", [], [exited(0)]) == "Running"  # it will be restarted
    assert pod_phase("OnFailure", [], [exited(0)]) == "Succeeded"
    assert pod_phase("OnFailure", [], [exited(2)]) == "Running"
    assert pod_phase("Always", [], [exited(0)], terminating=True) == "Succeeded"  # deleted: terminal
    assert pod_phase("Never", [running("init")], [waiting]) == "Pending"
    assert pod_phase("Never", [exited(1, "init")], [waiting]) == "Failed"


def test_status_of_a_running_then_failed_pod() -> None:
    the_pod = pod(restartPolicy="Never")
    status = pod_status(the_pod, init=[], containers=[running(ready=False)], pod_ip="127.0.0.10",
                        host_ip="127.0.0.1", start_time=NOW, now=NOW)
    conditions = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Running" and status["podIP"] == "127.0.0.10"
    assert status["podIPs"] == [{"ip": "127.0.0.10"}] and status["startTime"] == "2026-12-02T17:00:00Z"
    assert conditions["Ready"]["status"] == "False" and conditions["Ready"]["reason"] == "ContainersNotReady"
    assert conditions["PodScheduled"]["status"] == conditions["Initialized"]["status"] == "True"
    assert status["containerStatuses"][0]["state"] == {"running": {"startedAt": "2026-12-02T17:00:00Z"}}

    the_pod["status"] = status
    later = NOW + dt.timedelta(minutes=5)
    failed = exited(137)
    failed.signal, failed.message = 9, "killed"
    final = pod_status(the_pod, init=[], containers=[failed], pod_ip="127.0.0.10", host_ip="127.0.0.1",
                       start_time=NOW, now=later)
    conditions = {c["type"]: c for c in final["conditions"]}
    assert final["phase"] == "Failed"
    assert conditions["Ready"]["reason"] == "PodCompleted"
    assert conditions["Ready"]["lastTransitionTime"] == "2026-12-02T17:00:00Z"  # still False: time kept
    assert conditions["PodScheduled"]["lastTransitionTime"] == "2026-12-02T17:00:00Z"
    terminated = final["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["signal"], terminated["reason"], terminated["message"]) == (
        137, 9, "Error", "killed")


def test_exit_details_map_signals_like_a_container_runtime() -> None:
    assert exit_details(0) == (0, None)
    assert exit_details(3) == (3, None)
    assert exit_details(-15) == (143, 15)
    assert exit_details(-9) == (137, 9)


def test_two_dev_clusters_hand_out_different_pod_addresses() -> None:
    first, second = default_pod_ip_base("https://127.0.0.1:40001"), default_pod_ip_base("https://127.0.0.1:40002")
    assert first == "127.2.0.10" and second == "127.3.0.10"
    pool = IpPool("127.2.0.254")
    assert [pool.allocate(), pool.allocate()] == ["127.2.0.254", "127.2.1.1"]  # .255 and .0 skipped
    pool.reserve("127.2.1.7")  # a pod an earlier agent ran keeps its address
    assert pool.allocate() == "127.2.1.8"


def test_log_slice_is_tail_then_limit() -> None:
    log = b"one\ntwo\nthree\n"
    assert log_slice(log) == log
    assert log_slice(log, tail_lines=2) == b"two\nthree\n"
    assert log_slice(log, tail_lines=0) == b""
    assert log_slice(log, tail_lines=2, limit_bytes=5) == b"two\nt"
