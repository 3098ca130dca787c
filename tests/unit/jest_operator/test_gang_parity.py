"""One gang state machine: the operator and ``jestctl run`` give the same phase for the same observations.

Each row describes one moment of a 2-node gang attempt once: how each rank stands (running, or its exit
code and last stderr line), what rank 0 last reported (step of :data:`TOTAL`, energy), the restarts so far,
the time active and the run policy. The row is then observed the way each side observes it:

* the operator: builder pods with a kubelet's status (exit code, reason, termination message: the trainer's
  final Prometheus summary on a clean exit, its last log line on a failure), read by the operator's own
  :func:`jest_operator.progress.read_progress` (termination messages, a scrape of a running rank 0), then
  :func:`jest_operator.status.plan`;
* ``jestctl run``: process exit codes (negative for a signal), stderr tails and rank 0's progress file,
  judged by :func:`jest_operator.local.judge_local_gang` under :meth:`GangRunner.policy` (the stop request
  standing for ``spec.runPolicy.suspend``).

Both must reach the same phase and reason, and for failures the same message (the same culprit named).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from jest_operator import progress as progress_module
from jest_operator.api import parse_job
from jest_operator.builders import build_children, build_config_map, build_pod, build_service
from jest_operator.local import GangRunner, judge_local_gang, observe_process, trainer_progress
from jest_operator.status import Plan, TrainerProgress, format_time, plan, stopped_early

NOW = dt.datetime(2026, 11, 29, 12, 0, 0, tzinfo=dt.UTC)
TOTAL = 100
RUNNING = None
METRICS_URL = "http://rank-0.test/metrics"


@dataclass(frozen=True)
class Case:
    """One observation of a 2-node gang attempt, and the phase and reason both sides must give.

    ``ranks``: per rank, None while it runs, else its exit code (negative: killed by that signal);
    ``stderr``: per rank, its last stderr line; ``step``/``joules``: rank 0's last report (None: none).
    """

    ranks: tuple[int | None, ...]
    phase: str
    reason: str
    step: int | None = None
    joules: float | None = None
    stderr: tuple[str, ...] = ("", "")
    restarts: int = 0
    backoff_limit: int = 2
    suspend: bool = False
    active_seconds: float = 10.0
    deadline: int | None = None
    budget: float | None = None
    on_budget: str = "Warn"
    policy: dict[str, Any] = field(default_factory=dict)


LOST_PEER = "jest-trainer: error (a restart may cure it; exit code 1): DistBackendError: peer closed"
BAD_FIELD = "jest-trainer: error (deterministic, not worth a retry; exit code 3): ValueError: batchSize: 36"

CASES: dict[str, Case] = {
    "all running": Case((RUNNING, RUNNING), "Running", "AllPodsRunning", step=40),
    "all running, nothing reported yet": Case((RUNNING, RUNNING), "Running", "AllPodsRunning"),
    "rank 1 done first, rank 0 still trains": Case((RUNNING, 0), "Pending", "PodsPending", step=99),
    "rank 0 finished, rank 1 finished": Case((0, 0), "Succeeded", "Succeeded", step=TOTAL),
    "rank 0 finished, rank 1 still exiting": Case((0, RUNNING), "Succeeded", "Succeeded", step=TOTAL),
    "rank 0 exited 0 with no report": Case((0, 0), "Succeeded", "Succeeded"),
    "retryable failure under the backoff limit": Case((RUNNING, 1), "Restarting", "PodFailed",
                                                      stderr=("", LOST_PEER), step=40),
    "worker killed by SIGKILL": Case((RUNNING, -9), "Restarting", "PodFailed", stderr=("", "Killed")),
    "rank 0 finished but rank 1 failed": Case((0, 1), "Restarting", "PodFailed", step=TOTAL,
                                              stderr=("", LOST_PEER)),
    "retryable failure, backoff limit reached": Case((RUNNING, 1), "Failed", "BackoffLimitExceeded",
                                                     stderr=("", LOST_PEER), restarts=2),
    "non-retryable exit 3 fails at once": Case((RUNNING, 3), "Failed", "NonRetryableError", stderr=("", BAD_FIELD),
                                               backoff_limit=5),
    "non-retryable exit 2 (bad config) fails at once": Case((2, RUNNING), "Failed", "NonRetryableError",
                                                            stderr=("jest-trainer: invalid config", "")),
    "non-retryable beats a retryable peer": Case((1, 3), "Failed", "NonRetryableError",
                                                 stderr=(LOST_PEER, BAD_FIELD)),
    "early exit 0, no suspension: restart from the checkpoint": Case((0, 0), "Restarting", "PodFailed", step=40),
    "early exit 0 at step 0": Case((0, 0), "Restarting", "PodFailed", step=0),
    "early exit 0, backoff limit reached": Case((0, 0), "Failed", "BackoffLimitExceeded", step=40, restarts=2),
    "early exit 0 after a suspension request": Case((0, 0), "Suspended", "Suspended", step=40, suspend=True),
    "suspension while running": Case((RUNNING, RUNNING), "Suspended", "Suspended", step=40, suspend=True),
    "suspension beats a failure": Case((RUNNING, 1), "Suspended", "Suspended", stderr=("", LOST_PEER),
                                       suspend=True),
    "success beats a suspension": Case((0, 0), "Succeeded", "Succeeded", step=TOTAL, suspend=True),
    "deadline exceeded": Case((RUNNING, RUNNING), "Failed", "DeadlineExceeded", step=40, active_seconds=120,
                              deadline=60),
    "deadline beats a failure": Case((RUNNING, 1), "Failed", "DeadlineExceeded", stderr=("", LOST_PEER),
                                     active_seconds=120, deadline=60),
    "deadline not reached": Case((RUNNING, RUNNING), "Running", "AllPodsRunning", active_seconds=30, deadline=60),
    "success beats the deadline": Case((0, 0), "Succeeded", "Succeeded", step=TOTAL, active_seconds=120,
                                       deadline=60),
    "energy budget spent, Suspend": Case((RUNNING, RUNNING), "Suspended", "EnergyBudgetExceeded", step=40,
                                         joules=1500.0, budget=1000.0, on_budget="Suspend"),
    "energy budget spent, Fail": Case((RUNNING, RUNNING), "Failed", "EnergyBudgetExceeded", step=40,
                                      joules=1500.0, budget=1000.0, on_budget="Fail"),
    "energy budget spent, Warn": Case((RUNNING, RUNNING), "Running", "AllPodsRunning", step=40, joules=1500.0,
                                      budget=1000.0, on_budget="Warn"),
    "energy budget not spent": Case((RUNNING, RUNNING), "Running", "AllPodsRunning", step=40, joules=900.0,
                                    budget=1000.0, on_budget="Fail"),
}


def manifest(case: Case) -> dict[str, Any]:
    run_policy: dict[str, Any] = {"backoffLimit": case.backoff_limit, "suspend": case.suspend}
    if case.deadline is not None:
        run_policy["activeDeadlineSeconds"] = case.deadline
    energy: dict[str, Any] = {"onBudgetExceeded": case.on_budget}
    if case.budget is not None:
        energy["budgetJoules"] = case.budget
    return {
        "apiVersion": "jest.training/v1alpha1",
        "kind": "JESTTrainingJob",
        "metadata": {"name": "demo", "namespace": "default", "uid": "uid-1", "generation": 1},
        "spec": {
            "image": "jest-trainer:0.1.0",
            "numNodes": len(case.ranks),
            "training": {"steps": TOTAL, "selection": {"batchSize": 64, "chunks": 16}},
            "runPolicy": run_policy,
            "energy": energy,
        },
    }


def exposition(case: Case) -> str:
    """Rank 0's figures as the trainer exposes them (and writes as its termination message on a clean exit)."""
    lines = []
    if case.step is not None:
        lines += ["# TYPE jest_train_steps_total counter", f'jest_train_steps_total{{rank="0"}} {case.step}']
    if case.joules is not None:
        lines += ["# TYPE jest_energy_consumed_joules_total counter",
                  f'jest_energy_consumed_joules_total{{method="modelled",source="config"}} {case.joules}']
    return "".join(f"{line}\n" for line in lines)


# -------------------------------------------------------------------------------------- the operator's view
def operator_pods(case: Case, job: Any) -> list[dict]:
    """The gang's pods as the API server returns them, for the row's rank states."""
    pods = []
    for index, code in enumerate(case.ranks):
        pod = build_pod(job, index, attempt=case.restarts)
        if code is None:
            pod["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}],
                             "containerStatuses": [{"name": "trainer", "state": {"running": {}}}]}
            if index == 0 and (case.step is not None or case.joules is not None):
                pod["metadata"].setdefault("annotations", {})[progress_module.METRICS_URL_ANNOTATION] = METRICS_URL
        else:
            # a kubelet reports a signal as 128 + n; a clean exit's message is the trainer's summary, a failed
            # one's its log tail (FallbackToLogsOnError)
            message = (exposition(case) if index == 0 else "") if code == 0 else case.stderr[index]
            terminated = {"exitCode": code if code >= 0 else 128 - code,
                          "reason": "Completed" if code == 0 else "Error", "message": message}
            pod["status"] = {"phase": "Succeeded" if code == 0 else "Failed",
                             "conditions": [{"type": "Ready", "status": "False"}],
                             "containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}]}
        pods.append(pod)
    return pods


def operator_plan(case: Case) -> Plan:
    job = parse_job(manifest(case))
    pods = operator_pods(case, job)
    report = progress_module.read_progress(
        pods, total_steps=TOTAL, fetch=lambda url, timeout: exposition(case) if url == METRICS_URL else None)
    started = format_time(NOW - dt.timedelta(seconds=case.active_seconds))
    previous = {"phase": "Running", "restarts": case.restarts, "startTime": started,
                "conditions": [{"type": "Running", "status": "True", "reason": "AllPodsRunning",
                                "message": "all 2 worker pod(s) are running", "lastTransitionTime": started}]}
    return plan(job, pods, report, NOW, previous_status=previous,
                existing_children=[build_config_map(job), build_service(job)])


def operator_outcome(result: Plan) -> tuple[str, str, str]:
    """(phase, reason, message) of the condition the new phase raised."""
    status = result.status
    phase = status["phase"]
    condition_type = {"Pending": "Running", "Running": "Running"}.get(phase, phase)
    condition = next((c for c in status.get("conditions", []) if c["type"] == condition_type), None)
    if condition is None:
        return phase, "", ""
    return phase, condition["reason"], condition["message"]


# -------------------------------------------------------------------------------------- jestctl's view
def local_verdict(case: Case, tmp_path: Path):
    job = parse_job(manifest(case))
    runner = GangRunner(job=job, build_children=build_children, workdir=tmp_path,
                        backoff_limit=job.spec.run_policy.backoff_limit,
                        active_deadline_seconds=job.spec.run_policy.active_deadline_seconds,
                        budget_joules=job.spec.energy.budget_joules,
                        on_budget_exceeded=job.spec.energy.on_budget_exceeded)
    if case.suspend:
        runner.stop.set()  # jestctl's Ctrl-C / SIGTERM: its spec.runPolicy.suspend
    progress_file: dict[str, Any] | None = None
    if case.step is not None or case.joules is not None:
        progress_file = {"phase": "Succeeded" if case.step == TOTAL else "Running", "totalSteps": TOTAL,
                         "attempt": case.restarts}
        if case.step is not None:
            progress_file["step"] = case.step
        if case.joules is not None:
            progress_file["energy"] = {"joules": case.joules, "method": "modelled", "source": "config"}
    names = {index: f"demo-node-{index}" for index in range(len(case.ranks))}
    return judge_local_gang(
        runner.policy(len(case.ranks)), dict(enumerate(case.ranks)), progress_file, attempt=case.restarts,
        restarts=case.restarts, active_seconds=case.active_seconds, names=names,
        stderr_tails={index: (line,) for index, line in enumerate(case.stderr)})


# -------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", list(CASES))
def test_operator_and_jestctl_give_the_same_phase(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    phase, reason, message = operator_outcome(operator_plan(case))
    verdict = local_verdict(case, tmp_path)
    assert (phase, reason) == (case.phase, case.reason), f"operator: {message}"
    assert (verdict.phase, verdict.reason) == (case.phase, case.reason), f"jestctl: {verdict.message}"
    if case.phase in ("Failed", "Restarting"):
        assert message == verdict.message  # the same culprit, named the same way


def test_an_early_clean_exit_names_the_step_on_both_sides(tmp_path: Path) -> None:
    case = CASES["early exit 0, no suspension: restart from the checkpoint"]
    _, _, message = operator_outcome(operator_plan(case))
    expected = "pod demo-node-0 (rank 0) exited 0 at step 40 of 100, before the last step"
    assert expected in message and expected in local_verdict(case, tmp_path).message


def test_a_restart_recreates_the_gang_with_the_next_attempt() -> None:
    result = operator_plan(CASES["early exit 0, no suspension: restart from the checkpoint"])
    assert result.restarted and result.status["restarts"] == 1
    assert set(result.delete_pods) == {"demo-node-0", "demo-node-1"}


# -------------------------------------------------------------------------------------- the mappings
@pytest.mark.parametrize(
    ("code", "phase", "exit_code", "message"),
    [(None, "Running", None, ""), (0, "Succeeded", 0, ""), (1, "Failed", 1, "peer closed"),
     (3, "Failed", 3, "peer closed"), (-9, "Failed", 137, "peer closed"), (-15, "Failed", 143, "peer closed")],
)
def test_a_local_process_is_observed_like_its_pod(code, phase, exit_code, message) -> None:
    observed = observe_process(1, code, name="demo-node-1", attempt=2, stderr_tail=("Traceback", "peer closed", ""))
    assert (observed.name, observed.index, observed.attempt) == ("demo-node-1", 1, 2)
    assert (observed.phase, observed.exit_code, observed.message) == (phase, exit_code, message)
    assert observed.disruption is None and not observed.terminating


def test_a_failed_process_without_stderr_is_described_by_its_exit() -> None:
    assert observe_process(0, -9).message == "signal SIGKILL"


def test_the_progress_file_is_read_as_the_trainer_report() -> None:
    report = trainer_progress({"phase": "Running", "step": 7, "totalSteps": 10, "examplesTrained": 448,
                               "energy": {"joules": 12.5, "method": "integrated", "source": "rapl"},
                               "checkpoint": {"step": 5, "path": "/w/ckpt-00000005.pt"}})
    assert report == TrainerProgress(step=7, total_steps=10, examples_trained=448.0, energy_joules=12.5,
                                     energy_method="integrated", energy_source="rapl", checkpoint_step=5,
                                     checkpoint_path="/w/ckpt-00000005.pt")
    assert trainer_progress(None) is None and trainer_progress({}) is None
    assert trainer_progress({"step": True, "totalSteps": "10"}) == TrainerProgress()


@pytest.mark.parametrize(
    ("report", "total", "early"),
    [(None, 10, False), (TrainerProgress(), 10, False), (TrainerProgress(step=3), 10, True),
     (TrainerProgress(step=10), 10, False), (TrainerProgress(step=3, total_steps=3), 10, False),
     (TrainerProgress(step=3), None, False)],
)
def test_stopped_early_needs_a_step_below_the_total(report, total, early) -> None:
    assert stopped_early(report, total) is early
