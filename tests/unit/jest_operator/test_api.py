"""parse_job: valid manifests become typed jobs; every invalid one is an InvalidSpec naming its field."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from jest_operator import api
from jest_operator.api import InvalidSpec, parse_job, world_size


def manifest(**spec: Any) -> dict[str, Any]:
    """A minimal valid job (2 CPU workers) with ``spec`` keys overridden."""
    body: dict[str, Any] = {
        "apiVersion": "jest.training/v1alpha1",
        "kind": "JESTTrainingJob",
        "metadata": {"name": "demo", "namespace": "team", "uid": "1234", "generation": 3},
        "spec": {"image": "registry.example/jest-trainer:0.1.0", "numNodes": 2},
    }
    body["spec"].update(spec)
    return body


def rejected(body: dict[str, Any]) -> InvalidSpec:
    with pytest.raises(InvalidSpec) as info:
        parse_job(body)
    return info.value


def test_contract_constants() -> None:
    assert (api.GROUP, api.VERSION, api.KIND, api.PLURAL) == (
        "jest.training",
        "v1alpha1",
        "JESTTrainingJob",
        "jesttrainingjobs",
    )
    assert api.LABEL_JOB_NAME == "jest.training/job-name"
    assert api.LABEL_REPLICA_INDEX == "jest.training/replica-index"
    assert api.LABEL_MANAGED_BY == "app.kubernetes.io/managed-by"
    assert api.ANNOTATION_ATTEMPT == "jest.training/attempt"
    assert [phase.value for phase in api.Phase] == [
        "Pending",
        "Running",
        "Restarting",
        "Suspended",
        "Succeeded",
        "Failed",
    ]
    assert {c.value for c in api.ConditionType} == {
        "Created",
        "Running",
        "Restarting",
        "Suspended",
        "Succeeded",
        "Failed",
    }
    for reason in ("InvalidSpec", "BackoffLimitExceeded", "DeadlineExceeded", "EnergyBudgetExceeded"):
        assert api.ConditionReason(reason) == reason


def test_minimal_manifest_gets_defaults() -> None:
    job = parse_job(manifest())
    assert job.name == "demo" and job.namespace == "team" and job.metadata.uid == "1234"
    assert job.metadata.generation == 3
    assert job.spec.num_proc_per_node == 1
    assert job.spec.accelerator.type == "cpu"
    assert job.spec.training.selection.method == "jest"
    assert job.spec.run_policy.backoff_limit == 3 and job.spec.run_policy.clean_pod_policy == "Running"
    assert job.spec.energy.on_budget_exceeded == "Warn"
    assert world_size(job) == 2
    assert job.status is None


def test_namespace_defaults_and_unknown_metadata_is_ignored() -> None:
    body = manifest()
    body["metadata"] = {"name": "demo", "resourceVersion": "7", "managedFields": [], "creationTimestamp": "x"}
    assert parse_job(body).namespace == "default"


def test_invalid_spec_message_format() -> None:
    error = InvalidSpec("spec.numNodes", "must be >= 1")
    assert str(error) == "spec.numNodes: must be >= 1"
    assert isinstance(error, ValueError)
    assert (error.field, error.message) == ("spec.numNodes", "must be >= 1")


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda b: b.update(apiVersion="v1"), "apiVersion"),
        (lambda b: b.update(kind="Job"), "kind"),
        (lambda b: b.pop("metadata"), "metadata"),
        (lambda b: b["metadata"].pop("name"), "metadata.name"),
        (lambda b: b["metadata"].update(name="Demo_Job"), "metadata.name"),
        (lambda b: b["metadata"].update(name="a" * 51), "metadata.name"),
        (lambda b: b.pop("spec"), "spec"),
        (lambda b: b["spec"].pop("image"), "spec.image"),
        (lambda b: b["spec"].update(image=""), "spec.image"),
        (lambda b: b["spec"].update(numNodes="2"), "spec.numNodes"),
        (lambda b: b["spec"].update(numNodes=0), "spec.numNodes"),
        (lambda b: b["spec"].update(numNodes=True), "spec.numNodes"),
        (lambda b: b["spec"].update(numProcPerNode=65), "spec.numProcPerNode"),
        (lambda b: b["spec"].update(replicas=2), "spec.replicas"),
        (lambda b: b["spec"].update(accelerator={"type": "fpga"}), "spec.accelerator.type"),
        (
            lambda b: b["spec"].update(training={"selection": {"filterRatio": 1.0}}),
            "spec.training.selection.filterRatio",
        ),
        (lambda b: b["spec"].update(training={"selection": {"method": "best"}}), "spec.training.selection.method"),
        (lambda b: b["spec"].update(training={"selection": {"chunks": 0}}), "spec.training.selection.chunks"),
        (lambda b: b["spec"].update(training={"steps": 0}), "spec.training.steps"),
        (lambda b: b["spec"].update(training={"optimizer": {"lr": -1}}), "spec.training.optimizer.lr"),
        (lambda b: b["spec"].update(training={"model": {"arch": "resnet"}}), "spec.training.model.arch"),
        (lambda b: b["spec"].update(training={"data": {"source": "webdataset"}}), "spec.training.data.urls"),
        (
            lambda b: b["spec"].update(training={"data": {"noise": {"wrong": 0.9, "junk": 0.2}}}),
            "spec.training.data.noise",
        ),
        (lambda b: b["spec"].update(training={"checkpoint": {"dir": "ckpt"}}), "spec.training.checkpoint.dir"),
        (lambda b: b["spec"].update(training={"checkpoint": {"dir": "/etc/jest/x"}}), "spec.training.checkpoint.dir"),
        (lambda b: b["spec"].update(energy={"budgetJoules": 0}), "spec.energy.budgetJoules"),
        (lambda b: b["spec"].update(energy={"onBudgetExceeded": "Explode"}), "spec.energy.onBudgetExceeded"),
        (lambda b: b["spec"].update(runPolicy={"cleanPodPolicy": "Some"}), "spec.runPolicy.cleanPodPolicy"),
        (lambda b: b["spec"].update(runPolicy={"backoffLimit": -1}), "spec.runPolicy.backoffLimit"),
        (lambda b: b["spec"].update(runPolicy={"queueName": "Team A"}), "spec.runPolicy.queueName"),
        (lambda b: b["spec"].update(resources={"requests": {"cpu": 0.5}}), "spec.resources.requests.cpu"),
        (lambda b: b["spec"].update(resources={"requests": {"memory": "lots"}}), "spec.resources.requests[memory]"),
        (
            lambda b: b["spec"].update(resources={"limits": {"nvidia.com/gpu": 1}}),
            "spec.resources.limits[nvidia.com/gpu]",
        ),
        (
            lambda b: b["spec"].update(resources={"requests": {"cpu": "4"}, "limits": {"cpu": "2"}}),
            "spec.resources.requests[cpu]",
        ),
    ],
)
def test_field_errors_name_the_field(mutate, field: str) -> None:
    body = manifest()
    mutate(body)
    assert rejected(body).field == field


def test_batch_must_split_over_ranks_and_chunks() -> None:
    ok = manifest(numNodes=2, training={"selection": {"batchSize": 64, "chunks": 16}})
    assert parse_job(ok).spec.training.selection.per_rank(2) == (32, 160)
    # 64 / (2 nodes) = 32 per rank, not divisible by 3 nodes
    error = rejected(manifest(numNodes=3, training={"selection": {"batchSize": 64, "chunks": 16}}))
    assert error.field == "spec.training.selection.batchSize"
    assert "numNodes x numProcPerNode x chunks" in error.message
    # divisible by the world size but the per-rank batch (16) is not divisible by 32 chunks
    error = rejected(manifest(numNodes=2, numProcPerNode=2, training={"selection": {"batchSize": 64, "chunks": 32}}))
    assert error.field == "spec.training.selection.batchSize"


def test_accelerator_consistency() -> None:
    assert rejected(manifest(accelerator={"type": "gpu"})).field == "spec.accelerator.count"
    assert rejected(manifest(accelerator={"type": "tpu", "count": 4})).field == "spec.accelerator.tpu"
    tpu = {"accelerator": "tpu-v5-lite-podslice", "topology": "2x4"}
    assert rejected(manifest(accelerator={"type": "gpu", "count": 1, "tpu": tpu})).field == "spec.accelerator.tpu"
    assert rejected(manifest(accelerator={"type": "cpu", "count": 2})).field == "spec.accelerator.count"
    selection = {"selection": {"batchSize": 128, "chunks": 16}}
    error = rejected(manifest(numProcPerNode=4, accelerator={"type": "gpu", "count": 2}, training=selection))
    assert error.field == "spec.numProcPerNode"
    error = rejected(manifest(numNodes=2, accelerator={"type": "tpu", "count": 8, "tpu": tpu}))
    assert error.field == "spec.accelerator.tpu.topology" and "8 chips" in error.message
    bad_topology = {"accelerator": "tpu-v5-lite-podslice", "topology": "2by4"}
    assert rejected(manifest(accelerator={"type": "tpu", "count": 4, "tpu": bad_topology})).field == (
        "spec.accelerator.tpu.topology"
    )
    job = parse_job(manifest(numNodes=2, accelerator={"type": "tpu", "count": 4, "tpu": tpu}))
    assert api.topology_chips(job.spec.accelerator.tpu.topology) == 8


@pytest.mark.parametrize(
    ("pod_template", "field"),
    [
        ({"hostNetwork": True}, "spec.podTemplate.hostNetwork"),
        ({"hostPID": True}, "spec.podTemplate.hostPID"),
        ({"hostIPC": True}, "spec.podTemplate.hostIPC"),
        ({"securityContext": {"privileged": True}}, "spec.podTemplate.securityContext.privileged"),
        (
            {"securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}},
            "spec.podTemplate.securityContext.capabilities",
        ),
        ({"securityContext": {"runAsUser": 0}}, "spec.podTemplate.securityContext.runAsUser"),
        ({"securityContext": {"runAsNonRoot": False}}, "spec.podTemplate.securityContext.runAsNonRoot"),
        ({"volumes": [{"name": "host", "hostPath": {"path": "/"}}]}, "spec.podTemplate.volumes[0].hostPath"),
        ({"containers": []}, "spec.podTemplate.containers"),
        ({"env": [{"name": "MASTER_ADDR", "value": "evil"}]}, "spec.podTemplate.env[0].name"),
        ({"env": [{"name": "OK", "value": "1"}, {"name": "RANK", "value": "3"}]}, "spec.podTemplate.env[1].name"),
        ({"env": [{"name": "JEST_CONFIG", "value": "/x"}]}, "spec.podTemplate.env[0].name"),
        ({"env": [{"name": "PET_NNODES", "value": "9"}]}, "spec.podTemplate.env[0].name"),
        ({"env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {}}}]}, "spec.podTemplate.env[0]"),
        ({"labels": {"jest.training/job-name": "other"}}, "spec.podTemplate.labels[jest.training/job-name]"),
        ({"labels": {"kueue.x-k8s.io/queue-name": "q"}}, "spec.podTemplate.labels[kueue.x-k8s.io/queue-name]"),
        ({"volumes": [{"name": "tmp", "emptyDir": {}}]}, "spec.podTemplate.volumes[0].name"),
        ({"volumes": [{"name": "a"}]}, "spec.podTemplate.volumes[0]"),
        ({"volumes": [{"name": "a", "emptyDir": {}, "secret": {"secretName": "s"}}]}, "spec.podTemplate.volumes[0]"),
        ({"volumeMounts": [{"name": "nope", "mountPath": "/data"}]}, "spec.podTemplate.volumeMounts[0].name"),
        (
            {"volumes": [{"name": "a", "emptyDir": {}}], "volumeMounts": [{"name": "a", "mountPath": "/etc/jest"}]},
            "spec.podTemplate.volumeMounts[0].mountPath",
        ),
        ({"terminationGracePeriodSeconds": 1}, "spec.podTemplate.terminationGracePeriodSeconds"),
        ({"tolerations": [{"operator": "Maybe"}]}, "spec.podTemplate.tolerations[0].operator"),
    ],
)
def test_pod_template_restrictions(pod_template: dict[str, Any], field: str) -> None:
    assert rejected(manifest(podTemplate=pod_template)).field == field


def test_tpu_node_selector_is_reserved() -> None:
    tpu = {"accelerator": "tpu-v5-lite-podslice", "topology": "2x4"}
    body = manifest(
        accelerator={"type": "tpu", "count": 4, "tpu": tpu},
        podTemplate={"nodeSelector": {"cloud.google.com/gke-tpu-topology": "4x4"}},
    )
    assert rejected(body).field == "spec.podTemplate.nodeSelector[cloud.google.com/gke-tpu-topology]"


def test_allowed_pod_template_round_trips() -> None:
    template = {
        "labels": {"team": "vision"},
        "annotations": {"example.com/note": "hi"},
        "nodeSelector": {"pool": "a100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"anything": ["goes", {"here": 1}]}},
        "env": [{"name": "HF_HOME", "value": "/data/hf"}, {"name": "TOKEN", "valueFrom": {"secretKeyRef": {}}}],
        "volumes": [{"name": "ckpt", "persistentVolumeClaim": {"claimName": "ckpt-pvc"}}],
        "volumeMounts": [{"name": "ckpt", "mountPath": "/checkpoints"}],
        "serviceAccountName": "trainer",
        "imagePullSecrets": [{"name": "regcred"}],
        "securityContext": {"runAsUser": 2000, "fsGroup": 3000},
        "terminationGracePeriodSeconds": 300,
    }
    job = parse_job(manifest(podTemplate=template))
    wire = job.spec.pod_template.to_wire()
    for key, value in template.items():
        assert wire[key] == value


def test_status_is_parsed_and_kopf_bookkeeping_ignored() -> None:
    body = manifest()
    body["status"] = {
        "phase": "Running",
        "replicas": {"active": 2, "ready": 1, "total": 2},
        "energy": {"joules": 12345.0, "method": "modelled", "source": "config:modelledWattsPerDevice"},
        "conditions": [{"type": "Running", "status": "True", "reason": "PodsRunning"}],
        "kopf": {"progress": {}},
        "reconcile": {"some": "handler result"},
    }
    status = parse_job(body).status
    assert status is not None and status.phase is api.Phase.RUNNING
    assert status.nodes == "1/2"
    assert status.energy.kilojoules == pytest.approx(12.345)
    body["status"]["phase"] = "Sleeping"
    assert rejected(body).field == "status.phase"


def test_spec_to_wire_is_a_fixed_point() -> None:
    job = parse_job(manifest(training={"selection": {"batchSize": 128, "chunks": 8}}))
    again = parse_job(manifest(**job.spec.to_wire()))
    assert again.spec == job.spec


def test_parse_job_does_not_mutate_input() -> None:
    body = manifest(podTemplate={"env": [{"name": "A", "value": "1"}]})
    before = copy.deepcopy(body)
    parse_job(body)
    assert body == before


def test_reserved_env_names() -> None:
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "JEST_ANYTHING", "PET_X"):
        assert api.is_reserved_env_name(name)
    for name in ("HOME", "NCCL_DEBUG", "RANKING"):
        assert not api.is_reserved_env_name(name)


def test_operator_modules_do_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, jest_operator.api, jest_operator.builders, jest_operator.crd; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_load_manifests_reads_numbers_like_kubectl() -> None:
    text = """
apiVersion: jest.training/v1alpha1
kind: JESTTrainingJob
metadata: {name: demo}
spec:
  image: x:1
  energy: {budgetJoules: 3.6e9, modelledWattsPerDevice: 1e2}
  training: {optimizer: {lr: 2.0e-3}, selection: {filterRatio: .5}}
---
"""
    (body,) = api.load_manifests(text)
    job = parse_job(body)
    assert job.spec.energy.budget_joules == 3.6e9
    assert job.spec.energy.modelled_watts_per_device == 100.0
    assert job.spec.training.selection.filter_ratio == 0.5
    assert api.load_manifests("a: '3e9'\nb: 12\nc: v1.2\nd: 1_000\n") == [{"a": "3e9", "b": 12, "c": "v1.2", "d": 1000}]
    # PyYAML alone (YAML 1.1) reads 3.6e9 as a string, which the strict parser refuses as a wrong type
    import yaml

    assert rejected(yaml.safe_load(text.replace("---", ""))).field == "spec.energy.budgetJoules"


def test_parse_job_accepts_read_only_mapping_views() -> None:
    """Kopf hands over bodies as Mapping views, not dicts; they must parse like the dicts they wrap."""
    from types import MappingProxyType

    def frozen(value: Any) -> Any:
        if isinstance(value, dict):
            return MappingProxyType({key: frozen(item) for key, item in value.items()})
        if isinstance(value, list):
            return tuple(frozen(item) for item in value)
        return value

    body = manifest(podTemplate={"env": [{"name": "A", "value": "1"}], "labels": {"team": "a"}})
    assert parse_job(frozen(body)) == parse_job(body)


def test_energy_status_uses_the_designed_wire_name_for_co2e() -> None:
    """DESIGN §3 spells it co2eGrams; the operator writes that key, so the schema must not strip it."""
    from jest_operator.api import EnergyStatus

    assert EnergyStatus.model_validate({"co2eGrams": 1.5}).to_wire()["co2eGrams"] == 1.5
