"""Tests of ``jestctl``: summaries (pure), manifest loading, and the commands that need no trainer
(validate, render, run on a bad manifest), run in-process through ``main(argv)``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from jest_operator.cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    ManifestError,
    build_summary,
    energy_text,
    failed_summary,
    load_job_documents,
    main,
    summary_rows,
)

MANIFEST = {
    "apiVersion": "jest.training/v1alpha1",
    "kind": "JESTTrainingJob",
    "metadata": {"name": "tiny", "namespace": "default"},
    "spec": {
        "image": "jest-trainer:test",
        "numNodes": 2,
        "numProcPerNode": 1,
        "accelerator": {"type": "cpu"},
        "runPolicy": {"backoffLimit": 2},
        "training": {
            "model": {"arch": "tiny", "embedDim": 16},
            "selection": {"method": "jest", "filterRatio": 0.5, "chunks": 4, "batchSize": 32, "loss": "sigmoid"},
            "steps": 20,
            "checkpoint": {"dir": "/checkpoints", "intervalSteps": 5},
        },
    },
}

PROGRESS = {
    "phase": "Succeeded", "step": 20, "totalSteps": 20, "examplesTrained": 640, "examplesScored": 1280,
    "observedSelectionRatio": 0.5, "lastEvalAccuracy": 0.4125, "loss": 1.5, "examplesPerSecond": 321.5,
    "stepSeconds": 0.1, "selectionOverheadFraction": 0.3,
    "energy": {"joules": 1234.5, "averageWatts": 30.0, "method": "modelled", "source": "config:modelledWattsPerDevice"},
    "checkpoint": {"step": 20, "path": "/w/checkpoints/ckpt-00000020.pt", "time": "t"}, "resumedFromStep": 10,
    "worldSize": 2, "attempt": 1, "updatedAt": "t",
}


def write_manifest(tmp_path: Path, document: dict | list[dict], name: str = "job.yaml") -> Path:
    path = tmp_path / name
    documents = document if isinstance(document, list) else [document]
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return path


# -------------------------------------------------------------------------------------------- pure parts


def test_build_summary_takes_counters_from_rank0_progress() -> None:
    result = SimpleNamespace(phase="Succeeded", restarts=1, progress=PROGRESS, wall_seconds=12.34567,
                             message="all 2 workers succeeded", resume_seconds=[4.56789])
    assert build_summary(result, world_size=2) == {
        "phase": "Succeeded", "world_size": 2, "steps": 20, "restarts": 1, "resumed_from_step": 10,
        "final_accuracy": 0.4125, "examples_trained": 640, "examples_scored": 1280,
        "energy": {"joules": 1234.5, "method": "modelled", "source": "config:modelledWattsPerDevice"},
        "examples_per_second": 321.5, "retrieval": None, "samples_skipped": None, "reference_mode": None,
        "data_wait_fraction": None, "configuration": None, "wall_seconds": 12.346, "restart_to_resume_seconds": [4.568],
        "message": "all 2 workers succeeded",
    }


def test_build_summary_without_progress_reports_nulls() -> None:
    result = SimpleNamespace(phase="Failed", restarts=2, progress=None, wall_seconds=1.0, message="boom")
    summary = build_summary(result, world_size=2)
    assert summary["steps"] is None and summary["energy"] == {"joules": None, "method": None, "source": None}
    assert summary["message"] == "boom" and summary["restarts"] == 2


def test_failed_summary_has_every_key_of_a_run_summary() -> None:
    result = SimpleNamespace(phase="Failed", restarts=0, progress=None, wall_seconds=0.0, message="x")
    assert failed_summary("x").keys() == build_summary(result, world_size=1).keys()


def test_energy_text_labels_modelled_figures() -> None:
    assert energy_text(PROGRESS["energy"]) == "1.23 kJ (modelled: config:modelledWattsPerDevice; not measured)"
    assert energy_text({"joules": 12.0, "method": "measured", "source": "nvml"}) == "12.0 J (measured: nvml)"
    assert energy_text({}) == "not reported"


def test_summary_rows_format_accuracy_counts_and_throughput() -> None:
    result = SimpleNamespace(phase="Succeeded", restarts=0, progress=PROGRESS, wall_seconds=3.0, message="")
    rows = dict(summary_rows(build_summary(result, world_size=2)))
    assert rows["final accuracy (zero-shot)"] == "41.2%"
    assert rows["examples trained"] == "640" and rows["examples scored"] == "1,280"
    assert rows["throughput"] == "321.5 examples/s trained"
    assert "modelled" in rows["energy"]


def test_load_job_documents_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read"):
        load_job_documents(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("spec: [unclosed\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_job_documents(tmp_path / "bad.yaml")
    other = write_manifest(tmp_path, {"apiVersion": "v1", "kind": "ConfigMap"}, "other.yaml")
    with pytest.raises(ManifestError, match="no JESTTrainingJob"):
        load_job_documents(other)


def test_load_job_documents_picks_jobs_from_multi_document_files(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, [{"apiVersion": "v1", "kind": "Namespace"}, MANIFEST, MANIFEST])
    assert len(load_job_documents(path)) == 2


# ------------------------------------------------------------------------------------ validate / render


def test_validate_accepts_a_good_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(write_manifest(tmp_path, MANIFEST))]) == EXIT_OK
    assert "'tiny' is valid (world size 2)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("spec.training.selection.filterRatio=1.0", "filterRatio"),
        ("spec.training.selection.batchSize=36", "batchSize"),
        ("spec.training.stepz=3", "stepz"),
        ("spec.numNodes=two", "numNodes"),
    ],
)
def test_validate_names_the_bad_field(tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str,
                                      field: str) -> None:
    path = write_manifest(tmp_path, MANIFEST)
    assert main(["validate", str(path), "--set", override]) == EXIT_FAILED
    assert field in capsys.readouterr().err


def test_validate_reports_what_the_admission_policy_would_refuse(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The chart's default policy, then an admin's values file that allows Secrets but no ServiceAccounts."""
    manifest = {**MANIFEST, "spec": {**MANIFEST["spec"], "podTemplate": {
        "serviceAccountName": "trainer",
        "volumes": [{"name": "creds", "secret": {"secretName": "creds"}}],
        "volumeMounts": [{"name": "creds", "mountPath": "/creds"}]}}}
    path = write_manifest(tmp_path, manifest)
    assert main(["validate", str(path)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "would be refused by the admission policy: spec.podTemplate.volumes: creds (secret)" in err
    assert "serviceAccountName" not in err

    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"admissionPolicy": {"allowedVolumeTypes": ["secret"],
                                                          "allowServiceAccountName": False}}))
    assert main(["validate", str(path), "--admission-values", str(values)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "spec.podTemplate.serviceAccountName:" in err and "volumes" not in err

    values.write_text(yaml.safe_dump({"admissionPolicy": {"enabled": False}}))
    assert main(["validate", str(path), "--admission-values", str(values)]) == EXIT_OK
    values.write_text(yaml.safe_dump({"admissionPolicy": {"allowedVolumeTypes": ["hostPath"]}}))
    assert main(["validate", str(path), "--admission-values", str(values)]) == EXIT_USAGE
    assert "admissionPolicy.allowedVolumeTypes" in capsys.readouterr().err


def test_render_prints_the_builders_children(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", str(write_manifest(tmp_path, MANIFEST)), "--attempt", "2"]) == EXIT_OK
    children = list(yaml.safe_load_all(capsys.readouterr().out))
    kinds = sorted(child["kind"] for child in children)
    assert kinds == ["ConfigMap", "Pod", "Pod", "Service"]
    pod = next(child for child in children if child["kind"] == "Pod")
    env = {item["name"]: item.get("value") for item in pod["spec"]["containers"][0]["env"]}
    assert env["JEST_ATTEMPT"] == "2"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("spec.training.selection.filterRatio=1", "filterRatio"),
        ("spec.training.selection.chunks=3", "chunks"),
        ("spec.training.selection.batchSize=20", "batchSize"),
        ("spec.unknownField=1", "unknownField"),
        ("spec.training.steps=many", "steps"),
    ],
)
def test_run_stops_on_a_bad_manifest_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            override: str, field: str) -> None:
    workdir = tmp_path / "work"
    summary_path = tmp_path / "summary.json"
    code = main(["run", str(write_manifest(tmp_path, MANIFEST)), "--workdir", str(workdir), "--no-progress",
                 "--json", str(summary_path), "--set", override])
    assert code == EXIT_USAGE
    error = capsys.readouterr().err
    assert field in error and "'tiny'" in error
    assert not workdir.exists()
    summary = json.loads(summary_path.read_text())
    assert summary["phase"] == "Failed" and field in summary["message"]


def test_run_rejects_a_malformed_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(write_manifest(tmp_path, MANIFEST)), "--set", "spec.training.steps"])
    assert code == EXIT_USAGE
    assert "key.path=value" in capsys.readouterr().err


def test_jestctl_startup_does_not_import_torch() -> None:
    code = ("import sys; from jest_operator import cli; cli.build_parser(); "
            "import jest_operator.api, jest_operator.builders, jest_operator.local; "
            "print('torch' in sys.modules)")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "False"


def test_parse_env_flags() -> None:
    from jest_operator.cli import parse_env_flags

    assert parse_env_flags(["JEST_DEBUG_DUMP_DIR=/tmp/d", "A_1=x=y"]) == {"JEST_DEBUG_DUMP_DIR": "/tmp/d", "A_1": "x=y"}
    for bad in ("NOVALUE", "=x", "1A=x", "A-B=x"):
        with pytest.raises(ManifestError, match="NAME=VALUE"):
            parse_env_flags([bad])


def test_crds_writes_the_generated_crd(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from jest_operator.crd import CRD_FILE_NAME, render_crd_yaml

    assert main(["crds", "--out", str(tmp_path / "crds")]) == EXIT_OK
    assert (tmp_path / "crds" / CRD_FILE_NAME).read_text() == render_crd_yaml()
    assert CRD_FILE_NAME in capsys.readouterr().out


def test_bench_selection_forwards_to_the_trainer_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["bench", "selection", "--help"])
    assert caught.value.code == 0
    help_text = capsys.readouterr().out
    assert "--filter-ratio" in help_text and "--seeds" in help_text


def test_bench_scaling_forwards_to_the_bench_script(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["bench", "scaling", "--help"])
    assert caught.value.code == 0
    assert "--workers" in capsys.readouterr().out


@pytest.mark.slow
def test_data_digits_writes_readable_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from jest_trainer.data import read_webdataset

    assert main(["data", "digits", "--out", str(tmp_path), "--shard-size", "5000"]) == EXIT_OK
    patterns = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert set(patterns) == {"pool", "curated", "test"}
    assert len(read_webdataset(patterns["test"])) > 100
    assert main(["data", "digits", "--out", str(tmp_path), "--wrong", "0.9", "--junk", "0.5"]) == EXIT_USAGE


def test_scaling_benchmark_summarises_scraped_phase_totals(repo_root: Path) -> None:
    import runpy

    scaling = runpy.run_path(str(repo_root / "bench" / "scaling.py"), run_name="jest_bench_scaling")
    totals = {"phase:selection": 3.0, "phase:forward_backward": 1.0, "phase:optimizer": 1.0, "phase:data": 0.0,
              "jest_step_duration_seconds_sum": 5.0, "jest_step_duration_seconds_count": 10.0}
    rank = scaling["summarise_rank"](totals)
    assert rank["steps_observed"] == 10 and rank["step_seconds"] == pytest.approx(0.5)
    assert rank["selection_fraction"] == pytest.approx(0.6)
    run = {"ranks": {"0": rank, "1": {**rank, "step_seconds": 1.0}}}
    assert scaling["_training_seconds"](run) == pytest.approx(0.4)


def test_load_job_documents_reads_exponent_numbers_as_kubectl_does(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        "apiVersion: jest.training/v1alpha1\nkind: JESTTrainingJob\nspec:\n  energy: {budgetJoules: 3.6e9}\n"
    )
    (job,) = load_job_documents(path)
    assert job["spec"]["energy"]["budgetJoules"] == 3.6e9
