"""Benchmarks of the streaming input pipeline: memory against data-set size, and loader throughput.

Both run on JPEG shards this script writes (``--image-px`` square photos-like images: smooth colour
fields plus noise, so they compress like photos; captions of a few words; ``cls`` labels).

* ``memory`` — the same job (``--steps`` super-batches of ``--batch`` pairs, ``data.loaderWorkers`` 2,
  shuffle buffer 1000) over 1x and 10x the shards, each in a fresh process. Reported: the peak RSS of
  the training process and of its largest loader worker (``getrusage``), and their sum as the rank's
  footprint. Goal: 10x / 1x ratio <= 1.1 (memory does not grow with the data set).
* ``loader`` — samples/s of the trainer's pipeline (``data.open_train_stream``: shard split, shuffle
  buffer, decode + resize + centre crop + normalise + tokenize in workers, cursor) against a plain
  ``webdataset.WebDataset(...).shuffle().decode("pil").map(resize...).batched()`` + ``DataLoader`` loop
  over the same shards, the same worker count and batch size. Trials alternate A/B and the ratio of
  medians is reported. Goal: ours / plain >= 0.9. Our decoder asks libjpeg for a reduced-size decode
  (``Image.draft``) when the target is much smaller than the photo; the plain loop, being plain, does not:
  ``--no-draft`` measures without that advantage too (both are reported).

Writes ``bench/results/data_memory.json|png`` and ``bench/results/data_loader.json|png``.
Run: ``.venv/bin/python bench/data_stream.py memory`` / ``... loader`` (or ``make bench-data``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "bench" / "results"
MEMORY_GOAL = 1.1
THROUGHPUT_GOAL = 0.9
WORDS = ("red", "blue", "small", "large", "photo", "of", "a", "cat", "dog", "tree", "car", "house", "on", "grass")


def write_jpeg_shards(out: Path, *, shards: int, per_shard: int, image_px: int, seed: int = 0) -> str:
    """Write ``shards`` JPEG shards; returns their brace pattern."""
    import webdataset as wds
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grid = np.linspace(0.0, 1.0, image_px, dtype=np.float32)
    for shard in range(shards):
        with wds.TarWriter(str(out / f"b-{shard:06d}.tar"), mtime=0.0) as writer:
            for row in range(per_shard):
                a, b, c = rng.random(3)
                field = np.stack([np.add.outer(grid * a, grid * (1 - a)), np.add.outer(grid * b, grid * c),
                                  np.add.outer(grid * c, grid * b)], axis=-1) / 2
                pixels = np.clip(field * 255 + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
                caption = " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 6))
                writer.write({"__key__": f"b{shard:06d}-{row:05d}", "jpg": buffer.getvalue(), "txt": caption,
                              "cls": str(int(rng.integers(0, 10)))})
    return str(out / f"b-{{000000..{shards - 1:06d}}}.tar")


def _cfg(urls: str, *, workers: int, image_size: int, shuffle: int = 1000):
    from jest_trainer.config import TrainingConfig

    return TrainingConfig.model_validate(
        {"data": {"source": "webdataset", "urls": urls, "loaderWorkers": workers, "shuffleBuffer": shuffle},
         "model": {"imageSize": image_size}}
    )


def _ours(urls: str, *, workers: int, batch: int, image_size: int, draft: bool = True):
    from jest_trainer import data
    from jest_trainer.models import hash_tokenize
    from jest_trainer.preprocess import build_image_transform

    cfg = _cfg(urls, workers=workers, image_size=image_size)
    transform = build_image_transform(cfg.model, cfg.data, train=True)
    if not draft:
        transform = _NoDraft(transform.spec)
    return data.open_train_stream(cfg, rank=0, world_size=1, local_super_batch=batch, transform=transform,
                                  tokenizer=hash_tokenize)


class _NoDraft:
    """Our transform with full-size JPEG decoding (what a plain loop does), for the like-for-like figure."""

    def __init__(self, spec) -> None:
        from jest_trainer.preprocess import ImageTransform

        self.inner = ImageTransform(spec)

    def warm(self) -> None:
        self.inner.warm()

    def __call__(self, payload: bytes, *, sample_seed: int | None = None):
        from jest_trainer.preprocess import decode_rgb

        return self.inner.from_pil(decode_rgb(payload), sample_seed=sample_seed)


def _plain_loader(urls: str, *, workers: int, batch: int, image_size: int):
    """The baseline: webdataset's own decode + torchvision resize/crop/normalise, batched, DataLoader workers."""
    import torch
    import webdataset as wds
    from jest_trainer.preprocess import OPENAI_MEAN, OPENAI_STD
    from torchvision.transforms import v2

    transform = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(OPENAI_MEAN), list(OPENAI_STD)),
        ]
    )
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker,
                       empty_check=False)
        .shuffle(1000)
        .decode("pil")
        .to_tuple("jpg", "txt")
        .map_tuple(transform, lambda text: text)
        .batched(batch)
        .repeat()
    )
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                            prefetch_factor=2 if workers else None))


def _rate(batches, *, count: int, batch: int) -> float:
    next(batches)  # worker start-up and the first fill of the shuffle buffers are not throughput
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    return count * batch / (time.perf_counter() - start)


# --------------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------------


def _memory_child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    stream = _ours(args.urls, workers=2, batch=args.batch, image_size=args.image_size)
    for _ in range(args.steps):
        next(stream)
    stream.close()
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"main_peak_rss_bytes": own, "worker_peak_rss_bytes": worker, "seen": stream.seen}))


def run_memory(args: argparse.Namespace) -> dict:
    results = {}
    with tempfile.TemporaryDirectory(prefix="jest-bench-mem-") as tmp:
        for factor in (1, 10):
            urls = write_jpeg_shards(Path(tmp) / f"x{factor}", shards=args.shards * factor, per_shard=args.per_shard,
                                     image_px=args.image_px)
            trials = []
            for _ in range(args.repeats):
                out = subprocess.run(
                    [sys.executable, __file__, "memory-child", "--urls", urls, "--steps", str(args.steps),
                     "--batch", str(args.batch), "--image-size", str(args.image_size)],
                    check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                )
                trials.append(json.loads(out.stdout.strip().splitlines()[-1]))
            main = statistics.median(t["main_peak_rss_bytes"] for t in trials)
            worker = statistics.median(t["worker_peak_rss_bytes"] for t in trials)
            results[f"x{factor}"] = {
                "shards": args.shards * factor, "samples": args.shards * factor * args.per_shard,
                "main_peak_rss_bytes": main, "worker_peak_rss_bytes": worker,
                "rank_peak_rss_bytes": main + 2 * worker, "trials": trials,
            }
    ratio = results["x10"]["rank_peak_rss_bytes"] / results["x1"]["rank_peak_rss_bytes"]
    worker_ratio = results["x10"]["worker_peak_rss_bytes"] / results["x1"]["worker_peak_rss_bytes"]
    return {
        "benchmark": "data_memory",
        "setup": {"steps": args.steps, "super_batch": args.batch, "image_px": args.image_px,
                  "model_image_size": args.image_size, "loader_workers": 2, "shuffle_buffer": 1000,
                  "per_shard": args.per_shard, "repeats": args.repeats},
        "results": results,
        "ratio_10x_over_1x": ratio,
        "worker_ratio_10x_over_1x": worker_ratio,
        "goal": f"ratio <= {MEMORY_GOAL}",
        "goal_met": ratio <= MEMORY_GOAL,
        "method": "peak RSS from getrusage (self = training process, children = largest loader worker); "
        "rank footprint = main + 2 x worker peak (upper bound: shared copy-on-write pages count twice)",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }


def plot_memory(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = [result["results"][k]["samples"] for k in ("x1", "x10")]
    labels = [f"1x ({samples[0]:,} samples)", f"10x ({samples[1]:,})"]
    mib = 1 / 2**20
    main = [result["results"][k]["main_peak_rss_bytes"] * mib for k in ("x1", "x10")]
    worker = [result["results"][k]["worker_peak_rss_bytes"] * mib for k in ("x1", "x10")]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.bar(labels, main, label="training process")
    axis.bar(labels, [2 * w for w in worker], bottom=main, label="2 loader workers")
    axis.set_ylabel("peak RSS (MiB)")
    ratio = result["ratio_10x_over_1x"]
    axis.set_title(f"Streaming memory vs data-set size: ratio {ratio:.3f} (goal <= {MEMORY_GOAL})")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------------
# loader throughput
# --------------------------------------------------------------------------------------------------


def run_loader(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)
    trials: dict[str, list[float]] = {"ours": [], "ours_no_draft": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="jest-bench-loader-") as tmp:
        urls = write_jpeg_shards(Path(tmp), shards=args.shards, per_shard=args.per_shard, image_px=args.image_px)
        for _ in range(args.repeats):
            for name in trials:
                if name == "plain":
                    batches = _plain_loader(urls, workers=args.workers, batch=args.batch, image_size=args.image_size)
                    trials[name].append(_rate(batches, count=args.batches, batch=args.batch))
                    del batches
                else:
                    stream = _ours(urls, workers=args.workers, batch=args.batch, image_size=args.image_size,
                                   draft=name == "ours")
                    trials[name].append(_rate(stream, count=args.batches, batch=args.batch))
                    stream.close()
    medians = {name: statistics.median(values) for name, values in trials.items()}
    ratio = medians["ours"] / medians["plain"]
    return {
        "benchmark": "data_loader",
        "setup": {"shards": args.shards, "per_shard": args.per_shard, "image_px": args.image_px,
                  "model_image_size": args.image_size, "loader_workers": args.workers, "batch": args.batch,
                  "batches_timed": args.batches, "repeats": args.repeats, "shuffle_buffer": 1000},
        "samples_per_second": medians,
        "trials": trials,
        "ratio_ours_over_plain": ratio,
        "ratio_ours_no_draft_over_plain": medians["ours_no_draft"] / medians["plain"],
        "goal": f"ratio >= {THROUGHPUT_GOAL}",
        "goal_met": ratio >= THROUGHPUT_GOAL,
        "method": "samples/s over the timed batches after the first (worker start-up excluded); A/B trials "
        "interleaved, medians; ours = open_train_stream (decode, resize, centre crop, normalise, tokenize, cursor)",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average": os.getloadavg()},
    }


def plot_loader(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["plain", "ours_no_draft", "ours"]
    labels = ["plain webdataset\n+ DataLoader", "ours\n(full-size decode)", "ours"]
    figure, axis = plt.subplots(figsize=(6, 4))
    for index, name in enumerate(names):
        values = result["trials"][name]
        axis.bar(index, result["samples_per_second"][name], color="C0" if name == "plain" else "C1")
        axis.scatter([index] * len(values), values, color="k", s=10, zorder=3)
    axis.set_xticks(range(len(names)), labels)
    axis.set_ylabel("samples / s")
    setup = result["setup"]
    axis.set_title(f"Loader throughput, {setup['loader_workers']} workers, {setup['image_px']} px JPEG -> "
                   f"{setup['model_image_size']} px: ratio {result['ratio_ours_over_plain']:.2f}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    memory = commands.add_parser("memory", help="peak RSS over 1x and 10x the shards")
    memory.add_argument("--shards", type=int, default=4)
    memory.add_argument("--per-shard", type=int, default=500)
    memory.add_argument("--steps", type=int, default=40)
    memory.add_argument("--batch", type=int, default=160)
    memory.add_argument("--image-px", type=int, default=96)
    memory.add_argument("--image-size", type=int, default=64)
    memory.add_argument("--repeats", type=int, default=1)
    memory.add_argument("--out", type=Path, default=RESULTS / "data_memory.json")
    child = commands.add_parser("memory-child", help=argparse.SUPPRESS)
    child.add_argument("--urls", required=True)
    child.add_argument("--steps", type=int, required=True)
    child.add_argument("--batch", type=int, required=True)
    child.add_argument("--image-size", type=int, required=True)
    loader = commands.add_parser("loader", help="samples/s: ours vs plain webdataset + DataLoader")
    loader.add_argument("--shards", type=int, default=4)
    loader.add_argument("--per-shard", type=int, default=400)
    loader.add_argument("--workers", type=int, default=2)
    loader.add_argument("--batch", type=int, default=64)
    loader.add_argument("--batches", type=int, default=15)
    loader.add_argument("--image-px", type=int, default=256)
    loader.add_argument("--image-size", type=int, default=64)
    loader.add_argument("--repeats", type=int, default=3)
    loader.add_argument("--out", type=Path, default=RESULTS / "data_loader.json")
    args = parser.parse_args(argv)
    if args.command == "memory-child":
        _memory_child(args)
        return 0
    result = run_memory(args) if args.command == "memory" else run_loader(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    (plot_memory if args.command == "memory" else plot_loader)(result, args.out.with_suffix(".png"))
    summary = {k: v for k, v in result.items() if k not in ("trials", "results")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
