"""Global-negative contrastive losses under real torch.distributed (gloo, two processes on localhost).

Each worker holds half of one fixed random global batch and calls ``contrastive_loss``; the test checks,
for both loss kinds, that every rank returns the single-process loss of the full batch and that the
gradients follow the documented DDP convention: local features receive ``world_size x`` the full-batch
gradient of their rows, and the mean over ranks of the temperature/bias gradients equals the full-batch
gradient. The workers are this file run as a script (``python test_distributed_losses.py OUT``), so no
pickling of test functions across processes is involved.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch.nn import functional

WORLD_SIZE = 2
GLOBAL_BATCH = 8
DIM = 16
KINDS = ("sigmoid", "softmax")


def _global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed global batch (float64 so the comparison is tight) with its temperature and bias."""
    generator = torch.Generator().manual_seed(1234)
    image = functional.normalize(torch.randn(GLOBAL_BATCH, DIM, generator=generator, dtype=torch.float64), dim=1)
    noise = torch.randn(GLOBAL_BATCH, DIM, generator=generator, dtype=torch.float64)
    text = functional.normalize(image + 0.7 * noise, dim=1)
    return image, text, torch.tensor(math.log(10.0), dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)


def _loss_and_gradients(image, text, scale, bias, kind: str) -> dict[str, torch.Tensor]:
    from jest_trainer.losses import contrastive_loss

    image = image.clone().requires_grad_(True)
    text = text.clone().requires_grad_(True)
    scale = scale.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True)
    loss = contrastive_loss(image, text, scale, bias, kind=kind, check_batch_sizes=True)
    loss.backward()
    return {
        "loss": loss.detach(),
        "image_grad": image.grad,
        "text_grad": text.grad,
        "scale_grad": scale.grad,
        "bias_grad": bias.grad if bias.grad is not None else torch.zeros((), dtype=torch.float64),
    }


def _worker(out_dir: Path) -> None:
    """One rank: compute both kinds on its half, then provoke the unequal-batch error, save everything."""
    import torch.distributed as dist
    from jest_trainer.losses import contrastive_loss

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        image, text, scale, bias = _global_batch()
        rows = GLOBAL_BATCH // world
        mine = slice(rank * rows, (rank + 1) * rows)
        results: dict[str, object] = {
            kind: _loss_and_gradients(image[mine], text[mine], scale, bias, kind) for kind in KINDS
        }
        uneven = rows + rank  # rank 0 holds `rows`, rank 1 one more
        try:
            contrastive_loss(image[:uneven], text[:uneven], scale, bias, kind="sigmoid", check_batch_sizes=True)
            results["uneven_error"] = ""
        except ValueError as error:
            results["uneven_error"] = str(error)
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_global_negative_losses_match_the_single_process_full_batch(
    tmp_path: Path, free_port: int, process_reaper: list[subprocess.Popen]
) -> None:
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port),
        "WORLD_SIZE": str(WORLD_SIZE),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    for rank in range(WORLD_SIZE):
        process_reaper.append(
            subprocess.Popen(
                [sys.executable, __file__, str(tmp_path)],
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    for rank, proc in enumerate(process_reaper):
        output, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"rank {rank} failed:\n{output}"

    image, text, scale, bias = _global_batch()
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    rows = GLOBAL_BATCH // WORLD_SIZE
    for kind in KINDS:
        single = _loss_and_gradients(image, text, scale, bias, kind)
        for rank, results in enumerate(per_rank):
            got = results[kind]
            mine = slice(rank * rows, (rank + 1) * rows)
            torch.testing.assert_close(got["loss"], single["loss"], msg=f"{kind} loss on rank {rank}")
            torch.testing.assert_close(got["image_grad"] / WORLD_SIZE, single["image_grad"][mine])
            torch.testing.assert_close(got["text_grad"] / WORLD_SIZE, single["text_grad"][mine])
        for name in ("scale_grad", "bias_grad"):
            mean = sum(results[kind][name] for results in per_rank) / WORLD_SIZE
            torch.testing.assert_close(mean, single[name], msg=f"{kind} {name}")
    for results in per_rank:
        assert "every rank must hold the same local batch size" in results["uneven_error"]
        assert "[4, 5]" in results["uneven_error"]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
