"""Atomic, rotating training checkpoints and RNG-state capture.

A worker can be killed at any instant (preemption, gang restart, OOM), so a checkpoint file either
exists completely or not at all: it is written to a hidden temporary file in the same directory,
fsynced, then ``os.replace``-d onto ``ckpt-<step:08d>.pt`` (a rename is atomic on POSIX). Loading
walks the files newest first and skips any that cannot be read or lack the required keys (a file
copied in by hand, a disk that lost data) with a warning, so a restart never crashes on a bad file
and never silently starts from step 0 while a good checkpoint exists.

Checkpoints are loaded with ``torch.load(weights_only=True)``: every value stored here is a tensor
or a plain container of str/int/float/bool/None, which keeps untrusted files from running code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

log = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^ckpt-(\d{8,})\.pt$")
REQUIRED_KEYS: frozenset[str] = frozenset({"step", "model", "optimizer"})


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint that was read completely: its step, file and contents."""

    step: int
    path: Path
    state: dict[str, Any]


def checkpoint_path(directory: Path, step: int) -> Path:
    """The file name a checkpoint of ``step`` (completed optimizer steps) gets."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return Path(directory) / f"ckpt-{step:08d}.pt"


def _fsync_directory(directory: Path) -> None:
    """Persist a rename (best effort: some filesystems refuse to open directories)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Run ``write`` on a temp file beside ``path``, fsync, then rename it over ``path`` (atomic on POSIX).

    Readers see either the old file or the whole new one; a writer killed mid-way leaves only a
    ``.<name>.*.tmp`` file, which :func:`prune_temporaries` removes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see either the old file or the whole new one."""
    _atomic_write(path, lambda handle: handle.write(data))


def atomic_write_json(path: Path, document: Mapping[str, Any]) -> None:
    """Atomically write a JSON document (the progress file the operator and ``jestctl`` poll)."""
    atomic_write_bytes(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every file named like a checkpoint, oldest first (contents not checked)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = CHECKPOINT_PATTERN.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def save_checkpoint(directory: Path, step: int, state: Mapping[str, Any], *, keep: int) -> Path:
    """Atomically write ``state`` as the checkpoint of ``step`` and delete all but the newest ``keep``.

    ``state`` must contain at least ``REQUIRED_KEYS``; its ``step`` must equal ``step``. Returns the path.
    """
    if keep < 1:
        raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
    missing = REQUIRED_KEYS - set(state)
    if missing:
        raise ValueError(f"checkpoint state lacks required keys: {sorted(missing)}")
    if int(state["step"]) != step:
        raise ValueError(f"checkpoint state step {state['step']} != file step {step}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    _atomic_write(path, lambda handle: torch.save(dict(state), handle))
    for _, old in list_checkpoints(directory)[:-keep]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    return path


def read_checkpoint(path: Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one checkpoint file; raises ``ValueError`` when it is unreadable or incomplete."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ... on bad files
        raise ValueError(f"unreadable checkpoint {path}: {type(error).__name__}: {error}") from error
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds {type(state).__name__}, not a dict")
    missing = REQUIRED_KEYS - set(state)
    if missing:
        raise ValueError(f"checkpoint {path} lacks required keys {sorted(missing)}")
    return state


def load_latest_checkpoint(
    directory: Path, *, map_location: str | torch.device = "cpu"
) -> LoadedCheckpoint | None:
    """The newest checkpoint in ``directory`` that loads completely, or None when there is none.

    Corrupted or partial files are skipped with a warning (and left in place for inspection).
    """
    for step, path in reversed(list_checkpoints(directory)):
        try:
            state = read_checkpoint(path, map_location=map_location)
        except ValueError as error:
            log.warning("skipping checkpoint: %s", error)
            continue
        if int(state["step"]) != step:
            log.warning("skipping checkpoint %s: it records step %s", path, state["step"])
            continue
        return LoadedCheckpoint(step=step, path=path, state=state)
    return None


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA, when present) RNG states, storable with weights_only."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _to_lists(random.getstate()),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng_state`` (missing parts, e.g. CUDA on a CPU host, are left alone)."""
    if "python" in state:
        random.setstate(_to_tuples(state["python"]))
    if "numpy" in state:
        np_state = state["numpy"]
        np.random.set_state(
            (
                np_state["kind"],
                np_state["keys"].numpy().astype(np.uint32),
                np_state["pos"],
                np_state["has_gauss"],
                np_state["cached_gaussian"],
            )
        )
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value: Any) -> Any:
    """Nested tuples -> lists (Python's RNG state is tuples; lists survive any serialiser)."""
    if isinstance(value, tuple | list):
        return [_to_lists(item) for item in value]
    return value


def _to_tuples(value: Any) -> Any:
    """Nested lists -> tuples (what ``random.setstate`` expects)."""
    if isinstance(value, list):
        return tuple(_to_tuples(item) for item in value)
    return value


def prune_temporaries(directory: Path) -> int:
    """Remove leftover ``.ckpt-*.tmp`` files of a writer that was killed mid-write; returns how many."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for entry in directory.iterdir():
        if entry.name.startswith(".ckpt-") and entry.name.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed += 1
    return removed
