"""Every transition of the pure state machine (jest_operator.status), with the real API parser and builders."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import pytest
from jest_operator.api import parse_job
from jest_operator.builders import build_config_map, build_pod, build_service
from jest_operator.handlers import decide, sanitize_status
from jest_operator.status import (
    REASONS,
    SHORT_GRACE_SECONDS,
    EventSpec,
    Plan,
    TrainerProgress,
    format_time,
    invalid_spec_plan,
    merge_patch,
    observe_pod,
    plan,
    set_condition,
)

NOW = dt.datetime(2026, 11, 29, 12, 0, 0, tzinfo=dt.UTC)


def body(*, num_nodes: int = 2, run_policy: dict | None = None, energy: dict | None = None,
         status: dict | None = None, generation: int = 1) -> dict:
    """A valid JESTTrainingJob manifest (2 CPU nodes unless told otherwise)."""
    manifest: dict[str, Any] = {
        "apiVersion": "jest.training/v1alpha1",
        "kind": "JESTTrainingJob",
        "metadata": {"name": "demo", "namespace": "default", "uid": "uid-1", "generation": generation},
        "spec": {
            "image": "jest-trainer:0.1.0",
            "numNodes": num_nodes,
            "training": {"steps": 100, "selection": {"batchSize": 64, "chunks": 16}},
            "runPolicy": {"backoffLimit": 2, **(run_policy or {})},
            "energy": energy or {},
        },
    }
    if status is not None:
        manifest["status"] = status
    return manifest


def job(**kwargs: Any):
    return parse_job(body(**kwargs))


def pod(index: int, phase: str, *, attempt: int = 0, ready: bool | None = None, terminating: bool = False,
        reason: str = "", message: str = "", num_nodes: int = 2) -> dict:
    """A real builder pod with a kubelet-like status."""
    manifest = build_pod(job(num_nodes=num_nodes), index, attempt=attempt)
    ready = phase == "Running" if ready is None else ready
    manifest["status"] = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if reason:
        manifest["status"]["reason"] = reason
    if message:
        manifest["status"]["message"] = message
    if terminating:
        manifest["metadata"]["deletionTimestamp"] = format_time(NOW)
    return manifest


def stored_children(**job_kwargs: Any) -> list[dict]:
    """The ConfigMap and Service as the builders make them (i.e. in sync with the spec)."""
    parsed = job(**job_kwargs)
    return [build_config_map(parsed), build_service(parsed)]


def run(status: dict | None, pods: list[dict], *, progress: TrainerProgress | None = None, now: dt.datetime = NOW,
        existing: list[dict] | None = None, **job_kwargs: Any) -> Plan:
    return plan(job(**job_kwargs), pods, progress, now, previous_status=status or {},
                existing_children=existing if existing is not None else stored_children(**job_kwargs))


def reasons(result: Plan) -> list[str]:
    return [event.reason for event in result.events]


def cond(status: dict, type_: str) -> dict | None:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), None)


def created_names(result: Plan) -> list[str]:
    return [child["metadata"]["name"] for child in result.create]


def running_status(**extra: Any) -> dict:
    status = run(None, [pod(0, "Running"), pod(1, "Running")]).status
    status.update(extra)
    return status


# ---------------------------------------------------------------------------------------------- creation
def test_fresh_job_creates_config_map_service_and_one_pod_per_node():
    result = run(None, [], existing=[])
    assert created_names(result) == ["demo-config", "demo", "demo-node-0", "demo-node-1"]
    assert result.status["phase"] == "Pending"
    assert result.status["startTime"] == format_time(NOW)
    assert result.status["restarts"] == 0
    assert result.status["observedGeneration"] == 1
    assert result.status["replicas"] == {"active": 0, "ready": 0, "succeeded": 0, "failed": 0, "total": 2}
    assert result.status["nodes"] == "0/2"
    assert cond(result.status, "Created")["status"] == "True"
    assert reasons(result) == ["Created"]
    assert all(
        c["metadata"]["annotations"]["jest.training/attempt"] == "0" for c in result.create if c["kind"] == "Pod"
    )


def test_unknown_existing_children_means_config_map_and_service_are_recreated_idempotently():
    result = plan(job(), [], None, NOW, previous_status={})
    assert [c["kind"] for c in result.create] == ["ConfigMap", "Service", "Pod", "Pod"]


def test_only_missing_pods_are_created():
    result = run(run(None, []).status, [pod(0, "Pending")])
    assert created_names(result) == ["demo-node-1"]
    assert result.events == ()  # Created was already reported


@pytest.mark.parametrize(
    ("phases", "expected_phase", "ready"),
    [
        (("Pending", "Pending"), "Pending", 0),
        (("Running", "Pending"), "Pending", 1),
        (("Running", "Running"), "Running", 2),
        (("Running", "Succeeded"), "Pending", 1),  # rank 1 done early: rank 0 still trains, not all running
    ],
)
def test_phase_follows_the_pods(phases, expected_phase, ready):
    result = run(run(None, []).status, [pod(i, p) for i, p in enumerate(phases)])
    assert result.status["phase"] == expected_phase
    assert result.status["replicas"]["ready"] == ready
    assert result.create == ()


def test_all_running_emits_one_event_and_keeps_transition_time():
    first = run(None, [pod(0, "Running"), pod(1, "Running")])
    assert reasons(first) == ["AllPodsRunning"]
    later = run(first.status, [pod(0, "Running"), pod(1, "Running")], now=NOW + dt.timedelta(minutes=5))
    assert later.events == ()
    assert cond(later.status, "Running") == cond(first.status, "Running")
    assert later.status["nodes"] == "2/2"


def test_running_but_not_ready_pods_count_as_active_not_ready():
    result = run(None, [pod(0, "Running", ready=False), pod(1, "Running", ready=False)])
    assert result.status["replicas"]["ready"] == 0
    assert result.status["replicas"]["active"] == 2


# ---------------------------------------------------------------------------------------------- success
@pytest.mark.parametrize(
    ("policy", "deleted"),
    [("None", ()), ("Running", ("demo-node-1",)), ("All", ("demo-node-0", "demo-node-1"))],
)
def test_rank0_success_finishes_the_job_and_applies_clean_pod_policy(policy, deleted):
    result = run(running_status(), [pod(0, "Succeeded"), pod(1, "Running")], run_policy={"cleanPodPolicy": policy})
    assert result.status["phase"] == "Succeeded"
    assert result.status["completionTime"] == format_time(NOW)
    assert cond(result.status, "Succeeded")["status"] == "True"
    assert cond(result.status, "Running")["status"] == "False"
    assert tuple(result.delete_pods) == deleted
    assert reasons(result) == ["Succeeded"]


def test_rank1_success_alone_is_not_job_success():
    result = run(running_status(), [pod(0, "Running"), pod(1, "Succeeded")])
    assert result.status["phase"] != "Succeeded"


def test_finished_job_is_stable_and_creates_nothing():
    done = run(running_status(), [pod(0, "Succeeded"), pod(1, "Succeeded")]).status
    again = run(done, [pod(0, "Succeeded"), pod(1, "Succeeded")], now=NOW + dt.timedelta(hours=1))
    assert again.create == () and again.events == ()
    assert again.status["completionTime"] == done["completionTime"]


# ---------------------------------------------------------------------------------------------- TTL
@pytest.mark.parametrize(("ttl", "age", "delete"), [(60, 30, False), (60, 59, False), (60, 60, True), (60, 61, True),
                                                     (0, 0, True)])
def test_ttl_after_finished_deletes_the_job(ttl, age, delete):
    done = run(running_status(), [pod(0, "Succeeded"), pod(1, "Succeeded")]).status
    result = run(done, [], now=NOW + dt.timedelta(seconds=age), run_policy={"ttlSecondsAfterFinished": ttl})
    assert result.delete_job is delete
    assert ("TTLExpired" in reasons(result)) is delete


# ---------------------------------------------------------------------------------------------- gang restarts
def test_a_failed_pod_restarts_the_whole_gang():
    failed = pod(1, "Failed", reason="Error", message="exit code 1")
    result = run(running_status(), [pod(0, "Running"), failed])
    assert result.status["phase"] == "Restarting"
    assert result.status["restarts"] == 1
    assert result.restarted is True
    assert set(result.delete_pods) == {"demo-node-0", "demo-node-1"}
    assert result.create == ()
    restarting = cond(result.status, "Restarting")
    assert restarting["status"] == "True" and restarting["reason"] == "PodFailed"
    assert "demo-node-1 (rank 1) failed: Error: exit code 1" in restarting["message"]
    assert reasons(result) == ["Restarting"]


def test_after_a_restart_old_pods_are_removed_then_the_new_attempt_is_created():
    restarting = run(running_status(), [pod(0, "Running"), pod(1, "Failed")]).status
    # the old pods are still there (not yet terminating): delete them, create nothing under the same name
    waiting = run(restarting, [pod(0, "Running"), pod(1, "Failed")])
    assert set(waiting.delete_pods) == {"demo-node-0", "demo-node-1"}
    assert waiting.create == () and waiting.status["restarts"] == 1
    # a terminating pod blocks the WHOLE gang: no new rank may rendezvous with an old rank 0 shutting down
    blocked = run(restarting, [pod(0, "Running", terminating=True)])
    assert blocked.create == ()
    blocked = run(restarting, [pod(1, "Failed", terminating=True)])
    assert blocked.create == ()
    # gone: the new gang is created with attempt 1
    fresh = run(restarting, [])
    assert created_names(fresh) == ["demo-node-0", "demo-node-1"]
    assert {c["metadata"]["annotations"]["jest.training/attempt"] for c in fresh.create} == {"1"}
    assert fresh.status["phase"] == "Restarting"
    recovered = run(fresh.status, [pod(0, "Running", attempt=1), pod(1, "Running", attempt=1)])
    assert recovered.status["phase"] == "Running"
    assert cond(recovered.status, "Restarting")["status"] == "False"
    assert cond(recovered.status, "Restarting")["reason"] == "Recovered"


def test_backoff_limit_exhausted_fails_with_the_pod_reason():
    status = running_status(restarts=2)
    failed = pod(0, "Failed", attempt=2, reason="OOMKilled", message="out of memory")
    result = run(status, [failed, pod(1, "Running", attempt=2)])
    assert result.status["phase"] == "Failed"
    failed_condition = cond(result.status, "Failed")
    assert failed_condition["reason"] == "BackoffLimitExceeded"
    assert "OOMKilled: out of memory" in failed_condition["message"]
    assert result.status["restarts"] == 2
    assert result.delete_pods == ("demo-node-1",)  # cleanPodPolicy Running (default)
    assert result.restarted is False


def test_backoff_limit_zero_fails_on_the_first_failure():
    result = run(running_status(), [pod(0, "Running"), pod(1, "Failed")], run_policy={"backoffLimit": 0})
    assert result.status["phase"] == "Failed"


def exited(index: int, code: int, message: str, *, container: str = "trainer") -> dict:
    """A failed worker whose trainer container exited with ``code`` (kubelet form; the log tail as message)."""
    manifest = pod(index, "Failed")
    manifest["status"]["containerStatuses"] = [
        {"name": container, "state": {"terminated": {"exitCode": code, "reason": "Error", "message": message}}}]
    return manifest


@pytest.mark.parametrize("code", [2, 3])
def test_a_non_retryable_exit_fails_the_job_at_once_with_the_workers_error(code: int):
    """Exit codes 2/3 (jest_trainer.exit_codes): a restart would fail the same way; no backoff is spent."""
    error = "jest-trainer: error (deterministic): ValueError: training.selection.batchSize: 36 does not split"
    result = run(running_status(), [exited(0, 1, "peer closed the connection"), exited(1, code, error)])
    assert result.status["phase"] == "Failed" and result.status.get("restarts", 0) == 0
    failed = cond(result.status, "Failed")
    assert failed["reason"] == "NonRetryableError"
    assert failed["message"].startswith("pod demo-node-1 (rank 1) failed: Error: " + error)
    assert f"(exit code {code}: an error the same inputs raise again; not retried)" in failed["message"]
    assert result.restarted is False


def test_retryable_exits_and_other_containers_codes_still_restart_the_gang():
    result = run(running_status(), [pod(0, "Running"), exited(1, 1, "lost the data mount")])
    assert result.status["phase"] == "Restarting"
    sidecar = run(running_status(), [pod(0, "Running"), exited(1, 3, "sidecar says 3", container="proxy")])
    assert sidecar.status["phase"] == "Restarting"  # only the trainer's code carries the contract


def test_pod_vanishing_while_running_is_a_gang_failure():
    result = run(running_status(), [pod(0, "Running")])
    assert result.status["phase"] == "Restarting"
    assert cond(result.status, "Restarting")["reason"] == "PodMissing"


def test_container_termination_reason_is_used_when_the_pod_has_none():
    manifest = pod(0, "Failed")
    manifest["status"]["containerStatuses"] = [{"state": {"terminated": {"exitCode": 3, "message": "boom"}}}]
    observed = observe_pod(manifest)
    assert (observed.reason, observed.message) == ("ExitCode3", "boom")


# ---------------------------------------------------------------------------------------------- suspend
def test_suspend_deletes_pods_with_grace_and_clears_start_time():
    result = run(running_status(), [pod(0, "Running"), pod(1, "Running")], run_policy={"suspend": True})
    assert result.status["phase"] == "Suspended"
    assert set(result.delete_pods) == {"demo-node-0", "demo-node-1"}
    assert result.delete_grace_seconds is None  # the pod's own grace period: the trainer checkpoints
    assert "startTime" not in result.status
    assert cond(result.status, "Suspended")["reason"] == "Suspended"
    assert cond(result.status, "Running")["status"] == "False"
    assert reasons(result) == ["Suspended"]
    again = run(result.status, [], run_policy={"suspend": True})
    assert again.events == () and again.create == ()


def test_created_suspended_job_creates_no_pods():
    result = run(None, [], run_policy={"suspend": True})
    assert result.status["phase"] == "Suspended"
    assert [c for c in result.create if c["kind"] == "Pod"] == []


def test_a_pod_failing_during_suspension_is_not_a_gang_failure():
    result = run(running_status(), [pod(0, "Failed"), pod(1, "Running")], run_policy={"suspend": True})
    assert result.status["phase"] == "Suspended" and result.status["restarts"] == 0


def test_resume_recreates_the_pods():
    suspended = run(running_status(), [], run_policy={"suspend": True}).status
    result = run(suspended, [])
    assert created_names(result) == ["demo-node-0", "demo-node-1"]
    assert result.status["phase"] == "Pending"
    assert cond(result.status, "Suspended") | {"lastTransitionTime": None} == {
        "type": "Suspended", "status": "False", "reason": "Resumed", "message": "the job was resumed",
        "lastTransitionTime": None,
    }
    assert "Resumed" in reasons(result)
    assert result.status["startTime"] == format_time(NOW)


# ---------------------------------------------------------------------------------------------- deadline
@pytest.mark.parametrize(("elapsed", "failed"), [(30, False), (60, True), (61, True)])
def test_active_deadline(elapsed, failed):
    status = running_status(startTime=format_time(NOW - dt.timedelta(seconds=elapsed)))
    result = run(status, [pod(0, "Running"), pod(1, "Running")], run_policy={"activeDeadlineSeconds": 60})
    assert (result.status["phase"] == "Failed") is failed
    if failed:
        assert cond(result.status, "Failed")["reason"] == "DeadlineExceeded"
        assert set(result.delete_pods) == {"demo-node-0", "demo-node-1"}
        assert result.delete_grace_seconds == SHORT_GRACE_SECONDS  # a failed job resumes nothing
    else:
        assert result.delete_pods == () and result.status["phase"] == "Running"


def test_deadline_stops_active_pods_even_with_clean_pod_policy_none():
    status = running_status(startTime=format_time(NOW - dt.timedelta(seconds=100)))
    result = run(status, [pod(0, "Running"), pod(1, "Running")],
                 run_policy={"activeDeadlineSeconds": 60, "cleanPodPolicy": "None"})
    assert set(result.delete_pods) == {"demo-node-0", "demo-node-1"}


# ---------------------------------------------------------------------------------------------- energy
def energy_progress(joules: float, *, method: str | None = "modelled", examples: float = 1000) -> TrainerProgress:
    return TrainerProgress(step=10, examples_trained=examples, examples_scored=examples * 5, energy_joules=joules,
                           average_watts=50.0, energy_method=method,
                           energy_source="config:modelledWattsPerDevice" if method else None)


def test_energy_status_carries_method_source_per_example_and_co2e():
    result = run(running_status(), [pod(0, "Running"), pod(1, "Running")], progress=energy_progress(7.2e6),
                 energy={"carbonIntensityGramsPerKWh": 400})
    energy = result.status["energy"]
    assert energy["joules"] == 7.2e6 and energy["kilojoules"] == 7200.0
    assert energy["method"] == "modelled" and energy["source"] == "config:modelledWattsPerDevice"
    assert energy["joulesPerExample"] == pytest.approx(7200.0)
    assert energy["co2eGrams"] == pytest.approx(800.0)
    assert energy["averageWatts"] == 50.0
    assert result.status["progress"]["examplesTrained"] == 1000
    assert result.status["progress"]["totalSteps"] == 100


def test_energy_without_method_is_never_reported():
    result = run(running_status(), [pod(0, "Running"), pod(1, "Running")], progress=energy_progress(5.0, method=None))
    assert "energy" not in result.status


def test_energy_never_decreases_and_missing_progress_keeps_old_values():
    first = run(running_status(), [pod(0, "Running"), pod(1, "Running")], progress=energy_progress(500.0))
    lower = run(first.status, [pod(0, "Running"), pod(1, "Running")], progress=energy_progress(10.0))
    assert lower.status["energy"]["joules"] == 500.0
    silent = run(first.status, [pod(0, "Running"), pod(1, "Running")], progress=None)
    assert silent.status["progress"] == first.status["progress"]
    assert silent.status["energy"] == first.status["energy"]


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (0.0, 800.0, []),
        (0.0, 900.0, ["EnergyBudgetNearlySpent"]),
        (900.0, 950.0, []),
        (950.0, 1000.0, ["EnergyBudgetExceeded"]),
        (0.0, 2000.0, ["EnergyBudgetExceeded"]),
        (1000.0, 1200.0, []),
    ],
)
def test_energy_budget_warnings_fire_once_per_crossing(before, after, expected):
    status = running_status(energy={"joules": before, "method": "modelled", "source": "s"})
    result = run(status, [pod(0, "Running"), pod(1, "Running")], progress=energy_progress(after),
                 energy={"budgetJoules": 1000, "onBudgetExceeded": "Warn"})
    assert [r for r in reasons(result) if r.startswith("Energy")] == expected
    assert result.status["phase"] == "Running" and result.spec_patch is None


def test_energy_budget_suspend_patches_the_spec_and_stops_the_pods():
    result = run(running_status(), [pod(0, "Running"), pod(1, "Running")], progress=energy_progress(1500.0),
                 energy={"budgetJoules": 1000, "onBudgetExceeded": "Suspend"})
    assert result.spec_patch == {"runPolicy": {"suspend": True}}
    assert result.status["phase"] == "Suspended"
    assert cond(result.status, "Suspended")["reason"] == "EnergyBudgetExceeded"
    assert set(result.delete_pods) == {"demo-node-0", "demo-node-1"}
    assert result.delete_grace_seconds is None
    # next reconcile: the spec now says suspend; the reason stays
    after = run(result.status, [], run_policy={"suspend": True},
                energy={"budgetJoules": 1000, "onBudgetExceeded": "Suspend"})
    assert after.spec_patch is None and after.events == ()
    assert cond(after.status, "Suspended")["reason"] == "EnergyBudgetExceeded"
    # the spec patch landed, the status write was refused (409) and re-planned: still the budget's reason
    replanned = run(running_status(), [pod(0, "Running"), pod(1, "Running")], progress=energy_progress(1500.0),
                    run_policy={"suspend": True}, energy={"budgetJoules": 1000, "onBudgetExceeded": "Suspend"})
    assert replanned.spec_patch is None
    assert cond(replanned.status, "Suspended")["reason"] == "EnergyBudgetExceeded"


def test_energy_budget_fail_fails_the_job():
    result = run(running_status(), [pod(0, "Running"), pod(1, "Running")], progress=energy_progress(1500.0),
                 energy={"budgetJoules": 1000, "onBudgetExceeded": "Fail"})
    assert result.status["phase"] == "Failed"
    assert cond(result.status, "Failed")["reason"] == "EnergyBudgetExceeded"
    assert set(result.delete_pods) == {"demo-node-0", "demo-node-1"}


# ---------------------------------------------------------------------------------------------- invalid spec
def test_invalid_spec_plan_fails_with_the_field_and_reports_once():
    first = invalid_spec_plan({}, field_path="spec.numNodes", message="must be >= 1", generation=3, now=NOW)
    assert first.status["phase"] == "Failed"
    failed = cond(first.status, "Failed")
    assert failed["reason"] == "InvalidSpec" and failed["message"] == "spec.numNodes: must be >= 1"
    assert first.create == ()
    assert first.status["observedGeneration"] == 3
    assert [e.reason for e in first.events] == ["InvalidSpec"]
    again = invalid_spec_plan(first.status, field_path="spec.numNodes", message="must be >= 1", generation=3, now=NOW)
    assert again.events == ()


def test_fixing_an_invalid_spec_starts_the_job():
    broken = invalid_spec_plan({}, field_path="spec.numNodes", message="bad", generation=1, now=NOW).status
    result = run(broken, [], generation=2)
    assert result.status["phase"] == "Pending"
    assert cond(result.status, "Failed")["status"] == "False"
    assert created_names(result) == ["demo-node-0", "demo-node-1"]
    assert result.status["observedGeneration"] == 2


def test_decide_rejects_a_cross_field_violation_and_creates_nothing():
    manifest = body(num_nodes=3)  # 64 is not divisible by 3 * 16
    outcome, result = decide(manifest, [], existing_children=None, progress=None, now=NOW)
    assert outcome == "invalid"
    assert result.create == ()
    assert cond(result.status, "Failed")["reason"] == "InvalidSpec"
    assert "spec" in cond(result.status, "Failed")["message"]


def test_decide_survives_a_garbage_status():
    manifest = body(status={"phase": "Exploded", "restarts": "many", "conditions": "nope", "energy": {"joules": -1}})
    outcome, result = decide(manifest, [], existing_children=None, progress=None, now=NOW)
    assert outcome == "ok"
    assert result.status["phase"] == "Pending" and result.status["restarts"] == 0


def test_sanitize_status_keeps_valid_fields_only():
    assert sanitize_status({"phase": "Running", "restarts": -3, "bogus": 1})["phase"] == "Running"
    assert sanitize_status({"phase": "Running", "restarts": -3})["restarts"] == 0
    assert sanitize_status("not a dict") == {}
    nested = sanitize_status({"energy": {"joules": 5.0, "method": "modelled", "source": "s", "typo": 1},
                              "conditions": [{"type": "A", "status": "True", "reason": "R"},
                                             {"type": "B", "status": "Maybe", "reason": "R"}]})
    assert nested["energy"]["joules"] == 5.0 and "typo" not in nested["energy"]
    assert [c["type"] for c in nested["conditions"]] == ["A"]


# ---------------------------------------------------------------------------------------------- helpers
def test_set_condition_changes_transition_time_only_on_flips():
    conditions: list[dict] = []
    set_condition(conditions, "Running", True, "A", "a", NOW)
    set_condition(conditions, "Running", True, "B", "b", NOW + dt.timedelta(seconds=5))
    assert conditions[0]["lastTransitionTime"] == format_time(NOW) and conditions[0]["reason"] == "B"
    set_condition(conditions, "Running", False, "C", "c", NOW + dt.timedelta(seconds=9))
    assert conditions[0]["lastTransitionTime"] == format_time(NOW + dt.timedelta(seconds=9))
    set_condition(conditions, "Created", True, "Created", "", NOW)
    assert [c["type"] for c in conditions] == ["Created", "Running"]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ({"a": 1}, {"a": 1}, {}),
        ({"a": 1, "b": 2}, {"a": 1}, {"b": None}),
        ({"a": {"x": 1, "y": 2}}, {"a": {"x": 1, "y": 3}}, {"a": {"y": 3}}),
        ({"a": [1, 2]}, {"a": [1]}, {"a": [1]}),
        ({}, {"a": {"x": 1}}, {"a": {"x": 1}}),
    ],
)
def test_merge_patch(old, new, expected):
    assert merge_patch(old, new) == expected


def test_plan_does_not_mutate_its_inputs():
    status = running_status()
    pods = [pod(0, "Running"), pod(1, "Failed")]
    status_copy, pods_copy = copy.deepcopy(status), copy.deepcopy(pods)
    run(status, pods)
    assert status == status_copy and pods == pods_copy


def test_every_emitted_reason_is_a_stable_reason():
    scenarios = [
        run(None, []),
        run(running_status(), [pod(0, "Running"), pod(1, "Failed")]),
        run(running_status(), [pod(0, "Succeeded"), pod(1, "Running")]),
        run(running_status(), [], run_policy={"suspend": True}),
        run(running_status(), [pod(0, "Running"), pod(1, "Running")], progress=energy_progress(2000.0),
            energy={"budgetJoules": 1000, "onBudgetExceeded": "Fail"}),
    ]
    for result in scenarios:
        for event in result.events:
            assert isinstance(event, EventSpec) and event.reason in REASONS


# ---------------------------------------------------------------------------------------------- ownership (uid)
def owned_by(manifest: dict, uid: str | None) -> dict:
    """The manifest re-owned: by another job uid of the same name, or (None) by nothing at all."""
    manifest = copy.deepcopy(manifest)
    if uid is None:
        manifest["metadata"].pop("ownerReferences", None)
    else:
        for ref in manifest["metadata"]["ownerReferences"]:
            ref["uid"] = uid
    return manifest


def test_a_recreated_job_never_adopts_the_previous_jobs_pods():
    old = [owned_by(pod(0, "Running"), "uid-0"), owned_by(pod(1, "Running"), "uid-0")]
    result = run(None, old)
    assert result.status["phase"] == "Pending"
    assert result.status["replicas"]["active"] == 0 and result.status["nodes"] == "0/2"
    assert set(result.delete_pods) == {"demo-node-0", "demo-node-1"}  # garbage of the deleted job
    assert [c["kind"] for c in result.create] == []  # the names are still taken
    created = cond(result.status, "Created")
    assert created["status"] == "False" and created["reason"] == "NameInUse"
    assert "demo-node-0 is left by a deleted job of the same name" in created["message"]
    # while GC removes them: waiting, never a restart
    terminating = [owned_by(pod(i, "Running", terminating=True), "uid-0") for i in (0, 1)]
    waiting = run(result.status, terminating)
    assert waiting.delete_pods == () and waiting.create == () and waiting.status["restarts"] == 0
    # gone: this job's own gang, attempt 0
    fresh = run(waiting.status, [])
    assert created_names(fresh) == ["demo-node-0", "demo-node-1"]
    assert cond(fresh.status, "Created")["reason"] == "Created"
    assert fresh.status["restarts"] == 0


def test_old_pods_vanishing_from_a_running_job_are_not_a_pod_missing():
    """The emulator-era bug: adopted old pods made the job Running, their GC then burned a restart."""
    status = running_status()
    leftover = owned_by(pod(1, "Failed"), "uid-0")
    leftover["metadata"]["name"] = "demo-node-3"  # a rank of an earlier, larger job of the same name
    result = run(status, [pod(0, "Running"), pod(1, "Running"), leftover])
    assert result.status["phase"] == "Running" and result.status["restarts"] == 0
    assert result.delete_pods == ("demo-node-3",)
    # and the job's own pods gone with only old ones left is a missing pod of THIS job, found by uid
    old_only = run(status, [pod(0, "Running"), owned_by(pod(1, "Running"), "uid-0")])
    assert cond(old_only.status, "Restarting")["reason"] == "PodMissing"


def test_a_pod_of_another_owner_holding_a_name_is_left_alone_and_waited_for():
    result = run(None, [owned_by(pod(1, "Running"), None)])
    assert result.delete_pods == () and result.create == ()
    assert "demo-node-1 is not owned by this job" in cond(result.status, "Created")["message"]
    assert result.status["replicas"]["active"] == 0


def test_a_job_without_uid_owns_everything_labelled_with_its_name():
    manifest = body()
    manifest["metadata"].pop("uid")
    result = plan(parse_job(manifest), [owned_by(pod(0, "Running"), None), owned_by(pod(1, "Running"), "x")],
                  None, NOW, previous_status={}, existing_children=stored_children())
    assert result.status["phase"] == "Running"


def test_invalid_spec_deletes_its_own_and_previous_pods_never_another_owners():
    manifest = body(num_nodes=3)
    pods = [pod(0, "Running"), owned_by(pod(1, "Running"), "uid-0"), owned_by(pod(1, "Running"), None)]
    pods[2]["metadata"]["name"] = "demo-node-7"
    outcome, result = decide(manifest, pods, existing_children=None, progress=None, now=NOW)
    assert outcome == "invalid"
    assert set(result.delete_pods) == {"demo-node-0", "demo-node-1"}


# ---------------------------------------------------------------------------------------------- desired state
def edited_training(**training: Any) -> dict:
    return {"training": {"steps": 100, "selection": {"batchSize": 64, "chunks": 16}, **training}}


def job_with(spec_update: dict) -> Any:
    manifest = body()
    manifest["spec"].update(spec_update)
    return parse_job(manifest)


@pytest.mark.parametrize(
    ("stored", "expected_updates"),
    [
        ("in-sync", []),
        ("old-config", ["ConfigMap"]),
        ("no-hash", ["ConfigMap", "Service"]),  # objects written by an older operator
    ],
)
def test_config_map_and_service_drift_is_patched_back(stored: str, expected_updates: list[str]):
    edited = job_with(edited_training(steps=400, optimizer={"lr": 0.001}))
    children = [build_config_map(edited), build_service(edited)]
    if stored == "old-config":
        children[0] = build_config_map(job())
    elif stored == "no-hash":
        for child in children:
            child["metadata"]["annotations"].clear()
    result = plan(edited, [pod(0, "Running"), pod(1, "Running")], None, NOW, previous_status=running_status(),
                  existing_children=children)
    assert [c["kind"] for c in result.update] == expected_updates
    assert result.create == () and result.delete_pods == ()
    if "ConfigMap" in expected_updates:
        assert '"steps": 400' in result.update[0]["data"]["config.json"]
    assert result.status["phase"] == "Running"  # the running gang is untouched: the next (re)start reads it


def test_unknown_children_are_created_and_not_compared():
    result = plan(job(), [], None, NOW, previous_status={})
    assert [c["kind"] for c in result.create] == ["ConfigMap", "Service", "Pod", "Pod"]
    assert result.update == ()


@pytest.mark.parametrize(
    ("owner", "terminating", "deleted", "message"),
    [
        ("uid-0", False, [("ConfigMap", "demo-config")], "ConfigMap demo-config is left by a deleted job"),
        (None, False, [], "ConfigMap demo-config is not owned by this job"),
        ("uid-1", True, [], "ConfigMap demo-config is being deleted"),
    ],
)
def test_a_config_map_not_ours_blocks_the_pods(owner, terminating, deleted, message):
    config_map = owned_by(build_config_map(job()), owner)
    if terminating:
        config_map["metadata"]["deletionTimestamp"] = format_time(NOW)
    result = run(None, [], existing=[config_map, build_service(job())])
    assert list(result.delete_children) == deleted
    assert [c["kind"] for c in result.create] == []  # a pod must never mount another job's config
    assert message in cond(result.status, "Created")["message"]


# ---------------------------------------------------------------------------------------------- disruptions
def disrupted(index: int, *, phase: str = "Running", terminating: bool = True, attempt: int = 0,
              reason: str = "EvictionByEvictionAPI") -> dict:
    manifest = pod(index, phase, attempt=attempt, terminating=terminating)
    manifest["status"]["conditions"].append(
        {"type": "DisruptionTarget", "status": "True", "reason": reason, "message": "Eviction API: evicting"})
    return manifest


def test_an_evicted_pod_restarts_the_gang_without_counting_against_backoff_limit():
    result = run(running_status(), [pod(0, "Running"), disrupted(1)], run_policy={"backoffLimit": 0})
    assert result.status["phase"] == "Restarting"
    assert result.status["restarts"] == 1 and result.status["disruptions"] == 1
    assert result.restarted is True
    assert result.delete_pods == ("demo-node-0",)  # the evicted one is already terminating
    assert result.delete_grace_seconds is None  # full grace: the gang checkpoints together on SIGTERM
    restarting = cond(result.status, "Restarting")
    assert restarting["reason"] == "PodDisrupted"
    assert "demo-node-1 (rank 1) was evicted or preempted (EvictionByEvictionAPI: Eviction API: evicting)" in (
        restarting["message"])
    assert "not counted against backoffLimit" in restarting["message"]
    assert reasons(result) == ["PodDisrupted"]


@pytest.mark.parametrize(
    ("manifest", "why"),
    [
        (disrupted(1, reason="PreemptionByScheduler"), "PreemptionByScheduler"),
        (disrupted(1, phase="Failed", terminating=False, reason="TerminationByKubelet"), "TerminationByKubelet"),
        (pod(1, "Failed", reason="Evicted", message="The node was low on resource: memory."), "Evicted: The node"),
    ],
)
def test_every_kind_of_disruption_is_recognised(manifest: dict, why: str):
    result = run(running_status(), [pod(0, "Running"), manifest], run_policy={"backoffLimit": 0})
    assert result.status["phase"] == "Restarting" and result.status["disruptions"] == 1
    assert why in cond(result.status, "Restarting")["message"]


def test_rank0_exiting_after_a_disruption_is_not_success():
    """The trainer stops every rank (exit 0) when one gets SIGTERM: that is not the end of training."""
    result = run(running_status(), [pod(0, "Succeeded"), disrupted(1)])
    assert result.status["phase"] == "Restarting"
    assert cond(result.status, "Succeeded") is None


def test_disruptions_do_not_use_up_the_backoff_limit():
    status = running_status(restarts=2, disruptions=2)
    pods = [pod(0, "Running", attempt=2), pod(1, "Failed", attempt=2, reason="Error")]
    result = run(status, pods, run_policy={"backoffLimit": 1})
    assert result.status["phase"] == "Restarting" and result.status["restarts"] == 3
    assert result.status["disruptions"] == 2
    assert "failure 1 of backoffLimit 1" in cond(result.status, "Restarting")["message"]
    status = result.status | {"phase": "Running"}
    again = run(status, [pod(0, "Running", attempt=3), pod(1, "Failed", attempt=3)], run_policy={"backoffLimit": 1})
    assert again.status["phase"] == "Failed"
    assert cond(again.status, "Failed")["reason"] == "BackoffLimitExceeded"


def test_a_disruption_of_an_old_attempt_or_of_another_job_is_ignored():
    status = running_status(restarts=1)
    pods = [pod(0, "Running", attempt=1), pod(1, "Running", attempt=1), disrupted(0, attempt=0)]
    assert run(status, pods).status["phase"] == "Running"
    pods = [pod(0, "Running"), pod(1, "Running")]
    foreign = owned_by(disrupted(1), "uid-0")
    foreign["metadata"]["name"] = "demo-node-5"
    assert run(running_status(), [*pods, foreign]).status.get("disruptions", 0) == 0


def test_suspension_during_a_disruption_suspends():
    result = run(running_status(), [pod(0, "Running"), disrupted(1)], run_policy={"suspend": True})
    assert result.status["phase"] == "Suspended" and result.status.get("disruptions", 0) == 0


# ---------------------------------------------------------------------------------------------- deletion grace
def checkpointed(step: int, checkpoint_step: int) -> TrainerProgress:
    return TrainerProgress(step=step, checkpoint_step=checkpoint_step, checkpoint_path=f"/c/ckpt-{checkpoint_step}")


@pytest.mark.parametrize(
    ("case", "grace"),
    [
        ("failure-restart", SHORT_GRACE_SECONDS),  # the collective is broken: the survivors cannot checkpoint
        ("disruption-restart", None),
        ("suspend-unsaved", None),  # the trainer checkpoints on SIGTERM within its own grace
        ("suspend-saved", SHORT_GRACE_SECONDS),  # the newest step is already on disk
        ("finished-cleanup", SHORT_GRACE_SECONDS),
        ("stale-pods", SHORT_GRACE_SECONDS),
    ],
)
def test_deletion_grace(case: str, grace: int | None):
    running = [pod(0, "Running"), pod(1, "Running")]
    results = {
        "failure-restart": lambda: run(running_status(), [pod(0, "Running"), pod(1, "Failed")]),
        "disruption-restart": lambda: run(running_status(), [pod(0, "Running"), disrupted(1)]),
        "suspend-unsaved": lambda: run(running_status(), running, progress=checkpointed(12, 10),
                                       run_policy={"suspend": True}),
        "suspend-saved": lambda: run(running_status(), running, progress=checkpointed(10, 10),
                                     run_policy={"suspend": True}),
        "finished-cleanup": lambda: run(running_status(), [pod(0, "Succeeded"), pod(1, "Running")]),
        "stale-pods": lambda: run(running_status(restarts=1), [pod(0, "Running"), pod(1, "Running")]),
    }
    result = results[case]()
    assert result.delete_pods, case
    assert result.delete_grace_seconds == grace


# ---------------------------------------------------------------------------------------------- early clean exit
def test_rank0_exiting_zero_before_the_last_step_restarts_the_gang_against_the_backoff_limit():
    """The trainer exits 0 early only after a SIGTERM (it checkpointed); nobody suspended the job, so it was
    stopped from outside: neither Succeeded (the model is not trained) nor Suspended (see judge_gang)."""
    result = run(running_status(), [pod(0, "Succeeded"), pod(1, "Succeeded")],
                 progress=TrainerProgress(step=40, total_steps=100))
    assert result.status["phase"] == "Restarting" and result.restarted and result.status["restarts"] == 1
    assert cond(result.status, "Restarting")["reason"] == "PodFailed"
    assert "exited 0 at step 40 of 100, before the last step" in cond(result.status, "Restarting")["message"]
    assert "Succeeded" not in reasons(result)


def test_an_early_exit_is_judged_by_the_fresh_report_not_an_older_status():
    """A step the status kept from an earlier scrape may be stale: without the exited trainer's own word
    (its termination message) the exit code decides."""
    status = running_status(progress={"step": 40, "totalSteps": 100})
    result = run(status, [pod(0, "Succeeded"), pod(1, "Succeeded")], progress=None)
    assert result.status["phase"] == "Succeeded"
    final = run(status, [pod(0, "Succeeded"), pod(1, "Succeeded")], progress=TrainerProgress(step=100))
    assert final.status["phase"] == "Succeeded"
