"""Entry point of every worker: ``jest-trainer`` == ``python -m jest_trainer.train`` (contract C2).

One step on rank ``r`` of ``W`` (the pieces live in their own modules):

1. **data** — the next super-batch of ``B/W`` pairs from this rank's stream (``pool_stream`` /
   ``data``); its cursor is checkpointed, so a resumed run reads exactly what an uninterrupted one would;
2. **selection** — learner logits (no grad) and reference logits (``reference.ReferenceScorer``:
   online or precomputed embeddings), then ``select_batch`` seeded by ``schedule.selection_generator``;
3. **forward_backward** — ``contrastive_loss`` on the selected ``b/W`` pairs with global negatives (DDP
   averages the gradients; the frozen reference is never wrapped);
4. **optimizer** — AdamW at ``schedule.lr_at(step)``;
5. **checkpoint** — every ``checkpoint.intervalSteps``, at the end, and after SIGTERM (then exit 0).

``loop`` holds the train state, ``train_step`` and ``run``; ``distributed`` the process group and
collectives; ``telemetry`` metrics, progress file, reporter and phase timing; ``evaluate`` zero-shot
accuracy and retrieval recall. This module keeps the public names earlier callers import.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from jest_trainer.config import WorkerConfig
from jest_trainer.distributed import (
    DistContext,
    configure_cpu_threads,
    distributed_env,
    init_distributed,
    shutdown,
)
from jest_trainer.exit_codes import EXIT_DETERMINISTIC, EXIT_INVALID_CONFIG, exit_code_for
from jest_trainer.loop import Prepared, prepare, run
from jest_trainer.reference import ReferenceTrainingInterruptedError
from jest_trainer.schedule import lr_at, selection_generator, shard_indices, super_batch_positions
from jest_trainer.telemetry import PHASES, StopFlag, report_stopped_before_training, signal_handlers

log = logging.getLogger("jest_trainer.train")

__all__ = [
    "PHASES",
    "DistContext",
    "Prepared",
    "configure_cpu_threads",
    "distributed_env",
    "init_distributed",
    "lr_at",
    "main",
    "prepare",
    "selection_generator",
    "shard_indices",
    "super_batch_positions",
    "train",
    "zero_shot_accuracy",
]


def zero_shot_accuracy(model: Any, test: Any, class_prompts: list[list[str]], *, device: Any) -> float:
    """Zero-shot accuracy of ``model`` on an in-memory ``PairTable`` of pixels in [0, 1] (converted to model input)."""
    from jest_trainer.evaluate import zero_shot_accuracy as accuracy
    from jest_trainer.models import to_model_input

    return accuracy(model, to_model_input(test.images, model.image_spec), test.labels, class_prompts, device=device)


def train(
    config: WorkerConfig,
    *,
    env: Mapping[str, str] | None = None,
    ctx: DistContext | None = None,
    prepared: Prepared | None = None,
    install_signal_handlers: bool = True,
    stop_flag: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the training described by ``config``; returns a summary of this rank's run.

    ``env`` defaults to ``os.environ`` (C2 variables); ``ctx`` to ``init_distributed(env)`` (the process
    group is then destroyed on return); ``prepared`` lets the benchmark share data and reference across
    methods. ``stop_flag`` is an extra stop request (tests), polled at step boundaries like SIGTERM.
    Summary keys: ``completed_steps``, ``total_steps``, ``stopped``, ``resumed_from_step``, ``method``,
    ``reference_mode``, ``world_size``, ``final_accuracy``, ``retrieval`` ({direction: {k: recall}}),
    ``eval_history`` ([step, accuracy, cumulative total FLOPs]), ``flops``, ``flops_per_step``,
    ``selected_mix``, ``pool_mix``, ``phase_seconds``, ``selection_arithmetic_seconds``, ``step_seconds``,
    ``selection_overhead_fraction``, ``data_wait_fraction``, ``samples_skipped``, ``examples_trained``,
    ``examples_scored``, ``loss``, ``energy``, ``checkpoint``.
    A stop requested while the reference is still training ends the run before step 0 with only
    ``completed_steps`` (0), ``total_steps``, ``stopped``, ``resumed_from_step``, ``final_accuracy`` and
    ``checkpoint`` (None): there is nothing to checkpoint yet.
    """
    env = os.environ if env is None else env
    flag = StopFlag(stop_flag)
    # Installed before the (possibly long) set-up, so a SIGTERM during data loading or reference training
    # also ends in a checkpoint at the first step boundary and exit 0.
    with signal_handlers(flag, install_signal_handlers):
        own_ctx = ctx is None
        ctx = init_distributed(env) if ctx is None else ctx
        if own_ctx:
            configure_cpu_threads(env, ctx)
        try:
            return run(config, env=env, ctx=ctx, prepared=prepared, stop=flag)
        except ReferenceTrainingInterruptedError as interrupted:
            log.warning("stop requested while training the reference (%s): exiting before step 0", interrupted)
            report_stopped_before_training(env, ctx, total_steps=config.training.steps,
                                           checkpoint_dir=Path(config.training.checkpoint.dir))
            return {"completed_steps": 0, "total_steps": config.training.steps, "stopped": True,
                    "resumed_from_step": None, "final_accuracy": None, "checkpoint": None}
        finally:
            if own_ctx:
                shutdown(ctx)


def _stop_note(summary: Mapping[str, Any]) -> str:
    if not summary["stopped"]:
        return ""
    if summary["checkpoint"] is None:
        return " (stopped by signal before the first step; no checkpoint needed)"
    return f" (stopped by signal, checkpoint {summary['checkpoint']['path']})"


def main(argv: list[str] | None = None) -> int:
    """CLI: ``jest-trainer [--config PATH]`` (default ``$JEST_CONFIG``); exit codes: :mod:`jest_trainer.exit_codes`."""
    parser = argparse.ArgumentParser(prog="jest-trainer", description="JEST contrastive training worker")
    parser.add_argument(
        "--config", default=os.environ.get("JEST_CONFIG"), help="WorkerConfig JSON (default $JEST_CONFIG)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s [rank " +
        os.environ.get("RANK", "0") + "] %(name)s: %(message)s"
    )
    if not args.config:
        print("jest-trainer: no config: pass --config PATH or set JEST_CONFIG", file=sys.stderr)
        return EXIT_INVALID_CONFIG
    try:
        config = WorkerConfig.model_validate_json(Path(args.config).read_text())
    except FileNotFoundError:
        print(f"jest-trainer: config file {args.config} does not exist", file=sys.stderr)
        return EXIT_INVALID_CONFIG
    except ValueError as error:
        print(f"jest-trainer: invalid config {args.config}: {error}", file=sys.stderr)
        return EXIT_INVALID_CONFIG
    try:
        summary = train(config)
    except Exception as error:
        log.exception("training failed")
        code = exit_code_for(error)
        kind = "deterministic, not worth a retry" if code == EXIT_DETERMINISTIC else "a restart may cure it"
        # the last line is what a pod's termination message (log tail) and the job's status end with
        print(f"jest-trainer: error ({kind}; exit code {code}): {type(error).__name__}: {error}", file=sys.stderr)
        return code
    log.info(
        "done: %d/%d steps, final accuracy %s%s",
        summary["completed_steps"],
        summary["total_steps"],
        summary["final_accuracy"],
        _stop_note(summary),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
