"""The Helm chart, rendered by the real Helm engine (helm-python-sdk, Helm v4 as a library).

Every configuration users are expected to run (defaults, monitoring on, namespaced RBAC, a peering
group, everything at once) is rendered and every object is validated: built-in kinds with
kubernetes-validate (strict, Kubernetes 1.32), monitoring.coreos.com kinds against our own JSON schemas
in monitoring_schemas/ (the Prometheus Operator CRDs are not installable here). On top of shape, the
tests check the promises the chart makes: least-privilege RBAC equal to what the operator calls
(jest_operator.kube.REQUIRED_PERMISSIONS), no wildcard, a hardened non-root operator pod, the CRD equal
to the generated one, the rules and dashboard files embedded verbatim, a values schema that rejects bad
input naming the field, and a values.yaml where every value is documented.
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import time
import tomllib
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import requests
import yaml
from referencing import Registry, Resource

from hack.devcluster.controlplane import ControlPlane
from tests.integration.kube.realcluster import OperatorIdentity, apply_crds, chart_identity, new_namespace

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "jest-operator"
GENERATED_CRD = REPO_ROOT / "crds" / "jesttrainingjobs.jest.training.yaml"
CHART_CRD_LINK = CHART_DIR / "crd" / "jesttrainingjobs.jest.training.yaml"
RULES_FILE = CHART_DIR / "files" / "prometheus-rules.yaml"
DASHBOARDS_DIR = CHART_DIR / "dashboards"
SCHEMA_DIR = Path(__file__).resolve().parent / "monitoring_schemas"

KUBERNETES_VERSION = "1.32.0"
RELEASE = "jest"
NAMESPACE = "jest-system"

# The install scenarios (charts/jest-operator/ci/<name>-values.yaml, also usable with chart-testing).
CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "default": {},
    **{
        path.name.removesuffix("-values.yaml"): yaml.safe_load(path.read_text())
        for path in sorted((CHART_DIR / "ci").glob("*-values.yaml"))
    },
}
MONITORING_ON = CONFIGURATIONS["monitoring"]
WATCHED: list[str] = CONFIGURATIONS["namespaced"]["watchNamespaces"]

# Cluster-scoped resources the operator touches: these can only be granted by a ClusterRole.
CLUSTER_SCOPED = {
    ("apiextensions.k8s.io", "customresourcedefinitions"),
    ("", "namespaces"),
    ("kopf.dev", "clusterkopfpeerings"),
}
# Permissions granted beyond REQUIRED_PERMISSIONS, each with its reason (also in the chart README):
# the peering init container creates the peering object Helm cannot create in the CRD's own release.
DOCUMENTED_EXTRAS = {
    ("kopf.dev", "kopfpeerings", "create"),
    ("kopf.dev", "clusterkopfpeerings", "create"),
}


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    """The chart loaded once per module (loading resolves the CRD link; rendering takes ~1 ms)."""
    with helm_python.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="module", autouse=True)
def _cached_kubernetes_schemas() -> Iterator[None]:
    """kubernetes-validate re-reads its multi-megabyte definitions file on every call; read each file once."""
    with pytest.MonkeyPatch.context() as patch:
        cached = functools.cache(kubernetes_validate.utils.schema_contents)
        patch.setattr(kubernetes_validate.utils, "schema_contents", cached)
        yield


def render_manifests(chart: helm_python.Chart, values: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` would produce it (NOTES.txt included)."""
    return chart.render(dict(values or {}), name=RELEASE, namespace=NAMESPACE)


def render(chart: helm_python.Chart, values: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders for `values` (NOTES.txt and empty documents dropped)."""
    objects: list[dict[str, Any]] = []
    for path, text in render_manifests(chart, values).items():
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.load_all(text, Loader=yaml.CSafeLoader) if doc)
    return objects


def only(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The single object of `kind` (and `name`), failing clearly when there is none or several."""
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in matches]}"
    return matches[0]


def operator_deployment(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return only(objects, "Deployment")


def operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = operator_deployment(objects)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "operator")


def monitoring_validator(kind: str) -> jsonschema.protocols.Validator:
    """A validator for one monitoring.coreos.com kind from monitoring_schemas/ (shared defs resolved)."""
    resources = [
        (f"https://jest.training/schemas/monitoring/{path.name}", Resource.from_contents(json.loads(path.read_text())))
        for path in SCHEMA_DIR.glob("*.json")
    ]
    registry = Registry().with_resources(resources)
    schema = json.loads((SCHEMA_DIR / f"{kind.lower()}.json").read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema, registry=registry)


def validate_object(obj: dict[str, Any]) -> None:
    """Built-in kinds (CRDs included) via kubernetes-validate; Prometheus Operator kinds via our schemas."""
    if obj["apiVersion"].startswith("monitoring.coreos.com/"):
        monitoring_validator(obj["kind"]).validate(obj)
    else:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def effective_grants(objects: list[dict[str, Any]], service_account: tuple[str, str]) -> dict[str | None, set]:
    """What the service account may do: namespace (None = cluster-wide) -> {(apiGroup, resource, verb)}.

    Follows RoleBindings/ClusterRoleBindings to the rules they grant, as the API server's authoriser does.
    """
    roles = {("Role", o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objects if o["kind"] == "Role"}
    cluster_roles = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ClusterRole"}
    grants: dict[str | None, set] = {}
    for binding in objects:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        subjects = {(s["kind"], s.get("namespace"), s["name"]) for s in binding["subjects"]}
        if ("ServiceAccount", service_account[0], service_account[1]) not in subjects:
            continue
        ref = binding["roleRef"]
        scope = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
        role = cluster_roles[ref["name"]] if ref["kind"] == "ClusterRole" else roles[("Role", scope, ref["name"])]
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        grants.setdefault(scope, set()).add((group, resource, verb))
    return grants


def required_permissions() -> list[tuple[str, str, tuple[str, ...]]]:
    """The operator's own statement of what it calls (owned by the controller code, not by the chart)."""
    from jest_operator import kube

    return [(group, resource, tuple(verbs)) for group, resource, verbs in kube.REQUIRED_PERMISSIONS]


def needed_in_configuration(group: str, resource: str, values: Mapping[str, Any]) -> bool:
    """Whether a required permission applies to this configuration (documented in the chart README).

    Peering objects are used only by a peering group (replicas > 1): the namespaced kind when the operator
    watches listed namespaces, the cluster kind otherwise. Kopf lists/watches namespaces only when it
    serves a list of namespaces (with -A it needs no namespace observation).
    """
    peering = int(values.get("replicas", 1)) > 1
    namespaced = bool(values.get("watchNamespaces"))
    if (group, resource) == ("kopf.dev", "kopfpeerings"):
        return peering and namespaced
    if (group, resource) == ("kopf.dev", "clusterkopfpeerings"):
        return peering and not namespaced
    if (group, resource) == ("", "namespaces"):
        return namespaced
    return True


# ----------------------------------------------------------------------------------------- chart basics


def test_chart_metadata_matches_the_package() -> None:
    metadata = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    package_version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert metadata["apiVersion"] == "v2"
    assert metadata["name"] == "jest-operator"
    assert metadata["appVersion"] == package_version
    assert re.fullmatch(r"\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?", metadata["version"])


def test_install_scenarios_are_all_there() -> None:
    """Removing a ci/ scenario would silently drop its coverage from every parametrised test below."""
    assert set(CONFIGURATIONS) == {
        "default", "monitoring", "namespaced", "peering", "peering-namespaced", "all-on"
    }


@pytest.mark.parametrize("configuration", ["default", "all-on"])
def test_lint_is_clean(configuration: str) -> None:
    report = helm_python.lint(
        CHART_DIR, CONFIGURATIONS[configuration], strict=True, namespace=NAMESPACE, kube_version="v1.32.0"
    )
    assert report["errors"] == []
    # Severity 1 is "info" (only the missing-icon hint); warnings (2) and errors (3) must not occur.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("configuration", sorted(CONFIGURATIONS))
def test_every_rendered_object_is_valid(chart: helm_python.Chart, configuration: str) -> None:
    objects = render(chart, CONFIGURATIONS[configuration])
    assert objects
    for obj in objects:
        try:
            validate_object(obj)
        except Exception as error:  # re-raised with the object named, the validators' messages are terse
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {error}")


@pytest.mark.parametrize("configuration", sorted(CONFIGURATIONS))
def test_objects_are_labelled_and_namespaced(chart: helm_python.Chart, configuration: str) -> None:
    cluster_kinds = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "ValidatingAdmissionPolicy",
                     "ValidatingAdmissionPolicyBinding"}
    for obj in render(chart, CONFIGURATIONS[configuration]):
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/instance") == RELEASE, obj["metadata"]["name"]
        assert labels.get("app.kubernetes.io/managed-by") == "Helm", obj["metadata"]["name"]
        if obj["kind"] in cluster_kinds:
            assert "namespace" not in obj["metadata"]
        else:
            assert obj["metadata"]["namespace"], f"{obj['kind']} {obj['metadata']['name']} has no namespace"


def test_monitoring_is_off_by_default(chart: helm_python.Chart) -> None:
    kinds = {obj["kind"] for obj in render(chart)}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert kinds >= {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service"}
    assert "ConfigMap" not in kinds


def test_monitoring_schemas_catch_mistakes() -> None:
    """Our monitoring schemas are strict enough to matter (a typo is an error, not a silent no-op)."""
    good = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": "x", "namespace": "y"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "podMetricsEndpoints": [{"port": "metrics"}]},
    }
    monitoring_validator("PodMonitor").validate(good)
    typo = json.loads(json.dumps(good))
    typo["spec"]["podMetricEndpoints"] = typo["spec"].pop("podMetricsEndpoints")
    with pytest.raises(jsonschema.ValidationError):
        monitoring_validator("PodMonitor").validate(typo)
    bad_interval = json.loads(json.dumps(good))
    bad_interval["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        monitoring_validator("PodMonitor").validate(bad_interval)


# ------------------------------------------------------------------------------------------ values + schema


BAD_VALUES = [
    ({"replicas": 0}, "/replicas"),
    ({"replica": 2}, "replica"),
    ({"image": {"repository": "r", "tag": "t", "pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"image": {"repository": "r", "pullPolicy": "Always", "digest": "x"}}, "digest"),
    ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
    ({"watchNamespaces": "team-a"}, "/watchNamespaces"),
    ({"crds": {"install": "yes"}}, "/crds/install"),
    ({"metrics": {"port": 70000}}, "/metrics/port"),
    (
        {"metrics": {"port": 9100, "podMonitor": {"enabled": True, "interval": "15 seconds"}}},
        "/metrics/podMonitor/interval",
    ),
    ({"grafana": {"dashboards": {"enabled": True, "labelValue": 1}}}, "/grafana/dashboards/labelValue"),
    ({"resources": {"limit": {"cpu": 1}}}, "limit"),
    ({"nodeSelector": {"disk": 1}}, "/nodeSelector/disk"),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
    ({"podSecurityContext": {"runAsUser": 0}}, "/podSecurityContext/runAsUser"),
    ({"securityContext": {"privileged": True}}, "/securityContext/privileged"),
]


@pytest.mark.parametrize(("values", "field"), BAD_VALUES, ids=[field for _, field in BAD_VALUES])
def test_values_schema_rejects_bad_values_naming_the_field(
    chart: helm_python.Chart, values: dict[str, Any], field: str
) -> None:
    with pytest.raises(helm_python.HelmValuesError) as rendered:
        render(chart, values)
    assert field in str(rendered.value)
    with pytest.raises(helm_python.HelmValuesError) as validated:
        chart.validate_schema(chart.merge_values(values))
    assert field in str(validated.value)


def test_hardening_cannot_be_unset(chart: helm_python.Chart) -> None:
    """`--set securityContext.allowPrivilegeEscalation=null` deletes a default; the schema requires it back."""
    with pytest.raises(helm_python.HelmValuesError, match="allowPrivilegeEscalation"):
        render(chart, {"securityContext": {"allowPrivilegeEscalation": None}})
    with pytest.raises(helm_python.HelmValuesError, match="runAsNonRoot"):
        render(chart, {"podSecurityContext": {"runAsNonRoot": None}})


def test_template_checks_reject_port_clash(chart: helm_python.Chart) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=r"metrics\.port and livenessProbe\.port must differ"):
        render(chart, {"metrics": {"port": 8080}})


def test_default_values_pass_the_schema(chart: helm_python.Chart) -> None:
    chart.validate_schema(chart.merge_values({}))


def _schema_node(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = root["definitions"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _comment_above(lines: list[str], number: int) -> list[str]:
    comment = []
    previous = number - 1
    while previous >= 0 and lines[previous].strip().startswith("#"):
        comment.append(lines[previous].strip())
        previous -= 1
    return comment


def test_values_yaml_documents_every_value_and_matches_the_schema() -> None:
    """Each value has a `# --` comment and a schema entry, and each schema entry a default in values.yaml.

    A `# --` comment documents the key's whole subtree (e.g. `resources`, whose inner keys are Kubernetes
    API fields); a key without one must be a section whose own keys are documented.
    """
    root = json.loads((CHART_DIR / "values.schema.json").read_text())
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str, bool]] = []  # (indent, key, documented as a whole)
    undocumented, unknown = [], []
    seen: set[tuple[str, ...]] = set()
    whole: set[tuple[str, ...]] = set()
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z_][\w.-]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if stack and stack[-1][2]:
            continue  # inside a value documented as a whole
        path = (*[k for _, k, _ in stack], key)
        documented = any(c.startswith("# --") for c in _comment_above(lines, number))
        stack.append((indent, key, documented))
        node: dict[str, Any] | None = root
        for part in path:
            node = _schema_node(node, root).get("properties", {}).get(part) if node is not None else None
        if node is None:
            unknown.append(".".join(path))
            continue
        seen.add(path)
        if documented:
            whole.add(path)
        elif "properties" not in _schema_node(node, root):
            undocumented.append(".".join(path))
    assert unknown == [], f"values.yaml keys missing from values.schema.json: {unknown}"
    assert undocumented == [], f"values without a '# --' comment: {undocumented}"

    def schema_paths(node: dict[str, Any], prefix: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        for key, child in _schema_node(node, root).get("properties", {}).items():
            path = (*prefix, key)
            if key == "global" or prefix in whole:
                continue
            yield path
            yield from schema_paths(child, path)

    missing_defaults = sorted(".".join(p) for p in schema_paths(root, ()) if p not in seen)
    assert missing_defaults == [], f"schema properties without a default in values.yaml: {missing_defaults}"


def test_values_yaml_has_the_documented_keys(chart: helm_python.Chart) -> None:
    """Keys that users and the docs rely on (the issue names them)."""
    values = chart.values
    for dotted in [
        "image.repository", "image.tag", "image.pullPolicy", "replicas", "watchNamespaces", "crds.install",
        "metrics.serviceMonitor.enabled", "metrics.podMonitor.enabled", "prometheusRule.enabled",
        "grafana.dashboards.enabled", "resources", "nodeSelector", "tolerations", "affinity",
        "podSecurityContext", "securityContext",
    ]:
        node: Any = values
        for part in dotted.split("."):
            assert isinstance(node, dict) and part in node, f"values.yaml lacks {dotted}"
            node = node[part]


# ------------------------------------------------------------------------------------------------- CRDs


def _without_chart_additions(crd: dict[str, Any]) -> dict[str, Any]:
    """The rendered CRD minus the labels/annotation the chart adds to the generated one."""
    crd = json.loads(json.dumps(crd))
    metadata = crd["metadata"]
    generated = yaml.safe_load(GENERATED_CRD.read_text())["metadata"]
    for key in ("labels", "annotations"):
        added = {k: v for k, v in metadata.get(key, {}).items() if k not in generated.get(key, {})}
        for k in added:
            del metadata[key][k]
        if key in metadata and not metadata[key] and key not in generated:
            del metadata[key]
    return crd


def test_chart_crd_is_the_generated_crd(chart: helm_python.Chart) -> None:
    assert GENERATED_CRD.is_file(), "crds/jesttrainingjobs.jest.training.yaml is missing (make crds)"
    assert CHART_CRD_LINK.resolve() == GENERATED_CRD.resolve(), "the chart must link to the generated CRD"
    crd = only(render(chart), "CustomResourceDefinition", "jesttrainingjobs.jest.training")
    assert _without_chart_additions(crd) == yaml.safe_load(GENERATED_CRD.read_text())
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    kubernetes_validate.validate(crd, KUBERNETES_VERSION, strict=True)


def test_crd_text_is_emitted_verbatim(chart: helm_python.Chart) -> None:
    """Byte-level: apart from the spliced metadata lines the chart emits the generated file unchanged."""
    text = render_manifests(chart)[f"{CHART_DIR.name}/templates/crd-jesttrainingjobs.yaml"]
    generated_lines = GENERATED_CRD.read_text().splitlines()
    rendered_lines = text.splitlines()
    position = 0
    for line in generated_lines:  # the generated lines appear in order, each exactly once
        position = rendered_lines.index(line, position) + 1


def test_packaged_chart_carries_the_crd_content(tmp_path: Path) -> None:
    """`helm package` stores the linked CRD as a regular file, so a published chart needs no repository."""
    archive = helm_python.package(CHART_DIR, destination=tmp_path)
    with tarfile.open(archive) as tar:
        member = tar.getmember("jest-operator/crd/jesttrainingjobs.jest.training.yaml")
        assert member.isfile()
        assert tar.extractfile(member).read() == GENERATED_CRD.read_bytes()
        assert not [m.name for m in tar.getmembers() if m.name.startswith("jest-operator/ci/")]
    with helm_python.Chart.load(archive) as packaged:
        crd = only(render(packaged), "CustomResourceDefinition", "jesttrainingjobs.jest.training")
    assert _without_chart_additions(crd) == yaml.safe_load(GENERATED_CRD.read_text())


def test_crd_install_switch(chart: helm_python.Chart) -> None:
    off = render(chart, {"crds": {"install": False}})
    assert not [o for o in off if o["kind"] == "CustomResourceDefinition"]
    not_kept = only(render(chart, {"crds": {"install": True, "keep": False}}), "CustomResourceDefinition")
    assert "helm.sh/resource-policy" not in not_kept["metadata"].get("annotations", {})


def test_crd_is_shipped_exactly_once(chart: helm_python.Chart) -> None:
    """The CRD is a template; a copy in the chart's crds/ folder as well would make `helm install` fail
    (Helm creates crds/ first, then refuses to adopt the same object for the template)."""
    shipped_in_crds_folder = [c["name"] for c in chart.crds]
    assert shipped_in_crds_folder == [], (
        f"remove {shipped_in_crds_folder} from charts/jest-operator/crds/: the chart ships the CRD from "
        "templates/crd-jesttrainingjobs.yaml (see the chart README, 'CRD lifecycle')"
    )


# ------------------------------------------------------------------------------------- operator workload


@pytest.mark.parametrize("configuration", sorted(CONFIGURATIONS))
def test_operator_pod_is_hardened(chart: helm_python.Chart, configuration: str) -> None:
    objects = render(chart, CONFIGURATIONS[configuration])
    deployment = operator_deployment(objects)
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is True
    assert only(objects, "ServiceAccount")["automountServiceAccountToken"] is False
    for container in pod["containers"] + pod.get("initContainers", []):
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context.get("privileged") is not True
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
        assert container["image"] == "ghcr.io/jest-operator/jest-operator:0.1.0"


def parse_operator_arguments(container: dict[str, Any]) -> Any:
    """The operator container's command line, parsed by the operator's own argument parser.

    With a peering group the command is a shell wrapper that appends a random ``--priority``; a fixed
    priority stands in for it here.
    """
    from jest_operator.main import build_parser

    if container["command"] == ["jest-operator"]:
        return build_parser().parse_args(container["args"])
    assert container["command"][:2] == ["/bin/sh", "-c"], container["command"]
    assert container["command"][2].startswith('exec jest-operator "$@" --priority=')
    return build_parser().parse_args([*container["args"], "--priority=7"])


def test_liveness_probe_targets_kopf_health_endpoint(chart: helm_python.Chart) -> None:
    container = operator_container(render(chart))
    probe = container["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    arguments = parse_operator_arguments(container)
    assert arguments.liveness_port == ports[probe["port"]]
    assert arguments.liveness_host == "0.0.0.0"
    assert probe["path"] == "/healthz"  # where Kopf serves it (jest_operator.main builds the same URL)


@pytest.mark.parametrize("configuration", sorted(CONFIGURATIONS))
def test_operator_accepts_the_rendered_command_line(chart: helm_python.Chart, configuration: str) -> None:
    values = CONFIGURATIONS[configuration]
    container = operator_container(render(chart, values))
    arguments = parse_operator_arguments(container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert arguments.metrics_port == ports["metrics"]
    if values.get("watchNamespaces"):
        assert arguments.namespace == values["watchNamespaces"] and not arguments.all_namespaces
    else:
        assert arguments.all_namespaces and arguments.namespace is None
    if int(values.get("replicas", 1)) > 1:
        assert arguments.peering == f"{RELEASE}-jest-operator"
    else:
        assert arguments.peering is None  # standalone: no peering objects needed


def test_image_values(chart: helm_python.Chart) -> None:
    values = {"image": {"repository": "registry.example/jest-operator", "tag": "1.2.3", "pullPolicy": "Always"}}
    container = operator_container(render(chart, values))
    assert container["image"] == "registry.example/jest-operator:1.2.3"
    assert container["imagePullPolicy"] == "Always"


def test_scheduling_values_reach_the_pod(chart: helm_python.Chart) -> None:
    values = {
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ops"]}]}]}}},
        "resources": {"requests": {"cpu": "200m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "podSecurityContext": {"runAsNonRoot": True, "runAsUser": 2000, "seccompProfile": {"type": "RuntimeDefault"}},
    }
    objects = render(chart, values)
    pod = operator_deployment(objects)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == values["nodeSelector"]
    assert pod["tolerations"] == values["tolerations"]
    assert pod["affinity"] == values["affinity"]
    assert values["podSecurityContext"].items() <= pod["securityContext"].items()  # merged with the defaults
    assert operator_container(objects)["resources"] == values["resources"]
    kubernetes_validate.validate(operator_deployment(objects), KUBERNETES_VERSION, strict=True)


# ------------------------------------------------------------------------------------------------- RBAC


@pytest.mark.parametrize("configuration", sorted(CONFIGURATIONS))
def test_rbac_has_no_wildcards(chart: helm_python.Chart, configuration: str) -> None:
    for obj in render(chart, CONFIGURATIONS[configuration]):
        if obj["kind"] in ("Role", "ClusterRole"):
            for rule in obj["rules"]:
                assert "nonResourceURLs" not in rule
                for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                    assert not [v for v in rule.get(field, []) if "*" in v], f"{obj['metadata']['name']}: {rule}"
                assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])


@pytest.mark.parametrize("configuration", sorted(CONFIGURATIONS))
def test_rbac_is_exactly_what_the_operator_uses(chart: helm_python.Chart, configuration: str) -> None:
    values = CONFIGURATIONS[configuration]
    objects = render(chart, values)
    service_account = (NAMESPACE, only(objects, "ServiceAccount")["metadata"]["name"])
    grants = effective_grants(objects, service_account)
    watched = values.get("watchNamespaces") or []
    namespaced_scopes: list[str | None] = list(watched) if watched else [None]

    required: set[tuple[str, str, str]] = set()
    for group, resource, verbs in required_permissions():
        if not needed_in_configuration(group, resource.split("/")[0], values):
            continue
        for verb in verbs:
            required.add((group, resource, verb))
            scopes = [None] if (group, resource.split("/")[0]) in CLUSTER_SCOPED else namespaced_scopes
            for scope in scopes:
                assert (group, resource, verb) in grants.get(scope, set()), (
                    f"{configuration}: operator needs {verb} {group or 'core'}/{resource} "
                    f"in {scope or 'all namespaces'}, the chart does not grant it"
                )

    granted = set().union(*grants.values())
    beyond = granted - required - DOCUMENTED_EXTRAS
    assert beyond == set(), f"{configuration}: granted beyond REQUIRED_PERMISSIONS: {sorted(beyond)}"

    if watched:
        assert set(grants) == {None, *watched}, "namespaced install must not bind namespaced rules cluster-wide"
        cluster_wide = grants[None]
        assert {(g, r) for g, r, _ in cluster_wide} <= CLUSTER_SCOPED


def test_namespaced_install_has_a_role_per_namespace(chart: helm_python.Chart) -> None:
    objects = render(chart, {"watchNamespaces": WATCHED})
    assert sorted(o["metadata"]["namespace"] for o in objects if o["kind"] == "Role") == sorted(WATCHED)
    assert sorted(o["metadata"]["namespace"] for o in objects if o["kind"] == "RoleBinding") == sorted(WATCHED)
    for binding in (o for o in objects if o["kind"] == "RoleBinding"):
        assert binding["subjects"][0]["namespace"] == NAMESPACE


def test_rbac_create_false_renders_no_rbac(chart: helm_python.Chart) -> None:
    kinds = {o["kind"] for o in render(chart, {"rbac": {"create": False}})}
    assert not kinds & {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}


# ------------------------------------------------------------------------------------------ monitoring


def test_service_monitor_selects_the_operator_metrics_service(chart: helm_python.Chart) -> None:
    objects = render(chart, MONITORING_ON)
    monitor = only(objects, "ServiceMonitor")
    service = only(objects, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    pod_labels = operator_deployment(objects)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"] for p in operator_container(objects)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports


def test_service_monitor_forces_the_service(chart: helm_python.Chart) -> None:
    values = {"metrics": {"port": 9100, "service": {"enabled": False}, "serviceMonitor": {"enabled": True}}}
    assert only(render(chart, values), "Service")
    values["metrics"]["serviceMonitor"]["enabled"] = False
    assert not [o for o in render(chart, values) if o["kind"] == "Service"]


def test_pod_monitor_selects_trainer_pods(chart: helm_python.Chart) -> None:
    monitor = only(render(chart, MONITORING_ON), "PodMonitor")
    assert monitor["spec"]["selector"] == {"matchLabels": {"app.kubernetes.io/managed-by": "jest-operator"}}
    ports = [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]]
    assert ports == ["metrics"] + [f"metrics-{rank}" for rank in range(1, 8)]
    single = only(render(chart, {**MONITORING_ON, "metrics": {"podMonitor": {"enabled": True, "procsPerNode": 1}}}),
                  "PodMonitor")
    assert [e["port"] for e in single["spec"]["podMetricsEndpoints"]] == ["metrics"]
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    namespaced = only(render(chart, {**MONITORING_ON, "watchNamespaces": WATCHED}), "PodMonitor")
    assert namespaced["spec"]["namespaceSelector"] == {"matchNames": WATCHED}


def test_pod_monitor_matches_the_pods_the_operator_builds(chart: helm_python.Chart) -> None:
    """Cross-check with the real pod builder: labels selected and the port name exist on trainer pods."""
    from jest_operator import api, builders

    manifest = yaml.safe_load((REPO_ROOT / "examples" / "quickstart.yaml").read_text())
    job = api.parse_job({**manifest, "metadata": {**manifest["metadata"], "namespace": "team-a", "uid": "u-1"}})
    pod = builders.build_pod(job, 0, attempt=0)
    monitor = only(render(chart, MONITORING_ON), "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    pod_ports = {p.get("name") for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    assert "metrics" in pod_ports
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} & pod_ports == {"metrics"}
    torchrun_job = api.parse_job({**manifest, "metadata": {**manifest["metadata"], "uid": "u-2"},
                                  "spec": {**manifest["spec"], "numNodes": 1, "numProcPerNode": 4}})
    torchrun_pod = builders.build_pod(torchrun_job, 0, attempt=0)
    torchrun_ports = {p["name"]: p["containerPort"] for p in torchrun_pod["spec"]["containers"][0]["ports"]}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} & set(torchrun_ports) == {
        "metrics", "metrics-1", "metrics-2", "metrics-3"}
    assert [torchrun_ports[f"metrics-{rank}"] for rank in range(1, 4)] == [9091, 9092, 9093]


def test_monitor_labels_and_intervals(chart: helm_python.Chart) -> None:
    values = json.loads(json.dumps(MONITORING_ON))
    values["metrics"]["podMonitor"].update({"interval": "30s", "scrapeTimeout": "20s", "labels": {"release": "kps"}})
    values["metrics"]["serviceMonitor"]["labels"] = {"release": "kps"}
    values["prometheusRule"]["labels"] = {"release": "kps"}
    objects = render(chart, values)
    for kind in ("PodMonitor", "ServiceMonitor", "PrometheusRule"):
        assert only(objects, kind)["metadata"]["labels"]["release"] == "kps"
    endpoint = only(objects, "PodMonitor")["spec"]["podMetricsEndpoints"][0]
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("30s", "20s")


def test_prometheus_rule_embeds_exactly_the_rules_file(chart: helm_python.Chart) -> None:
    rule = only(render(chart, MONITORING_ON), "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES_FILE.read_text())
    assert rule["spec"]["groups"]


def test_dashboard_config_map_embeds_the_dashboards(chart: helm_python.Chart) -> None:
    dashboards = sorted(DASHBOARDS_DIR.glob("*.json"))
    assert dashboards, "charts/jest-operator/dashboards/*.json is missing"
    config_map = only(render(chart, MONITORING_ON), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert sorted(config_map["data"]) == [p.name for p in dashboards]
    for path in dashboards:
        assert json.loads(config_map["data"][path.name]) == json.loads(path.read_text())


def test_dashboard_label_and_namespace_are_configurable(chart: helm_python.Chart) -> None:
    values = {"grafana": {"dashboards": {
        "enabled": True, "label": "grafana.com/dashboard", "labelValue": "jest", "namespace": "monitoring",
        "annotations": {"grafana_folder": "JEST"},
    }}}
    config_map = only(render(chart, values), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana.com/dashboard"] == "jest"
    assert "grafana_dashboard" not in config_map["metadata"]["labels"]
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "JEST"}


# --------------------------------------------------------------------------------------------- peering


def test_single_replica_runs_standalone_without_peering(chart: helm_python.Chart) -> None:
    objects = render(chart)
    assert not [o for o in objects if o["metadata"]["name"].endswith("kopfpeerings.kopf.dev")]
    assert "initContainers" not in operator_deployment(objects)["spec"]["template"]["spec"]


@pytest.mark.parametrize("watch", [[], WATCHED], ids=["cluster-wide", "namespaced"])
def test_peering_group_for_several_replicas(chart: helm_python.Chart, watch: list[str]) -> None:
    objects = render(chart, {"replicas": 3, "watchNamespaces": watch, "peering": {"name": "jest-peers"}})
    crds = {o["metadata"]["name"]: o for o in objects if o["kind"] == "CustomResourceDefinition"}
    assert {"kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"} <= set(crds)
    assert crds["kopfpeerings.kopf.dev"]["spec"]["scope"] == "Namespaced"
    assert crds["clusterkopfpeerings.kopf.dev"]["spec"]["scope"] == "Cluster"
    deployment = operator_deployment(objects)
    assert deployment["spec"]["replicas"] == 3
    arguments = parse_operator_arguments(operator_container(objects))
    assert arguments.peering == "jest-peers"
    (init,) = deployment["spec"]["template"]["spec"]["initContainers"]
    env = {e["name"]: e.get("value") for e in init["env"]}
    assert env["KOPF_RUN_PEERING"] == "jest-peers"
    assert env["JEST_PEERING_NAMESPACES"].split() == watch
    assert init["command"][:2] == ["python3", "-c"]
    compile(init["command"][2], "peering-init", "exec")  # the embedded script is valid Python


def test_peering_crds_can_be_left_out(chart: helm_python.Chart) -> None:
    objects = render(chart, {"replicas": 2, "peering": {"installCRDs": False}})
    assert not [o for o in objects if o["metadata"]["name"].endswith("kopf.dev")]


# ------------------------------------------------------------------------------------------------ NOTES


@pytest.mark.parametrize("configuration", sorted(CONFIGURATIONS))
def test_notes_explain_the_next_steps(chart: helm_python.Chart, configuration: str) -> None:
    values = CONFIGURATIONS[configuration]
    notes = render_manifests(chart, values)[f"{CHART_DIR.name}/templates/NOTES.txt"]
    assert "examples/quickstart.yaml" in notes
    assert "kubectl get jtj" in notes
    if values.get("grafana", {}).get("dashboards", {}).get("enabled"):
        assert "grafana_dashboard" in notes and "-dashboards" in notes
    else:
        assert "grafana.dashboards.enabled=true" in notes


# ------------------------------------------- the rendered operator pod, run against the real API server
#
# The session's real control plane (tests/kube_cluster.py: kube-apiserver + etcd + kube-controller-manager).
# Each test installs a release of its own (unique name and namespace: the cluster is shared): the rendered
# CRDs through plain `kubectl apply`, the rendered ServiceAccount and RBAC, and a token for that
# ServiceAccount from the TokenRequest API. The rendered containers' commands then run as local processes
# (what a kubelet would start) with that token, so RBAC checks every call they make.

VENV_BIN = Path(sys.executable).parent


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _wait_for(predicate: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _peering_state(log: Path) -> str | None:
    """The replica's peering state from its Kopf log: "active", "paused", or None (never switched)."""
    switches = re.findall(r"(Resuming operations|Pausing operations)", log.read_text(errors="replace"))
    return None if not switches else ("active" if switches[-1].startswith("Resuming") else "paused")


@dataclass
class Release:
    """One release of the chart on the real control plane, under its own name and namespace."""

    cp: ControlPlane
    name: str
    namespace: str
    workdir: Path
    identity: OperatorIdentity | None = None

    @property
    def fullname(self) -> str:
        return f"{self.name}-{CHART_DIR.name}"

    def render(self, chart: helm_python.Chart, values: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Every object the chart renders for this release (NOTES.txt left out)."""
        objects: list[dict[str, Any]] = []
        for path, text in chart.render(dict(values), name=self.name, namespace=self.namespace).items():
            if not path.endswith("NOTES.txt"):
                objects.extend(doc for doc in yaml.load_all(text, Loader=yaml.CSafeLoader) if doc)
        return objects

    def install(self, objects: list[dict[str, Any]], *, can_i: tuple[tuple[str, ...], ...]) -> None:
        """Apply the rendered CRDs (kubectl apply, validated by the server) and the rendered RBAC; mint the
        ServiceAccount's token (TokenRequest) once ``can_i`` holds for it."""
        apply_crds(self.cp, [o for o in objects if o["kind"] == "CustomResourceDefinition"])
        self.identity = chart_identity(self.cp, self.workdir, objects, can_i=can_i)

    def get(self, path: str) -> dict[str, Any] | None:
        """GET as admin (the test's own look at the server); None on 404."""
        status, payload = self.cp.api("GET", path)
        if status == 404:
            return None
        assert status == 200, f"GET {path} -> {status}: {payload}"
        return payload

    def environment(self) -> dict[str, str]:
        """A container environment that reaches the API server as the chart's ServiceAccount, with this
        venv's console scripts on PATH (the image's entry points)."""
        assert self.identity is not None, "install() first"
        return {
            **os.environ,
            "KUBECONFIG": str(self.identity.kubeconfig),
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }

    def container_env(self, container: dict[str, Any], pod_name: str) -> dict[str, str]:
        """The container's env as the kubelet would set it (downward API: pod name and namespace)."""
        env = self.environment()
        for variable in container.get("env", []):
            if "value" in variable:
                env[variable["name"]] = variable["value"]
            else:
                field = variable["valueFrom"]["fieldRef"]["fieldPath"]
                env[variable["name"]] = {"metadata.name": pod_name, "metadata.namespace": self.namespace}[field]
        return env


@pytest.fixture
def release(control_plane: ControlPlane, tmp_path: Path) -> Iterator[Release]:
    """A fresh release name and namespace; its cluster-scoped objects and namespaces are deleted afterwards."""
    name = f"peer{uuid.uuid4().hex[:6]}"
    installed = Release(control_plane, name, f"{name}-system", tmp_path)
    yield installed
    selector = f"app.kubernetes.io/instance={name}"
    control_plane.kubectl("delete", "clusterrolebinding,clusterrole", "-l", selector, "--wait=false", check=False)
    control_plane.kubectl("delete", "clusterkopfpeering", installed.fullname, "--ignore-not-found", "--wait=false",
                          check=False)
    control_plane.kubectl("delete", "namespace", "-l", f"jest.training/test-release={name}", "--wait=false",
                          check=False)


def _label_namespaces(release: Release, namespaces: list[str]) -> None:
    """Create (if needed) and label the namespaces of a release so the fixture removes them afterwards."""
    for namespace in namespaces:
        if release.cp.api("GET", f"/api/v1/namespaces/{namespace}")[0] == 404:
            release.cp.kubectl("create", "namespace", namespace)
        release.cp.kubectl("label", "--overwrite", "namespace", namespace, f"jest.training/test-release={release.name}")


@pytest.mark.slow
def test_peering_init_container_creates_the_peering_objects(chart: helm_python.Chart, release: Release) -> None:
    """The rendered init container, run as is with the chart's ServiceAccount, creates each watched namespace's
    KopfPeering once (the namespaced install: its RBAC is a Role in each watched namespace)."""
    watched = [f"{namespace}-{release.name}" for namespace in WATCHED]  # as many as the CI scenario, unique
    objects = release.render(chart, {"replicas": 2, "watchNamespaces": watched})
    _label_namespaces(release, [release.namespace, *watched])
    release.install(objects, can_i=tuple(("create", "kopfpeerings.kopf.dev", "-n", ns) for ns in watched))
    (init,) = operator_deployment(objects)["spec"]["template"]["spec"]["initContainers"]
    env = release.container_env(init, "operator-0")
    outputs = []
    for _ in range(2):  # a second replica's init container finds the objects (409 is success)
        result = subprocess.run(init["command"], env=env, capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout.split())
    assert outputs[0].count("created") == len(WATCHED)
    assert outputs[1].count("found") == len(WATCHED)
    for namespace in watched:
        peering = release.get(f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings/{release.fullname}")
        assert peering is not None and peering["kind"] == "KopfPeering"
    # The namespaced install grants nothing cluster-wide: the same script cannot create a ClusterKopfPeering.
    cluster_wide = {key: value for key, value in env.items() if key != "JEST_PEERING_NAMESPACES"}
    refused = subprocess.run(init["command"], env=cluster_wide, capture_output=True, text=True, timeout=120,
                             check=False)
    assert refused.returncode != 0 and "403" in refused.stderr, refused.stderr


@pytest.mark.slow
def test_rendered_operator_pods_form_a_working_peering_group(
    chart: helm_python.Chart, release: Release, process_reaper: list[subprocess.Popen]
) -> None:
    """Two replicas of the rendered operator pod on the real API server, as the chart's ServiceAccount: both
    live and serve metrics, exactly one works (the higher random priority), and that one reconciles a job
    into its pods."""
    host_ports = _free_ports(4)
    _label_namespaces(release, [release.namespace])
    replicas = []
    for index in range(2):
        # Each replica is its own "pod"; locally they share a host, so each gets its own ports via values.
        liveness_port, metrics_port = host_ports[index], host_ports[2 + index]
        values = {"replicas": 2, "livenessProbe": {"port": liveness_port}, "metrics": {"port": metrics_port}}
        objects = release.render(chart, values)
        if index == 0:
            release.install(objects, can_i=(("list", "jesttrainingjobs.jest.training", "-A"),
                                            ("create", "clusterkopfpeerings.kopf.dev"),
                                            ("patch", "clusterkopfpeerings.kopf.dev")))
        pod = operator_deployment(objects)["spec"]["template"]["spec"]
        name = f"operator-{index}"
        (init,) = pod["initContainers"]
        subprocess.run(init["command"], env=release.container_env(init, name),
                       check=True, capture_output=True, timeout=120)
        container = operator_container(objects)
        log_path = release.workdir / f"{name}.log"
        proc = subprocess.Popen(
            [*container["command"], *container["args"]], env=release.container_env(container, name),
            stdout=log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=release.workdir,
        )
        process_reaper.append(proc)
        probe = container["livenessProbe"]["httpGet"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        replicas.append((name, f"http://127.0.0.1:{ports[probe['port']]}{probe['path']}", ports["metrics"], log_path,
                         proc))

    for name, health_url, metrics_port, log_path, proc in replicas:
        def healthy(url: str = health_url, name: str = name, proc: subprocess.Popen = proc,
                    log_path: Path = log_path) -> bool:
            if proc.poll() is not None:
                pytest.fail(f"{name} exited ({proc.returncode}):\n{log_path.read_text(errors='replace')[-4000:]}")
            try:
                return requests.get(url, timeout=1).status_code == 200
            except requests.RequestException:
                return False

        _wait_for(healthy, f"{name}'s liveness endpoint (the chart's probe)", timeout=90)
        metrics = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert "jest_operator_reconcile_total" in metrics

    peering_path = f"/apis/kopf.dev/v1/clusterkopfpeerings/{release.fullname}"
    peers = _wait_for(
        lambda: len((release.get(peering_path) or {}).get("status") or {}) == 2 and release.get(peering_path),
        "both replicas in the peering object",
    )["status"]
    priorities = {identity: peer["priority"] for identity, peer in peers.items()}
    assert set(priorities) == {"operator-0", "operator-1"}  # POD_ID names the replica
    assert len(set(priorities.values())) == 2, "equal priorities would pause both replicas"
    logs = {name: log for name, _, _, log, _ in replicas}
    active, standby = sorted(priorities, key=priorities.__getitem__, reverse=True)
    # Kopf starts a peered replica paused and logs each switch; the last switch is the current state.
    _wait_for(lambda: _peering_state(logs[active]) == "active", f"{active} (highest priority) to resume")
    time.sleep(2)
    assert _peering_state(logs[standby]) in (None, "paused"), f"{standby} works although {active} outranks it"

    # The job's namespace: a node agent started by other tests of the session leaves it alone (pods stay
    # Pending, so the pod count below is the operator's doing only).
    jobs = new_namespace(release.cp, "peered")
    _label_namespaces(release, [jobs.namespace])
    release.cp.kubectl("label", "namespace", jobs.namespace, "jest.training/node-agent=off")
    manifest = yaml.safe_load((REPO_ROOT / "examples" / "quickstart.yaml").read_text())
    manifest["metadata"]["namespace"] = jobs.namespace
    job_name = manifest["metadata"]["name"]
    job = jobs.create_job(manifest)
    pods = _wait_for(lambda: jobs.pods(job_name), "the active replica to create the job's pods")
    time.sleep(2)  # a second reconciler would now be creating duplicates
    pods = jobs.pods(job_name)
    assert len(pods) == manifest["spec"]["numNodes"]
    for pod in pods:  # created as the chart's ServiceAccount, blockOwnerDeletion and all (RBAC + admission)
        (owner,) = [ref for ref in pod["metadata"]["ownerReferences"] if ref.get("controller")]
        assert owner["uid"] == job["metadata"]["uid"]


# ------------------------------------------------------------------------------------- admission policy


def admission_objects(chart: helm_python.Chart, values: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    kinds = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
    return {obj["kind"]: obj for obj in render(chart, values) if obj["kind"] in kinds}


def test_admission_policy_is_on_by_default_and_exempts_only_the_operator(chart: helm_python.Chart) -> None:
    objects = admission_objects(chart)
    policy, binding = objects["ValidatingAdmissionPolicy"], objects["ValidatingAdmissionPolicyBinding"]
    assert policy["spec"]["failurePolicy"] == "Fail"
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert "matchResources" not in binding["spec"]  # every namespace the operator serves
    conditions = {c["name"]: c["expression"] for c in policy["spec"]["matchConditions"]}
    account = only(render(chart), "ServiceAccount")["metadata"]["name"]
    operator = f"system:serviceaccount:{NAMESPACE}:{account}"
    assert conditions["not-the-operator"] == f'request.userInfo.username != "{operator}"'
    rules = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rules == [{"apiGroups": ["jest.training"], "apiVersions": ["*"], "operations": ["CREATE", "UPDATE"],
                      "resources": ["jesttrainingjobs"]}]  # not status: the operator's status writes never match
    validations = policy["spec"]["validations"]
    assert 'resource("pods")' in validations[0]["expression"] and 'check("create")' in validations[0]["expression"]
    assert len(validations) == 3  # pods, volume types, secret env (ServiceAccounts are allowed by default)


def test_admission_policy_binding_follows_watch_namespaces(chart: helm_python.Chart) -> None:
    binding = admission_objects(chart, CONFIGURATIONS["namespaced"])["ValidatingAdmissionPolicyBinding"]
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": WATCHED}]


def test_admission_policy_checks_follow_the_admins_values(chart: helm_python.Chart) -> None:
    from jest_operator.api import VOLUME_SOURCES

    everything = {"admissionPolicy": {"allowedVolumeTypes": list(VOLUME_SOURCES), "allowSecretEnv": True,
                                      "allowServiceAccountName": True}}
    validations = admission_objects(chart, everything)["ValidatingAdmissionPolicy"]["spec"]["validations"]
    assert len(validations) == 1  # the author's pods/create check is never optional
    strict = {"admissionPolicy": {"allowedVolumeTypes": [], "allowServiceAccountName": False}}
    validations = admission_objects(chart, strict)["ValidatingAdmissionPolicy"]["spec"]["validations"]
    volume_check = validations[1]["expression"]
    assert all(f"!has(v.{source})" in volume_check for source in VOLUME_SOURCES)
    assert "(allowed: none;" in validations[1]["messageExpression"]
    assert "serviceAccountName" in validations[2]["expression"]
    assert admission_objects(chart, {"admissionPolicy": {"enabled": False}}) == {}


def test_admission_policy_values_mirror_jestctls_policy_and_the_api(chart: helm_python.Chart) -> None:
    """One list of volume sources (the API's) and one set of defaults (jestctl validate's) across the chart."""
    from jest_operator.admission import AdmissionPolicy
    from jest_operator.api import VOLUME_SOURCES

    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert AdmissionPolicy.from_values(values) == AdmissionPolicy()
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    enum = schema["properties"]["admissionPolicy"]["properties"]["allowedVolumeTypes"]["items"]["enum"]
    assert tuple(enum) == VOLUME_SOURCES
    helpers = (CHART_DIR / "templates" / "_helpers.tpl").read_text()
    listed = helpers.split('define "jest-operator.volumeSources" -}}', 1)[1].split("{{- end }}", 1)[0]
    assert tuple(json.loads(listed)) == VOLUME_SOURCES


def test_admission_policy_values_are_checked(chart: helm_python.Chart) -> None:
    with pytest.raises(Exception, match="allowedVolumeTypes"):
        render(chart, {"admissionPolicy": {"allowedVolumeTypes": ["hostPath"]}})
