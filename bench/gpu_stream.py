"""The Python parts of ``bench/gpu_stream.sh``: shards, job manifest, NVML monitor and the report.

Why a separate module: the shell script runs once on a GPU machine that CI never has, so everything it
does beyond orchestration lives here, importable and tested on CPU (``tests/unit/bench``).

* ``shards``: synthetic 224 px JPEG WebDataset shards written on the GPU machine itself (it reaches no
  network, so no data set can be downloaded there): coloured shapes on coloured backgrounds, captioned
  "a <colour> <shape> on a <background> background", with the digits pool's noise kinds (wrong captions,
  junk text, near-duplicates), a clean curated split for the reference and an eval split with ``cls``
  labels and ``class_prompts.json``. The content only has to be decodable, varied and captioned: the
  benchmark measures throughput, data wait, utilisation, memory and energy, not accuracy.
* ``manifest``: the ``JESTTrainingJob`` (open_clip ViT-B-32 from random init, bf16, streaming, JEST at
  f = 0.8, ``energy.backend: auto``: NVML where it works) that ``jestctl run`` trains.
* ``monitor``: samples NVML (utilisation, memory used, power) until SIGTERM and reads the total-energy
  counter at both ends, so the counter can be compared with the integral of the sampled power.
* ``report``: folds ``jestctl run --json``, the monitor's file and the final checkpoint into one JSON.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "black": (20, 20, 20), "white": (245, 245, 245),
}  # fmt: skip
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")
JUNK = ("free shipping today", "click here now", "best price guaranteed", "vintage poster sale",
        "download wallpaper hd", "cheap flights deals")  # fmt: skip
NOISE_MIX: tuple[tuple[str, float], ...] = (("wrong", 0.5), ("junk", 0.15), ("duplicate", 0.15), ("clean", 0.2))


def class_names() -> list[str]:
    """Eval classes: every (colour, shape) pair, in a fixed order."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def draw_scene(label: int, background: str, size: int, rng: np.random.Generator) -> bytes:
    """JPEG bytes of class ``label``'s shape on ``background`` at ``size`` x ``size`` px (seeded jitter)."""
    colour, shape = class_names()[label].split(" ")
    picture = Image.new("RGB", (size, size), COLOURS[background])
    draw = ImageDraw.Draw(picture)
    radius = size * rng.uniform(0.18, 0.38)
    cx, cy = (size * rng.uniform(0.35, 0.65) for _ in range(2))
    fill = COLOURS[colour]
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(radius / 3)))
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=fill)
    else:
        bar = radius / 3
        draw.rectangle((cx - bar, cy - radius, cx + bar, cy + radius), fill=fill)
        draw.rectangle((cx - radius, cy - bar, cx + radius, cy + bar), fill=fill)
    pixels = np.asarray(picture, dtype=np.float32) + rng.normal(0.0, 6.0, size=(size, size, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def sample_plan(count: int, *, noisy: bool, seed: int) -> list[tuple[int, str, str, str]]:
    """``(label, background, caption, noise kind)`` per sample (pure, seeded); clean splits when not ``noisy``."""
    rng = np.random.default_rng(seed)
    names = class_names()
    backgrounds = list(COLOURS)
    kinds = [kind for kind, _ in NOISE_MIX]
    weights = [share for _, share in NOISE_MIX]
    plan: list[tuple[int, str, str, str]] = []
    duplicate_of: tuple[int, str, str] | None = None
    for row in range(count):
        kind = str(rng.choice(kinds, p=weights)) if noisy else "clean"
        if kind == "duplicate":
            if duplicate_of is None or row % 64 == 0:
                label = int(rng.integers(len(names)))
                duplicate_of = (label, backgrounds[(label + 1) % len(backgrounds)], f"a {names[label]}")
            plan.append((*duplicate_of, "duplicate"))
            continue
        label = int(rng.integers(len(names)))
        background = backgrounds[int(rng.integers(len(backgrounds)))]
        if background == names[label].split(" ")[0]:
            background = backgrounds[(backgrounds.index(background) + 1) % len(backgrounds)]
        if kind == "junk":
            text = str(JUNK[int(rng.integers(len(JUNK)))])
        else:
            named = label if kind == "clean" else (label + int(rng.integers(1, len(names)))) % len(names)
            text = f"a {names[named]} on a {background} background"
        plan.append((label, background, text, kind))
    return plan


def _write_shard(job: tuple[Path, str, int, Sequence[tuple[int, str, str, str]], int, int]) -> str:
    import webdataset as wds

    path, prefix, start, rows, size, seed = job
    rng = np.random.default_rng(seed)
    with open(path, "wb") as stream, wds.TarWriter(stream, mtime=0.0) as writer:
        for offset, (label, background, text, kind) in enumerate(rows):
            writer.write({"__key__": f"{prefix}-{start + offset:08d}", "jpg": draw_scene(label, background, size, rng),
                          "txt": text, "cls": str(label), "noise": kind})  # fmt: skip
    return str(path)


def write_split(out: Path, prefix: str, count: int, *, size: int, shard_size: int, noisy: bool, seed: int,
                processes: int = 1) -> str:  # fmt: skip
    """Write one split as shards (in ``processes`` parallel writers); returns its brace pattern."""
    out.mkdir(parents=True, exist_ok=True)
    plan = sample_plan(count, noisy=noisy, seed=seed)
    jobs = [(out / f"{prefix}-{index:06d}.tar", prefix, start, plan[start : start + shard_size], size,
             seed * 100_003 + index) for index, start in enumerate(range(0, count, shard_size))]  # fmt: skip
    if processes > 1:
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(_write_shard, jobs))
    else:
        for job in jobs:
            _write_shard(job)
    if len(jobs) == 1:
        return str(jobs[0][0])
    return str(out / f"{prefix}-{{000000..{len(jobs) - 1:06d}}}.tar")


def write_shards(out: Path, *, pool: int, curated: int, eval_count: int, size: int, shard_size: int, seed: int,
                 processes: int = 1) -> dict[str, str]:  # fmt: skip
    """Pool, curated and eval splits under ``out`` plus ``eval/class_prompts.json``; returns their patterns."""
    urls = {
        "pool": write_split(out / "pool", "pool", pool, size=size, shard_size=shard_size, noisy=True, seed=seed,
                            processes=processes),
        "curated": write_split(out / "curated", "curated", curated, size=size, shard_size=shard_size, noisy=False,
                               seed=seed + 1, processes=processes),
        "eval": write_split(out / "eval", "eval", eval_count, size=size, shard_size=shard_size, noisy=False,
                            seed=seed + 2, processes=processes),
    }  # fmt: skip
    prompts = [[f"a {name}", f"a {name} on a plain background", f"a picture of a {name}"] for name in class_names()]
    (out / "eval" / "class_prompts.json").write_text(json.dumps(prompts) + "\n")
    (out / "urls.json").write_text(json.dumps(urls, indent=1) + "\n")
    return urls


def job_manifest(urls: Mapping[str, str], *, arch: str, steps: int, batch_size: int, filter_ratio: float,
                 loader_workers: int, precision: str, accelerator: str, reference_steps: int,
                 image_size: int | None = None) -> dict[str, Any]:  # fmt: skip
    """The ``JESTTrainingJob`` of the benchmark (one pod, one process; NVML energy on GPUs)."""
    chunks = 16 if batch_size % 16 == 0 else 1
    model: dict[str, Any] = {"arch": arch}
    if image_size is not None:
        model["imageSize"] = image_size
    gpu = accelerator == "gpu"
    return {
        "apiVersion": "jest.training/v1alpha1",
        "kind": "JESTTrainingJob",
        "metadata": {"name": "gpu-stream"},
        "spec": {
            "image": "ghcr.io/jest-operator/jest-trainer:0.1.0",
            "numNodes": 1,
            "numProcPerNode": 1,
            "accelerator": {"type": "gpu", "count": 1} if gpu else {"type": "cpu"},
            "training": {
                "model": model,
                "reference": {"mode": "online", "train": {"steps": reference_steps, "batchSize": batch_size,
                                                          "lr": 1.0e-3, "urls": urls["curated"]}},
                "data": {"source": "webdataset", "urls": urls["pool"], "evalUrls": urls["eval"],
                         "loaderWorkers": loader_workers, "prefetch": 4, "evalMaxSamples": 2000},
                "selection": {"method": "jest", "filterRatio": filter_ratio, "chunks": chunks,
                              "batchSize": batch_size, "loss": "sigmoid"},
                "optimizer": {"lr": 1.0e-3, "weightDecay": 0.1, "warmupSteps": min(50, steps // 4)},
                "steps": steps,
                "precision": precision,
                "checkpoint": {"dir": "/checkpoints", "intervalSteps": steps, "keep": 1},
                "eval": {"intervalSteps": steps},
            },
            "energy": {"backend": "auto" if gpu else "modelled"},  # auto: the NVML counter when pynvml works
            "runPolicy": {"backoffLimit": 0},
        },
    }  # fmt: skip


def integrate(samples: Sequence[tuple[float, float]]) -> float:
    """Trapezoid integral of ``(seconds, watts)`` samples in joules (0 for fewer than two samples)."""
    return sum((t1 - t0) * (w0 + w1) / 2.0 for (t0, w0), (t1, w1) in itertools.pairwise(samples))


def monitor(out: Path, *, interval: float, device_index: int = 0, nvml: Any = None,
            should_stop: Any = None) -> dict[str, Any]:  # fmt: skip
    """Sample NVML until SIGTERM/SIGINT (or ``should_stop()``); write and return the monitor document."""
    if nvml is None:
        try:
            import pynvml as nvml  # package nvidia-ml-py
        except ImportError as error:
            document = {"available": False, "why": f"pynvml is not installed ({error})"}
            out.write_text(json.dumps(document, indent=1) + "\n")
            return document
    try:
        nvml.nvmlInit()
        handle = nvml.nvmlDeviceGetHandleByIndex(device_index)
    except Exception as error:  # NVMLError_* when no driver or GPU
        document = {"available": False, "why": f"NVML unavailable: {error}"}
        out.write_text(json.dumps(document, indent=1) + "\n")
        return document
    stop = {"now": False}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["now"] = True

    if should_stop is None:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        should_stop = lambda: stop["now"]  # noqa: E731 - a one-line predicate
    start = time.monotonic()
    counter_start = int(nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    power: list[tuple[float, float]] = []
    utilisation: list[float] = []
    memory: list[float] = []
    while not should_stop():
        now = time.monotonic() - start
        power.append((now, nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0))
        utilisation.append(float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
        memory.append(float(nvml.nvmlDeviceGetMemoryInfo(handle).used))
        time.sleep(interval)
    counter_end = int(nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    name = nvml.nvmlDeviceGetName(handle)
    document = {
        "available": True,
        "device": name.decode() if isinstance(name, bytes) else str(name),
        "seconds": time.monotonic() - start,
        "interval_seconds": interval,
        "samples": len(power),
        "utilisation_gpu_percent": utilisation,
        "memory_used_bytes": memory,
        "power_watts": power,
        "energy_counter_joules": (counter_end - counter_start) / 1000.0,
        "energy_integrated_joules": integrate(power),
    }
    out.write_text(json.dumps(document) + "\n")
    return document


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None


def report(summary: Mapping[str, Any], monitor_doc: Mapping[str, Any], *, counters: Mapping[str, Any] | None,
           settings: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The benchmark's result document (pure): throughput and data wait from the trainer, the rest from NVML."""
    gpu: dict[str, Any] = {"available": bool(monitor_doc.get("available")), "why": monitor_doc.get("why")}
    if monitor_doc.get("available"):
        utilisation = list(monitor_doc["utilisation_gpu_percent"])
        busy = [value for value in utilisation if value > 0]  # the training part (generation runs before)
        counter, integrated = monitor_doc["energy_counter_joules"], monitor_doc["energy_integrated_joules"]
        gpu.update({
            "device": monitor_doc["device"],
            "utilisation_percent": {"mean": float(np.mean(utilisation)) if utilisation else None,
                                    "median": _percentile(utilisation, 50), "p90": _percentile(utilisation, 90),
                                    "mean_while_busy": float(np.mean(busy)) if busy else None},
            "peak_memory_used_bytes": max(monitor_doc["memory_used_bytes"], default=None),
            "energy": {
                "counter_joules": counter, "counter_method": "measured",
                "counter_source": "nvml nvmlDeviceGetTotalEnergyConsumption",
                "integrated_joules": integrated, "integrated_method": "integrated",
                "integrated_source": f"nvml nvmlDeviceGetPowerUsage every {monitor_doc['interval_seconds']} s",
                "integrated_over_counter": (integrated / counter) if counter else None,
                "seconds": monitor_doc["seconds"],
            },
        })  # fmt: skip
    return {
        "benchmark": "gpu_stream",
        "settings": dict(settings),
        "phase": summary.get("phase"),
        "examples_per_second": summary.get("examples_per_second"),
        "data_wait_fraction": summary.get("data_wait_fraction"),
        "samples_skipped": summary.get("samples_skipped"),
        "reference_mode": summary.get("reference_mode"),
        "wall_seconds": summary.get("wall_seconds"),
        "trainer_energy": summary.get("energy"),
        "final_accuracy": summary.get("final_accuracy"),
        "flops_total": sum(float(v) for v in (counters or {}).get("flops", {}).values()) or None,
        "gpu": gpu,
    }


def _cmd_shards(args: argparse.Namespace) -> int:
    urls = write_shards(args.out, pool=args.pool, curated=args.curated, eval_count=args.eval, size=args.size,
                        shard_size=args.shard_size, seed=args.seed, processes=args.processes)  # fmt: skip
    print(json.dumps(urls))
    return 0


def _cmd_manifest(args: argparse.Namespace) -> int:
    import yaml

    urls = json.loads(Path(args.urls).read_text())
    manifest = job_manifest(urls, arch=args.arch, steps=args.steps, batch_size=args.batch_size,
                            filter_ratio=args.filter_ratio, loader_workers=args.loader_workers,
                            precision=args.precision, accelerator=args.accelerator,
                            reference_steps=args.reference_steps, image_size=args.image_size)  # fmt: skip
    Path(args.out).write_text(yaml.safe_dump(manifest, sort_keys=False))
    return 0


def _cmd_monitor(args: argparse.Namespace) -> int:
    monitor(Path(args.out), interval=args.interval)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    summary = json.loads(Path(args.summary).read_text())
    monitor_doc = json.loads(Path(args.monitor).read_text()) if Path(args.monitor).is_file() else {
        "available": False, "why": "no monitor file"}  # fmt: skip
    counters = None
    if args.checkpoints:
        from jest_trainer.checkpoint import load_latest_checkpoint

        loaded = load_latest_checkpoint(Path(args.checkpoints))
        counters = None if loaded is None else loaded.state.get("counters")
    settings = json.loads(args.settings) if args.settings else {}
    document = report(summary, monitor_doc, counters=counters, settings=settings)
    Path(args.out).write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps({key: document[key] for key in ("phase", "examples_per_second", "data_wait_fraction")}))
    return 0 if document["phase"] == "Succeeded" else 1


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python bench/gpu_stream.py {shards,manifest,monitor,report} ...`` (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    commands = parser.add_subparsers(dest="command", required=True)
    shards = commands.add_parser("shards")
    shards.add_argument("--out", type=Path, required=True)
    shards.add_argument("--pool", type=int, default=200_000)
    shards.add_argument("--curated", type=int, default=5_000)
    shards.add_argument("--eval", type=int, default=2_000)
    shards.add_argument("--size", type=int, default=224)
    shards.add_argument("--shard-size", type=int, default=2_000)
    shards.add_argument("--seed", type=int, default=0)
    shards.add_argument("--processes", type=int, default=1)
    shards.set_defaults(func=_cmd_shards)
    manifest = commands.add_parser("manifest")
    manifest.add_argument("--urls", required=True, help="urls.json written by 'shards'")
    manifest.add_argument("--out", required=True)
    manifest.add_argument("--arch", default="openclip:ViT-B-32")
    manifest.add_argument("--steps", type=int, default=300)
    manifest.add_argument("--batch-size", type=int, default=256)
    manifest.add_argument("--filter-ratio", type=float, default=0.8)
    manifest.add_argument("--loader-workers", type=int, default=8)
    manifest.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    manifest.add_argument("--accelerator", choices=("gpu", "cpu"), default="gpu")
    manifest.add_argument("--reference-steps", type=int, default=50)
    manifest.add_argument("--image-size", type=int, default=None)
    manifest.set_defaults(func=_cmd_manifest)
    mon = commands.add_parser("monitor")
    mon.add_argument("--out", required=True)
    mon.add_argument("--interval", type=float, default=0.2)
    mon.set_defaults(func=_cmd_monitor)
    rep = commands.add_parser("report")
    rep.add_argument("--summary", required=True)
    rep.add_argument("--monitor", required=True)
    rep.add_argument("--checkpoints", default=None)
    rep.add_argument("--settings", default=None, help="JSON object of the run's settings")
    rep.add_argument("--out", required=True)
    rep.set_defaults(func=_cmd_report)
    args = parser.parse_args(argv)
    if getattr(args, "steps", 1) < 1 or not math.isfinite(getattr(args, "filter_ratio", 0.0)):
        parser.error("--steps must be >= 1")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
