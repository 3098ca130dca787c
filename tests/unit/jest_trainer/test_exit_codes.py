"""Which errors the trainer calls deterministic (exit 3, never retried) and which a restart may cure (exit 1)."""

from __future__ import annotations

import pytest
import torch
from jest_trainer.exit_codes import (
    EXIT_DETERMINISTIC,
    EXIT_RETRYABLE,
    NON_RETRYABLE_EXIT_CODES,
    exit_code_for,
    is_deterministic,
)


def shape_error() -> RuntimeError:
    try:
        torch.zeros(2, 3) @ torch.zeros(4, 5)
    except RuntimeError as error:
        return error
    raise AssertionError("torch accepted mismatched shapes")


@pytest.mark.parametrize("error", [
    ValueError("training.checkpoint.dir: holds a checkpoint of another model"),
    TypeError("unsupported operand"),
    IndexError("index 40 is out of bounds"),
    NotImplementedError("softmax loss on XLA"),
    shape_error(),  # torch's own wording, so a model/input mismatch fails at once
])
def test_errors_the_same_inputs_raise_again_are_deterministic(error: BaseException) -> None:
    assert is_deterministic(error) and exit_code_for(error) == EXIT_DETERMINISTIC in NON_RETRYABLE_EXIT_CODES


@pytest.mark.parametrize("error", [
    RuntimeError("Connection closed by peer [127.0.0.1]:29500"),
    torch.distributed.DistBackendError("NCCL communicator was aborted"),
    OSError("No space left on device"),
    MemoryError(),
    KeyboardInterrupt(),
])
def test_lost_peers_io_and_memory_are_retried(error: BaseException) -> None:
    assert not is_deterministic(error) and exit_code_for(error) == EXIT_RETRYABLE not in NON_RETRYABLE_EXIT_CODES
