"""The loop's own series on the rank's registry: retrieval recall and skipped samples (read at scrape)."""

from __future__ import annotations

from pathlib import Path

from jest_trainer.config import EnergyConfig, WorkerConfig
from jest_trainer.distributed import single_process
from jest_trainer.telemetry import Telemetry
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families


def _samples(telemetry: Telemetry, name: str) -> dict[tuple, float]:
    text = generate_latest(telemetry.metrics.registry).decode()
    return {tuple(sorted(sample.labels.items())): sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name}


def test_retrieval_recall_and_skipped_samples_are_exported(tmp_path: Path) -> None:
    config = WorkerConfig(energy=EnergyConfig(backend="modelled"))
    telemetry = Telemetry(config, {"JEST_JOB_NAME": "unit"}, single_process(), status_file=tmp_path / "p.json",
                          total_steps=10, restored_joules=0.0)
    try:
        skipped = {"decode_error": 3}
        telemetry.watch_skipped(lambda: skipped)
        telemetry.observe_eval(0.5, {"image_to_text": {1: 0.25, 5: 0.75}, "text_to_image": {1: 0.2, 5: 0.6}})
        recall = _samples(telemetry, "jest_eval_retrieval_recall")
        base = (("rank", "0"), ("trainingjob", "unit"))
        assert recall[tuple(sorted((*base, ("direction", "image_to_text"), ("k", "5"))))] == 0.75
        assert len(recall) == 4
        skipped["empty_caption"] = 1  # read at scrape time: no push from the loop
        counts = _samples(telemetry, "jest_data_samples_skipped_total")
        assert counts[tuple(sorted((*base, ("reason", "decode_error"))))] == 3
        assert counts[tuple(sorted((*base, ("reason", "empty_caption"))))] == 1
        assert _samples(telemetry, "jest_eval_accuracy")[base] == 0.5
    finally:
        telemetry.close()
