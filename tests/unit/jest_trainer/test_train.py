"""The training loop's pure pieces (LR schedule, seeding, sharding, FLOPs) and short in-process runs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from jest_trainer import flops as flops_mod
from jest_trainer import train as train_mod

# --- LR schedule -----------------------------------------------------------------------------------


def test_lr_warms_up_linearly_then_decays_by_cosine() -> None:
    lrs = [train_mod.lr_at(step, total_steps=100, peak_lr=1.0, warmup_steps=10) for step in range(100)]
    assert lrs[:10] == pytest.approx([(step + 1) / 10 for step in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(later <= earlier for earlier, later in itertools.pairwise(lrs[10:]))
    assert 0.0 < lrs[-1] < 0.001


def test_lr_without_warmup_starts_at_peak() -> None:
    assert train_mod.lr_at(0, total_steps=10, peak_lr=0.3, warmup_steps=0) == pytest.approx(0.3)


def test_lr_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="steps"):
        train_mod.lr_at(0, total_steps=0, peak_lr=1.0, warmup_steps=0)
    with pytest.raises(ValueError, match="step"):
        train_mod.lr_at(-1, total_steps=10, peak_lr=1.0, warmup_steps=0)


# --- seeding and sharding --------------------------------------------------------------------------


def test_selection_generator_is_reproducible_and_distinct_per_step_and_rank() -> None:
    def draw(seed: int, step: int, rank: int) -> torch.Tensor:
        return torch.rand(4, generator=train_mod.selection_generator(seed, step, rank))

    assert torch.equal(draw(0, 5, 1), draw(0, 5, 1))
    assert not torch.equal(draw(0, 5, 1), draw(0, 5, 0))
    assert not torch.equal(draw(0, 5, 1), draw(0, 6, 1))
    assert not torch.equal(draw(0, 5, 1), draw(1, 5, 1))


def test_shards_are_disjoint_and_cover_the_pool() -> None:
    shards = [train_mod.shard_indices(103, world_size=3, rank=rank, seed=7) for rank in range(3)]
    together = torch.cat(shards)
    assert sorted(together.tolist()) == list(range(103))
    assert {len(shard) for shard in shards} == {34, 35}


def test_super_batches_walk_epochs_without_repeats_inside_an_epoch() -> None:
    positions = [
        train_mod.super_batch_positions(10, local_super_batch=4, step=step, seed=3, rank=0) for step in range(5)
    ]
    stream = torch.cat(positions).tolist()
    assert sorted(stream[:10]) == list(range(10))
    assert sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]
    again = train_mod.super_batch_positions(10, local_super_batch=4, step=3, seed=3, rank=0)
    assert torch.equal(again, positions[3])


def test_super_batch_larger_than_the_shard_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="super-batch"):
        train_mod.super_batch_positions(10, local_super_batch=11, step=0, seed=0, rank=0)


def test_distributed_env_parses_and_names_bad_variables() -> None:
    assert train_mod.distributed_env({}) == (1, 0, 0)
    assert train_mod.distributed_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}) == (4, 2, 0)
    with pytest.raises(ValueError, match="RANK"):
        train_mod.distributed_env({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        train_mod.distributed_env({"WORLD_SIZE": "two"})


def test_tpu_without_torch_xla_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="torch_xla"):
        train_mod.init_distributed({"PJRT_DEVICE": "TPU"})


def test_multi_process_env_without_master_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        train_mod.init_distributed({"WORLD_SIZE": "2", "RANK": "0"})


# --- FLOPs accounting ------------------------------------------------------------------------------


def test_step_flops_count_training_and_what_each_method_scores() -> None:
    forward = {"image": 1000.0, "text": 500.0}
    kwargs = {"forward_per_example": forward, "embed_dim": 8, "local_batch": 4, "global_batch": 8,
              "local_super_batch": 20}
    jest = flops_mod.step_flops(method="jest", **kwargs)
    assert jest["train"] == 3 * (4 * 1500 + 2 * 4 * 8 * 8)
    assert jest["selection_learner"] == 20 * 1500 + 2 * 20 * 20 * 8
    assert jest["selection_reference"] == 2 * 20 * 20 * 8
    uniform = flops_mod.step_flops(method="uniform", **kwargs)
    assert uniform["train"] == jest["train"]
    assert uniform["selection_learner"] == uniform["selection_reference"] == 0
    assert flops_mod.step_flops(method="hard_learner", **kwargs)["selection_reference"] == 0
    assert flops_mod.step_flops(method="easy_reference", **kwargs)["selection_learner"] == 0
    assert flops_mod.total_flops(jest) == sum(jest.values())


def test_step_flops_reject_inconsistent_sizes() -> None:
    with pytest.raises(ValueError, match="batch"):
        flops_mod.step_flops(method="jest", forward_per_example={"image": 1, "text": 1}, embed_dim=4,
                             local_batch=8, global_batch=8, local_super_batch=4)
