"""Loop pieces without training: which config changes refuse a resume, the phase timer, the train state."""

from __future__ import annotations

import pytest
import torch
from jest_trainer import loop
from jest_trainer.config import TrainingConfig
from jest_trainer.telemetry import PhaseTimer


def _cfg(**changes: object) -> TrainingConfig:
    document = {"steps": 10, "seed": 1, "selection": {"batchSize": 32, "chunks": 4}}
    for path, value in changes.items():
        node = document
        *parents, leaf = path.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return TrainingConfig.model_validate(document)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"seed": 2}, "training.seed"),
        ({"model__embedDim": 32}, "training.model.embedDim"),
        ({"selection__filterRatio": 0.5}, "training.selection.filterRatio"),
        ({"selection__batchSize": 64}, "training.selection.batchSize"),
        ({"data__noise__wrong": 0.3}, "training.data.noise.wrong"),
        ({"data__loaderWorkers": 4}, "training.data.loaderWorkers"),
        ({"data__shuffleBuffer": 10}, "training.data.shuffleBuffer"),
    ],
)
def test_a_change_of_data_order_or_model_refuses_the_resume_naming_the_field(change: dict, field: str) -> None:
    saved = _cfg().to_wire()
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        loop.refuse_incompatible_config(saved, _cfg(**change), path="/ck/ckpt-00000010.pt", step=10)


@pytest.mark.parametrize(
    "change",
    [{"steps": 20}, {"optimizer__lr": 1e-3}, {"eval__intervalSteps": 5}, {"selection__method": "uniform"},
     {"data__maxSkipFraction": 0.2}, {"checkpoint__keep": 5}, {"precision": "bf16"}],
)
def test_changes_that_keep_order_and_model_resume(change: dict) -> None:
    loop.refuse_incompatible_config(_cfg().to_wire(), _cfg(**change), path="/ck/x.pt", step=3)


def test_a_checkpoint_without_a_config_is_not_refused() -> None:
    loop.refuse_incompatible_config(None, _cfg(), path="/ck/x.pt", step=3)


def test_phase_timer_adds_to_named_phases_and_rejects_others() -> None:
    timer = PhaseTimer(torch.device("cpu"))
    with timer("data"):
        sum(range(10_000))
    with timer("data"):
        pass
    assert timer.seconds["data"] > 0 and timer.seconds["selection"] == 0
    assert timer.total == pytest.approx(sum(timer.seconds.values()))
    with pytest.raises(ValueError, match="phase"), timer("thinking"):
        pass


class _Cursor:
    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def test_train_state_round_trips_model_optimizer_counters_rng_and_cursor() -> None:
    def fresh() -> loop.TrainState:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        return loop.TrainState(model=model, optimizer=torch.optim.AdamW(model.parameters()), stream=_Cursor(),
                               config=_cfg())

    state = fresh()
    state.model(torch.ones(1, 3)).sum().backward()
    state.optimizer.step()
    state.step, state.stream.position = 7, 224
    state.counters.examples_trained = 7 * 32
    document = state.state_dict([state.rank_state(joules=12.5, metrics={"steps": 7.0})])
    expected_draw = torch.rand(3)
    restored = fresh()
    restored.load_state_dict(document, rank=0, world_size=1, path="/ck/ckpt-00000007.pt")
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where the checkpoint was taken
    assert restored.step == restored.resumed_from == 7 and restored.stream.position == 224
    assert restored.counters.examples_trained == 7 * 32 and restored.restored_joules == 12.5
    assert restored.restored_metrics == {"steps": 7.0}
    for name, tensor in state.model.state_dict().items():
        assert torch.equal(tensor, restored.model.state_dict()[name])
    assert restored.optimizer.state_dict()["state"].keys() == state.optimizer.state_dict()["state"].keys()
    with pytest.raises(ValueError, match=r"training\.seed"):
        fresh_other = fresh()
        fresh_other.config = _cfg(seed=9)
        fresh_other.load_state_dict(document, rank=0, world_size=1, path="/ck/ckpt-00000007.pt")
