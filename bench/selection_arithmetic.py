"""Micro-benchmark: what JEST's selection arithmetic costs per step on CPU, one thread.

JEST adds, per step, a learner and a reference forward over the super-batch (measured by the training
loop) plus the arithmetic timed here: the two ``[B, D] x [D, B]`` logit products, the per-pair
learnability ``S = M^θ - M^θ*`` (``pair_loss_matrices``: two loss matrices subtracted, the formulation
training uses; ``pair_score_torch``: the stable few-pass torch form; ``pair_score_native``: the form
``select_batch`` uses on CPU, whose first pass is the native kernel), the Gumbel noise, the chunk loop
(``chunk_loop_native`` / ``_numpy`` / ``_torch``: the same draws three ways) and the chunked sampling
(``jest_select``, given S; ``select_batch_jest_sigmoid`` is the whole call the trainer times, and
``..._without_native`` the same call on an install without the kernel). For the softmax (CLIP) loss (temperature 10, and
``..._temperature100`` as a trained CLIP, whose exps need float64):
``softmax_exps`` (the stack and ``exp(L - max L)`` pass before the native loop), the chunk loop two ways
(``softmax_chunk_loop_native``: exp domain, one call; ``softmax_chunk_loop_torch``: the log-domain scorer that
accelerators and installs without the kernel run) and the whole ``select_batch_jest_softmax`` call (and
``..._without_native``). The
headline configuration is the quickstart's per-rank shape, B = 320, b = 64 (filter ratio 0.8), 16
chunks. Each operation is timed call by call (after a warm-up) and summarised by median and 10th/90th
percentiles, because the benchmark machine is shared: the load average before and after is recorded with
the numbers.

Writes ``bench/results/selection_arithmetic.json`` and a PNG next to it:
``python bench/selection_arithmetic.py [--repeats N] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from jest_trainer import native
from jest_trainer.losses import (
    sigmoid_logits,
    sigmoid_pair_loss_difference,
    sigmoid_pair_loss_difference_,
    sigmoid_pair_losses,
    softmax_logits,
)
from jest_trainer.selection import (
    _chunked_sample,
    _gumbel_noise,
    _pairwise_chunk_loop_cpu,
    _pairwise_chunk_loop_numpy,
    _PairwiseScorer,
    _shifted_exps,
    _softmax_chunk_loop_native,
    _SoftmaxScorer,
    _stack_terms,
    jest_select,
    jest_select_softmax,
    select_batch,
)
from torch.nn import functional

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "selection_arithmetic.json"


def time_call(function: Callable[[], object], repeats: int, warmup: int) -> dict[str, float]:
    """Median, 10th/90th percentile and mean of one call's wall time, and its median thread CPU time (µs).

    With one torch thread the work runs on the calling thread, so the CPU time excludes time the thread
    spent descheduled on a busy machine; the wall-time median is the number a training step sees.
    """
    for _ in range(warmup):
        function()
    samples, cpu_samples = [], []
    for _ in range(repeats):
        cpu_start = time.thread_time_ns()
        start = time.perf_counter_ns()
        function()
        samples.append((time.perf_counter_ns() - start) / 1e3)
        cpu_samples.append((time.thread_time_ns() - cpu_start) / 1e3)
    samples.sort()
    return {
        "median_us": statistics.median(samples),
        "p10_us": samples[int(0.1 * (len(samples) - 1))],
        "p90_us": samples[int(0.9 * (len(samples) - 1))],
        "mean_us": statistics.fmean(samples),
        "cpu_median_us": statistics.median(cpu_samples),
        "repeats": repeats,
    }


def embeddings(size: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image/text embeddings with matching pairs correlated, as after some training."""
    generator = torch.Generator().manual_seed(seed)
    image = functional.normalize(torch.randn(size, dim, generator=generator), dim=1)
    text = functional.normalize(image + torch.randn(size, dim, generator=generator), dim=1)
    return image, text


def measure_shape(super_batch: int, batch_size: int, chunks: int, dim: int, repeats: int, warmup: int) -> dict:
    """Every selection-arithmetic component at one (B, b, chunks, D)."""
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-5.0)
    learner_image, learner_text = embeddings(super_batch, dim, seed=0)
    reference_image, reference_text = embeddings(super_batch, dim, seed=1)
    learner = sigmoid_logits(learner_image, learner_text, scale, bias)
    reference = sigmoid_logits(reference_image, reference_text, scale, bias)
    learner_soft = softmax_logits(learner_image, learner_text, scale)
    reference_soft = softmax_logits(reference_image, reference_text, scale)
    scores = sigmoid_pair_losses(learner) - sigmoid_pair_losses(reference)
    generator = torch.Generator().manual_seed(0)

    def dispatch(method: str, loss: str) -> Callable[[], object]:
        pair = (learner, reference) if loss == "sigmoid" else (learner_soft, reference_soft)
        return lambda: select_batch(method, learner_logits=pair[0], reference_logits=pair[1], loss=loss,
                                    batch_size=batch_size, n_chunks=chunks, generator=generator)

    def without_native(function: Callable[[], object]) -> Callable[[], object]:
        def call() -> object:
            kernel, native.KERNEL = native.KERNEL, None
            try:
                return function()
            finally:
                native.KERNEL = kernel
        return call

    per_chunk = batch_size // chunks
    noise = _gumbel_noise((chunks, super_batch), scores, generator)
    soft_terms = [(1.0, learner_soft), (-1.0, reference_soft)]
    soft_stacked = _stack_terms(soft_terms)
    soft_exps = _shifted_exps(soft_stacked.clone())
    assert soft_exps is not None, "benchmark logits outside the exp-domain range"
    soft_signs = torch.tensor([1.0, -1.0])
    operations: dict[str, Callable[[], object]] = {
        "logits_matmul_learner_and_reference": lambda: (
            sigmoid_logits(learner_image, learner_text, scale, bias),
            sigmoid_logits(reference_image, reference_text, scale, bias),
        ),
        "pair_loss_matrices": lambda: sigmoid_pair_losses(learner) - sigmoid_pair_losses(reference),
        "pair_score_torch": lambda: sigmoid_pair_loss_difference_(torch.stack([learner, reference])),
        "pair_score_native": lambda: sigmoid_pair_loss_difference([learner, reference], torch.float32),
        "gumbel_noise": lambda: _gumbel_noise((chunks, super_batch), scores, generator),
        "chunk_loop_torch": lambda: _chunked_sample(_PairwiseScorer(scores), super_batch, batch_size, chunks,
                                                    scores, generator),
        "chunk_loop_numpy": lambda: _pairwise_chunk_loop_numpy(scores.numpy(), noise.numpy(), per_chunk),
        "chunk_loop_native": lambda: _pairwise_chunk_loop_cpu(scores, noise, per_chunk),
        "jest_select": lambda: jest_select(scores, batch_size, chunks, generator),
        "select_batch_jest_sigmoid": dispatch("jest", "sigmoid"),
        "select_batch_jest_sigmoid_without_native": without_native(dispatch("jest", "sigmoid")),
        "softmax_exps": lambda: _shifted_exps(_stack_terms(soft_terms)),
        "softmax_chunk_loop_native": lambda: _softmax_chunk_loop_native(soft_exps, [1.0, -1.0],
                                                                        noise.to(soft_exps.dtype), per_chunk),
        "softmax_chunk_loop_torch": lambda: _chunked_sample(_SoftmaxScorer(soft_stacked, soft_signs), super_batch,
                                                            batch_size, chunks, soft_stacked, generator),
        "jest_select_softmax": lambda: jest_select_softmax(learner_soft, reference_soft, batch_size, chunks,
                                                           generator),
        "select_batch_jest_softmax_without_native": without_native(dispatch("jest", "softmax")),
        "select_batch_jest_softmax": dispatch("jest", "softmax"),
        # a trained CLIP's temperature: positives up to ~100 logits below the maximum, so float64 exps
        "select_batch_jest_softmax_temperature100": lambda: select_batch(
            "jest", learner_logits=10 * learner_soft, reference_logits=10 * reference_soft, loss="softmax",
            batch_size=batch_size, n_chunks=chunks, generator=generator),
        "select_batch_learnability_topk_sigmoid": dispatch("learnability_topk", "sigmoid"),
        "select_batch_learnability_topk_softmax": dispatch("learnability_topk", "softmax"),
        "select_batch_uniform": dispatch("uniform", "sigmoid"),
    }
    with torch.no_grad():
        return {name: time_call(function, repeats, warmup) for name, function in operations.items()}


def plot(result: dict, png: Path) -> None:
    """Bar chart of the headline components and the super-batch sweep (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    headline = result["headline"]["timings"]
    names = list(headline)
    medians = [headline[name]["median_us"] for name in names]
    low = [headline[name]["median_us"] - headline[name]["p10_us"] for name in names]
    high = [headline[name]["p90_us"] - headline[name]["median_us"] for name in names]
    config = result["headline"]["config"]

    figure, (bars, sweep) = plt.subplots(1, 2, figsize=(13, 5))
    bars.barh(names, medians, xerr=[low, high], color="#4c72b0")
    bars.set_xscale("log")
    bars.set_xlabel("wall time per call (µs, median; whiskers p10-p90)")
    bars.set_title(f"B={config['superBatch']}, b={config['batchSize']}, {config['chunks']} chunks, "
                   f"D={config['embedDim']}, 1 thread")
    bars.invert_yaxis()

    for name, colour in (("jest_select", "#4c72b0"), ("jest_select_softmax", "#dd8452"),
                         ("softmax_chunk_loop_native", "#937860"),
                         ("pair_loss_matrices", "#55a868"), ("pair_score_native", "#8172b3"),
                         ("chunk_loop_numpy", "#c44e52")):
        points = [(row["config"]["superBatch"], row["timings"][name]["median_us"]) for row in result["sweep"]]
        sweep.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colour, label=name)
    sweep.set_xscale("log")
    sweep.set_yscale("log")
    sweep.set_xlabel("super-batch B (b fixed; filter ratio 1 - b/B)")
    sweep.set_ylabel("median µs per call")
    sweep.set_title(f"scaling with B at b={result['sweep'][0]['config']['batchSize']}")
    sweep.legend()
    figure.suptitle(f"JEST selection arithmetic on CPU (load avg {result['machine']['loadAverageBefore']:.1f} "
                    f"→ {result['machine']['loadAverageAfter']:.1f} on {result['machine']['cpuCount']} cores)")
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """Run the headline shape and the B sweep, write JSON (+ PNG), print the headline medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--super-batch", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--embed-dim", type=int, default=64, help="embedding width for the logits matmul")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--sweep-repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-png", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    config = {"superBatch": args.super_batch, "batchSize": args.batch_size, "chunks": args.chunks,
              "embedDim": args.embed_dim}
    headline = measure_shape(args.super_batch, args.batch_size, args.chunks, args.embed_dim, args.repeats,
                             args.warmup)
    wide = measure_shape(args.super_batch, args.batch_size, args.chunks, 512, args.sweep_repeats, args.warmup)
    sweep = []
    for super_batch in (128, 320, 640, 1280):
        timings = measure_shape(super_batch, args.batch_size, args.chunks, args.embed_dim, args.sweep_repeats,
                                args.warmup)
        sweep.append({"config": {**config, "superBatch": super_batch,
                                 "filterRatio": round(1 - args.batch_size / super_batch, 4)},
                      "timings": timings})
    result = {
        "benchmark": "selection_arithmetic",
        "description": "wall time per call of JEST selection arithmetic (no model forwards), CPU",
        "headline": {"config": config, "timings": headline},
        "embedDim512": {"config": {**config, "embedDim": 512},
                        "logits_matmul_learner_and_reference": wide["logits_matmul_learner_and_reference"]},
        "sweep": sweep,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpuCount": os.cpu_count(),
            "torchThreads": torch.get_num_threads(),
            "torch": torch.__version__,
            "loadAverageBefore": load_before,
            "loadAverageAfter": os.getloadavg()[0],
        },
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_png:
        plot(result, args.out.with_suffix(".png"))
    for name, timing in headline.items():
        print(f"{name:42s} median {timing['median_us']:9.1f} µs  (p10 {timing['p10_us']:.1f}, "
              f"p90 {timing['p90_us']:.1f}; thread CPU median {timing['cpu_median_us']:.1f})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
