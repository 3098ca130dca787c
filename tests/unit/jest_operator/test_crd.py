"""The generated CRD: committed bytes match the models, it is a valid structural apiextensions/v1 CRD,
its defaults agree with the models, and its CEL rules agree with parse_job."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from jest_operator import crd
from jest_operator.api import InvalidSpec, JESTTrainingJobSpec, parse_job

REPO = Path(__file__).resolve().parents[3]
COMMITTED = REPO / crd.CRD_PATH


def job(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "jest.training/v1alpha1",
        "kind": "JESTTrainingJob",
        "metadata": {"name": "demo"},
        "spec": {"image": "ghcr.io/jest-operator/jest-trainer:0.1.0", **spec},
    }


def test_committed_crd_matches_the_models() -> None:
    assert COMMITTED.read_text(encoding="utf-8") == crd.render_crd_yaml(), (
        "crds/ is stale: run `make crds` (jestctl crds) and commit the result"
    )


def test_chart_ships_the_same_bytes_exactly_once() -> None:
    chart = REPO / "charts" / "jest-operator"
    copies = [chart / folder / crd.CRD_FILE_NAME for folder in ("crd", "crds")]
    present = [path for path in copies if path.exists()]
    assert present, "the Helm chart has no copy of the CRD"
    for path in present:
        assert path.read_bytes() == COMMITTED.read_bytes(), f"{path} differs from {COMMITTED}"
    assert len(present) == 1, "a chart crds/ copy next to the templated crd/ one would install the CRD twice"


def test_crd_is_valid_apiextensions_v1_for_kubernetes_1_32() -> None:
    kubernetes_validate.validate(crd.build_crd(), "1.32.0", strict=True)
    kubernetes_validate.validate(yaml.safe_load(COMMITTED.read_text()), "1.32.0", strict=True)


def test_yaml_round_trips_to_the_built_object() -> None:
    assert yaml.safe_load(crd.render_crd_yaml()) == crd.build_crd()


def test_names_scope_subresource_and_printer_columns() -> None:
    built = crd.build_crd()
    spec = built["spec"]
    assert built["metadata"]["name"] == "jesttrainingjobs.jest.training"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["jtj", "jestjob"]
    assert spec["names"]["categories"] == ["jest"]
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = {column["name"]: column for column in version["additionalPrinterColumns"]}
    assert list(columns)[:6] == ["Phase", "Nodes", "Step", "Sel", "Energy(kJ)", "EnergyBy"]
    assert columns["Age"]["type"] == "date"
    schema = crd.openapi_schema(built)
    for column in columns.values():
        if column["jsonPath"].startswith(".metadata"):
            continue
        node = schema
        for part in column["jsonPath"].strip(".").split("."):
            node = node["properties"][part]
        assert node["type"] == column["type"] or (column["type"] == "number" and node["type"] == "number")


def test_schema_is_structural_and_described() -> None:
    assert crd.structural_errors(crd.openapi_schema()) == []


@pytest.mark.parametrize(
    ("plant", "expected"),
    [
        (lambda s: s["properties"]["spec"]["properties"]["numNodes"].pop("type"), "spec.numNodes: missing type"),
        (
            lambda s: s["properties"]["spec"]["properties"].update(x={"description": "d", "anyOf": [{}]}),
            "spec.x: forbidden keyword anyOf",
        ),
        (
            lambda s: s["properties"]["spec"]["properties"]["image"].update(title="Image"),
            "spec.image: forbidden keyword title",
        ),
        (
            lambda s: s["properties"]["spec"]["properties"]["image"].pop("description"),
            "spec.image: missing description",
        ),
        (
            lambda s: s["properties"]["spec"].update(additionalProperties=False),
            "spec: properties and additionalProperties are mutually exclusive",
        ),
        (
            lambda s: s["properties"]["spec"]["properties"]["numNodes"].update(exclusiveMinimum=0),
            "spec.numNodes: exclusiveMinimum must be a boolean (OpenAPI v3.0)",
        ),
        (
            lambda s: s["properties"]["spec"]["properties"]["image"].update({"$ref": "#/x"}),
            "spec.image: forbidden keyword $ref",
        ),
    ],
)
def test_structural_checker_catches_violations(plant, expected: str) -> None:
    schema = copy.deepcopy(crd.openapi_schema())
    plant(schema)
    assert expected in crd.structural_errors(schema)


def test_no_pydantic_leftovers_in_the_yaml() -> None:
    text = crd.render_crd_yaml()
    for leftover in ("$ref", "$defs", "anyOf", "allOf", "title:", "additionalProperties: false", "type: 'null'"):
        assert leftover not in text


def test_bounds_enums_and_patterns_come_from_the_models() -> None:
    spec = crd.openapi_schema()["properties"]["spec"]["properties"]
    selection = spec["training"]["properties"]["selection"]["properties"]
    assert selection["filterRatio"]["minimum"] == 0
    assert (selection["filterRatio"]["maximum"], selection["filterRatio"]["exclusiveMaximum"]) == (1, True)
    assert selection["method"]["enum"] == ["jest", "learnability_topk", "easy_reference", "hard_learner", "uniform"]
    assert spec["numNodes"]["minimum"] == 1
    assert spec["accelerator"]["properties"]["type"]["enum"] == ["cpu", "gpu", "tpu"]
    assert spec["runPolicy"]["properties"]["cleanPodPolicy"]["enum"] == ["None", "Running", "All"]
    assert spec["energy"]["properties"]["budgetJoules"]["exclusiveMinimum"] is True
    assert spec["training"]["properties"]["model"]["properties"]["arch"]["pattern"].startswith("^(tiny|openclip:")
    assert spec["resources"]["properties"]["requests"]["additionalProperties"] == {"x-kubernetes-int-or-string": True}
    assert spec["podTemplate"]["properties"]["affinity"]["x-kubernetes-preserve-unknown-fields"] is True
    assert spec["podTemplate"]["properties"]["env"]["x-kubernetes-list-type"] == "map"
    assert "hostPath" not in spec["podTemplate"]["properties"]["volumes"]["items"]["properties"]
    assert crd.openapi_schema()["required"] == ["spec"]
    assert spec["image"] and "image" in crd.openapi_schema()["properties"]["spec"]["required"]
    status = crd.openapi_schema()["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == ["Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed"]


def _strip_empty(value: Any) -> Any:
    if isinstance(value, dict):
        stripped = {key: _strip_empty(item) for key, item in value.items()}
        return {key: item for key, item in stripped.items() if item not in ({}, [], None)}
    return value


def test_crd_defaults_equal_the_model_defaults() -> None:
    """What the API server stores for a minimal job is what parse_job assumes for it."""
    minimal = job()
    defaulted = crd.apply_defaults(crd.openapi_schema(), minimal)["spec"]
    expected = JESTTrainingJobSpec.model_validate(minimal["spec"]).to_wire()
    # the reference model's validator fills reference.train when no checkpoint is given: a model-side
    # derivation (the trainer applies it), not a schema default
    expected["training"]["reference"].pop("train")
    assert _strip_empty(defaulted) == _strip_empty(expected)
    assert JESTTrainingJobSpec.model_validate(defaulted) == JESTTrainingJobSpec.model_validate(minimal["spec"])


def test_every_cel_rule_compiles_and_the_checker_rejects_garbage() -> None:
    rules = list(crd.iter_rules(crd.openapi_schema()))
    assert len(rules) >= 15
    for _, rule in rules:
        crd.compile_rule(rule["rule"])
        assert rule["message"]
    with pytest.raises(Exception):  # noqa: B017 - cel-python raises its own parse error type
        crd.compile_rule("self.numNodes >")


def test_every_cel_rule_is_exercised_by_a_bad_manifest() -> None:
    """Each CEL message appears for at least one fixture, so no rule is untested."""
    fixtures = sorted((REPO / "tests" / "fixtures" / "bad_manifests").glob("*.yaml"))
    seen: set[str] = set()
    for path in fixtures:
        seen |= {violation.message for violation in crd.validate_custom_resource(yaml.safe_load(path.read_text()))}
    untested = {
        rule["message"]
        for _, rule in crd.iter_rules(crd.openapi_schema())
        if not crd.is_transition_rule(rule["rule"])  # updates only: test_transition_rules covers them
        and not any(message.startswith(rule["message"]) for message in seen)
    }
    assert untested <= {
        "count is only allowed for gpu and tpu",
        "set value or valueFrom, not both",
        "this volume name is used by the operator",
        "batchSize must be divisible by chunks",
        "annotation keys of the operator are reserved",
        "tpu is only allowed when type is 'tpu'",
        "nvidia.com/gpu and google.com/tpu are set from accelerator.count",
    }


def _stored(phase: str | None, **spec: Any) -> dict[str, Any]:
    body = job(numNodes=2, training={"selection": {"batchSize": 64, "chunks": 16}}, **spec)
    if phase:
        body["status"] = {"phase": phase}
    return body


def _edited(old: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    new = copy.deepcopy(old)
    node = new["spec"]
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return new


SUSPENDED = {"runPolicy": {"suspend": True}}


@pytest.mark.parametrize(
    ("phase", "old_spec", "path", "value", "refused"),
    [
        ("Running", {}, "numNodes", 4, ".spec.numNodes"),
        ("Pending", {}, "numProcPerNode", 2, ".spec.numProcPerNode"),
        ("Running", {}, "accelerator", {"type": "gpu", "count": 2}, ".spec.accelerator"),
        ("Running", {}, "image", "jest-trainer:0.2.0", ".spec.image"),
        (None, {}, "numNodes", 4, ".spec.numNodes"),  # not yet seen by the operator
        ("Suspended", SUSPENDED, "numNodes", 4, None),  # suspended and stopped: Kueue-style edits are fine
        ("Suspended", SUSPENDED, "image", "jest-trainer:0.2.0", None),
        ("Running", SUSPENDED, "numNodes", 4, ".spec.numNodes"),  # suspend requested, pods not yet stopped
        ("Suspended", SUSPENDED, "runPolicy.suspend", False, None),  # resuming alone is fine
        ("Failed", {}, "numNodes", 4, None),  # nothing runs; fixing an InvalidSpec job
        ("Running", {}, "training.steps", 400, None),  # propagated to the ConfigMap instead
        ("Running", {}, "training.optimizer", {"lr": 0.001}, None),
        ("Running", {}, "training.model", {"arch": "tiny", "embedDim": 32}, ".spec.training.model"),
        ("Suspended", SUSPENDED, "training.model", {"embedDim": 32}, ".spec.training.model"),
        ("Running", {}, "training.seed", 7, ".spec.training.seed"),
        ("Running", {}, "training.selection", {"batchSize": 64, "chunks": 16, "method": "uniform"},
         ".spec.training.selection"),
        ("Running", {}, "training.data", {"source": "digits", "noise": {"wrong": 0.1}}, ".spec.training.data"),
        ("Failed", {}, "training.seed", 7, None),
    ],
)
def test_transition_rules(phase: str | None, old_spec: dict, path: str, value: Any, refused: str | None) -> None:
    old = _stored(phase, **old_spec)
    new = _edited(old, path, value)
    fields = {violation.field for violation in crd.validate_custom_resource(new, old=old)}
    assert fields == ({refused.lstrip(".")} if refused else set()), fields
    assert crd.validate_custom_resource(new) == [], "transition rules never run on a create"


def test_status_only_updates_pass_every_transition_rule() -> None:
    old = _stored("Running")
    new = copy.deepcopy(old)
    new["status"] = {"phase": "Restarting", "restarts": 1}
    assert crd.validate_custom_resource(new, old=old) == []


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"accelerator": {"type": "cpu", "count": 2}}, "spec.accelerator.count"),
        (
            {"accelerator": {"type": "gpu", "count": 1, "tpu": {"accelerator": "tpu-v5", "topology": "2x2"}}},
            "spec.accelerator.tpu",
        ),
        (
            {"podTemplate": {"env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {}}}]}},
            "spec.podTemplate.env[0]",
        ),
        ({"podTemplate": {"volumes": [{"name": "tmp", "emptyDir": {}}]}}, "spec.podTemplate.volumes[0].name"),
        ({"podTemplate": {"annotations": {"kueue.x-k8s.io/queue-name": "x"}}}, "spec.podTemplate.annotations"),
        ({"resources": {"requests": {"google.com/tpu": 4}}}, "spec.resources.requests"),
        ({"training": {"selection": {"batchSize": 64, "chunks": 48}}}, "spec.training.selection.batchSize"),
    ],
)
def test_remaining_cel_rules_agree_with_parse_job(spec: dict[str, Any], field: str) -> None:
    violations = crd.validate_custom_resource(job(numNodes=1, **spec))
    assert field in {violation.field for violation in violations}, violations
    with pytest.raises(InvalidSpec) as info:
        parse_job(job(numNodes=1, **spec))
    assert info.value.field.startswith(field)


@settings(max_examples=20, deadline=None)
@given(
    num_nodes=st.integers(1, 8),
    num_proc=st.integers(1, 4),
    batch_size=st.integers(2, 512),
    chunks=st.sampled_from([1, 2, 3, 4, 8, 16, 32]),
)
def test_batch_divisibility_cel_rule_mirrors_parse_job(num_nodes: int, num_proc: int, batch_size: int, chunks: int):
    body = job(
        numNodes=num_nodes, numProcPerNode=num_proc, training={"selection": {"batchSize": batch_size, "chunks": chunks}}
    )
    crd_ok = crd.validate_custom_resource(body) == []
    try:
        parse_job(body)
        parser_ok = True
    except InvalidSpec as error:
        assert error.field == "spec.training.selection.batchSize"
        parser_ok = False
    assert crd_ok == parser_ok


def test_unknown_fields_and_defaulting_helpers() -> None:
    schema = crd.openapi_schema()
    body = job(replicas=3, podTemplate={"affinity": {"anything": {"goes": 1}}, "labels": {"a": "b"}})
    assert crd.unknown_fields(schema, body) == ["spec.replicas"]
    defaulted = crd.apply_defaults(schema, job())
    assert defaulted["spec"]["training"]["selection"]["filterRatio"] == 0.8
    assert defaulted["spec"]["runPolicy"]["backoffLimit"] == 3
    assert "tpu" not in defaulted["spec"]["accelerator"]
    assert "status" not in defaulted


def test_write_crds_to_files_and_directories(tmp_path: Path) -> None:
    file_target = tmp_path / "a" / "crd.yaml"
    directory_target = tmp_path / "b"
    directory_target.mkdir()
    crd.write_crds([file_target, directory_target])
    assert file_target.read_text() == crd.render_crd_yaml()
    assert (directory_target / crd.CRD_FILE_NAME).read_text() == crd.render_crd_yaml()
    assert not list(tmp_path.rglob("*.tmp"))
