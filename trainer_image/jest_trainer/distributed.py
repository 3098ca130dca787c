"""Who this process is in the job, where it computes, and the few collectives the loop needs.

Why its own module: the loop, the reference broadcast and the benchmarks all need "rank, world size,
device" and a handful of small collectives that degrade to the identity in a single process, so
nothing outside this file branches on ``dist.is_initialized()``.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the job and where it computes."""

    world_size: int
    rank: int
    local_rank: int
    backend: str | None
    device: torch.device

    @property
    def distributed(self) -> bool:
        """Whether a process group with more than one member is initialised."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 evaluates, writes checkpoints and the progress file."""
        return self.rank == 0


def single_process(device: str | torch.device = "cpu") -> DistContext:
    """The context of a one-process run on ``device`` (benchmarks, tests, ``jestctl score``)."""
    return DistContext(world_size=1, rank=0, local_rank=0, backend=None, device=torch.device(device))


def env_int(env: Mapping[str, str], name: str, default: int) -> int:
    """Integer environment variable ``name`` (``default`` when unset or empty); a clear error names it."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {raw!r}") from None


def distributed_env(env: Mapping[str, str]) -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` from the pod / torchrun environment (absent => single process)."""
    world = env_int(env, "WORLD_SIZE", 1)
    rank = env_int(env, "RANK", 0)
    local_rank = env_int(env, "LOCAL_RANK", rank if world > 1 else 0)
    if world < 1:
        raise ValueError(f"WORLD_SIZE: must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"RANK: must be in [0, WORLD_SIZE={world}), got {rank}")
    if local_rank < 0:
        raise ValueError(f"LOCAL_RANK: must be >= 0, got {local_rank}")
    return world, rank, local_rank


def init_distributed(env: Mapping[str, str] | None = None, *, timeout_seconds: float = 1800.0) -> DistContext:
    """Join the process group the environment describes: XLA on TPU, NCCL on CUDA, gloo on CPU.

    ``PJRT_DEVICE=TPU`` needs ``torch_xla`` (clear error when it is missing). Without ``WORLD_SIZE`` (or
    with 1) no process group is created and the device is chosen the same way.
    """
    env = os.environ if env is None else env
    world, rank, local_rank = distributed_env(env)
    if env.get("PJRT_DEVICE", "").upper() == "TPU":
        try:
            import torch_xla.core.xla_model as xm
        except ImportError as error:
            raise RuntimeError(
                "PJRT_DEVICE=TPU but torch_xla is not installed in this image; install torch_xla or unset PJRT_DEVICE"
            ) from error
        device = xm.xla_device()
        backend = "xla"
    elif torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if world == 1:
        return DistContext(world_size=1, rank=0, local_rank=local_rank, backend=None, device=device)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if backend != "xla" and not env.get(name):
            raise ValueError(f"{name}: required when WORLD_SIZE={world} > 1")
    if backend == "xla":
        import torch_xla.distributed.xla_backend  # noqa: F401  (registers the "xla" backend)

        dist.init_process_group("xla", init_method="xla://")
    else:
        dist.init_process_group(
            backend,
            init_method=f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}",
            world_size=world,
            rank=rank,
            timeout=dt.timedelta(seconds=timeout_seconds),
        )
    return DistContext(world_size=world, rank=rank, local_rank=local_rank, backend=backend, device=device)


def configure_cpu_threads(env: Mapping[str, str], ctx: DistContext) -> int | None:
    """Avoid CPU oversubscription when every rank of a CPU job runs on this host; returns the threads set.

    When ``OMP_NUM_THREADS`` is unset, the job runs on CPU with several ranks and ``MASTER_ADDR`` is a
    loopback address (``jestctl run``, the local kubelet, ``torchrun --standalone``), all ranks share
    this machine: each gets ``usable CPUs // world size`` intra-op threads (at least 1). Without this,
    every rank starts one spinning OpenMP thread per core and a 2-rank job on 2 cores runs >10x slower.
    In a pod (``MASTER_ADDR`` is a Service name) or with ``OMP_NUM_THREADS`` set, nothing is changed.
    """
    if env.get("OMP_NUM_THREADS") or ctx.device.type != "cpu" or not ctx.distributed:
        return None
    if env.get("MASTER_ADDR", "") not in ("127.0.0.1", "localhost", "::1"):
        return None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    threads = max(1, usable // ctx.world_size)
    torch.set_num_threads(threads)
    return threads


def all_reduce(values: list[float], ctx: DistContext, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> list[float]:
    """All-reduce a few floats (identity in a single process)."""
    if not ctx.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor, op=op)
    return [float(value) for value in tensor.cpu()]


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when ``flag`` is True on at least one (the stop vote)."""
    return all_reduce([1.0 if flag else 0.0], ctx, dist.ReduceOp.MAX)[0] > 0


def all_gather_object(value: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``value``, in rank order (``[value]`` in a single process)."""
    if not ctx.distributed:
        return [value]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any, ctx: DistContext) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not ctx.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def sync(device: torch.device) -> None:
    """Wait for queued device work so phase timings are honest (XLA: cut the graph; no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group this process joined (no-op in a single process)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
