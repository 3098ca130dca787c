"""Builders: DESIGN.md §4 exactly, and every object they emit is a valid Kubernetes 1.32 object (strict)."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jest_operator import builders
from jest_operator.api import parse_job
from jest_trainer.config import WorkerConfig

PVC_TEMPLATE = {
    "volumes": [{"name": "ckpt", "persistentVolumeClaim": {"claimName": "ckpt-pvc"}}],
    "volumeMounts": [{"name": "ckpt", "mountPath": "/checkpoints"}],
}
TPU = {"accelerator": "tpu-v5-lite-podslice", "topology": "2x4"}

VARIANTS: dict[str, dict[str, Any]] = {
    "cpu": {"numNodes": 2},
    "single": {"numNodes": 1},
    "gpu": {
        "numNodes": 4,
        "accelerator": {"type": "gpu", "count": 8},
        "resources": {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "64Gi"}},
    },
    "multiproc": {
        "numNodes": 2,
        "numProcPerNode": 8,
        "accelerator": {"type": "gpu", "count": 8},
        "training": {"selection": {"batchSize": 256, "chunks": 16}},
        "podTemplate": PVC_TEMPLATE,
    },
    "tpu": {"numNodes": 2, "accelerator": {"type": "tpu", "count": 4, "tpu": TPU}},
    "queue": {
        "numNodes": 2,
        "runPolicy": {"queueName": "team-a", "priorityClassName": "high", "schedulerName": "kueue-sched"},
        "podTemplate": {
            "labels": {"team": "a"},
            "annotations": {"note": "x"},
            "nodeSelector": {"pool": "cpu"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": [{"key": "k", "operator": "Exists"}]}]
                    }
                }
            },
            "env": [{"name": "NCCL_DEBUG", "value": "INFO"}],
            "serviceAccountName": "trainer",
            "imagePullSecrets": [{"name": "regcred"}],
            "securityContext": {"runAsUser": 2000, "runAsGroup": 2000, "fsGroup": 2000},
        },
    },
}


def job_of(spec: dict[str, Any], *, uid: str | None = "0a1b2c3d", namespace: str = "team"):
    metadata: dict[str, Any] = {"name": "demo", "namespace": namespace}
    if uid:
        metadata["uid"] = uid
    body = {
        "apiVersion": "jest.training/v1alpha1",
        "kind": "JESTTrainingJob",
        "metadata": metadata,
        "spec": {"image": "registry.example/jest-trainer:0.1.0", **spec},
    }
    return parse_job(body)


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in pod["spec"]["containers"][0]["env"]}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_child_is_a_valid_kubernetes_object(variant: str) -> None:
    job = job_of(VARIANTS[variant])
    children = builders.build_children(job, attempt=2)
    assert [c["kind"] for c in children] == ["ConfigMap", "Service"] + ["Pod"] * job.spec.num_nodes
    for child in children:
        kubernetes_validate.validate(child, "1.32.0", strict=True)


def test_validator_is_really_strict() -> None:
    pod = builders.build_pod(job_of(VARIANTS["cpu"]), 0, attempt=0)
    pod["spec"]["containers"][0]["bogusField"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, "1.32.0", strict=True)


def test_config_map_holds_the_worker_config() -> None:
    job = job_of({"numNodes": 2, "training": {"steps": 300}, "energy": {"budgetJoules": 1e6}})
    config_map = builders.build_config_map(job)
    assert config_map["metadata"]["name"] == "demo-config"
    assert config_map["metadata"]["namespace"] == "team"
    config = WorkerConfig.model_validate(json.loads(config_map["data"]["config.json"]))
    assert config.training == job.spec.training
    assert config.energy == job.spec.energy
    assert config.training.steps == 300


def test_service_is_headless_rendezvous() -> None:
    service = builders.build_service(job_of(VARIANTS["cpu"]))
    assert service["metadata"]["name"] == "demo"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["ports"] == [{"name": "rendezvous", "port": 29500, "targetPort": 29500, "protocol": "TCP"}]
    assert service["spec"]["selector"]["jest.training/job-name"] == "demo"


def test_children_are_labelled_and_owned() -> None:
    job = job_of(VARIANTS["cpu"])
    for child in builders.build_children(job, attempt=0):
        labels = child["metadata"]["labels"]
        assert labels["jest.training/job-name"] == "demo"
        assert labels["app.kubernetes.io/managed-by"] == "jest-operator"
        assert child["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "jest.training/v1alpha1",
                "kind": "JESTTrainingJob",
                "name": "demo",
                "uid": "0a1b2c3d",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        if child["kind"] == "Service":
            assert set(child["spec"]["selector"].items()) <= set(labels.items()) | {("jest.training/job-name", "demo")}


def test_no_owner_reference_without_uid() -> None:
    job = job_of(VARIANTS["cpu"], uid=None)
    for child in builders.build_children(job, attempt=0):
        assert "ownerReferences" not in child["metadata"]
        kubernetes_validate.validate(child, "1.32.0", strict=True)


def test_pod_identity_and_env_contract_single_process() -> None:
    job = job_of(VARIANTS["cpu"])
    pod = builders.build_pod(job, 1, attempt=3)
    assert pod["metadata"]["name"] == "demo-node-1"
    assert pod["spec"]["hostname"] == "demo-node-1"
    assert pod["spec"]["subdomain"] == "demo"
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["metadata"]["labels"]["jest.training/replica-index"] == "1"
    assert pod["metadata"]["labels"]["jest.training/attempt"] == "3"
    assert pod["metadata"]["annotations"]["jest.training/attempt"] == "3"
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["jest-trainer"]
    env = env_of(pod)
    assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"] == "demo-node-0.demo.team.svc"
    assert env["MASTER_PORT"] == env["PET_MASTER_PORT"] == "29500"
    assert (env["PET_NNODES"], env["PET_NODE_RANK"], env["PET_NPROC_PER_NODE"]) == ("2", "1", "1")
    assert (env["WORLD_SIZE"], env["RANK"], env["LOCAL_RANK"]) == ("2", "1", "0")
    assert env["JEST_CONFIG"] == "/etc/jest/config.json"
    assert (env["JEST_JOB_NAME"], env["JEST_NAMESPACE"], env["JEST_ATTEMPT"]) == ("demo", "team", "3")
    assert env["JEST_METRICS_PORT"] == "9090"
    assert {"TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES", "PJRT_DEVICE"}.isdisjoint(env)
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
    assert container["readinessProbe"]["httpGet"]["port"] == "metrics"
    names = [item["name"] for item in container["env"]]
    assert len(names) == len(set(names))


def test_multi_process_pods_use_torchrun_without_rank_env() -> None:
    job = job_of(VARIANTS["multiproc"])
    pod = builders.build_pod(job, 1, attempt=0)
    assert pod["spec"]["containers"][0]["command"] == ["torchrun", "-m", "jest_trainer.train"]
    env = env_of(pod)
    assert {"WORLD_SIZE", "RANK", "LOCAL_RANK"}.isdisjoint(env)
    assert (env["PET_NNODES"], env["PET_NODE_RANK"], env["PET_NPROC_PER_NODE"]) == ("2", "1", "8")


def test_gpu_resources_are_merged() -> None:
    pod = builders.build_pod(job_of(VARIANTS["gpu"]), 0, attempt=0)
    resources = pod["spec"]["containers"][0]["resources"]
    assert resources == {
        "requests": {"cpu": "8", "memory": "64Gi"},
        "limits": {"memory": "64Gi", "nvidia.com/gpu": "8"},
    }


def test_tpu_pods() -> None:
    job = job_of(VARIANTS["tpu"])
    for index in range(2):
        pod = builders.build_pod(job, index, attempt=0)
        assert pod["spec"]["nodeSelector"] == {
            "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
            "cloud.google.com/gke-tpu-topology": "2x4",
        }
        assert pod["spec"]["containers"][0]["resources"] == {"limits": {"google.com/tpu": "4"}}
        env = env_of(pod)
        assert env["TPU_WORKER_ID"] == str(index)
        assert env["TPU_WORKER_HOSTNAMES"] == "demo-node-0.demo.team.svc,demo-node-1.demo.team.svc"
        assert env["PJRT_DEVICE"] == "TPU"


def test_restricted_security_context() -> None:
    pod = builders.build_pod(job_of(VARIANTS["cpu"]), 0, attempt=0)
    pod_security = pod["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == 1000 and pod_security["runAsGroup"] == 1000
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    container_security = pod["spec"]["containers"][0]["securityContext"]
    assert container_security["allowPrivilegeEscalation"] is False
    assert container_security["capabilities"] == {"drop": ["ALL"]}
    assert container_security["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes[mounts["/tmp"]]["emptyDir"] == {}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory"}
    assert volumes[mounts["/etc/jest"]]["configMap"] == {"name": "demo-config"}
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 60
    trainer = pod["spec"]["containers"][0]
    env = {variable["name"]: variable.get("value") for variable in trainer["env"]}
    # the final-figures summary goes where the kubelet reads it; a crash's log tail replaces it
    assert env["JEST_TERMINATION_MESSAGE_PATH"] == trainer["terminationMessagePath"] == "/dev/termination-log"
    node_name = next(variable for variable in trainer["env"] if variable["name"] == "JEST_NODE_NAME")
    assert node_name["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}  # one RAPL meter per node
    assert trainer["terminationMessagePolicy"] == "FallbackToLogsOnError"
    text = json.dumps(pod)
    for forbidden in ("privileged", "hostPath", "hostNetwork", "hostPID", "hostIPC"):
        assert forbidden not in text


def test_checkpoint_dir_is_emptydir_unless_user_mounts_it() -> None:
    pod = builders.build_pod(job_of(VARIANTS["cpu"]), 0, attempt=0)
    mounts = {m["mountPath"]: m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes[mounts["/checkpoints"]] == {"name": "checkpoints", "emptyDir": {}}

    pod = builders.build_pod(job_of(VARIANTS["multiproc"]), 0, attempt=0)
    mounts = {m["mountPath"]: m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert mounts["/checkpoints"] == "ckpt"
    assert volumes["ckpt"]["persistentVolumeClaim"] == {"claimName": "ckpt-pvc"}
    assert "checkpoints" not in volumes

    nested = job_of(
        {
            "numNodes": 1,
            "training": {"checkpoint": {"dir": "/data/run-1/ckpt/"}},
            "podTemplate": {
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "d"}}],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            },
        }
    )
    assert builders.checkpoint_mount_covered(nested)
    assert "checkpoints" not in {v["name"] for v in builders.build_pod(nested, 0, attempt=0)["spec"]["volumes"]}


def test_kueue_and_scheduling_fields() -> None:
    job = job_of(VARIANTS["queue"])
    pod = builders.build_pod(job, 1, attempt=0)
    labels, annotations = pod["metadata"]["labels"], pod["metadata"]["annotations"]
    assert labels["kueue.x-k8s.io/queue-name"] == "team-a"
    assert labels["kueue.x-k8s.io/pod-group-name"] == "demo"
    assert annotations["kueue.x-k8s.io/pod-group-total-count"] == "2"
    assert labels["team"] == "a" and annotations["note"] == "x"
    spec = pod["spec"]
    assert spec["priorityClassName"] == "high"
    assert spec["schedulerName"] == "kueue-sched"
    assert spec["serviceAccountName"] == "trainer" and "automountServiceAccountToken" not in spec
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["nodeSelector"] == {"pool": "cpu"}
    assert spec["tolerations"][0]["key"] == "dedicated"
    assert "nodeAffinity" in spec["affinity"]
    assert spec["securityContext"]["runAsUser"] == 2000
    assert env_of(pod)["NCCL_DEBUG"] == "INFO"

    plain = builders.build_pod(job_of(VARIANTS["cpu"]), 0, attempt=0)
    assert not any(key.startswith("kueue.x-k8s.io/") for key in plain["metadata"]["labels"])
    assert "priorityClassName" not in plain["spec"]


def test_user_env_overrides_cache_defaults_without_duplicates() -> None:
    job = job_of({"numNodes": 1, "podTemplate": {"env": [{"name": "XDG_CACHE_HOME", "value": "/data/cache"}]}})
    pod = builders.build_pod(job, 0, attempt=0)
    names = [item["name"] for item in pod["spec"]["containers"][0]["env"]]
    assert names.count("XDG_CACHE_HOME") == 1
    assert env_of(pod)["XDG_CACHE_HOME"] == "/data/cache"


def test_builders_are_deterministic_and_reject_bad_indices() -> None:
    job = job_of(VARIANTS["gpu"])
    assert builders.build_children(job, attempt=1) == builders.build_children(job, attempt=1)
    assert builders.build_config_map(job) == builders.build_config_map(job_of(VARIANTS["gpu"]))
    with pytest.raises(ValueError, match="out of range"):
        builders.build_pod(job, 4, attempt=0)
    with pytest.raises(ValueError, match="attempt"):
        builders.build_pod(job, 0, attempt=-1)


RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_profile_violations(pod: dict[str, Any]) -> list[str]:
    """The controls of the Pod Security Standards "restricted" profile (v1.32) that a pod spec can break."""
    spec = pod["spec"]
    found = [key for key in ("hostNetwork", "hostPID", "hostIPC") if spec.get(key)]
    pod_context = spec.get("securityContext", {})
    if pod_context.get("sysctls"):
        found.append("sysctls")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            found.append(f"volume {volume['name']}: {sorted(kinds - RESTRICTED_VOLUME_TYPES)}")
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        context = container.get("securityContext", {})
        name = container["name"]
        if context.get("privileged"):
            found.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation must be false")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{name}: must drop ALL capabilities")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities")
        if not (context.get("runAsNonRoot") or pod_context.get("runAsNonRoot")):
            found.append(f"{name}: runAsNonRoot")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            found.append(f"{name}: runAsUser 0")
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {}))
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccomp")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"{name}: hostPort")
        if context.get("procMount", "Default") != "Default":
            found.append(f"{name}: procMount")
    return found


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pods_meet_the_restricted_pod_security_profile(variant: str) -> None:
    job = job_of(VARIANTS[variant])
    for index in range(job.spec.num_nodes):
        assert restricted_profile_violations(builders.build_pod(job, index, attempt=0)) == []


def test_restricted_profile_checker_detects_violations() -> None:
    pod = builders.build_pod(job_of(VARIANTS["cpu"]), 0, attempt=0)
    pod["spec"]["hostNetwork"] = True
    pod["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    pod["spec"]["containers"][0]["securityContext"]["capabilities"] = {"add": ["SYS_ADMIN"]}
    found = restricted_profile_violations(pod)
    assert "hostNetwork" in found
    assert "volume host: ['hostPath']" in found
    assert "trainer: must drop ALL capabilities" in found and "trainer: adds capabilities" in found


@st.composite
def job_specs(draw: st.DrawFn) -> dict[str, Any]:
    """Valid specs across accelerators, gang shapes, queues, templates and names."""
    accelerator_type = draw(st.sampled_from(["cpu", "gpu", "tpu"]))
    num_nodes = draw(st.integers(1, 6))
    spec: dict[str, Any] = {"numNodes": num_nodes}
    if accelerator_type == "gpu":
        count = draw(st.sampled_from([1, 2, 4, 8]))
        spec["accelerator"] = {"type": "gpu", "count": count}
        spec["numProcPerNode"] = draw(st.integers(1, count))
    elif accelerator_type == "tpu":
        spec["accelerator"] = {
            "type": "tpu",
            "count": 4,
            "tpu": {"accelerator": "tpu-v5-lite-podslice", "topology": f"{num_nodes}x4"},
        }
    chunks = draw(st.sampled_from([1, 2, 4, 8]))
    world = num_nodes * spec.get("numProcPerNode", 1)
    spec["training"] = {"selection": {"batchSize": world * chunks * draw(st.integers(2, 4)), "chunks": chunks}}
    if draw(st.booleans()):
        spec["runPolicy"] = {"queueName": draw(st.from_regex(r"[a-z][a-z0-9-]{0,20}[a-z0-9]", fullmatch=True))}
    if draw(st.booleans()):
        spec["podTemplate"] = {
            "env": [{"name": f"EXTRA_{i}", "value": str(i)} for i in range(draw(st.integers(0, 3)))],
            "labels": {"team": draw(st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True))},
            **(PVC_TEMPLATE if draw(st.booleans()) else {}),
        }
    return spec


@settings(max_examples=12, deadline=None)
@given(
    spec=job_specs(), name=st.from_regex(r"[a-z][a-z0-9-]{0,48}[a-z0-9]", fullmatch=True), attempt=st.integers(0, 1000)
)
def test_any_valid_job_builds_valid_objects(spec: dict[str, Any], name: str, attempt: int) -> None:
    body = {
        "apiVersion": "jest.training/v1alpha1",
        "kind": "JESTTrainingJob",
        "metadata": {"name": name, "namespace": "ns", "uid": "u"},
        "spec": {"image": "registry.example/jest-trainer:0.1.0", **spec},
    }
    job = parse_job(body)
    children = builders.build_children(job, attempt=attempt)
    for child in children:
        kubernetes_validate.validate(child, "1.32.0", strict=True)
    pods = [child for child in children if child["kind"] == "Pod"]
    assert [pod["metadata"]["name"] for pod in pods] == [f"{name}-node-{i}" for i in range(job.spec.num_nodes)]
    ranks = sorted(int(env_of(pod)["PET_NODE_RANK"]) for pod in pods)
    assert ranks == list(range(job.spec.num_nodes))
    for pod in pods:
        assert restricted_profile_violations(pod) == []
        assert len(pod["spec"]["hostname"]) <= 63


def test_spec_hash_tracks_content_only() -> None:
    """ConfigMap/Service carry a digest of their content: it changes with spec.training, not with noise."""
    from jest_operator.api import ANNOTATION_SPEC_HASH

    base = job_of({"numNodes": 2})
    edited = job_of({"numNodes": 2, "training": {"steps": 12345}})

    def digest(child: dict[str, Any]) -> str:
        return child["metadata"]["annotations"][ANNOTATION_SPEC_HASH]

    assert digest(builders.build_config_map(base)) != digest(builders.build_config_map(edited))
    assert digest(builders.build_service(base)) == digest(builders.build_service(edited))
    config_map = builders.build_config_map(base)
    stored = {**config_map, "metadata": {**config_map["metadata"], "resourceVersion": "7", "uid": "u",
                                         "annotations": {"other": "x"}}}
    assert builders.spec_hash(stored) == digest(config_map)
