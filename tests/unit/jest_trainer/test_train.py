"""The training loop's pure pieces (LR schedule, seeding, sharding, FLOPs) and short in-process runs."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from jest_trainer import flops as flops_mod
from jest_trainer import train as train_mod
from jest_trainer.config import EnergyConfig, TrainingConfig, WorkerConfig

# --- LR schedule -----------------------------------------------------------------------------------


def test_lr_warms_up_linearly_then_decays_by_cosine() -> None:
    lrs = [train_mod.lr_at(step, total_steps=100, peak_lr=1.0, warmup_steps=10) for step in range(100)]
    assert lrs[:10] == pytest.approx([(step + 1) / 10 for step in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(later <= earlier for earlier, later in itertools.pairwise(lrs[10:]))
    assert 0.0 < lrs[-1] < 0.001


def test_lr_without_warmup_starts_at_peak() -> None:
    assert train_mod.lr_at(0, total_steps=10, peak_lr=0.3, warmup_steps=0) == pytest.approx(0.3)


def test_lr_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="steps"):
        train_mod.lr_at(0, total_steps=0, peak_lr=1.0, warmup_steps=0)
    with pytest.raises(ValueError, match="step"):
        train_mod.lr_at(-1, total_steps=10, peak_lr=1.0, warmup_steps=0)


# --- seeding and sharding --------------------------------------------------------------------------


def test_selection_generator_is_reproducible_and_distinct_per_step_and_rank() -> None:
    def draw(seed: int, step: int, rank: int) -> torch.Tensor:
        return torch.rand(4, generator=train_mod.selection_generator(seed, step, rank))

    assert torch.equal(draw(0, 5, 1), draw(0, 5, 1))
    assert not torch.equal(draw(0, 5, 1), draw(0, 5, 0))
    assert not torch.equal(draw(0, 5, 1), draw(0, 6, 1))
    assert not torch.equal(draw(0, 5, 1), draw(1, 5, 1))


def test_shards_are_disjoint_and_cover_the_pool() -> None:
    shards = [train_mod.shard_indices(103, world_size=3, rank=rank, seed=7) for rank in range(3)]
    together = torch.cat(shards)
    assert sorted(together.tolist()) == list(range(103))
    assert {len(shard) for shard in shards} == {34, 35}


def test_super_batches_walk_epochs_without_repeats_inside_an_epoch() -> None:
    positions = [
        train_mod.super_batch_positions(10, local_super_batch=4, step=step, seed=3, rank=0) for step in range(5)
    ]
    stream = torch.cat(positions).tolist()
    assert sorted(stream[:10]) == list(range(10))
    assert sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]
    again = train_mod.super_batch_positions(10, local_super_batch=4, step=3, seed=3, rank=0)
    assert torch.equal(again, positions[3])


def test_super_batch_larger_than_the_shard_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="super-batch"):
        train_mod.super_batch_positions(10, local_super_batch=11, step=0, seed=0, rank=0)


def test_distributed_env_parses_and_names_bad_variables() -> None:
    assert train_mod.distributed_env({}) == (1, 0, 0)
    assert train_mod.distributed_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}) == (4, 2, 0)
    with pytest.raises(ValueError, match="RANK"):
        train_mod.distributed_env({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        train_mod.distributed_env({"WORLD_SIZE": "two"})


def test_tpu_without_torch_xla_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="torch_xla"):
        train_mod.init_distributed({"PJRT_DEVICE": "TPU"})


def test_multi_process_env_without_master_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        train_mod.init_distributed({"WORLD_SIZE": "2", "RANK": "0"})


# --- FLOPs accounting ------------------------------------------------------------------------------


def test_step_flops_count_training_and_what_each_method_scores() -> None:
    forward = {"image": 1000.0, "text": 500.0}
    kwargs = {"forward_per_example": forward, "embed_dim": 8, "local_batch": 4, "global_batch": 8,
              "local_super_batch": 20}
    jest = flops_mod.step_flops(method="jest", **kwargs)
    assert jest["train"] == 3 * (4 * 1500 + 2 * 4 * 8 * 8)
    assert jest["selection_learner"] == 20 * 1500 + 2 * 20 * 20 * 8
    assert jest["selection_reference"] == 2 * 20 * 20 * 8
    uniform = flops_mod.step_flops(method="uniform", **kwargs)
    assert uniform["train"] == jest["train"]
    assert uniform["selection_learner"] == uniform["selection_reference"] == 0
    assert flops_mod.step_flops(method="hard_learner", **kwargs)["selection_reference"] == 0
    assert flops_mod.step_flops(method="easy_reference", **kwargs)["selection_learner"] == 0
    assert flops_mod.total_flops(jest) == sum(jest.values())


def test_step_flops_reject_inconsistent_sizes() -> None:
    with pytest.raises(ValueError, match="batch"):
        flops_mod.step_flops(method="jest", forward_per_example={"image": 1, "text": 1}, embed_dim=4,
                             local_batch=8, global_batch=8, local_super_batch=4)


# --- short in-process runs (real tiny model, digits pool, single process) ---------------------------
# Each run takes 1-3 s; the shared fixture (digits data + a 20-step reference) takes 5-20 s on a busy
# 2-core machine, hence ``slow``.

SINGLE = train_mod.DistContext(world_size=1, rank=0, local_rank=0, backend=None, device=torch.device("cpu"))
PLAIN = {"JEST_PROGRESS": "plain", "JEST_JOB_NAME": "unit"}


def _config(checkpoint_dir: Path, *, steps: int = 6, method: str = "jest") -> WorkerConfig:
    training = TrainingConfig.model_validate(
        {
            "steps": steps,
            "seed": 3,
            "reference": {"train": {"steps": 20}},
            "selection": {"method": method, "batchSize": 32, "chunks": 4, "filterRatio": 0.8},
            "optimizer": {"lr": 2e-3, "warmupSteps": 2},
            "checkpoint": {"dir": str(checkpoint_dir), "intervalSteps": 2, "keep": 2},
            "eval": {"intervalSteps": 3},
        }
    )
    return WorkerConfig(training=training, energy=EnergyConfig(backend="modelled"))


@pytest.fixture(scope="module")
def prepared() -> train_mod.Prepared:
    from jest_trainer.data import load_digits_demo
    from jest_trainer.reference import build_reference

    cfg = _config(Path("/unused")).training
    demo = load_digits_demo(cfg.data.noise, seed=cfg.seed)
    reference = build_reference(cfg, demo.curated, image_shape=demo.pool.image_shape, device=SINGLE.device)
    return train_mod.Prepared(reference=reference, image_shape=demo.pool.image_shape)


def _run(config: WorkerConfig, prepared: train_mod.Prepared, **kwargs) -> dict:
    return train_mod.train(
        config, env=PLAIN, ctx=SINGLE, prepared=prepared, install_signal_handlers=False, **kwargs
    )


def _stop_after(steps: int):
    polls = iter(range(10_000))
    return lambda: next(polls) >= steps


@pytest.mark.slow
def test_resume_gives_identical_parameters_to_an_uninterrupted_run(tmp_path: Path, prepared) -> None:
    whole = _run(_config(tmp_path / "whole"), prepared)
    first = _run(_config(tmp_path / "split"), prepared, stop_flag=_stop_after(3))
    assert first["stopped"] and first["completed_steps"] == 3
    assert first["checkpoint"]["step"] == 3
    second = _run(_config(tmp_path / "split"), prepared)
    assert second["resumed_from_step"] == 3 and second["completed_steps"] == 6
    a = torch.load(tmp_path / "whole" / "ckpt-00000006.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "ckpt-00000006.pt", weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["counters"] == b["counters"]
    assert whole["selected_mix"] == second["selected_mix"]
    assert whole["eval_history"] == second["eval_history"]


@pytest.mark.slow
def test_progress_file_follows_the_contract(tmp_path: Path, prepared) -> None:
    summary = _run(_config(tmp_path), prepared)
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["phase"] == "Succeeded"
    assert progress["step"] == progress["totalSteps"] == 6
    assert progress["examplesTrained"] == 6 * 32
    assert progress["examplesScored"] == 6 * 160
    assert progress["observedSelectionRatio"] == pytest.approx(0.2)
    assert progress["lastEvalAccuracy"] == summary["final_accuracy"]
    assert 0 <= progress["lastEvalAccuracy"] <= 1
    assert progress["examplesPerSecond"] > 0 and progress["stepSeconds"] > 0
    assert 0 < progress["selectionOverheadFraction"] < 1
    assert progress["energy"]["method"] == "modelled"
    assert progress["energy"]["source"] == "config:modelledWattsPerDevice"
    assert progress["energy"]["joules"] > 0
    assert progress["checkpoint"]["step"] == 6
    assert Path(progress["checkpoint"]["path"]).name == "ckpt-00000006.pt"
    assert progress["resumedFromStep"] is None and progress["worldSize"] == 1 and progress["attempt"] == 0
    assert progress["updatedAt"].endswith("Z")
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == ["ckpt-00000004.pt", "ckpt-00000006.pt"]


@pytest.mark.slow
def test_a_clean_exit_leaves_the_final_figures_as_termination_message(tmp_path: Path, prepared) -> None:
    """What the operator reads of a worker that exited between scrapes: the last step and its energy."""
    from jest_operator.progress import combine_ranks, parse_metrics

    message = tmp_path / "termination-log"
    env = {**PLAIN, "JEST_TERMINATION_MESSAGE_PATH": str(message)}
    train_mod.train(_config(tmp_path / "run"), env=env, ctx=SINGLE, prepared=prepared, install_signal_handlers=False)
    final = combine_ranks({0: parse_metrics(message.read_text())}, total_steps=6)
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert final is not None and final.step == 6 and final.examples_trained == 6 * 32
    assert final.energy_joules == pytest.approx(progress["energy"]["joules"]) and final.energy_joules > 0
    assert final.energy_method == "modelled" and final.checkpoint_step == 6
    assert "jest_job_train_examples_total" in message.read_text()  # rank 0's job totals, read in preference
    assert final.average_watts == pytest.approx(progress["energy"]["averageWatts"], rel=0.05)

    message.unlink()
    polls = iter(range(10_000))

    def fail_mid_run() -> bool:
        if next(polls) >= 2:
            raise RuntimeError("worker lost")
        return False

    with pytest.raises(RuntimeError, match="worker lost"):
        train_mod.train(_config(tmp_path / "failing"), env=env, ctx=SINGLE, prepared=prepared,
                        install_signal_handlers=False, stop_flag=fail_mid_run)
    assert json.loads((tmp_path / "failing" / "progress.json").read_text())["phase"] == "Failed"
    assert not message.exists()  # a failure leaves the message to FallbackToLogsOnError (the error)


@pytest.mark.slow
def test_a_corrupted_newest_checkpoint_is_skipped_on_resume(tmp_path: Path, prepared) -> None:
    _run(_config(tmp_path, steps=4), prepared)
    (tmp_path / "ckpt-00000004.pt").write_bytes(b"torn write")
    summary = _run(_config(tmp_path, steps=4), prepared)
    assert summary["resumed_from_step"] == 2
    assert summary["completed_steps"] == 4


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path: Path, prepared) -> None:
    from jest_trainer.checkpoint import save_checkpoint

    save_checkpoint(tmp_path, 2, {"step": 2, "model": {"other.weight": torch.zeros(3)}, "optimizer": {}}, keep=1)
    with pytest.raises(ValueError, match=r"training\.checkpoint\.dir"):
        _run(_config(tmp_path, steps=4), prepared)
    progress = json.loads((tmp_path / "progress.json").read_text()) if (tmp_path / "progress.json").exists() else None
    assert progress is None or progress["phase"] == "Failed"


@pytest.mark.slow
def test_rich_progress_bar_and_plain_lines(tmp_path: Path, prepared, capsys, caplog) -> None:
    rich_env = {**PLAIN, "JEST_PROGRESS": "rich"}
    train_mod.train(_config(tmp_path / "rich", steps=2), env=rich_env, ctx=SINGLE, prepared=prepared,
                    install_signal_handlers=False)
    assert "JEST" in capsys.readouterr().err
    with caplog.at_level("INFO", logger="jest_trainer.train"):
        _run(_config(tmp_path / "plain", steps=2), prepared)
    assert "step 2/2 loss" in caplog.text
    with pytest.raises(ValueError, match="JEST_PROGRESS"):
        train_mod.train(_config(tmp_path / "bad", steps=2), env={"JEST_PROGRESS": "fancy"}, ctx=SINGLE,
                        prepared=prepared, install_signal_handlers=False)


@pytest.mark.slow
def test_a_missing_native_kernel_is_reported_once_and_training_still_runs(
    tmp_path: Path, prepared, caplog, monkeypatch
) -> None:
    from jest_trainer import native

    with caplog.at_level("WARNING", logger="jest_trainer.train"):
        _run(_config(tmp_path / "native", steps=2), prepared)
    assert "native CPU kernel" not in caplog.text
    monkeypatch.setattr(native, "KERNEL", None)
    with caplog.at_level("WARNING", logger="jest_trainer.train"):
        summary = _run(_config(tmp_path / "fallback", steps=2), prepared)
    assert caplog.text.count("native CPU kernel was not built") == 1
    assert summary["completed_steps"] == 2


@pytest.mark.slow
def test_flops_and_counters_accumulate_per_step(tmp_path: Path, prepared) -> None:
    jest = _run(_config(tmp_path / "jest", steps=2), prepared)
    uniform = _run(_config(tmp_path / "uniform", steps=2, method="uniform"), prepared)
    assert jest["flops"]["train"] == pytest.approx(2 * jest["flops_per_step"]["train"])
    assert jest["flops"]["train"] == pytest.approx(uniform["flops"]["train"])
    assert jest["flops"]["selection_learner"] > 0 and jest["flops"]["selection_reference"] > 0
    assert uniform["flops"]["selection_learner"] == uniform["flops"]["selection_reference"] == 0
    assert sum(jest["selected_mix"].values()) == 2 * 32
    assert jest["eval_history"][0][0] == 0 and jest["eval_history"][-1][0] == 2


@pytest.mark.slow
def test_debug_dump_allows_recomputing_the_selection(tmp_path: Path, prepared) -> None:
    from jest_trainer.selection import select_batch

    dump = tmp_path / "dump"
    train_mod.train(_config(tmp_path / "ck", steps=4), env={**PLAIN, "JEST_DEBUG_DUMP_DIR": str(dump)}, ctx=SINGLE,
                    prepared=prepared, install_signal_handlers=False)
    assert sorted(p.name for p in dump.iterdir()) == [
        "params-rank0.pt", "sel-step0-rank0.pt", "sel-step1-rank0.pt", "sel-step2-rank0.pt"
    ]
    record = torch.load(dump / "sel-step1-rank0.pt", weights_only=True)
    again = select_batch(
        record["method"], learner_logits=record["learner_logits"], reference_logits=record["reference_logits"],
        loss=record["loss"], batch_size=record["batch_size"], n_chunks=record["chunks"],
        generator=train_mod.selection_generator(record["seed"], record["step"], record["rank"]),
    )
    assert torch.equal(again, record["selected"])
    assert len(record["candidate_keys"]) == 160


def test_cpu_threads_are_split_between_ranks_sharing_this_host() -> None:
    before = torch.get_num_threads()
    two_ranks = train_mod.DistContext(world_size=2, rank=0, local_rank=0, backend="gloo", device=torch.device("cpu"))
    try:
        threads = train_mod.configure_cpu_threads({"MASTER_ADDR": "127.0.0.1"}, two_ranks)
        assert threads is not None and threads >= 1
        assert torch.get_num_threads() == threads
        assert train_mod.configure_cpu_threads({"MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "3"}, two_ranks) is None
        assert train_mod.configure_cpu_threads({"MASTER_ADDR": "job-node-0.job.ns.svc"}, two_ranks) is None
        assert train_mod.configure_cpu_threads({"MASTER_ADDR": "127.0.0.1"}, SINGLE) is None
    finally:
        torch.set_num_threads(before)


# --- the selection benchmark's arithmetic and CLI ----------------------------------------------------


def test_steps_to_reach_interpolates_on_the_mean_curve() -> None:
    from jest_trainer.benchmark import mean_curve, steps_to_reach

    curve = mean_curve([[[0, 0.1, 0], [10, 0.5, 1], [20, 0.7, 2]], [[0, 0.1, 0], [10, 0.3, 1], [20, 0.9, 2]]])
    assert curve == [[0.0, pytest.approx(0.1)], [10.0, pytest.approx(0.4)], [20.0, pytest.approx(0.8)]]
    assert steps_to_reach(curve, 0.6) == pytest.approx(15.0)
    assert steps_to_reach(curve, 0.05) == 0.0
    assert steps_to_reach(curve, 0.95) is None


def test_summarise_reports_speedups_mixes_and_overhead() -> None:
    from jest_trainer.benchmark import summarise

    def run(curve, per_step_flops, mix, arithmetic=0.0):
        return {"final_accuracy": curve[-1][1], "eval_history": [[s, a, 0.0] for s, a in curve],
                "selected_mix": mix, "flops": {"train": 10.0 * per_step_flops, "selection_learner": 0.0,
                                               "selection_reference": 0.0, "total": 10.0 * per_step_flops},
                "selection_arithmetic_seconds": arithmetic, "step_seconds": 2.0}

    runs = {
        "uniform": [run([[0, 0.1], [5, 0.3], [10, 0.5]], 1.0, {"clean": 2, "wrong": 8})],
        "jest": [run([[0, 0.1], [5, 0.7], [10, 0.8]], 3.0, {"clean": 6, "wrong": 4}, arithmetic=0.2)],
    }
    document = summarise(runs, filter_ratio=0.8, steps=10, seeds=[7], reference_accuracy=[0.9],
                         pool_mix={"clean": 0.2, "wrong": 0.8})
    assert set(document) == {"filter_ratio", "steps", "seeds", "pool_mix", "reference_accuracy", "methods",
                             "speedup", "selection_overhead_fraction"}
    assert set(document["speedup"]) == {"iterations_to_uniform_final", "flops_to_uniform_final"}
    jest_needed = 5 * (0.5 - 0.1) / (0.7 - 0.1)
    assert document["speedup"]["iterations_to_uniform_final"] == pytest.approx(10 / jest_needed)
    assert document["speedup"]["flops_to_uniform_final"] == pytest.approx(10.0 / (jest_needed * 3.0))
    assert document["methods"]["jest"]["selected_mix"]["clean"] == pytest.approx(0.6)
    assert document["methods"]["jest"]["selected_mix"]["junk"] == 0.0
    assert document["selection_overhead_fraction"] == pytest.approx(0.1)
    assert document["pool_mix"] == {"clean": 0.2, "wrong": 0.8, "junk": 0.0, "duplicate": 0.0}


@pytest.mark.slow
def test_benchmark_cli_writes_the_documented_json_and_plot(tmp_path: Path) -> None:
    from jest_trainer.benchmark import main

    out, png = tmp_path / "selection.json", tmp_path / "selection.png"
    code = main(["selection", "--seeds", "1", "--seed-offset", "5", "--filter-ratio", "0.5", "--steps", "4",
                 "--eval-every", "2", "--methods", "jest,uniform", "--set", "reference.train.steps=5",
                 "--out", str(out), "--plot", str(png)])
    assert code == 0
    document = json.loads(out.read_text())
    assert document["filter_ratio"] == 0.5 and document["steps"] == 4 and document["seeds"] == [5]
    assert set(document["methods"]) == {"jest", "uniform"}
    jest = document["methods"]["jest"]
    assert [point[0] for point in jest["curve"]] == [0.0, 2.0, 4.0]
    assert set(jest["flops"]) == {"train", "selection_learner", "selection_reference", "total"}
    assert document["methods"]["uniform"]["flops"]["selection_learner"] == 0
    assert 0 < document["selection_overhead_fraction"] < 1
    assert png.stat().st_size > 10_000


def test_benchmark_rejects_unknown_methods(tmp_path: Path) -> None:
    from jest_trainer.benchmark import main

    assert main(["selection", "--methods", "jest,magic", "--out", str(tmp_path / "x.json")]) == 2


def test_a_stop_during_reference_training_reports_step_0_so_the_gang_sees_an_early_stop(tmp_path: Path) -> None:
    """Exit 0 before step 0 must not read as a finished run: the progress file (jestctl) and the termination
    message (operator) both say step 0 of the total, which the gang's judge takes for an early stop."""
    from jest_operator.local import trainer_progress
    from jest_operator.progress import combine_ranks, parse_metrics
    from jest_operator.status import stopped_early

    message = tmp_path / "termination-log"
    env = {**PLAIN, "JEST_TERMINATION_MESSAGE_PATH": str(message), "JEST_ATTEMPT": "1"}
    summary = train_mod.train(_config(tmp_path / "run"), env=env, ctx=SINGLE, install_signal_handlers=False,
                              stop_flag=lambda: True)  # the reference trains first: the stop lands there
    assert summary["stopped"] and summary["completed_steps"] == 0
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert (progress["step"], progress["totalSteps"], progress["attempt"]) == (0, 6, 1)
    assert stopped_early(trainer_progress(progress), 6)
    assert stopped_early(combine_ranks({0: parse_metrics(message.read_text())}, total_steps=6), 6)
