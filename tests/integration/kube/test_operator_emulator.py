"""What only the KMock emulator can give: garbage specs straight into the store, past any schema.

A real API server refuses every one of these manifests (tests/integration/kube/test_operator.py checks the
operator on it); here the operator itself must survive them: every job gets a status, the process stays
alive and healthy. The pure entry point is fuzzed the same way without any server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jest_operator.handlers import decide

from .conftest import REPO, Cluster, Operator, phase_of, start_emulator, start_operator, stop_process, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(module_tmp: Path) -> Iterator[Cluster]:
    """An emulator where jest.training exists only because the real CRD was applied with kubectl."""
    started = start_emulator(module_tmp, "--no-crd")
    try:
        started.kubectl("apply", "--validate=false", "-f", str(REPO / "crds"))
        yield started
    finally:
        stop_process(started.process)


@pytest.fixture(scope="module")
def operator(cluster: Cluster, module_tmp: Path) -> Iterator[Operator]:
    started = start_operator(cluster, module_tmp)
    try:
        yield started
    finally:
        stop_process(started.process, grace=10)


# ---------------------------------------------------------------------------------------------- fuzzing
def make_json_values(*, allow_nan: bool) -> st.SearchStrategy:
    """Arbitrary JSON-ish values (NaN only where the value never travels as JSON)."""
    return st.recursive(
        st.none() | st.booleans() | st.integers(-10, 10**12) | st.floats(allow_nan=allow_nan,
                                                                          allow_infinity=allow_nan)
        | st.text(max_size=12),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=4),
        max_leaves=12,
    )


def make_spec_fields(json_values: st.SearchStrategy) -> st.SearchStrategy:
    """Specs mixing plausible and garbage values in every field."""
    return st.fixed_dictionaries(
        {},
        optional={
            "image": st.one_of(st.text(max_size=20), json_values),
            "numNodes": st.one_of(st.integers(-2, 6), json_values),
            "numProcPerNode": st.one_of(st.integers(-1, 4), json_values),
            "accelerator": st.one_of(
                st.fixed_dictionaries({"type": st.sampled_from(["cpu", "gpu", "tpu", "fpga"])},
                                      optional={"count": st.integers(-1, 9)}),
                json_values),
            "training": st.one_of(
                st.fixed_dictionaries({}, optional={
                    "steps": st.one_of(st.integers(-5, 10**9), json_values),
                    "selection": st.fixed_dictionaries({}, optional={
                        "batchSize": st.integers(-4, 1024), "chunks": st.integers(-1, 64),
                        "filterRatio": st.floats(-1, 2, allow_nan=False), "method": st.text(max_size=10)}),
                }),
                json_values),
            "runPolicy": st.one_of(
                st.fixed_dictionaries({}, optional={
                    "suspend": json_values, "backoffLimit": st.integers(-3, 5),
                    "activeDeadlineSeconds": st.integers(-5, 100), "cleanPodPolicy": st.text(max_size=8)}),
                json_values),
            "energy": st.one_of(
                st.fixed_dictionaries({}, optional={
                    "budgetJoules": json_values,
                    "onBudgetExceeded": st.sampled_from(["Warn", "Suspend", "Fail", "x"])}),
                json_values),
            "podTemplate": json_values,
            "bogus": json_values,
        },
    )


json_values = make_json_values(allow_nan=True)
spec_fields = make_spec_fields(json_values)
bodies = st.fixed_dictionaries({
    "apiVersion": st.sampled_from(["jest.training/v1alpha1", "v1"]),
    "kind": st.sampled_from(["JESTTrainingJob", "Pod"]),
    "metadata": st.fixed_dictionaries({"name": st.sampled_from(["fuzz", "Bad_Name", "x" * 70, ""]),
                                       "namespace": st.just("default"), "uid": st.just("u")},
                                      optional={"generation": json_values}),
    "spec": st.one_of(spec_fields, json_values),
}, optional={"status": json_values})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies)
def test_handler_entry_point_never_crashes_on_bad_input(body):
    from datetime import UTC, datetime

    outcome, result = decide(body, [], existing_children=None, progress=None, now=datetime(2026, 1, 1, tzinfo=UTC))
    assert outcome in ("ok", "invalid")
    if outcome == "invalid":
        assert result.create == ()
        failed = next(c for c in result.status["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "InvalidSpec" and ":" in failed["message"]


@settings(max_examples=1, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(specs=st.lists(make_spec_fields(make_json_values(allow_nan=False)), min_size=12, max_size=12))
def test_fuzzed_specs_through_the_running_operator(cluster: Cluster, operator: Operator, specs: list[dict]):
    """Random specs straight into the API (no CRD validation here): every job gets a status, the operator lives."""
    names = []
    for index, spec in enumerate(specs):
        name = f"fuzz-{index}"
        names.append(name)
        response = requests.post(cluster.url + "/apis/jest.training/v1alpha1/namespaces/default/jesttrainingjobs",
                                 json={"apiVersion": "jest.training/v1alpha1", "kind": "JESTTrainingJob",
                                       "metadata": {"name": name}, "spec": spec}, timeout=5)
        assert response.status_code == 201, response.text
    try:
        for name in names:
            wait_for(lambda name=name: phase_of(cluster, name) in ("Pending", "Failed", "Suspended"), timeout=30,
                     what=f"a status for {name}")
        assert operator.process.poll() is None
        assert requests.get(f"http://127.0.0.1:{operator.liveness_port}/healthz", timeout=5).status_code == 200
    finally:
        for name in names:
            requests.delete(cluster.url + f"/apis/jest.training/v1alpha1/namespaces/default/jesttrainingjobs/{name}",
                            timeout=5)
