"""The Grafana dashboard, without a Grafana server: structure, PromQL validity (promtool) and metric names.

Every panel query is wrapped, with its template variables substituted, as a recording rule and checked by
``promtool check rules`` (the real PromQL parser). Every metric a panel names must be one the trainer
(``jest_trainer.metrics``) or the operator exports, and every recording rule it names must be defined in
the chart's PrometheusRule. The e2e test runs the same queries against a real Prometheus.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml
from jest_trainer.metrics import TRAINER_METRIC_NAMES

from tests.conftest import REPO_ROOT, require_tool

DASHBOARD = REPO_ROOT / "charts" / "jest-operator" / "dashboards" / "jest-training.json"
RULES = REPO_ROOT / "charts" / "jest-operator" / "files" / "prometheus-rules.yaml"
OPERATOR_METRIC_NAMES = (
    "jest_operator_reconcile_total",
    "jest_operator_reconcile_duration_seconds",
    "jest_operator_trainingjobs",
    "jest_operator_gang_restarts_total",
)
HISTOGRAMS = {"jest_step_duration_seconds", "jest_operator_reconcile_duration_seconds"}
REQUIRED_PANELS = (
    "Energy (kWh, by method)",
    "CO2e estimate",
    "Joules per example",
    "Power over time",
    "Examples/s: trained vs scored",
    "Step time p50 / p95",
    "Step phase breakdown",
    "Selection ratio and overhead",
    "Accuracy vs cumulative energy",
    "Reconciles by result",
    "Reconcile duration p50 / p95",
    "Training jobs by phase",
    "Gang restarts",
)
DEFAULT_SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__range": "1h",
    "$carbon_intensity": "400",
    "$namespace": ".*",
    "$trainingjob": ".*",
}
_RECORDING_NAME = re.compile(r"\b[a-zA-Z_][a-zA-Z0-9_]*:[a-zA-Z0-9_:]+\b")
_METRIC_NAME = re.compile(r"\bjest_[a-z0-9_]+\b")


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def query_panels(dashboard: dict) -> list[dict]:
    """Panels that query Prometheus (rows and text panels do not)."""
    return [panel for panel in dashboard["panels"] if panel["type"] not in {"row", "text"}]


def dashboard_queries(substitutions: dict[str, str] | None = None) -> list[tuple[str, str, str]]:
    """(panel title, refId, PromQL with variables substituted) of every panel target."""
    values = {**DEFAULT_SUBSTITUTIONS, **(substitutions or {})}
    queries = []
    for panel in query_panels(load_dashboard()):
        for target in panel["targets"]:
            expr = target["expr"]
            for variable in sorted(values, key=len, reverse=True):
                expr = expr.replace(variable, values[variable])
            queries.append((panel["title"], target["refId"], expr))
    return queries


def defined_recording_rules() -> set[str]:
    document = yaml.safe_load(RULES.read_text())
    return {rule["record"] for group in document["groups"] for rule in group["rules"] if "record" in rule}


def test_identity_and_schema_are_stable() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "jest-training-energy"
    assert dashboard["title"] == "JEST training \u2014 energy & throughput"
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36


def test_template_variables() -> None:
    variables = {variable["name"]: variable for variable in load_dashboard()["templating"]["list"]}
    assert set(variables) >= {"datasource", "namespace", "trainingjob", "carbon_intensity"}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "trainingjob"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
        assert variables[name]["allValue"] == ".*", f"{name}: All must also match series without the label"
    carbon = variables["carbon_intensity"]
    assert carbon["type"] in {"textbox", "constant"}
    assert carbon["query"] == "400" and carbon["current"]["value"] == "400"


def test_panels_have_unique_ids_and_non_overlapping_grid_positions() -> None:
    panels = load_dashboard()["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"}, panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells.get((x, y))}"
                cells[(x, y)] = panel["title"]


def test_every_query_panel_has_a_unit_targets_and_the_datasource_variable() -> None:
    panels = query_panels(load_dashboard())
    titles = [panel["title"] for panel in panels]
    for required in REQUIRED_PANELS:
        assert required in titles, f"missing panel {required!r}"
    for panel in panels:
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']}: unit not set"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{panel['title']}/{target['refId']}: empty expr"
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_energy_panels_split_by_method_and_use_the_carbon_variable() -> None:
    by_title = {panel["title"]: panel for panel in query_panels(load_dashboard())}
    assert "by (method)" in by_title["Energy (kWh, by method)"]["targets"][0]["expr"]
    assert by_title["Energy (kWh, by method)"]["fieldConfig"]["defaults"]["unit"] == "kwatth"
    assert "$carbon_intensity" in by_title["CO2e estimate"]["targets"][0]["expr"]
    assert "estimate" in by_title["CO2e estimate"]["description"].lower()


def test_every_panel_query_is_valid_promql(tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:panel_{index}:check", "expr": expr}
        for index, (_, _, expr) in enumerate(dashboard_queries())
    ]
    rule_file = tmp_path / "dashboard-rules.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [require_tool("promtool"), "check", "rules", str(rule_file)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_panels_only_use_exported_metrics_and_defined_recording_rules() -> None:
    exported = set(TRAINER_METRIC_NAMES) | set(OPERATOR_METRIC_NAMES)
    recorded = defined_recording_rules()
    used_metrics: set[str] = set()
    for title, ref_id, expr in dashboard_queries():
        for rule_name in _RECORDING_NAME.findall(expr):
            assert rule_name in recorded, f"{title}/{ref_id}: recording rule {rule_name} is not defined"
        for name in _METRIC_NAME.findall(_RECORDING_NAME.sub("", expr)):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            metric = base if base in HISTOGRAMS else name
            assert metric in exported, f"{title}/{ref_id}: {name} is exported by neither trainer nor operator"
            used_metrics.add(metric)
    assert {"jest_accelerator_energy_joules_total", "jest_step_duration_seconds"} <= used_metrics
    assert set(OPERATOR_METRIC_NAMES) <= used_metrics, "operator health must show every operator metric"


def test_operator_metric_names_match_the_operator_module() -> None:
    from jest_operator import operator_metrics

    assert set(operator_metrics.OPERATOR_METRIC_NAMES) == set(OPERATOR_METRIC_NAMES)
