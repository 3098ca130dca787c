"""Training configuration: the one schema shared by the trainer, ``jestctl`` and the CRD.

``TrainingConfig`` is embedded verbatim as ``spec.training`` of a ``JESTTrainingJob`` and
``EnergyConfig`` as ``spec.energy``; the operator writes both into the worker ConfigMap as
``WorkerConfig`` (``/etc/jest/config.json``). Field names are snake_case in Python and camelCase on
the wire (the Kubernetes convention), and unknown fields are rejected so that a typo in a manifest
fails loudly instead of silently training with a default.

This module imports only pydantic: the operator image must not need torch to validate a spec.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

SelectionMethod = Literal["jest", "learnability_topk", "easy_reference", "hard_learner", "uniform"]
SELECTION_METHODS: tuple[str, ...] = ("jest", "learnability_topk", "easy_reference", "hard_learner", "uniform")
ContrastiveLoss = Literal["sigmoid", "softmax"]
ARCH_PATTERN = r"^(tiny|openclip:[A-Za-z0-9._\-/]+)$"


class ApiModel(BaseModel):
    """Base for every wire model: camelCase aliases, no unknown fields, validated assignment."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
    )

    def to_wire(self) -> dict:
        """The camelCase JSON-compatible form, without unset optionals (what goes into manifests)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ModelConfig(ApiModel):
    """Which image-text towers to train (or to use as the frozen reference)."""

    arch: str = Field(
        "tiny",
        pattern=ARCH_PATTERN,
        description="'tiny' (built-in MLP towers, fast on CPU) or 'openclip:<model name>' for any "
        "open_clip architecture, e.g. 'openclip:ViT-B-32'.",
    )
    embed_dim: int = Field(64, ge=8, le=4096, description="Joint embedding width of the tiny towers.")
    pretrained: str | None = Field(
        None,
        description="Optional local path of pretrained weights (an open_clip or jest checkpoint file).",
    )
    image_size: int | None = Field(
        None,
        ge=4,
        le=4096,
        description="Square input side in pixels that WebDataset images are resized and cropped to. Built-in "
        "towers default to 64; open_clip architectures use their own size (set it only to that value). The "
        "digits demo ignores it (its images are 8x8).",
    )
    image_mean: list[float] | None = Field(
        None,
        min_length=3,
        max_length=3,
        description="Per-channel (RGB) mean subtracted from decoded images in [0, 1]; defaults to the "
        "architecture's own (open_clip) or the OpenAI CLIP constants (built-in towers).",
    )
    image_std: list[float] | None = Field(
        None,
        min_length=3,
        max_length=3,
        description="Per-channel (RGB) standard deviation dividing decoded images; defaults like imageMean.",
    )

    @model_validator(mode="after")
    def _normalisation_in_range(self) -> ModelConfig:
        for name, values, low in (("imageMean", self.image_mean, -10.0), ("imageStd", self.image_std, 1e-6)):
            if values is not None and not all(low <= value <= 10.0 for value in values):
                raise ValueError(f"model.{name}: every value must lie in [{low:g}, 10], got {values}")
        return self


class ReferenceTrainConfig(ApiModel):
    """How to train the reference model on the curated split before the learner starts."""

    steps: int = Field(150, ge=1, le=10_000_000, description="Optimizer steps on the curated data.")
    batch_size: int = Field(64, ge=2, le=1_048_576, description="Batch size for reference training.")
    lr: float = Field(2e-3, gt=0, le=1.0, description="AdamW learning rate for reference training.")
    urls: str | None = Field(
        None,
        description="Curated WebDataset shard pattern (data.source=webdataset); the digits demo uses "
        "its own curated split.",
    )


class ReferenceConfig(ApiModel):
    """The frozen reference model: either load a checkpoint or train one on curated data."""

    checkpoint: str | None = Field(None, description="Path of a reference checkpoint to load (frozen).")
    train: ReferenceTrainConfig | None = Field(
        None, description="Train the reference on curated data first (ignored when checkpoint is set)."
    )
    model: ModelConfig | None = Field(None, description="Reference architecture; defaults to the learner's.")
    mode: Literal["online", "precomputed"] = Field(
        "online",
        description="'online': the frozen reference embeds each super-batch (no grad; bf16 on CUDA). "
        "'precomputed': training joins the per-sample embeddings `jestctl score` wrote (embeddingsUrls) "
        "by __key__, so steps spend no reference forward FLOPs.",
    )
    embeddings_urls: str | None = Field(
        None,
        description="Sidecar shards of reference embeddings written by `jestctl score` (mode=precomputed).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ReferenceConfig:
        if self.checkpoint is None and self.train is None:
            self.train = ReferenceTrainConfig()
        if self.mode == "precomputed":
            if not self.embeddings_urls:
                raise ValueError("reference.embeddingsUrls is required when reference.mode is 'precomputed'")
            if not self.checkpoint:
                raise ValueError(
                    "reference.checkpoint is required when reference.mode is 'precomputed' (the reference.pt "
                    "`jestctl score` wrote next to the embeddings, so t* and b* match them)"
                )
        return self


class NoiseConfig(ApiModel):
    """Noise mix of the digits demo pool, mimicking web-scraped pairs. The rest of the pool is clean."""

    wrong: float = Field(0.5, ge=0, le=1, description="Fraction of pool captions naming the wrong digit.")
    junk: float = Field(0.15, ge=0, le=1, description="Fraction of pool captions that are unrelated text.")
    duplicate: float = Field(0.15, ge=0, le=1, description="Fraction of near-duplicate pairs in the pool.")

    @model_validator(mode="after")
    def _fractions_sum(self) -> NoiseConfig:
        if self.wrong + self.junk + self.duplicate > 1.0 + 1e-9:
            raise ValueError("noise: wrong + junk + duplicate must not exceed 1")
        return self

    @property
    def clean(self) -> float:
        """The fraction of the pool that is correctly captioned and unique."""
        return max(0.0, 1.0 - self.wrong - self.junk - self.duplicate)


class DataConfig(ApiModel):
    """Where training pairs come from."""

    source: Literal["digits", "webdataset"] = Field(
        "digits", description="'digits' (built-in demo from scikit-learn) or 'webdataset' (tar shards)."
    )
    urls: str | None = Field(
        None, description="WebDataset shard pattern, e.g. '/data/pool-{000000..000099}.tar'."
    )
    eval_urls: str | None = Field(None, description="WebDataset shards for zero-shot evaluation.")
    eval_max_samples: int = Field(
        10_000, ge=1, le=10_000_000, description="At most this many eval samples are decoded and held in memory."
    )
    noise: NoiseConfig = Field(default_factory=NoiseConfig, description="Noise mix of the digits pool.")
    loader_workers: int = Field(
        2,
        ge=0,
        le=64,
        description="DataLoader worker processes per rank that read, decode, preprocess and tokenize shards "
        "(0 = in the training process; capped at shards / world size). Each worker reads its own share of "
        "the shards, so a resumed run must keep the same value.",
    )
    prefetch: int = Field(2, ge=1, le=64, description="Super-batches each loader worker prepares ahead.")
    shuffle_buffer: int = Field(
        1000,
        ge=0,
        le=1_000_000,
        description="Samples each loader worker holds (undecoded) to shuffle the shard stream (0 = shard order).",
    )
    max_skip_fraction: float = Field(
        0.05,
        ge=0,
        le=1,
        description="The run fails once more than this fraction of the samples read was skipped as broken "
        "(undecodable image, missing or empty caption, truncated tar member, unreadable shard).",
    )
    random_resized_crop: bool = Field(
        False,
        description="Training images get a random resized crop (seeded per sample, so resume is exact) "
        "instead of resize + centre crop.",
    )
    crop_min_scale: float = Field(
        0.9, gt=0, le=1, description="Smallest crop area fraction of randomResizedCrop (open_clip's default)."
    )
    read_retries: int = Field(
        3, ge=0, le=20, description="Retries of a remote shard read that failed (exponential backoff)."
    )
    retry_backoff_seconds: float = Field(
        1.0, ge=0, le=300, description="Wait before the first retry; doubled on each further retry."
    )

    @model_validator(mode="after")
    def _urls_for_webdataset(self) -> DataConfig:
        if self.source == "webdataset" and not self.urls:
            raise ValueError("data.urls is required when data.source is 'webdataset'")
        return self


class SelectionConfig(ApiModel):
    """How each trained batch is chosen from a larger scored super-batch."""

    method: SelectionMethod = Field("jest", description="Selection method; 'uniform' trains on random data.")
    filter_ratio: float = Field(
        0.8, ge=0, lt=1, description="Fraction of each super-batch discarded: f = 1 - batchSize/superBatch."
    )
    chunks: int = Field(16, ge=1, le=4096, description="JEST sampling chunks; must divide the per-rank batch.")
    batch_size: int = Field(64, ge=2, le=1_048_576, description="Global trained batch size per step.")
    loss: ContrastiveLoss = Field("sigmoid", description="Contrastive loss: sigmoid (SigLIP) or softmax (CLIP).")

    @property
    def super_batch_size(self) -> int:
        """Global super-batch size B = b / (1 - f), rounded to the nearest integer (at least b)."""
        return max(self.batch_size, round(self.batch_size / (1.0 - self.filter_ratio)))

    def per_rank(self, world_size: int) -> tuple[int, int]:
        """(trained batch, super-batch) of one rank; raises ValueError when the sizes do not split."""
        if self.batch_size % world_size:
            raise ValueError(
                f"selection.batchSize ({self.batch_size}) must be divisible by the world size ({world_size})"
            )
        local_batch = self.batch_size // world_size
        if local_batch % self.chunks:
            raise ValueError(
                f"selection.batchSize / world size ({local_batch}) must be divisible by "
                f"selection.chunks ({self.chunks})"
            )
        return local_batch, max(local_batch, round(local_batch / (1.0 - self.filter_ratio)))

    @model_validator(mode="after")
    def _chunks_divide_batch(self) -> SelectionConfig:
        if self.batch_size % self.chunks:
            raise ValueError(
                f"selection.batchSize ({self.batch_size}) must be divisible by selection.chunks ({self.chunks})"
            )
        return self


class OptimizerConfig(ApiModel):
    """AdamW with linear warm-up then cosine decay (a pure function of the step, resume-safe)."""

    lr: float = Field(2e-3, gt=0, le=1.0, description="Peak learning rate.")
    weight_decay: float = Field(1e-4, ge=0, le=1.0, description="AdamW decoupled weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")


class CheckpointConfig(ApiModel):
    """Where and how often rank 0 writes atomic checkpoints."""

    dir: str = Field("/checkpoints", min_length=1, description="Checkpoint directory (a volume in pods).")
    interval_steps: int = Field(50, ge=1, description="Write a checkpoint every N steps (and at the end).")
    keep: int = Field(3, ge=1, le=1000, description="How many recent checkpoints to keep.")


class EvalConfig(ApiModel):
    """How often to measure zero-shot accuracy."""

    interval_steps: int = Field(50, ge=1, description="Evaluate every N steps (and at the end).")


class TrainingConfig(ApiModel):
    """Everything one JEST training run needs; ``spec.training`` of a JESTTrainingJob."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="The learner's architecture.")
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig, description="The frozen reference.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data source.")
    selection: SelectionConfig = Field(default_factory=SelectionConfig, description="Data selection.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Learner optimizer.")
    steps: int = Field(250, ge=1, le=100_000_000, description="Learner optimizer steps to train.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of data order, init and selection.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="Compute precision (bf16 autocast).")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpointing.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation cadence.")


EnergyMethod = Literal["measured", "integrated", "modelled"]


class EnergyConfig(ApiModel):
    """Energy accounting and budget; ``spec.energy`` of a JESTTrainingJob."""

    budget_joules: float | None = Field(None, gt=0, description="Optional energy budget for the whole job.")
    on_budget_exceeded: Literal["Warn", "Suspend", "Fail"] = Field(
        "Warn", description="What to do when the budget is spent (Suspend checkpoints first)."
    )
    modelled_watts_per_device: float = Field(
        300.0,
        gt=0,
        le=100_000,
        description="Watts per device assumed where no energy counter exists (TPU, CPU-only); the "
        "resulting figures are labelled method=modelled.",
    )
    carbon_intensity_grams_per_k_wh: float | None = Field(
        None,
        ge=0,
        alias="carbonIntensityGramsPerKWh",
        description="Grid carbon intensity (gCO2e/kWh) for CO2e estimates.",
    )
    backend: Literal["auto", "nvml", "rapl", "modelled"] = Field(
        "auto", description="Energy meter backend; 'auto' picks the best one the hardware offers."
    )


class WorkerConfig(ApiModel):
    """The file the operator mounts at ``/etc/jest/config.json`` (``JEST_CONFIG``)."""

    training: TrainingConfig = Field(default_factory=TrainingConfig)
    energy: EnergyConfig = Field(default_factory=EnergyConfig)


_SET_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def apply_overrides(document: dict, overrides: list[str]) -> dict:
    """Return a copy of ``document`` with ``key.path=value`` overrides applied (``jestctl --set``).

    Values are parsed as JSON when they parse (numbers, booleans, null, lists), else kept as strings.
    The result is not validated here; callers validate it with the model they own.
    """
    import copy
    import json

    result = copy.deepcopy(document)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not _SET_PATH.match(key):
            raise ValueError(f"--set expects key.path=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"--set {key}: {part!r} is not an object")
            node = child
        node[parts[-1]] = value
    return result

