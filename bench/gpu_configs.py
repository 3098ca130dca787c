"""The Python parts of ``bench/gpu_configs.sh``: the NVML monitor, the selection arithmetic timing and the report.

Why a separate module: the shell script runs once on a GPU machine that CI never has, so everything it does
beyond orchestration lives here, importable and tested on CPU (``tests/unit/bench/test_gpu_configs.py``).

* ``monitor``: finds the NVML board behind each CUDA device the job uses (``cuda:0`` .. ``cuda:N-1``, through
  ``CUDA_VISIBLE_DEVICES`` and the UUID torch reports: :func:`jest_trainer.energy.resolve_nvml_device`, the
  trainer's own mapping), then reads every board's total-energy counter (``measured``) and power
  (``integrated``, trapezoid rule) at each tick until SIGTERM, so the two are compared over the same window.
  Goal: the integral within 5% of the counter.
* ``arithmetic``: the wall time of ``select_batch("jest", ...)`` (the selection arithmetic the trainer times:
  no model forwards) on the run's device at one rank's super-batch shape, synchronised on both sides.
* ``report``: folds each loss's ``jestctl run --json`` summary, its progress file, its monitor file and the
  arithmetic timings into ``gpu_configs.json``; the arithmetic fraction is the arithmetic's median time over
  the run's step time (``global batch / examples per second``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import signal
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: |integrated - counter| / counter the benchmark aims for (DESIGN.md §5 honesty: both figures are shown).
ENERGY_GOAL = 0.05


def integrate(samples: Sequence[tuple[float, float]]) -> float:
    """Trapezoid integral of ``(seconds, watts)`` samples in joules (0 for fewer than two samples)."""
    return sum((t1 - t0) * (w0 + w1) / 2.0 for (t0, w0), (t1, w1) in itertools.pairwise(samples))


def _write(out: Path, document: Mapping[str, Any]) -> dict[str, Any]:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=1) + "\n")
    return dict(document)


def monitor(out: Path, *, devices: int, interval: float, nvml: Any = None, env: Mapping[str, str] | None = None,
            cuda_uuid: Callable[[int], str | None] | None = None, should_stop: Callable[[], bool] | None = None,
            clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:  # fmt: skip
    """Sample the boards of ``cuda:0 .. cuda:<devices-1>`` until SIGTERM/SIGINT (or ``should_stop()``).

    ``cuda_uuid`` defaults to torch's device UUID (:func:`jest_trainer.energy.torch_cuda_uuid`); ``nvml``,
    ``env`` and ``clock`` exist for tests. Writes and returns the monitor document.
    """
    from jest_trainer import energy

    module, why = energy.load_nvml(nvml)
    if module is None:
        return _write(out, {"available": False, "why": f"NVML unavailable: {why}"})
    env = os.environ if env is None else env
    boards: list[dict[str, Any]] = []
    handles: list[Any] = []
    for index in range(devices):
        try:
            handle, uuid, how = energy.resolve_nvml_device(
                module, index, env=env, cuda_uuid=energy.torch_cuda_uuid if cuda_uuid is None else cuda_uuid)
        except (energy.DeviceIdentityError, module.NVMLError) as error:
            return _write(out, {"available": False, "why": f"cuda:{index}: {error}"})
        name = module.nvmlDeviceGetName(handle)
        boards.append({"device": f"cuda:{index}", "uuid": uuid, "identified_by": how,
                       "name": name.decode() if isinstance(name, bytes) else str(name)})
        handles.append(handle)
    stop = {"now": False}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["now"] = True

    if should_stop is None:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        should_stop = lambda: stop["now"]  # noqa: E731 - a one-line predicate
    start = clock()
    power: list[list[tuple[float, float]]] = [[] for _ in handles]
    counters: list[list[int]] = [[] for _ in handles]

    def tick() -> None:
        now = clock() - start
        for slot, handle in enumerate(handles):
            counters[slot].append(int(module.nvmlDeviceGetTotalEnergyConsumption(handle)))
            power[slot].append((now, module.nvmlDeviceGetPowerUsage(handle) / 1000.0))

    try:
        tick()
    except module.NVMLError as error:  # e.g. NOT_SUPPORTED: a board without an energy counter (pre-Volta)
        return _write(out, {"available": False, "why": f"NVML cannot read the boards' energy and power: {error}"})
    while not should_stop():
        time.sleep(interval)
        tick()
    tick()  # the last reading closes the window for both figures
    for board, watts, millijoules in zip(boards, power, counters, strict=True):
        measured = (millijoules[-1] - millijoules[0]) / 1000.0
        integrated = integrate(watts)
        board.update({"measured_joules": measured, "integrated_joules": integrated,
                      "relative_difference": (integrated - measured) / measured if measured > 0 else None,
                      "samples": len(watts), "power_watts": watts})
    measured = sum(board["measured_joules"] for board in boards)
    integrated = sum(board["integrated_joules"] for board in boards)
    relative = (integrated - measured) / measured if measured > 0 else None
    with contextlib.suppress(Exception):  # nothing to clean up after a failed shutdown
        module.nvmlShutdown()
    return _write(out, {
        "available": True,
        "seconds": clock() - start,
        "interval_seconds": interval,
        "boards": boards,
        "measured": {"joules": measured, "method": "measured", "source": "nvml nvmlDeviceGetTotalEnergyConsumption"},
        "integrated": {"joules": integrated, "method": "integrated",
                       "source": f"nvml nvmlDeviceGetPowerUsage every {interval} s, trapezoid rule"},
        "relative_difference": relative,
        "within_goal": relative is not None and abs(relative) <= ENERGY_GOAL,
    })  # fmt: skip


def time_selection(*, device: str, super_batch: int, batch_size: int, chunks: int, loss: str, embed_dim: int,
                   repeats: int, warmup: int) -> dict[str, float]:  # fmt: skip
    """Median/p10/p90 wall time (s) of one ``select_batch("jest", ...)`` at (B, b) on ``device``.

    The logits are what the trainer hands over: float32 ``[B, B]`` matrices of a learner and a reference on
    the device (scaled like the quickstart's initial model, biased for the sigmoid loss), and a CPU
    generator as in ``loop.train_step``. The device is synchronised before and after each call.
    """
    import torch
    from jest_trainer.losses import sigmoid_logits, softmax_logits
    from jest_trainer.selection import select_batch
    from torch.nn import functional

    target = torch.device(device)
    seeded = torch.Generator().manual_seed(0)

    def embeddings() -> tuple[torch.Tensor, torch.Tensor]:
        image = functional.normalize(torch.randn(super_batch, embed_dim, generator=seeded), dim=1)
        text = functional.normalize(image + torch.randn(super_batch, embed_dim, generator=seeded), dim=1)
        return image.to(target), text.to(target)

    scale, bias = torch.tensor(math.log(10.0), device=target), torch.tensor(-10.0, device=target)
    if loss == "sigmoid":
        learner, reference = (sigmoid_logits(*embeddings(), scale, bias) for _ in range(2))
    else:
        learner, reference = (softmax_logits(*embeddings(), scale) for _ in range(2))
    generator = torch.Generator().manual_seed(1)

    def sync() -> None:
        if target.type == "cuda":
            torch.cuda.synchronize(target)

    def call() -> float:
        sync()
        begin = time.perf_counter()
        select_batch("jest", learner_logits=learner, reference_logits=reference, loss=loss,  # type: ignore[arg-type]
                     batch_size=batch_size, n_chunks=chunks, generator=generator)
        sync()
        return time.perf_counter() - begin

    with torch.no_grad():
        for _ in range(warmup):
            call()
        samples = sorted(call() for _ in range(repeats))
    return {"median_seconds": statistics.median(samples), "p10_seconds": samples[int(0.1 * (len(samples) - 1))],
            "p90_seconds": samples[int(0.9 * (len(samples) - 1))], "repeats": repeats}


def arithmetic(*, device: str, super_batch: int, batch_size: int, world_size: int, chunks: int,
               losses: Sequence[str], embed_dim: int, repeats: int, warmup: int) -> dict[str, Any]:  # fmt: skip
    """The selection arithmetic at one rank's shape (B/W, b/W) of a job of ``world_size`` ranks, per loss."""
    local_super, local_batch = super_batch // world_size, batch_size // world_size
    return {
        "device": device,
        "global": {"super_batch": super_batch, "batch_size": batch_size, "world_size": world_size},
        "per_rank": {"super_batch": local_super, "batch_size": local_batch, "chunks": chunks, "embed_dim": embed_dim},
        "timings": {loss: time_selection(device=device, super_batch=local_super, batch_size=local_batch,
                                         chunks=chunks, loss=loss, embed_dim=embed_dim, repeats=repeats,
                                         warmup=warmup) for loss in losses},
    }  # fmt: skip


def run_report(loss: str, summary: Mapping[str, Any], progress: Mapping[str, Any], monitor_doc: Mapping[str, Any],
               arithmetic_doc: Mapping[str, Any] | None, *, batch_size: int) -> dict[str, Any]:  # fmt: skip
    """One configuration's result (pure): what ran, its speed, both energy figures and the arithmetic fraction."""
    examples_per_second = summary.get("examples_per_second") or 0.0
    step_seconds = batch_size / examples_per_second if examples_per_second else None
    timing = (arithmetic_doc or {}).get("timings", {}).get(loss)
    fraction = timing["median_seconds"] / step_seconds if timing and step_seconds else None
    nvml = {"available": bool(monitor_doc.get("available")), "why": monitor_doc.get("why")}
    if monitor_doc.get("available"):
        nvml.update({key: monitor_doc[key] for key in ("measured", "integrated", "relative_difference",
                                                       "within_goal", "seconds", "interval_seconds")})
        nvml["boards"] = [{key: value for key, value in board.items() if key != "power_watts"}
                          for board in monitor_doc["boards"]]
    progress_energy = progress.get("energy") or {}
    return {
        "loss": loss,
        "phase": summary.get("phase"),
        "message": summary.get("message"),
        "configuration": summary.get("configuration"),
        "world_size": summary.get("world_size"),
        "steps": summary.get("steps"),
        "examples_per_second": summary.get("examples_per_second"),
        "step_seconds": step_seconds,
        "selection_phase_fraction": progress.get("selectionOverheadFraction"),
        "data_wait_fraction": summary.get("data_wait_fraction"),
        "final_accuracy": summary.get("final_accuracy"),
        "wall_seconds": summary.get("wall_seconds"),
        # the trainer's own meter: the training loop only, all ranks, with its method and source
        "trainer_energy": {**(summary.get("energy") or {}), "average_watts": progress_energy.get("averageWatts")},
        # the monitor: every board of the job over the whole run (start-up, reference, training)
        "nvml": nvml,
        "selection_arithmetic": None if timing is None else {
            **timing, "fraction_of_step": fraction, **(arithmetic_doc or {}).get("per_rank", {})},
    }  # fmt: skip


def report(out_dir: Path, *, losses: Sequence[str], batch_size: int, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Read ``<out_dir>/<loss>/{summary,monitor}.json``, its progress file and ``arithmetic.json``; the document."""

    def load(path: Path, default: Mapping[str, Any]) -> dict[str, Any]:
        return json.loads(path.read_text()) if path.is_file() else dict(default)

    arithmetic_doc = load(out_dir / "arithmetic.json", {}) or None
    runs = [
        run_report(loss, load(out_dir / loss / "summary.json", {"phase": None, "message": "no summary"}),
                   load(out_dir / loss / "run" / "progress.json", {}),
                   load(out_dir / loss / "monitor.json", {"available": False, "why": "no monitor file"}),
                   arithmetic_doc, batch_size=batch_size)
        for loss in losses
    ]  # fmt: skip
    return {
        "benchmark": "gpu_configs",
        "settings": dict(settings),
        "runs": runs,
        "arithmetic": arithmetic_doc,
        "all_succeeded": all(run["phase"] == "Succeeded" for run in runs),
        "energy_goal": ENERGY_GOAL,
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cmd_monitor(args: argparse.Namespace) -> int:
    monitor(Path(args.out), devices=args.devices, interval=args.interval)
    return 0


def _cmd_arithmetic(args: argparse.Namespace) -> int:
    document = arithmetic(device=args.device, super_batch=args.super_batch, batch_size=args.batch_size,
                          world_size=args.world_size, chunks=args.chunks, losses=args.losses.split(","),
                          embed_dim=args.embed_dim, repeats=args.repeats, warmup=args.warmup)  # fmt: skip
    _write(Path(args.out), document)
    print(json.dumps({loss: timing["median_seconds"] for loss, timing in document["timings"].items()}))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    document = report(Path(args.out_dir), losses=args.losses.split(","), batch_size=args.batch_size,
                      settings=json.loads(args.settings) if args.settings else {})
    Path(args.out).write_text(json.dumps(document, indent=2) + "\n")
    for run in document["runs"]:
        arithmetic_part = run["selection_arithmetic"] or {}
        print(json.dumps({"loss": run["loss"], "phase": run["phase"], "configuration": run["configuration"],
                          "examples_per_second": run["examples_per_second"],
                          "nvml_relative_difference": run["nvml"].get("relative_difference"),
                          "arithmetic_fraction": arithmetic_part.get("fraction_of_step")}))  # fmt: skip
    return 0 if document["all_succeeded"] else 1


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python bench/gpu_configs.py {monitor,arithmetic,report} ...`` (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    commands = parser.add_subparsers(dest="command", required=True)
    watch = commands.add_parser("monitor")
    watch.add_argument("--out", required=True)
    watch.add_argument("--devices", type=int, default=1, help="CUDA devices of the job: cuda:0 .. cuda:N-1")
    watch.add_argument("--interval", type=float, default=0.1)
    watch.set_defaults(func=_cmd_monitor)
    timing = commands.add_parser("arithmetic")
    timing.add_argument("--out", required=True)
    timing.add_argument("--device", default="cuda")
    timing.add_argument("--super-batch", type=int, default=5120)
    timing.add_argument("--batch-size", type=int, default=1024)
    timing.add_argument("--world-size", type=int, default=1)
    timing.add_argument("--chunks", type=int, default=16)
    timing.add_argument("--losses", default="sigmoid,softmax")
    timing.add_argument("--embed-dim", type=int, default=64)
    timing.add_argument("--repeats", type=int, default=30)
    timing.add_argument("--warmup", type=int, default=5)
    timing.set_defaults(func=_cmd_arithmetic)
    summary = commands.add_parser("report")
    summary.add_argument("--out-dir", required=True)
    summary.add_argument("--out", required=True)
    summary.add_argument("--losses", default="sigmoid,softmax")
    summary.add_argument("--batch-size", type=int, required=True, help="the runs' global batch (b)")
    summary.add_argument("--settings", default="")
    summary.set_defaults(func=_cmd_report)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
