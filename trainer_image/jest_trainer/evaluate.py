"""Evaluation without training: zero-shot classification where class prompts exist, retrieval always.

Why both: the digits demo (and labelled eval shards with ``class_prompts.json``) have classes, but most
real eval shards are just image-caption pairs. Retrieval recall needs nothing but the pairs: for each
image, is its caption among the ``k`` most similar captions (image->text), and for each caption, is its
image among the ``k`` most similar images (text->image)? Identical caption strings count as the same
caption, so a data set with repeated captions (digits, templated prompts) is not penalised for
retrieving an equally correct twin. All functions are pure given the model (eval mode, no grad).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

EVAL_CHUNK = 1024
RECALL_KS: tuple[int, ...] = (1, 5)
DIRECTIONS: tuple[str, ...] = ("image_to_text", "text_to_image")


@torch.no_grad()
def embed(model: nn.Module, images: Tensor, tokens: Tensor, *, device: torch.device) -> tuple[Tensor, Tensor]:
    """Normalised float32 image and text embeddings of aligned rows, in chunks, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        image_parts, text_parts = [], []
        for start in range(0, images.shape[0], EVAL_CHUNK):
            image_parts.append(model.encode_image(images[start : start + EVAL_CHUNK].to(device)).float())
            text_parts.append(model.encode_text(tokens[start : start + EVAL_CHUNK].to(device)).float())
        return torch.cat(image_parts), torch.cat(text_parts)
    finally:
        model.train(was_training)


@torch.no_grad()
def zero_shot_accuracy(
    model: nn.Module, images: Tensor, labels: Tensor, class_prompts: Sequence[Sequence[str]], *, device: torch.device
) -> float:
    """Zero-shot classification accuracy: nearest class prototype by cosine similarity.

    The prototype of class ``c`` is the normalised mean text embedding of ``class_prompts[c]``;
    ``images`` are model input; rows with label -1 (unknown) are not counted.
    """
    was_training = model.training
    model.eval()
    try:
        prototypes = []
        for prompts in class_prompts:
            text = model.encode_text(model.tokenize(list(prompts)).to(device)).float()
            prototypes.append(nn.functional.normalize(text.mean(dim=0), dim=0))
        prototype_matrix = torch.stack(prototypes)
        known = labels >= 0
        correct = 0
        for start in range(0, images.shape[0], EVAL_CHUNK):
            chunk = images[start : start + EVAL_CHUNK].to(device)
            predictions = (model.encode_image(chunk).float() @ prototype_matrix.T).argmax(dim=1).cpu()
            rows = slice(start, start + EVAL_CHUNK)
            correct += int(((predictions == labels[rows]) & known[rows]).sum())
        return correct / max(1, int(known.sum()))
    finally:
        model.train(was_training)


def retrieval_recall(
    image_emb: Tensor, text_emb: Tensor, captions: Sequence[str], ks: Sequence[int] = RECALL_KS
) -> dict[str, dict[int, float]]:
    """Recall@k in both directions for aligned rows; rows with identical captions are mutual positives.

    Returns ``{"image_to_text": {k: recall}, "text_to_image": {k: recall}}``; ``k`` larger than the set
    is clipped to its size.
    """
    n = image_emb.shape[0]
    if n == 0 or text_emb.shape[0] != n or len(captions) != n:
        raise ValueError(
            f"retrieval_recall: need aligned, non-empty rows, got {n}, {text_emb.shape[0]}, {len(captions)}"
        )
    ids: dict[str, int] = {}
    caption_id = torch.tensor([ids.setdefault(text, len(ids)) for text in captions])
    positive = caption_id[:, None] == caption_id[None, :]
    similarity = image_emb.float().cpu() @ text_emb.float().cpu().T
    result: dict[str, dict[int, float]] = {}
    for direction, scores in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        by_k = {}
        for k in ks:
            top = scores.topk(min(int(k), n), dim=1).indices
            hits = positive.gather(1, top).any(dim=1)
            by_k[int(k)] = float(hits.float().mean())
        result[direction] = by_k
    return result


def evaluate(
    model: nn.Module, eval_set: Any, *, device: torch.device
) -> tuple[float | None, dict[str, dict[int, float]]]:
    """``(zero-shot accuracy or None, retrieval recall)`` of ``model`` on ``eval_set``.

    ``eval_set`` has ``images`` (model input), ``tokens``, ``captions``, ``labels`` and ``class_prompts``
    (empty or None when the eval data carries no classes; accuracy is then None).
    """
    image_emb, text_emb = embed(model, eval_set.images, eval_set.tokens, device=device)
    recall = retrieval_recall(image_emb, text_emb, list(eval_set.captions))
    accuracy = None
    prompts = getattr(eval_set, "class_prompts", None)
    labels = getattr(eval_set, "labels", None)
    if prompts and labels is not None and bool((labels >= 0).any()):
        accuracy = zero_shot_accuracy(model, eval_set.images, labels, prompts, device=device)
    return accuracy, recall
