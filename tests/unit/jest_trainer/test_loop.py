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


def test_bf16_runs_score_in_fp32_and_select_what_fp32_runs_select_up_to_near_ties() -> None:
    """Same model, same super-batch, same draws: bf16 towers change the logits only by rounding, so JEST picks
    (nearly) the same pairs, and every logit matrix handed to selection is float32."""
    from types import SimpleNamespace

    from jest_trainer.config import ModelConfig
    from jest_trainer.models import build_model, hash_tokenize
    from jest_trainer.reference import ReferenceScorer
    from jest_trainer.selection import select_batch

    torch.manual_seed(0)
    learner, reference = (build_model(ModelConfig(), image_shape=(1, 8, 8)) for _ in range(2))
    scorer = ReferenceScorer(model=reference.eval(), mode="online", input_spec=None,
                             logit_scale=reference.logit_scale.detach(), logit_bias=reference.logit_bias.detach())
    batch = SimpleNamespace(images=torch.rand(160, 1, 8, 8),
                            tokens=hash_tokenize([f"digit {i % 10} sample {i}" for i in range(160)]))
    picks, logits = {}, {}
    for precision in ("fp32", "bf16"):
        plan = loop.LoopPlan.of(_cfg(precision=precision, selection__method="jest"), world_size=1)
        learner_logits, reference_logits = loop.score(plan, learner, scorer, batch, torch.device("cpu"))
        assert learner_logits.dtype == reference_logits.dtype == torch.float32
        logits[precision] = learner_logits
        picks[precision] = set(select_batch("jest", learner_logits=learner_logits, reference_logits=reference_logits,
                                            loss="sigmoid", batch_size=32, n_chunks=4,
                                            generator=torch.Generator().manual_seed(5)).tolist())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the towers at bf16, as the loop runs them
        image, text = learner.eval()(batch.images, batch.tokens)
    assert image.dtype == torch.bfloat16
    # the matrix itself is formed in float32 from those embeddings (bf16 logits would differ by up to ~0.06 here)
    assert torch.equal(logits["bf16"], loop.pair_logits(learner, image.float(), text.float(), "sigmoid"))
    rounding = (logits["bf16"] - logits["fp32"]).abs().max().item()
    assert 0 < rounding < 0.05 * logits["fp32"].abs().max().item()  # bf16 towers did run, and only rounded
    assert len(picks["fp32"] & picks["bf16"]) >= 0.9 * 32, (sorted(picks["fp32"]), sorted(picks["bf16"]))


def test_job_energy_sources_group_the_ranks_sources_by_method() -> None:
    ranks = [("measured", "nvml"), ("measured", "nvml"), ("modelled", "config:modelledWattsPerDevice"),
             ("measured", "rapl")]
    assert loop.job_energy_sources(ranks) == {"measured": "nvml+rapl", "modelled": "config:modelledWattsPerDevice"}
