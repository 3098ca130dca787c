"""Which device and process group the environment selects, and the collectives' single-process behaviour.

The XLA path itself runs in its own environment: ``tests/integration/test_xla.py``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from jest_trainer import distributed


@pytest.fixture
def no_torch_xla(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch_xla" else real(name, *a))


@pytest.fixture
def fake_torch_xla(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "torch_xla" else real(name, *a))


@pytest.mark.parametrize("value", ["TPU", "tpu", "CPU", "cpu"])
def test_pjrt_tpu_or_cpu_with_torch_xla_selects_xla(fake_torch_xla: None, value: str) -> None:
    assert distributed.xla_requested({"PJRT_DEVICE": value})


@pytest.mark.parametrize("env", [{}, {"PJRT_DEVICE": ""}, {"PJRT_DEVICE": "CUDA"}])
def test_without_pjrt_tpu_or_cpu_xla_is_not_used(fake_torch_xla: None, env: dict[str, str]) -> None:
    assert not distributed.xla_requested(env)


def test_pjrt_tpu_without_torch_xla_is_a_clear_error(no_torch_xla: None) -> None:
    with pytest.raises(RuntimeError, match="PJRT_DEVICE=TPU but torch_xla is not installed"):
        distributed.init_distributed({"PJRT_DEVICE": "TPU"})


def test_pjrt_cpu_without_torch_xla_is_a_plain_cpu_run(no_torch_xla: None) -> None:
    if torch.cuda.is_available():
        pytest.skip("picks CUDA on a GPU machine")
    ctx = distributed.init_distributed({"PJRT_DEVICE": "CPU"})
    assert ctx.device == torch.device("cpu") and ctx.backend is None and not ctx.distributed


def test_ddp_wraps_the_learner_except_on_xla() -> None:
    def ctx(world: int, device: str) -> distributed.DistContext:
        return distributed.DistContext(world_size=world, rank=0, local_rank=0, backend="gloo",
                                       device=torch.device(device))

    assert distributed.uses_ddp(ctx(2, "cpu"))
    assert not distributed.uses_ddp(ctx(1, "cpu"))
    assert not distributed.uses_ddp(ctx(2, "xla"))  # there distributed.average_gradients does DDP's averaging


def test_sync_and_mark_step_are_no_ops_on_cpu() -> None:
    distributed.sync(torch.device("cpu"))
    distributed.mark_step(torch.device("cpu"))


def test_average_gradients_without_a_process_group_leaves_gradients_alone() -> None:
    layer = torch.nn.Linear(3, 2)
    layer(torch.ones(1, 3)).sum().backward()
    before = [param.grad.clone() for param in layer.parameters()]
    distributed.average_gradients(layer.parameters())
    assert all(torch.equal(param.grad, grad) for param, grad in zip(layer.parameters(), before, strict=True))
