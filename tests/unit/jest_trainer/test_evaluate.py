"""Retrieval recall (label-free evaluation) and zero-shot accuracy on hand-made embeddings."""

from __future__ import annotations

import pytest
import torch
from jest_trainer.evaluate import retrieval_recall


def _unit(rows: list[list[float]]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_recall_at_k_in_both_directions() -> None:
    image = _unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    # text 0 is closest to image 0; texts 1 and 2 are swapped (each nearest to the other's image)
    text = _unit([[1, 0, 0], [0, 0.1, 1], [0, 1, 0.1]])
    recall = retrieval_recall(image, text, ["a", "b", "c"], ks=(1, 2))
    assert recall["image_to_text"] == {1: pytest.approx(1 / 3), 2: pytest.approx(1.0)}
    assert recall["text_to_image"] == {1: pytest.approx(1 / 3), 2: pytest.approx(1.0)}


def test_identical_captions_are_mutual_positives_and_k_is_clipped() -> None:
    image = _unit([[0.9, 0.1], [1, 0], [0, 1]])
    text = _unit([[0.95, 0.05], [0.9, 0.1], [0, 1]])
    # images 0 and 1 each retrieve the other's caption first: both read "cat", so both count
    recall = retrieval_recall(image, text, ["cat", "cat", "dog"], ks=(1, 10))
    assert recall["image_to_text"][1] == pytest.approx(1.0)
    assert recall["image_to_text"][10] == pytest.approx(1.0)
    distinct = retrieval_recall(image, text, ["cat", "kitten", "dog"], ks=(1,))
    assert distinct["image_to_text"][1] == pytest.approx(1 / 3)


def test_misaligned_rows_are_refused() -> None:
    with pytest.raises(ValueError, match="retrieval_recall"):
        retrieval_recall(torch.zeros(2, 3), torch.zeros(3, 3), ["a", "b"])
