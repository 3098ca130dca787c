"""Who this process is in the job, where it computes, and the few collectives the loop needs.

Why its own module: the loop, the reference broadcast and the benchmarks all need "rank, world size,
device" and a handful of small collectives that degrade to the identity in a single process, so
nothing outside this file branches on ``dist.is_initialized()``.

XLA (``torch_xla``, selected by ``PJRT_DEVICE``) comes in two shapes:

* ``PJRT_DEVICE=TPU``: the ``xla`` process group (``init_method="xla://"``); collectives are XLA ops
  inside the graph.
* ``PJRT_DEVICE=CPU`` (the XLA path CI runs, ``tests/integration/test_xla.py``): compute on the XLA
  device, processes joined by a **gloo** group. torch_xla 2.9's PJRT CPU client is single-process: every
  process sees one device, ``runtime.world_size() == 1`` and ``global_ordinal() == 0``, so the ``xla``
  backend makes each process a world of one (and the second one's TCPStore fails with EADDRINUSE on
  ``MASTER_PORT``). gloo cannot read XLA tensors either, and it does not say so: ``dist.all_reduce`` on an
  XLA tensor returns with the tensor unchanged. So every tensor collective here (and in ``losses`` and
  ``reference``, through :func:`all_gather_tensor`, :func:`all_reduce_tensor_`, :func:`broadcast_tensor_`)
  goes through host memory when the group is gloo and the tensor is not on the CPU, and on XLA gradients
  are averaged by :func:`average_gradients` instead of DDP (whose reducer would hand gloo XLA buffers).
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger("jest_trainer.distributed")

# PJRT_DEVICE values that put the trainer on torch_xla (TPU: required; CPU: when torch_xla is installed)
XLA_PJRT_DEVICES: tuple[str, ...] = ("TPU", "CPU")


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


def pjrt_device(env: Mapping[str, str]) -> str:
    """``PJRT_DEVICE`` upper-cased (``""`` when unset): which device torch_xla is asked to run on."""
    return env.get("PJRT_DEVICE", "").upper()


def xla_requested(env: Mapping[str, str]) -> bool:
    """Whether the environment asks for torch_xla: ``PJRT_DEVICE=TPU``, or ``PJRT_DEVICE=CPU`` with torch_xla installed.

    ``PJRT_DEVICE=TPU`` without torch_xla is a clear error; ``PJRT_DEVICE=CPU`` without it is a plain CPU run
    (the variable means nothing to torch itself).
    """
    pjrt = pjrt_device(env)
    if pjrt == "TPU":
        if importlib.util.find_spec("torch_xla") is None:
            raise RuntimeError(
                "PJRT_DEVICE=TPU but torch_xla is not installed in this image; install torch_xla or unset PJRT_DEVICE"
            )
        return True
    return pjrt in XLA_PJRT_DEVICES and importlib.util.find_spec("torch_xla") is not None


def init_distributed(env: Mapping[str, str] | None = None, *, timeout_seconds: float = 1800.0) -> DistContext:
    """Join the process group the environment describes: XLA on TPU, NCCL on CUDA, gloo on CPU and XLA-on-CPU.

    ``PJRT_DEVICE=TPU`` needs ``torch_xla`` (clear error when it is missing) and joins the ``xla`` group;
    ``PJRT_DEVICE=CPU`` with torch_xla installed computes on the XLA device with a gloo group (module
    docstring: why). Without ``WORLD_SIZE`` (or with 1) no process group is created and the device is
    chosen the same way.
    """
    env = os.environ if env is None else env
    world, rank, local_rank = distributed_env(env)
    if xla_requested(env):
        import torch_xla

        device = torch_xla.device()
        backend = "xla" if pjrt_device(env) == "TPU" else "gloo"
    elif torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if world == 1:
        log.info("single process on %s", device)
        return DistContext(world_size=1, rank=0, local_rank=local_rank, backend=None, device=device)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if backend != "xla" and not env.get(name):
            raise ValueError(f"{name}: required when WORLD_SIZE={world} > 1")
    if backend == "xla":
        import torch_xla.distributed.xla_backend  # registers the "xla" backend

        dist.init_process_group("xla", init_method="xla://")
    else:
        dist.init_process_group(
            backend,
            init_method=f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}",
            world_size=world,
            rank=rank,
            timeout=dt.timedelta(seconds=timeout_seconds),
        )
    log.info("rank %d of %d on %s, process group %s", rank, world, device, backend)
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
    # gloo reduces host tensors (also when the compute device is XLA); NCCL and XLA need them on the device
    device = torch.device("cpu") if ctx.backend == "gloo" else ctx.device
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
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


def _through_host(tensor: Tensor, group: dist.ProcessGroup | None) -> bool:
    """Whether a collective on ``tensor`` goes through host memory: a gloo group and an XLA (not CPU/CUDA) tensor."""
    return tensor.device.type not in ("cpu", "cuda") and dist.get_backend(group) == "gloo"


def all_gather_tensor(tensor: Tensor, group: dist.ProcessGroup | None = None) -> list[Tensor]:
    """Every rank's ``tensor`` (equal shapes), in rank order, on ``tensor``'s device (no autograd)."""
    if _through_host(tensor, group):
        host = tensor.detach().cpu().contiguous()
        parts = [torch.empty_like(host) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, host, group=group)
        return [part.to(tensor.device) for part in parts]
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def _in_place(collective: Callable[[Tensor], Any], tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Run an in-place ``collective`` on ``tensor``, on a host copy where :func:`_through_host`; returns it."""
    if not _through_host(tensor, group):
        collective(tensor)
        return tensor
    host = tensor.detach().cpu()
    collective(host)
    with torch.no_grad():
        tensor.copy_(host.to(tensor.device))
    return tensor


def all_reduce_tensor_(
    tensor: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM, group: dist.ProcessGroup | None = None
) -> Tensor:
    """All-reduce ``tensor`` in place (through host memory where :func:`_through_host`); returns it."""
    return _in_place(lambda target: dist.all_reduce(target, op=op, group=group), tensor, group)


def broadcast_tensor_(tensor: Tensor, src: int = 0, group: dist.ProcessGroup | None = None) -> Tensor:
    """Overwrite ``tensor`` with rank ``src``'s (in place, through host memory where needed); returns it."""
    return _in_place(lambda target: dist.broadcast(target, src=src, group=group), tensor, group)


def uses_ddp(ctx: DistContext) -> bool:
    """Whether the learner is wrapped in DDP: distributed, and not on XLA (there :func:`average_gradients`)."""
    return ctx.distributed and ctx.device.type != "xla"


def average_gradients(parameters: Iterable[nn.Parameter], group: dist.ProcessGroup | None = None) -> None:
    """Replace every gradient by its mean over ranks: what DDP does, for the XLA device (one flat all-reduce).

    A no-op without a process group of more than one member. Parameters without a gradient are skipped
    (every rank has the same ones: the same model, the same loss).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    grads = [param.grad for param in parameters if param.grad is not None]
    if not grads:
        return
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    all_reduce_tensor_(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    with torch.no_grad():
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def mark_step(device: torch.device) -> None:
    """End of a training step on XLA: cut the lazy graph so it does not grow across steps (no-op elsewhere).

    Without it a loop of ``n`` steps traces one graph of ``n`` steps, compiled anew at the first value read
    (every ``.cpu()`` of a ``state_dict`` then compiles its own slice of it: minutes for a 10-step loop).
    """
    if device.type == "xla":
        import torch_xla

        torch_xla.sync()


def sync(device: torch.device) -> None:
    """Wait for queued device work so phase timings are honest (no-op on CPU).

    CUDA: synchronise the stream. XLA: cut the lazy graph here (``torch_xla.sync()``, the successor of
    ``xm.mark_step()``), which compiles (first time) and launches what the phase traced, then wait for the
    device to finish it (``xm.wait_device_ops()``); without this an XLA phase would time only the tracing
    and the work would be charged to whichever later phase first needs a value.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xla":
        import torch_xla
        import torch_xla.core.xla_model as xm

        torch_xla.sync()
        xm.wait_device_ops()


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group this process joined (no-op in a single process)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
