"""``jestctl score``: run the frozen reference over the training shards once and write its embeddings.

Why: in ``reference.mode: precomputed`` a training step spends no reference forward FLOPs; the
embeddings come from sidecar shards (one per data shard, same file name, keys in data order) that the
input pipeline merge-joins by ``__key__``. This module builds (loads or trains, exactly as training
would) the reference, stores it as ``<out>/reference.pt`` (training must load the same t*, b*), scans
every usable sample of ``data.urls`` and writes the sidecars (``reference.write_sidecars``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from jest_trainer.config import TrainingConfig

log = logging.getLogger(__name__)

DEFAULT_BATCH = 256


def score_shards(cfg: TrainingConfig, out_dir: Path, *, batch_size: int = DEFAULT_BATCH) -> dict[str, Any]:
    """Write ``out_dir/reference.pt`` and the sidecars of ``cfg.data.urls``; returns the manifest plus the
    three config values a precomputed run needs (``settings``: wire path -> value)."""
    from jest_trainer.data import ShardScanner, model_input_shape
    from jest_trainer.distributed import single_process
    from jest_trainer.loop import prepare
    from jest_trainer.preprocess import build_image_transform
    from jest_trainer.reference import REFERENCE_FILE_NAME, reference_model_config, save_reference, sidecar_pattern
    from jest_trainer.reference import write_sidecars as write

    if cfg.data.source != "webdataset" or not cfg.data.urls:
        raise ValueError("data.source: `jestctl score` reads WebDataset shards (data.source: webdataset, data.urls)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = single_process("cuda" if _cuda() else "cpu")
    online = cfg.model_copy(update={"reference": cfg.reference.model_copy(update={"mode": "online",
                                                                                 "embeddings_urls": None})})
    reference = prepare(online, ctx, cache_dir=out_dir).reference
    reference_path = out_dir / REFERENCE_FILE_NAME
    save_reference(reference, reference_path, reference_model_config(cfg))
    transform = build_image_transform(reference_model_config(cfg), cfg.data, train=False,
                                      image_spec=reference.image_spec)
    scanner = ShardScanner(cfg.data.urls, transform=transform, tokenizer=reference.tokenizer, batch_size=batch_size,
                           cfg=cfg)
    log.info("scoring %d shard(s) of %s (input %s)", len(scanner.shards), cfg.data.urls, model_input_shape(cfg))
    manifest = write(reference, scanner, shards=list(scanner.shards), out_dir=out_dir, device=ctx.device)
    manifest["skipped"] = dict(scanner.skipped)
    manifest["settings"] = {
        "reference.mode": "precomputed",
        "reference.checkpoint": str(reference_path),
        "reference.embeddingsUrls": sidecar_pattern(cfg.data.urls, out_dir),
    }
    return manifest


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
