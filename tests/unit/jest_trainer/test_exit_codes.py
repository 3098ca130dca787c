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
from jest_trainer.shards import MissingExtraError
from jest_trainer.stream import DataQualityError


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


def test_data_errors_say_themselves_whether_a_restart_helps() -> None:
    """Too many broken samples fail the same way again; unreadable shards may be an outage that passes."""
    broken = DataQualityError("data: 9 of 100 samples were skipped: 9 decode_error", skipped={"decode_error": 9})
    outage = DataQualityError("data: 60 of 100 samples were skipped: 60 unreadable_shard",
                              skipped={"unreadable_shard": 60})
    reraised = DataQualityError("Caught DataQualityError in DataLoader worker process 0: ... 60 unreadable_shard")
    assert exit_code_for(broken) == EXIT_DETERMINISTIC
    assert exit_code_for(outage) == EXIT_RETRYABLE and exit_code_for(reraised) == EXIT_RETRYABLE
    assert exit_code_for(MissingExtraError("s3:// needs the [remote] extra")) == EXIT_DETERMINISTIC
