"""Image-text towers behind one small interface: built-in tiny towers and an open_clip adapter.

Why one interface: the JEST loop (learner and frozen reference) only needs "model input -> unit
image embedding", "captions -> tokens -> unit text embedding", a learnable temperature ``logit_scale``
(log t) and bias ``logit_bias`` (b), plus analytic FLOPs for cost accounting. ``ContrastiveModel``
is that interface; ``build_model`` picks the implementation from ``ModelConfig.arch``.

Model input is *normalised*: ``encode_image`` takes ``[n, C, S, S]`` pixels already resized to the
model's size and standardised with its mean/std (``ContrastiveModel.image_spec``), which the data
pipeline's transform does in its loader workers. ``to_model_input`` does the same on the host for
in-memory pixels in [0, 1]; ``convert_input`` re-expresses one model's input for another (a reference
with a different size or normalisation scoring the learner's super-batch).

* ``tiny`` -> ``TinyContrastiveModel``: a small conv tower on the normalised pixels and mean-pooled word
  embeddings over a deterministic hashing tokenizer (no vocabulary file, no network). Fast on 2 CPU
  cores; the digits demo trains it in seconds and it learns on natural RGB images too (the former
  pixel MLP only worked where the background is zero). ``logit_scale`` starts at log 10 and
  ``logit_bias`` at -5: the SigLIP paper uses b = -10 for 32k batches, where almost every pair is a
  negative; with the demo's batches of ~64 a smaller negative bias starts the sigmoid near the
  positive/negative prior.
* ``openclip:<name>`` -> ``OpenClipContrastiveModel``: ``open_clip.create_model(name, pretrained=None)``
  for any registered architecture, a custom config registered with ``register_openclip_config``, or a
  path to a JSON model config (``openclip:/configs/tiny-vit.json``). Its image spec is the model's own
  input size and mean/std; text uses the model's own open_clip tokenizer. The model keeps its own
  initial logit scale; a bias parameter (init -5) is created when the architecture has none.

``ModelConfig.pretrained`` is always a LOCAL file: an open_clip checkpoint (state dict, optionally under
``state_dict``) or a jest checkpoint (a dict with a ``model`` state dict of this module's models).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the universal torch idiom
from torch import Tensor, nn

from jest_trainer.config import ModelConfig

INITIAL_LOGIT_SCALE = math.log(10.0)
INITIAL_LOGIT_BIAS = -5.0
HASH_VOCAB_SIZE = 4096  # token 0 is padding; words hash into 1..4095
TINY_CONTEXT_LENGTH = 24
TINY_WORD_WIDTH = 128
TINY_HIDDEN = 256
TINY_CONV_WIDTHS: tuple[int, int] = (32, 64)
TINY_POOLED_SIZE = 4  # the last feature map is average-pooled to 4 x 4 and flattened (keeps layout)
TINY_MEAN = 0.5
TINY_STD = 0.5
OPENCLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENCLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class ImageSpec:
    """What ``encode_image`` takes: ``channels`` x ``size`` x ``size`` pixels standardised by mean/std.

    ``mean`` / ``std`` have one entry per channel and apply to pixels scaled to [0, 1]. The data
    pipeline's transform produces exactly this (resize + centre crop to ``size``, then standardise).
    """

    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, S, S)``."""
        return self.channels, self.size, self.size


def to_model_input(pixels: Tensor, spec: ImageSpec) -> Tensor:
    """``[n, C, H, W]`` pixels in [0, 1] -> model input of ``spec`` (grey -> RGB, bilinear resize, standardise)."""
    if pixels.dim() != 4:
        raise ValueError(f"pixels: expected [n, C, H, W], got {tuple(pixels.shape)}")
    if pixels.shape[1] != spec.channels:
        if pixels.shape[1] == 1 and spec.channels == 3:
            pixels = pixels.expand(-1, 3, -1, -1)
        else:
            raise ValueError(f"pixels: {pixels.shape[1]} channels cannot become the model's {spec.channels}")
    if tuple(pixels.shape[-2:]) != (spec.size, spec.size):
        pixels = F.interpolate(pixels, size=(spec.size, spec.size), mode="bilinear", align_corners=False)
    mean = torch.tensor(spec.mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return (pixels - mean) / std


def convert_input(images: Tensor, source: ImageSpec, target: ImageSpec) -> Tensor:
    """Model input of ``source`` re-expressed as model input of ``target`` (identity when they agree)."""
    if source == target:
        return images
    mean = torch.tensor(source.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(source.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return to_model_input((images * std + mean).clamp(0.0, 1.0), target)


class ContrastiveModel(nn.Module, ABC):
    """Two towers mapping images and captions into one L2-normalised embedding space.

    Contract: ``logit_scale`` (log t) and ``logit_bias`` (b) are scalar parameters used by the loss;
    ``tokenize`` is deterministic, picklable (loader workers call it) and needs no network;
    ``encode_image`` takes model input of ``image_spec`` (normalised, see the module docstring).
    """

    logit_scale: nn.Parameter
    logit_bias: nn.Parameter
    embed_dim: int
    image_spec: ImageSpec

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, S, S)`` of the model input."""
        return self.image_spec.shape

    @property
    def tokenizer(self) -> Any:
        """A picklable ``captions -> tokens`` callable for loader workers (never the module itself)."""
        return hash_tokenize

    @abstractmethod
    def tokenize(self, captions: list[str]) -> Tensor:
        """Token ids ``[n, context_length]`` (int64, CPU) of the captions."""

    @abstractmethod
    def encode_image(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings ``[n, embed_dim]`` of model input (``image_spec``)."""

    @abstractmethod
    def encode_text(self, tokens: Tensor) -> Tensor:
        """L2-normalised text embeddings ``[n, embed_dim]`` of ``tokenize`` output."""

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``(encode_image(images), encode_text(tokens))`` (one call, so DDP sees every parameter used)."""
        return self.encode_image(images), self.encode_text(tokens)

    def _check_images(self, images: Tensor) -> None:
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            expected = ", ".join(map(str, self.image_shape))
            raise ValueError(f"images: expected [n, {expected}], got {tuple(images.shape)}")


@functools.lru_cache(maxsize=65536)
def hash_token(word: str) -> int:
    """The id of a word in ``1..HASH_VOCAB_SIZE-1``: a stable hash (blake2b), identical across processes."""
    digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % (HASH_VOCAB_SIZE - 1)


def hash_tokenize(captions: list[str], context_length: int = TINY_CONTEXT_LENGTH) -> Tensor:
    """Lower-cased alphanumeric words -> hashed ids, truncated/padded with 0 to ``context_length``."""
    rows = []
    for text in captions:
        ids = [hash_token(word) for word in _WORD.findall(text.lower())][:context_length]
        rows.append(ids + [0] * (context_length - len(ids)))
    return torch.tensor(rows, dtype=torch.long).reshape(len(captions), context_length)


def tiny_image_spec(image_shape: tuple[int, ...], cfg: ModelConfig | None = None) -> ImageSpec:
    """The built-in towers' input: the data's channels at ``model.imageSize`` (default: the data's size).

    RGB uses ``model.imageMean``/``imageStd`` (default the OpenAI CLIP constants); single-channel data
    (the digits demo) is standardised with mean 0.5 and std 0.5.
    """
    channels = int(image_shape[0])
    image_size = getattr(cfg, "image_size", None)
    size = int(image_size) if image_size else int(image_shape[-1])
    if channels == 3:
        mean = tuple(getattr(cfg, "image_mean", None) or OPENCLIP_MEAN)
        std = tuple(getattr(cfg, "image_std", None) or OPENCLIP_STD)
    else:
        mean, std = (TINY_MEAN,) * channels, (TINY_STD,) * channels
    return ImageSpec(channels=channels, size=size, mean=mean, std=std)


class _ConvTower(nn.Sequential):
    """Two 3x3 conv stages with GELU (the second stride 2; the first too for inputs above 16 px),
    average-pooled to a 4 x 4 map, flattened, then a two-layer MLP to the embedding width.

    Sized for 2 CPU cores: ~1.3 MFLOPs per 8 x 8 digit, ~12 MFLOPs per 64 x 64 RGB image. Keeping a
    4 x 4 map rather than a global average keeps coarse layout; on the digits a deeper, more pooled
    variant (three stages down to 2 x 2) sat at chance for the first ~100 reference steps, this one
    does not.
    """

    def __init__(self, spec: ImageSpec, embed_dim: int) -> None:
        first_stride = 2 if spec.size > 16 else 1
        w1, w2 = TINY_CONV_WIDTHS
        side = math.ceil(math.ceil(spec.size / first_stride) / 2)  # the second conv's output side
        if side == TINY_POOLED_SIZE:
            pool: nn.Module = nn.Identity()  # already 4 x 4 (8 px digits): adaptive pooling costs ~3 ms a call
        elif side % TINY_POOLED_SIZE == 0:
            pool = nn.AvgPool2d(side // TINY_POOLED_SIZE)
        else:
            pool = nn.AdaptiveAvgPool2d(TINY_POOLED_SIZE)
        super().__init__(
            nn.Conv2d(spec.channels, w1, 3, stride=first_stride, padding=1),
            nn.GELU(),
            nn.Conv2d(w1, w2, 3, stride=2, padding=1),
            nn.GELU(),
            pool,
            nn.Flatten(),
            nn.Linear(w2 * TINY_POOLED_SIZE**2, TINY_HIDDEN),
            nn.GELU(),
            nn.Linear(TINY_HIDDEN, embed_dim),
        )


class TinyContrastiveModel(ContrastiveModel):
    """Built-in towers for CPU demos.

    Image: ``_ConvTower`` on the normalised pixels (colour images centred per image first). Text: word
    embeddings (4096 x 128, padding 0) mean-pooled over non-padding tokens -> Linear(128, 256) -> GELU
    -> Linear(256, D). Both outputs are L2-normalised.
    """

    def __init__(self, *, embed_dim: int, image_spec: ImageSpec) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_spec = image_spec
        self.image_tower = _ConvTower(image_spec, embed_dim)
        self.word_embedding = nn.Embedding(HASH_VOCAB_SIZE, TINY_WORD_WIDTH, padding_idx=0)
        self.text_tower = nn.Sequential(
            nn.Linear(TINY_WORD_WIDTH, TINY_HIDDEN),
            nn.GELU(),
            nn.Linear(TINY_HIDDEN, embed_dim),
        )
        self.logit_scale = nn.Parameter(torch.tensor(INITIAL_LOGIT_SCALE))
        self.logit_bias = nn.Parameter(torch.tensor(INITIAL_LOGIT_BIAS))

    def tokenize(self, captions: list[str]) -> Tensor:
        """Hashing tokenizer (see ``hash_tokenize``)."""
        return hash_tokenize(captions)

    def encode_image(self, images: Tensor) -> Tensor:
        """Conv tower on the normalised pixels, L2-normalised.

        Colour input is centred per image and channel first. The tower is shallow and has no
        normalisation layer, so on natural pictures the background colour dominates every embedding
        (mean off-diagonal cosine 0.96 at init on the emoji benchmark) and SigLIP training sits at the
        collapsed loss; centring removes that nuisance and the same tower learns (10x chance in 200
        steps there). Single-channel digits have a fixed black background and are left as they are.
        """
        self._check_images(images)
        if images.shape[1] == 3:
            images = images - images.mean(dim=(2, 3), keepdim=True)
        return F.normalize(self.image_tower(images), dim=-1)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """Mean of the non-padding word embeddings through a small MLP, L2-normalised."""
        mask = (tokens != 0).unsqueeze(-1).to(self.word_embedding.weight.dtype)
        summed = (self.word_embedding(tokens) * mask).sum(dim=1)
        pooled = summed / mask.sum(dim=1).clamp_min(1.0)
        return F.normalize(self.text_tower(pooled), dim=-1)


_REGISTERED_CONFIG_DIR: Path | None = None


def register_openclip_config(name: str, config: dict[str, Any]) -> None:
    """Register an open_clip model config under ``name`` (then ``arch: openclip:<name>`` builds it).

    The config needs ``embed_dim``, ``vision_cfg`` and ``text_cfg`` (open_clip's schema). It is written
    to a private temporary directory and registered with the public ``open_clip.add_model_config``.
    """
    import open_clip

    global _REGISTERED_CONFIG_DIR
    if not re.fullmatch(r"[A-Za-z0-9._\-]+", name):
        raise ValueError(f"name: use letters, digits, '.', '_' and '-' only, got {name!r}")
    _check_openclip_config(config, where=f"open_clip config {name!r}")
    if _REGISTERED_CONFIG_DIR is None:
        _REGISTERED_CONFIG_DIR = Path(tempfile.mkdtemp(prefix="jest-openclip-configs-"))
    path = _REGISTERED_CONFIG_DIR / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)


def _check_openclip_config(config: Any, *, where: str) -> None:
    required = ("embed_dim", "vision_cfg", "text_cfg")
    missing = [key for key in required if not isinstance(config, dict) or key not in config]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)} (open_clip needs embed_dim, vision_cfg, text_cfg)")


def _resolve_openclip_name(spec: str) -> str:
    """The open_clip model name for ``openclip:<spec>``; JSON paths are registered under their stem."""
    import open_clip

    if spec.endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"model.arch: open_clip config file {spec!r} does not exist")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"model.arch: {spec!r} is not valid JSON ({error})") from error
        _check_openclip_config(config, where=f"model.arch: {spec}")
        open_clip.add_model_config(path)
        return path.stem
    if spec not in open_clip.list_models():
        raise ValueError(
            f"model.arch: unknown open_clip architecture {spec!r}; use one of open_clip.list_models() "
            "(e.g. ViT-B-32), a name registered with register_openclip_config, or a path to a JSON config"
        )
    return spec


class OpenClipContrastiveModel(ContrastiveModel):
    """An open_clip CLIP/SigLIP model behind ``ContrastiveModel`` (the wrapped model is ``self.clip``)."""

    def __init__(self, name: str, *, image_shape: tuple[int, int, int]) -> None:
        import open_clip

        super().__init__()
        self.clip = open_clip.create_model(name, pretrained=None)
        try:
            self._tokenizer = open_clip.get_tokenizer(name)
        except Exception as error:  # HF / SigLIP tokenizers need `transformers` and a download
            raise ValueError(
                f"model.arch: cannot build the tokenizer of open_clip:{name} ({error}); only open_clip's "
                "bundled BPE tokenizer works offline (HF and SigLIP tokenizers need transformers + a download)"
            ) from error
        self.name = name
        if int(image_shape[0]) not in (1, 3):
            raise ValueError(f"image_shape: open_clip models take 1 or 3 channels, got {image_shape[0]}")
        self.embed_dim = int(self._probe_embed_dim())
        visual = self.clip.visual
        size = getattr(visual, "image_size", None)
        side = int(size if isinstance(size, int) else size[0])
        preprocess = getattr(visual, "preprocess_cfg", {}) or {}
        self.image_spec = ImageSpec(
            channels=3, size=side, mean=tuple(preprocess.get("mean", OPENCLIP_MEAN)),
            std=tuple(preprocess.get("std", OPENCLIP_STD)),
        )
        self.extra_logit_bias: nn.Parameter | None = None
        if getattr(self.clip, "logit_bias", None) is None:
            self.extra_logit_bias = nn.Parameter(torch.tensor(INITIAL_LOGIT_BIAS))

    def _probe_embed_dim(self) -> int:
        projection = getattr(self.clip, "text_projection", None)
        if isinstance(projection, nn.Parameter):
            return int(projection.shape[-1])
        if isinstance(projection, nn.Linear):
            return int(projection.out_features)
        visual_projection = getattr(self.clip.visual, "proj", None)
        if isinstance(visual_projection, nn.Parameter):
            return int(visual_projection.shape[-1])
        return int(getattr(self.clip.visual, "output_dim"))  # noqa: B009 - explicit attribute contract

    @property
    def logit_scale(self) -> nn.Parameter:  # type: ignore[override]
        """The wrapped model's temperature parameter (log t)."""
        return self.clip.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter:  # type: ignore[override]
        """The wrapped model's bias, or the one created for architectures without it."""
        bias = getattr(self.clip, "logit_bias", None)
        return bias if bias is not None else self.extra_logit_bias  # type: ignore[return-value]

    @property
    def tokenizer(self) -> Any:
        """open_clip's own tokenizer object (picklable; returns int64 tokens)."""
        return self._tokenizer

    def tokenize(self, captions: list[str]) -> Tensor:
        """The model's own open_clip tokenizer (BPE for CLIP configs; bundled vocabulary)."""
        return self._tokenizer(captions).to(torch.long)

    def encode_image(self, images: Tensor) -> Tensor:
        """open_clip ``encode_image(normalize=True)`` of model input (the model's size and mean/std)."""
        self._check_images(images)
        return self.clip.encode_image(images, normalize=True)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """open_clip ``encode_text(normalize=True)``."""
        return self.clip.encode_text(tokens, normalize=True)


def _load_pretrained(model: ContrastiveModel, path: str) -> None:
    """Load local weights: a jest checkpoint (``{"model": state}``) or an open_clip checkpoint."""
    if not Path(path).is_file():
        raise ValueError(f"model.pretrained: {path!r} is not a file (weights are loaded from local files only)")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        state = {key.removeprefix("module."): value for key, value in loaded["model"].items()}
        model.load_state_dict(state)
        return
    if isinstance(model, OpenClipContrastiveModel):
        import open_clip

        open_clip.load_checkpoint(model.clip, path)
        return
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"model.pretrained: {path!r} holds no state dict")
    model.load_state_dict({key.removeprefix("module."): value for key, value in state.items()})


def build_model(cfg: ModelConfig, *, image_shape: tuple[int, ...]) -> ContrastiveModel:
    """The model ``cfg`` names, for data images of ``image_shape`` = (C, H, W), on CPU in fp32.

    The built-in towers take the data's channels at ``model.imageSize`` (default: the data's size);
    open_clip models take RGB at their own size. ``model.image_spec`` says which.

    Initialisation uses the global torch RNG: seed it first for a reproducible model.
    """
    if cfg.arch == "tiny":
        spec = tiny_image_spec(image_shape, cfg)
        model: ContrastiveModel = TinyContrastiveModel(embed_dim=cfg.embed_dim, image_spec=spec)
    elif cfg.arch.startswith("openclip:"):
        name = _resolve_openclip_name(cfg.arch.removeprefix("openclip:"))
        model = OpenClipContrastiveModel(name, image_shape=image_shape)
    else:
        raise ValueError(f"model.arch: expected 'tiny' or 'openclip:<name>', got {cfg.arch!r}")
    if cfg.pretrained:
        _load_pretrained(model, cfg.pretrained)
    return model


def _cpu_sdpa_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of the CPU fused attention kernel (torch's counter only knows the CUDA kernels)."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def forward_flops_per_example(model: ContrastiveModel) -> dict[str, float]:
    """Analytic forward FLOPs per example: ``{"image": F_img, "text": F_txt}`` (2 per multiply-add).

    Counted from operator shapes (``torch.utils.flop_counter``) during one batch-1 forward without
    gradients: every matmul, linear, convolution and attention product (including projections done
    as parameter matmuls). Elementwise work, norms, softmax and embedding lookups are not counted,
    the usual convention. Text FLOPs use a representative caption padded to the tokenizer's context
    length (what the towers actually process). The MHA fast path is disabled for the count so that
    its fused kernel does not hide the attention products.
    """
    from torch.utils.flop_counter import FlopCounterMode

    parameter = next(model.parameters())
    images = torch.rand((1, *model.image_shape), generator=torch.Generator().manual_seed(0)).to(
        device=parameter.device, dtype=parameter.dtype
    )
    tokens = model.tokenize(["a photo of the digit three with thin strokes"]).to(parameter.device)
    custom = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    was_training = model.training
    counts: dict[str, float] = {}
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        model.eval()
        with torch.no_grad():
            for kind in ("image", "text"):
                counter = FlopCounterMode(display=False, custom_mapping=custom)
                with counter:
                    if kind == "image":
                        model.encode_image(images)
                    else:
                        model.encode_text(tokens)
                counts[kind] = float(counter.get_total_flops())
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    return counts


__all__ = [
    "INITIAL_LOGIT_BIAS",
    "INITIAL_LOGIT_SCALE",
    "ContrastiveModel",
    "ImageSpec",
    "OpenClipContrastiveModel",
    "TinyContrastiveModel",
    "build_model",
    "convert_input",
    "forward_flops_per_example",
    "hash_tokenize",
    "register_openclip_config",
    "tiny_image_spec",
    "to_model_input",
]
