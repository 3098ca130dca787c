"""The emulator's workarounds: each KMock 0.8 gap still exists in bare KMock, and each fix still works.

If KMock is upgraded and a gap disappears, ``test_bare_kmock_still_has_every_gap`` fails and names the
workaround that can go; if a fix stops applying (KMock internals moved), ``test_fixed_emulator`` fails.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from .conftest import Cluster, start_emulator, stop_process
from .emulator import human_age, jsonpath_value, label_selector_matches, render_table

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p1", "labels": {"app": "a"}},
       "spec": {"containers": [{"name": "c", "image": "i"}]}}
CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {"group": "example.com", "scope": "Namespaced",
             "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
             "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                           "additionalPrinterColumns": [{"name": "Size", "type": "integer", "jsonPath": ".spec.size"}],
                           "schema": {"openAPIV3Schema": {"type": "object"}}}]},
}
TABLE = {"Accept": "application/json;as=Table;g=meta.k8s.io;v=v1"}


def probe(url: str) -> dict[str, object]:
    """Observe every behaviour a workaround is about (True = the Kubernetes-correct behaviour)."""
    pods = f"{url}/api/v1/namespaces/default/pods"
    created = requests.post(pods, json=POD, timeout=5)
    generated = requests.post(pods, json={**POD, "metadata": {"generateName": "gen-"}}, timeout=5)
    put = requests.put(f"{pods}/p1", json=POD, timeout=5)
    listed = requests.get(pods, params={"labelSelector": "app=other"}, timeout=5).json()
    core = requests.get(f"{url}/api/v1", timeout=5).json()
    crd = requests.post(f"{url}/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=CRD, timeout=5)
    with requests.get(pods, params={"watch": "true"}, stream=True, timeout=5) as watch:
        watch_type = watch.headers.get("Content-Type", "")
    table = requests.get(pods, headers=TABLE, timeout=5).json()
    return {
        "1 namespaces list": requests.get(f"{url}/api/v1/namespaces", timeout=5).status_code == 200,
        "2 PUT": put.status_code == 200,
        "3 trailing slash": requests.get(f"{url}/apis/", timeout=5).status_code == 200,
        "4 create 201": created.status_code == 201,
        "5 core groupVersion": core.get("groupVersion") == "v1",
        "6 labelSelector": listed.get("items") == [],
        "7 generateName": str((generated.json().get("metadata") or {}).get("name", "")).startswith("gen-"),
        "8 list kind": listed.get("kind") == "PodList" and listed.get("apiVersion") == "v1",
        "9 watch content type": watch_type.startswith("application/json"),
        "10 CRD discoverable": crd.status_code in (200, 201)
        and requests.get(f"{url}/apis/example.com/v1", timeout=5).status_code == 200,
        "11 uid": bool((created.json().get("metadata") or {}).get("uid")),
        "12 Table": table.get("kind") == "Table",
    }


@pytest.fixture(scope="module")
def bare(module_tmp: Path) -> Iterator[Cluster]:
    (module_tmp / "bare").mkdir(exist_ok=True)
    started = start_emulator(module_tmp / "bare", "--no-fixes", "--no-crd")
    try:
        yield started
    finally:
        stop_process(started.process)


@pytest.fixture(scope="module")
def fixed(module_tmp: Path) -> Iterator[Cluster]:
    started = start_emulator(module_tmp, "--no-crd")
    try:
        yield started
    finally:
        stop_process(started.process)


def test_kmock_is_the_pinned_version():
    assert importlib.metadata.version("kmock") == "0.8", "the workarounds reach into kmock._internal of 0.8"


def test_bare_kmock_still_has_every_gap(bare: Cluster):
    behaviours = probe(bare.url)
    gone = [name for name, correct in behaviours.items() if correct]
    assert gone == [], f"KMock fixed these gaps; drop the matching workarounds in emulator.py: {gone}"


def test_fixed_emulator_behaves_like_kubernetes(fixed: Cluster):
    behaviours = probe(fixed.url)
    broken = [name for name, correct in behaviours.items() if not correct]
    assert broken == [], f"these workarounds no longer apply: {broken}"


def test_generation_increments_only_when_the_spec_changes(fixed: Cluster):
    url = f"{fixed.url}/api/v1/namespaces/default/configmaps"
    requests.post(url, json={"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "g"}, "spec": {"a": 1}},
                  timeout=5)
    headers = {"Content-Type": "application/merge-patch+json"}
    requests.patch(f"{url}/g", data=json.dumps({"metadata": {"labels": {"x": "y"}}}), headers=headers, timeout=5)
    assert requests.get(f"{url}/g", timeout=5).json()["metadata"]["generation"] == 1
    requests.patch(f"{url}/g", data=json.dumps({"spec": {"a": 2}}), headers=headers, timeout=5)
    assert requests.get(f"{url}/g", timeout=5).json()["metadata"]["generation"] == 2


def test_kubectl_get_prints_crd_printer_columns(fixed: Cluster):
    fixed.kubectl("apply", "--validate=false", "-f", "-", input_text=json.dumps(CRD))
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w1"}, "spec": {"size": 7}}
    fixed.kubectl("apply", "--validate=false", "-f", "-", input_text=json.dumps(widget))
    lines = fixed.kubectl("get", "wd").stdout.splitlines()
    assert lines[0].split()[:2] == ["NAME", "SIZE"]
    assert lines[1].split()[:2] == ["w1", "7"]


@pytest.mark.parametrize(
    ("labels", "selector", "expected"),
    [({"a": "1"}, "a=1", True), ({"a": "1"}, "a==1", True), ({"a": "1"}, "a!=1", False), ({}, "a", False),
     ({"a": "1"}, "!a", False), ({"a": "1", "b": "2"}, "a=1,b=2", True), ({"a": "1"}, "a=1,b=2", False)],
)
def test_label_selectors(labels, selector, expected):
    assert label_selector_matches(labels, selector) is expected


def test_jsonpath_and_table_rendering():
    obj = {"metadata": {"name": "x", "creationTimestamp": "2020-01-01T00:00:00Z"},
           "status": {"phase": "Running", "list": [{"v": 3}]}}
    assert jsonpath_value(obj, ".status.phase") == "Running"
    assert jsonpath_value(obj, ".status.list[0].v") == 3
    assert jsonpath_value(obj, ".status.missing.deeper") is None
    assert jsonpath_value(obj, "{.status.phase}") == "Running"
    table = render_table([obj], [{"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                                 {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}])
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Phase", "Age"]
    assert table["rows"][0]["cells"][:2] == ["x", "Running"]
    assert table["rows"][0]["cells"][2].endswith("d")
    assert human_age(None) == "<unknown>"


@pytest.mark.parametrize("fixes", [True, False])
def test_request_history_is_trimmed_only_with_fix_13(fixes: bool, monkeypatch: pytest.MonkeyPatch):
    """Bare KMock keeps every request (and scans them all per request); the fix keeps only in-flight ones."""
    import asyncio

    import aiohttp
    import kmock

    from . import emulator as emulator_module

    monkeypatch.setattr(emulator_module, "FIXES", fixes)

    async def scenario() -> int:
        emulator = emulator_module.Emulator()
        async with emulator, kmock.Server(emulator) as server:
            emulator.resources.load_bundled()
            async with aiohttp.ClientSession() as session:
                for _ in range(100):
                    async with session.get(f"{server.url}/api/v1/namespaces/default/configmaps") as response:
                        assert response.status == 200
            return len(emulator._requests)

    kept = asyncio.run(scenario())
    if fixes:
        assert kept <= 33, "fix 13 no longer trims KMock's request history"
    else:
        assert kept == 100, "KMock no longer keeps every request: fix 13 may be obsolete"
