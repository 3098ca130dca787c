"""Benchmarks of the training loop: ``selection`` compares the five selection methods on the digits pool.

Every method trains through the very same ``jest_trainer.train.train`` function (single process, in
process), with the same seeds, the same data and the same frozen reference per seed — only
``selection.method`` differs, so any gap between methods is the selection's doing. The reference is
trained once per seed and shared by all methods of that seed.

Output (``--out``): JSON with the per-seed final accuracies, the mean accuracy curve (per evaluated
step), the mix of noise kinds each method selected, the analytic FLOPs per kind, the speed-up of JEST
over uniform in iterations and in FLOPs to reach uniform's final mean accuracy (linear interpolation on
JEST's mean curve; ``null`` when JEST never reaches it), and the measured fraction of a JEST step spent
in the selection arithmetic (``select_batch`` only: scoring forwards are counted as FLOPs instead).
``--plot`` writes accuracy vs step and vs FLOPs per method (matplotlib, Agg backend).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jest_trainer.config import SELECTION_METHODS, EnergyConfig, TrainingConfig, WorkerConfig

log = logging.getLogger(__name__)

NOISE_KINDS: tuple[str, ...] = ("clean", "wrong", "junk", "duplicate")

# Benchmark defaults, tuned once for all methods alike (never per method): a noisy web-like pool
# (majority wrong digits, some junk, near-duplicates), b = 64 trained pairs per step, 16 chunks.
DEFAULT_STEPS = 300
DEFAULT_EVAL_EVERY = 10
BENCH_TRAINING: dict[str, Any] = {
    "model": {"arch": "tiny", "embedDim": 64},
    "reference": {"train": {"steps": 300, "batchSize": 64, "lr": 2e-3}},
    "data": {"source": "digits", "noise": {"wrong": 0.5, "junk": 0.15, "duplicate": 0.15}},
    "selection": {"method": "jest", "filterRatio": 0.8, "chunks": 16, "batchSize": 64, "loss": "sigmoid"},
    "optimizer": {"lr": 2e-3, "weightDecay": 1e-4, "warmupSteps": 10},
}


def bench_config(
    *, method: str, seed: int, filter_ratio: float, steps: int, eval_every: int, checkpoint_dir: str,
    overrides: dict[str, Any] | None = None,
) -> TrainingConfig:
    """The ``TrainingConfig`` of one benchmark run (same for every method except ``selection.method``)."""
    document = json.loads(json.dumps(BENCH_TRAINING))
    for key, value in (overrides or {}).items():
        node = document
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    document["selection"].update({"method": method, "filterRatio": filter_ratio})
    document.update(
        {
            "steps": steps,
            "seed": seed,
            "eval": {"intervalSteps": eval_every},
            "checkpoint": {"dir": checkpoint_dir, "intervalSteps": steps, "keep": 1},
        }
    )
    return TrainingConfig.model_validate(document)


def steps_to_reach(curve: Sequence[Sequence[float]], target: float) -> float | None:
    """First (interpolated) step at which a mean accuracy curve ``[[step, acc], ...]`` reaches ``target``.

    Linear interpolation between consecutive evaluations; ``None`` when the curve never reaches it.
    """
    previous: Sequence[float] | None = None
    for point in curve:
        step, accuracy = float(point[0]), float(point[1])
        if accuracy >= target:
            if previous is None or previous[1] >= accuracy:
                return step
            prev_step, prev_acc = float(previous[0]), float(previous[1])
            return prev_step + (target - prev_acc) * (step - prev_step) / (accuracy - prev_acc)
        previous = (step, accuracy)
    return None


def mean_curve(histories: Sequence[Sequence[Sequence[float]]]) -> list[list[float]]:
    """Mean accuracy per evaluated step over seeds (only steps every seed evaluated)."""
    by_step: dict[float, list[float]] = {}
    for history in histories:
        for row in history:
            by_step.setdefault(float(row[0]), []).append(float(row[1]))
    complete = [(step, values) for step, values in sorted(by_step.items()) if len(values) == len(histories)]
    return [[step, statistics.fmean(values)] for step, values in complete]


def jest_steps_to_uniform_final(methods_doc: dict[str, Any]) -> float | None:
    """Interpolated step at which JEST's mean curve reaches uniform's final mean accuracy (None if never)."""
    target = methods_doc["uniform"]["curve"][-1][1]
    return steps_to_reach(methods_doc["jest"]["curve"], target)


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def run_selection(
    *,
    seeds: int,
    seed_offset: int,
    filter_ratio: float,
    steps: int,
    methods: Sequence[str],
    eval_every: int = DEFAULT_EVAL_EVERY,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every method on every seed and return the benchmark document (see the module docstring)."""

    from jest_trainer.data import load_eval_set
    from jest_trainer.distributed import single_process
    from jest_trainer.evaluate import evaluate
    from jest_trainer.preprocess import build_image_transform
    from jest_trainer.reference import reference_model_config
    from jest_trainer.train import prepare, train

    unknown = [method for method in methods if method not in SELECTION_METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; expected a subset of {SELECTION_METHODS}")
    ctx = single_process("cpu")
    env = {"JEST_PROGRESS": "plain", "JEST_JOB_NAME": "bench"}
    energy = WorkerConfig(energy=EnergyConfig(backend="modelled")).energy
    runs: dict[str, list[dict[str, Any]]] = {method: [] for method in methods}
    reference_accuracy: list[float] = []
    pool_mix: dict[str, float] = {}
    for seed in range(seed_offset, seed_offset + seeds):
        with tempfile.TemporaryDirectory(prefix="jest-bench-") as workdir:
            base = bench_config(
                method=methods[0], seed=seed, filter_ratio=filter_ratio, steps=steps, eval_every=eval_every,
                checkpoint_dir=workdir, overrides=overrides,
            )
            prepared = prepare(base, ctx, cache_dir=None)
            reference = prepared.reference
            transform = build_image_transform(reference_model_config(base), base.data, train=False,
                                              image_spec=reference.image_spec)
            eval_set = load_eval_set(base, transform=transform, tokenizer=reference.tokenizer)
            ref_acc = evaluate(reference, eval_set, device=ctx.device)[0]
            reference_accuracy.append(ref_acc)
            for method in methods:
                run_dir = Path(workdir) / method
                cfg = bench_config(
                    method=method, seed=seed, filter_ratio=filter_ratio, steps=steps, eval_every=eval_every,
                    checkpoint_dir=str(run_dir), overrides=overrides,
                )
                summary = train(
                    WorkerConfig(training=cfg, energy=energy), env=env, ctx=ctx, prepared=prepared,
                    install_signal_handlers=False,
                )
                pool_mix = summary["pool_mix"]
                runs[method].append(summary)
                log.warning(
                    "f=%.2f seed %d %-18s final accuracy %.3f (reference %.3f)",
                    filter_ratio, seed, method, summary["final_accuracy"], ref_acc,
                )
    return summarise(
        runs, filter_ratio=filter_ratio, steps=steps, seeds=list(range(seed_offset, seed_offset + seeds)),
        reference_accuracy=reference_accuracy, pool_mix=pool_mix,
    )


def summarise(
    runs: dict[str, list[dict[str, Any]]],
    *,
    filter_ratio: float,
    steps: int,
    seeds: list[int],
    reference_accuracy: list[float],
    pool_mix: dict[str, float],
) -> dict[str, Any]:
    """Fold per-run training summaries into the benchmark JSON document (pure)."""
    methods_doc: dict[str, Any] = {}
    for method, summaries in runs.items():
        counts = {kind: 0 for kind in NOISE_KINDS}
        for summary in summaries:
            for kind, count in summary["selected_mix"].items():
                counts[kind] = counts.get(kind, 0) + int(count)
        total_selected = sum(counts.values()) or 1
        flops = {
            kind: statistics.fmean(summary["flops"][kind] for summary in summaries)
            for kind in ("train", "selection_learner", "selection_reference", "total")
        }
        methods_doc[method] = {
            "final_accuracy": [summary["final_accuracy"] for summary in summaries],
            "curve": mean_curve([summary["eval_history"] for summary in summaries]),
            "selected_mix": {kind: count / total_selected for kind, count in counts.items()},
            "flops": flops,
        }
    speedup: dict[str, float | None] = {"iterations_to_uniform_final": None, "flops_to_uniform_final": None}
    if "uniform" in methods_doc and "jest" in methods_doc:
        uniform, jest = methods_doc["uniform"], methods_doc["jest"]
        needed = jest_steps_to_uniform_final(methods_doc)
        if needed is not None and needed > 0:
            speedup["iterations_to_uniform_final"] = uniform["curve"][-1][0] / needed
            jest_flops_per_step = jest["flops"]["total"] / steps
            speedup["flops_to_uniform_final"] = uniform["flops"]["total"] / (needed * jest_flops_per_step)
    overhead = None
    if "jest" in runs:
        arithmetic = sum(summary["selection_arithmetic_seconds"] for summary in runs["jest"])
        step_time = sum(summary["step_seconds"] for summary in runs["jest"])
        overhead = arithmetic / step_time if step_time > 0 else None
    return {
        "filter_ratio": filter_ratio,
        "steps": steps,
        "seeds": seeds,
        "pool_mix": {kind: pool_mix.get(kind, 0.0) for kind in NOISE_KINDS},
        "reference_accuracy": reference_accuracy,
        "methods": methods_doc,
        "speedup": speedup,
        "selection_overhead_fraction": overhead,
    }


def print_table(document: dict[str, Any]) -> None:
    """Print the per-method results as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"JEST selection benchmark, f = {document['filter_ratio']}, {document['steps']} steps, "
                        f"seeds {document['seeds']}")
    for column in ("method", "final accuracy", "clean selected", "GFLOPs total", "GFLOPs / step"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for method, result in document["methods"].items():
        accuracies = result["final_accuracy"]
        table.add_row(
            method,
            f"{statistics.fmean(accuracies):.3f} ± {_std(accuracies):.3f}",
            f"{result['selected_mix']['clean']:.2f}",
            f"{result['flops']['total'] / 1e9:,.1f}",
            f"{result['flops']['total'] / document['steps'] / 1e9:.3f}",
        )
    console = Console(width=120)
    console.print(table)
    reference = document["reference_accuracy"]
    console.print(f"pool mix {document['pool_mix']}; reference accuracy {statistics.fmean(reference):.3f}")
    console.print(f"speed-up of JEST over uniform: {document['speedup']}")
    if "uniform" in document["methods"] and "jest" in document["methods"]:
        console.print(
            f"uniform's final mean accuracy {document['methods']['uniform']['curve'][-1][1]:.3f} is reached by "
            f"JEST at step {jest_steps_to_uniform_final(document['methods'])}"
        )
    console.print(f"selection arithmetic fraction of a JEST step: {document['selection_overhead_fraction']}")


def plot(document: dict[str, Any], path: Path) -> None:
    """Accuracy vs step and vs cumulative FLOPs, one line per method (Agg backend, PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_step, by_flops) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, result in document["methods"].items():
        steps = [point[0] for point in result["curve"]]
        accuracy = [point[1] for point in result["curve"]]
        by_step.plot(steps, accuracy, label=method)
        per_step = result["flops"]["total"] / document["steps"]
        after_start = [(step * per_step, acc) for step, acc in zip(steps, accuracy, strict=True) if step > 0]
        by_flops.plot([x for x, _ in after_start], [y for _, y in after_start], label=method)
    by_step.set_xlabel("training step")
    by_flops.set_xlabel("cumulative FLOPs (training + selection)")
    by_flops.set_xscale("log")
    for axis in (by_step, by_flops):
        axis.set_ylabel(f"zero-shot accuracy (mean of {len(document['seeds'])} seeds)")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"JEST vs baselines on the noisy digits pool, filter ratio {document['filter_ratio']}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key.path=value, got {item!r}")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return overrides


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m jest_trainer.benchmark selection --seeds N --filter-ratio F --out results.json``."""
    parser = argparse.ArgumentParser(prog="jest-bench", description="JEST training benchmarks")
    commands = parser.add_subparsers(dest="command", required=True)
    selection = commands.add_parser("selection", help="compare selection methods on the digits pool")
    selection.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    selection.add_argument("--seed-offset", type=int, default=0, help="first seed (default 0)")
    selection.add_argument("--filter-ratio", type=float, default=0.8, help="fraction discarded (default 0.8)")
    selection.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"steps per run (default {DEFAULT_STEPS})")
    selection.add_argument("--eval-every", type=int, default=DEFAULT_EVAL_EVERY, help="evaluation interval in steps")
    selection.add_argument("--methods", default=",".join(SELECTION_METHODS), help="comma-separated methods")
    selection.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="override a training field for every method, e.g. optimizer.lr=0.003")
    selection.add_argument("--out", type=Path, required=True, help="JSON output path")
    selection.add_argument("--plot", type=Path, default=None, help="PNG output path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    methods = [method.strip() for method in args.methods.split(",") if method.strip()]
    try:
        document = run_selection(
            seeds=args.seeds, seed_offset=args.seed_offset, filter_ratio=args.filter_ratio, steps=args.steps,
            methods=methods, eval_every=args.eval_every, overrides=_parse_overrides(args.set),
        )
    except ValueError as error:
        print(f"jest-bench: {error}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print_table(document)
    if args.plot is not None:
        plot(document, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
