"""The chart's PrometheusRule content, checked and unit-tested by the real promtool.

Besides running the promtool unit tests, every rule is mutated once (a recording rule's value doubled, an
alert made impossible) to prove the promtool tests would notice: each rule has a test that can fail.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, require_tool

FILES = REPO_ROOT / "charts" / "jest-operator" / "files"
RULES = FILES / "prometheus-rules.yaml"
RULES_TEST = FILES / "prometheus-rules-test.yaml"

RECORDING_RULES = {
    "trainingjob:jest_train_examples:rate5m",
    "trainingjob:jest_joules_per_example:ratio_rate5m",
    "trainingjob:jest_selection_overhead:ratio_rate5m",
    "trainingjob:jest_power_watts:rate1m",
}
ALERTS = {
    "JestEnergyTelemetryAbsent",
    "JestThroughputDrop",
    "JestStragglerRank",
    "JestSelectionOverheadHigh",
    "JestEnergyBudgetNearlySpent",
}


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def all_rules(document: dict) -> list[dict]:
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", RULES.name, cwd=FILES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(RECORDING_RULES) + len(ALERTS)} rules found" in result.stdout


def test_rules_pass_their_promtool_unit_tests() -> None:
    result = promtool("test", "rules", RULES_TEST.name, cwd=FILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_are_the_designed_set_with_severity_and_annotations() -> None:
    document = yaml.safe_load(RULES.read_text())
    assert set(document) == {"groups"}, "the file is a PrometheusRule spec: only `groups`"
    rules = all_rules(document)
    assert {rule["record"] for rule in rules if "record" in rule} == RECORDING_RULES
    alerts = [rule for rule in rules if "alert" in rule]
    assert {rule["alert"] for rule in alerts} == ALERTS
    for alert in alerts:
        assert alert["labels"]["severity"] in {"info", "warning", "critical"}, alert["alert"]
        assert set(alert["annotations"]) >= {"summary", "description"}, alert["alert"]
        assert alert.get("for"), f"{alert['alert']} needs a `for:` so one bad scrape does not page"
    for rule in rules:
        for clause in re.findall(r"\b(?:by|on|without|ignoring|group_left|group_right)\s*\(([^)]*)\)", rule["expr"]):
            assert "job" not in {label.strip() for label in clause.split(",")}, "never a label named job"
        assert "job" not in rule.get("labels", {})


def test_unit_tests_cover_every_rule(tmp_path: Path) -> None:
    tests = yaml.safe_load(RULES_TEST.read_text())
    tested_exprs = {case["expr"].split("{")[0] for test in tests["tests"] for case in test["promql_expr_test"]}
    assert tested_exprs >= RECORDING_RULES
    for alert in ALERTS:
        cases = [case for test in tests["tests"] for case in test["alert_rule_test"] if case["alertname"] == alert]
        assert any(case["exp_alerts"] for case in cases), f"{alert}: no firing case"
        assert any(not case["exp_alerts"] for case in cases), f"{alert}: no not-firing case"


@pytest.mark.parametrize("rule_name", sorted(RECORDING_RULES | ALERTS))
def test_breaking_a_rule_fails_its_unit_tests(rule_name: str, tmp_path: Path) -> None:
    document = yaml.safe_load(RULES.read_text())
    for rule in all_rules(document):
        if rule_name in (rule.get("record"), rule.get("alert")):
            if "record" in rule:
                rule["expr"] = f"2 * ({rule['expr']})"
            else:
                rule["expr"] = "vector(1) == 2"
    (tmp_path / RULES.name).write_text(yaml.safe_dump(document, sort_keys=False))
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    result = promtool("test", "rules", RULES_TEST.name, cwd=tmp_path)
    assert result.returncode != 0, f"promtool tests did not notice {rule_name} being broken"
