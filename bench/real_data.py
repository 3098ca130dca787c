"""Selection on a real image-text data set, trained through the product path (``jestctl run``).

Why: the digits demo is ours; this benchmark checks that the built-in towers learn on real RGB pictures
with real captions (Noto Color Emoji glyphs named by Unicode, written to WebDataset shards by
``bench/real_data_shards.py``) and whether JEST still saves iterations there. Every run is a
``JESTTrainingJob`` manifest run by ``jestctl run`` (``data.source: webdataset``, streaming, loader workers,
resize + centre crop to ``model.imageSize``), exactly as a user would run it; only
``selection.method`` differs between the runs of one seed.

Per seed, JEST runs first and trains the reference on the curated shards (``reference.train.urls``); the
other methods load that very reference (``reference.checkpoint``), so every method of a seed is scored
against the same frozen model, as in ``jestctl bench selection``. The learning curves come from the final
checkpoint's counters (``eval_history``), the headline numbers from ``jestctl run --json``.

Output: JSON (``--out``) with per-seed final zero-shot accuracies, mean +- std, mean curves, chance level,
the reference's accuracy, the noise mix each method selected, and JEST's iterations to uniform's final mean
accuracy (linear interpolation, ``jest_trainer.benchmark.steps_to_reach``); PNG (``--plot``) of the curves.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_METHODS: tuple[str, ...] = ("jest", "uniform", "learnability_topk")
NOISE_KINDS: tuple[str, ...] = ("clean", "wrong", "junk", "duplicate")
MEANINGFUL_OVER_CHANCE = 2.0  # below this multiple of chance, uniform has not learned and speed-ups are noise
log = logging.getLogger("bench.real_data")


def job_manifest(*, name: str, method: str, seed: int, urls: Mapping[str, str], steps: int, eval_every: int,
                 filter_ratio: float, batch_size: int, chunks: int, image_size: int, loader_workers: int,
                 reference_steps: int, reference_checkpoint: str | None = None) -> dict[str, Any]:  # fmt: skip
    """The ``JESTTrainingJob`` of one run (pure). Only ``method``, ``seed`` and the reference source vary."""
    reference: dict[str, Any] = (
        {"checkpoint": reference_checkpoint}
        if reference_checkpoint
        else {"train": {"steps": reference_steps, "batchSize": 64, "lr": 2.0e-3, "urls": urls["curated"]}}
    )
    return {
        "apiVersion": "jest.training/v1alpha1",
        "kind": "JESTTrainingJob",
        "metadata": {"name": name},
        "spec": {
            "image": "ghcr.io/jest-operator/jest-trainer:0.1.0",
            "numNodes": 1,
            "numProcPerNode": 1,
            "accelerator": {"type": "cpu"},
            "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
            "training": {
                "model": {"arch": "tiny", "embedDim": 64, "imageSize": image_size},
                "reference": reference,
                "data": {"source": "webdataset", "urls": urls["pool"], "evalUrls": urls["test"],
                         "loaderWorkers": loader_workers},
                "selection": {"method": method, "filterRatio": filter_ratio, "chunks": chunks,
                              "batchSize": batch_size, "loss": "sigmoid"},
                "optimizer": {"lr": 2.0e-3, "weightDecay": 1.0e-4, "warmupSteps": 10},
                "steps": steps,
                "seed": seed,
                "checkpoint": {"dir": "/checkpoints", "intervalSteps": steps, "keep": 1},
                "eval": {"intervalSteps": eval_every},
            },
            "energy": {"backend": "modelled", "modelledWattsPerDevice": 65},
            "runPolicy": {"backoffLimit": 0},
        },
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: Mapping[str, Sequence[Mapping[str, Any]]], *, n_classes: int,
              reference_accuracy: Sequence[float]) -> dict[str, Any]:  # fmt: skip
    """Fold the per-run records (``final_accuracy``, ``eval_history``, ``selected_mix``, ...) into results (pure).

    ``iterations_to_uniform_final`` is uniform's last evaluated step over the (interpolated) step at which
    JEST's mean curve first reaches uniform's final mean accuracy; None when it never does.
    """
    from jest_trainer.benchmark import mean_curve, steps_to_reach

    methods: dict[str, Any] = {}
    for method, records in runs.items():
        finals = [float(record["final_accuracy"]) for record in records]
        mean, std = mean_std(finals)
        counts = dict.fromkeys(NOISE_KINDS, 0)
        for record in records:
            for kind, count in record.get("selected_mix", {}).items():
                counts[kind] = counts.get(kind, 0) + int(count)
        total = sum(counts.values()) or 1
        methods[method] = {
            "final_accuracy": finals,
            "mean": mean,
            "std": std,
            "curve": mean_curve([record["eval_history"] for record in records]),
            "selected_mix": {kind: count / total for kind, count in counts.items()},
            "wall_seconds": [record.get("wall_seconds") for record in records],
            "data_wait_fraction": [record.get("data_wait_fraction") for record in records],
            "samples_skipped": [record.get("samples_skipped") for record in records],
        }
    chance = 1.0 / n_classes
    speedup: dict[str, Any] = {"uniform_final": None, "jest_steps_to_uniform_final": None,
                               "iterations_to_uniform_final": None}  # fmt: skip
    if "uniform" in methods and "jest" in methods and methods["uniform"]["curve"]:
        last_step, target = methods["uniform"]["curve"][-1]
        needed = steps_to_reach(methods["jest"]["curve"], target)
        speedup = {"uniform_final": target, "jest_steps_to_uniform_final": needed,
                   "iterations_to_uniform_final": (last_step / needed) if needed else None}  # fmt: skip
    ratio = speedup["iterations_to_uniform_final"]
    uniform_mean = methods.get("uniform", {}).get("mean")
    if uniform_mean is not None and uniform_mean < MEANINGFUL_OVER_CHANCE * chance:
        speedup["note"] = (f"uniform's final accuracy is below {MEANINGFUL_OVER_CHANCE:g}x chance: the iterations "
                           "ratio compares noise, not learning")
    return {
        "chance": chance,
        "reference_accuracy": list(reference_accuracy),
        "methods": methods,
        "speedup": speedup,
        "goals": {
            "uniform_over_chance": (uniform_mean / chance) if uniform_mean is not None else None,
            "jest_2x_fewer_iterations": bool(ratio is not None and ratio >= 2.0),
        },
    }


def jestctl() -> list[str]:
    """The ``jestctl`` of this interpreter's environment."""
    beside = Path(sys.executable).parent / "jestctl"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("jestctl")
    if found is None:
        raise FileNotFoundError("jestctl is not installed (make venv)")
    return [found]


def run_job(manifest: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """Run one manifest with ``jestctl run``; returns its record (``load_record``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "job.yaml"
    path.write_text(yaml.safe_dump(dict(manifest), sort_keys=False))
    summary_path = workdir / "summary.json"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    completed = subprocess.run([*jestctl(), "run", str(path), "--workdir", str(workdir), "--json", str(summary_path),
                                "--no-progress"], env=env, capture_output=True, text=True, check=False)  # fmt: skip
    (workdir / "stdout.log").write_text(completed.stdout + completed.stderr)
    if completed.returncode != 0 or not summary_path.is_file():
        raise RuntimeError(f"jestctl run {path} failed ({completed.returncode}): {completed.stderr[-2000:]}")
    return load_record(workdir)


def load_record(workdir: Path) -> dict[str, Any]:
    """One finished run's record: its ``jestctl run --json`` summary plus the final checkpoint's counters."""
    from jest_trainer.checkpoint import load_latest_checkpoint

    summary = json.loads((workdir / "summary.json").read_text())
    if summary.get("phase") != "Succeeded":
        raise RuntimeError(f"run in {workdir}: phase {summary.get('phase')}: {summary.get('message')}")
    loaded = load_latest_checkpoint(workdir / "checkpoints")
    if loaded is None:
        raise RuntimeError(f"run in {workdir}: no checkpoint in {workdir / 'checkpoints'}")
    counters = loaded.state["counters"]
    return {**summary, "eval_history": counters["eval_history"], "selected_mix": counters["selected_mix"]}


def reference_accuracy(reference_path: Path, manifest: Mapping[str, Any]) -> float | None:
    """Zero-shot accuracy of a saved reference on the eval shards (same preprocessing as training)."""
    import torch
    from jest_trainer.config import TrainingConfig
    from jest_trainer.data import load_eval_set, model_input_shape
    from jest_trainer.evaluate import evaluate
    from jest_trainer.preprocess import build_image_transform
    from jest_trainer.reference import load_reference

    cfg = TrainingConfig.model_validate(manifest["spec"]["training"])
    cpu = torch.device("cpu")
    model, model_cfg = load_reference(reference_path, cfg, image_shape=model_input_shape(cfg), device=cpu)
    transform = build_image_transform(model_cfg, cfg.data, train=False, image_spec=model.image_spec)
    eval_set = load_eval_set(cfg, transform=transform, tokenizer=model.tokenizer)
    return evaluate(model, eval_set, device=cpu)[0]


def ensure_data(data_dir: Path, seed: int) -> dict[str, Any]:
    """The shards' manifest, writing the shards first when ``data_dir`` has none."""
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        sys.path.insert(0, str(BENCH_DIR))
        import real_data_shards

        real_data_shards.build(data_dir, seed=seed)
    return json.loads(manifest_path.read_text())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every method on every seed (JEST first per seed: it trains the shared reference)."""
    data = ensure_data(args.data, args.data_seed)
    urls = data["urls"]
    methods = [m for m in ("jest", *args.methods) if m in args.methods]
    methods = list(dict.fromkeys(methods))
    runs: dict[str, list[dict[str, Any]]] = {method: [] for method in methods}
    references: list[float] = []
    settings = {"steps": args.steps, "eval_every": args.eval_every, "filter_ratio": args.filter_ratio,
                "batch_size": args.batch_size, "chunks": args.chunks, "image_size": args.image_size,
                "loader_workers": args.loader_workers, "reference_steps": args.reference_steps,
                "seeds": list(range(args.seed_offset, args.seed_offset + args.seeds)), "world_size": 1,
                "model": "tiny (conv image tower, hashed bag-of-words text tower), sigmoid loss"}  # fmt: skip
    for seed in settings["seeds"]:
        reference_path: Path | None = None
        for method in methods:
            workdir = args.workdir / f"seed{seed}" / method
            if not args.from_runs:
                shutil.rmtree(workdir, ignore_errors=True)
            manifest = job_manifest(
                name=f"real-{method.replace('_', '-')}-{seed}", method=method, seed=seed, urls=urls,
                steps=args.steps, eval_every=args.eval_every, filter_ratio=args.filter_ratio,
                batch_size=args.batch_size, chunks=args.chunks, image_size=args.image_size,
                loader_workers=args.loader_workers, reference_steps=args.reference_steps,
                reference_checkpoint=str(reference_path) if reference_path else None,
            )
            record = load_record(workdir) if args.from_runs else run_job(manifest, workdir)
            runs[method].append(record)
            if reference_path is None:
                trained = workdir / "checkpoints" / "reference.pt"
                reference_path = args.workdir / f"seed{seed}" / "reference.pt"
                if not args.from_runs:
                    shutil.copyfile(trained, reference_path)
                references.append(reference_accuracy(reference_path, manifest) or 0.0)
            log.warning("seed %d %-18s final zero-shot %.3f (chance %.3f, %.0f s)", seed, method,
                        record["final_accuracy"], 1 / len(data["classes"]), record["wall_seconds"])
            if args.partial:
                partial = _document(data, settings, runs, references)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({**partial, "partial": True}, indent=2) + "\n")
    return _document(data, settings, runs, references)


def _document(data: Mapping[str, Any], settings: Mapping[str, Any], runs: Mapping[str, list[dict[str, Any]]],
              references: Sequence[float]) -> dict[str, Any]:  # fmt: skip
    done = {method: records for method, records in runs.items() if records}
    document = summarise(done, n_classes=len(data["classes"]), reference_accuracy=references)
    return {
        "benchmark": "real_data",
        "data": {"source": data["source"], "classes": len(data["classes"]), "sizes": data["sizes"],
                 "pool_mix": data["pool_mix"], "seed": data["seed"]},
        "settings": settings,
        "path": "jestctl run (data.source webdataset, streaming, 1 worker process)",
        **document,
    }


def plot(document: Mapping[str, Any], path: Path) -> None:
    """Mean zero-shot accuracy vs step per method, with chance level (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method, result in document["methods"].items():
        axis.plot([p[0] for p in result["curve"]], [p[1] for p in result["curve"]],
                  label=f"{method} ({result['mean']:.3f} ± {result['std']:.3f})")  # fmt: skip
    axis.axhline(document["chance"], color="grey", linestyle=":", label=f"chance ({document['chance']:.3f})")
    axis.set_xlabel("training step")
    axis.set_ylabel(f"zero-shot accuracy (mean of {len(document['settings']['seeds'])} seeds)")
    axis.set_title(f"Noto emoji, {document['data']['classes']} classes, f = {document['settings']['filter_ratio']}")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python bench/real_data.py --data /tmp/jest-emoji --out bench/results/real_data.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/jest-real-data/shards"),
                        help="shards from real_data_shards.py (written there when missing)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/jest-real-data/runs"))
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed-offset", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--filter-ratio", type=float, default=0.8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--reference-steps", type=int, default=400)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "real_data.json")
    parser.add_argument("--plot", type=Path, default=REPO / "bench" / "results" / "real_data.png")
    parser.add_argument("--partial", action="store_true", help="rewrite --out after every run (partial: true)")
    parser.add_argument("--from-runs", action="store_true",
                        help="train nothing: rebuild the results from the finished runs under --workdir")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    document = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    plot(document, args.plot)
    print(json.dumps({"chance": document["chance"], "speedup": document["speedup"], "goals": document["goals"],
                      **{m: f"{r['mean']:.3f} ± {r['std']:.3f}" for m, r in document["methods"].items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
