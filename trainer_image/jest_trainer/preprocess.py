"""Image preprocessing: encoded bytes of any size and format -> the model's normalised input tensor.

Why its own module: the same transform runs in DataLoader worker processes (training stream), in the
training process (eval set) and in tests, so it must be one picklable object with no hidden state.

* **Decoding** (``decode_rgb``): JPEG, PNG, WebP (anything Pillow opens). Greyscale, palette and CMYK
  images become RGB; images with transparency (RGBA, LA, palette with a transparent colour) are
  composited on white first, so a transparent background never turns into arbitrary colours.
* **Geometry**: resize the shorter side to ``size`` then centre crop ``size x size``; for training,
  optionally a random resized crop (area fraction in ``[crop_min_scale, 1]``, aspect 3/4..4/3).
  The crop is seeded per sample (``sample_seed``, derived by the stream from seed, epoch and key), so
  a resumed run sees the very same pixels.
* **Normalisation**: ``(x - mean) / std`` per channel on pixels in [0, 1].

open_clip architectures take their size, mean, std, interpolation and resize mode from open_clip's
own preprocessing config (``PreprocessCfg`` defaults + the architecture's ``vision_cfg.image_size``,
as ``open_clip.create_model(name, pretrained=None)`` sets them) and run ``open_clip.image_transform``;
the built-in towers use ``model.imageSize`` (default ``DEFAULT_IMAGE_SIZE``) and ``model.imageMean`` /
``imageStd`` (default: the OpenAI CLIP constants) with torchvision.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from jest_trainer.config import DataConfig, ModelConfig

OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_IMAGE_SIZE = 64
RESIZE_MODES: tuple[str, ...] = ("shortest", "longest", "squash")
INTERPOLATIONS: tuple[str, ...] = ("bicubic", "bilinear")
CROP_ASPECT = (3 / 4, 4 / 3)
_WHITE = (255, 255, 255)


class ImageDecodeError(ValueError):
    """The bytes are not an image Pillow can decode (the stream skips the sample as ``decode_error``)."""


def decode_rgb(payload: bytes, *, draft_size: int | None = None) -> Image.Image:
    """Decode image bytes to an 8-bit RGB Pillow image, compositing any transparency on white.

    ``draft_size`` lets JPEG decoding shrink by a power of two while both sides stay >= ``draft_size``
    (a large speed-up for big photos; other formats ignore it). Raises ``ImageDecodeError``.
    """
    try:
        picture = Image.open(io.BytesIO(payload))
        if draft_size is not None and picture.format == "JPEG":
            picture.draft("RGB", (draft_size, draft_size))
        picture.load()
    except Exception as error:  # Pillow raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise ImageDecodeError(f"cannot decode image ({type(error).__name__}: {error})") from error
    if picture.mode == "P" and "transparency" in picture.info:
        picture = picture.convert("RGBA")
    if picture.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = picture.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if picture.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / float greyscale: scale to 8 bits by the value range Pillow reports
        array = np.asarray(picture, dtype=np.float64)
        top = 65535.0 if picture.mode.startswith("I;16") else max(1.0, float(array.max()))
        picture = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    return picture if picture.mode == "RGB" else picture.convert("RGB")


@dataclass(frozen=True)
class PreprocessSpec:
    """What the model expects: ``channels`` x square ``size``, per-channel ``mean``/``std``, how to resize.

    ``family`` is ``"builtin"`` (torchvision ops here) or ``"openclip"`` (``open_clip.image_transform``).
    ``channels`` is 3 (RGB) or 1 (grey, built-in towers only).
    """

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    family: str = "builtin"
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    channels: int = 3

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"model.imageSize: must be >= 1, got {self.size}")
        if self.channels not in (1, 3) or (self.family == "openclip" and self.channels != 3):
            raise ValueError(f"image channels: 3 (or 1 for built-in towers), got {self.channels} ({self.family})")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"model.imageMean / model.imageStd: need {self.channels} value(s) each")
        if min(self.std) <= 0:
            raise ValueError(f"model.imageStd: every value must be > 0, got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation: one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode: one of {RESIZE_MODES}, got {self.resize_mode!r}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(channels, size, size)``: the shape of every transformed image."""
        return self.channels, self.size, self.size


def _openclip_name(arch: str) -> str:
    """The registered open_clip model name of ``openclip:<spec>`` (JSON config paths registered on the way)."""
    from jest_trainer.models import _resolve_openclip_name

    return _resolve_openclip_name(arch.split(":", 1)[1])


class ModelImageSpec(Protocol):
    """The model side's description of its input (``models.ImageSpec``): channels, size, mean, std."""

    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def preprocess_spec(model: ModelConfig, image_spec: ModelImageSpec | None = None) -> PreprocessSpec:
    """The preprocessing a model config asks for (open_clip's own for ``openclip:`` archs).

    ``image_spec`` (a built model's ``image_spec``) wins for size, channels, mean and std when given, so
    the model stays the one source of truth; the family and resize details still come from the arch.
    For open_clip, ``model.imageSize`` may only restate the architecture's size (its position
    embeddings fix it); ``imageMean``/``imageStd`` override open_clip's defaults when given.
    """
    if image_spec is not None:
        base = preprocess_spec(model) if image_spec.channels == 3 else PreprocessSpec(
            size=int(image_spec.size), mean=tuple(image_spec.mean), std=tuple(image_spec.std),
            channels=int(image_spec.channels),
        )  # fmt: skip
        return replace(base, size=int(image_spec.size), channels=int(image_spec.channels),
                       mean=tuple(float(v) for v in image_spec.mean), std=tuple(float(v) for v in image_spec.std))
    if model.arch.startswith("openclip:"):
        import open_clip
        from open_clip.transform import PreprocessCfg

        name = _openclip_name(model.arch)
        config = open_clip.get_model_config(name) or {}
        defaults = PreprocessCfg()
        merged: dict[str, Any] = {
            "size": defaults.size, "mean": defaults.mean, "std": defaults.std,
            "interpolation": defaults.interpolation, "resize_mode": defaults.resize_mode,
        }  # fmt: skip
        merged.update({k: v for k, v in config.get("preprocess_cfg", {}).items() if k in merged})
        size = config.get("vision_cfg", {}).get("image_size", merged["size"])
        if isinstance(size, (list, tuple)):
            if len(set(size)) != 1:
                raise ValueError(f"model.arch: open_clip:{name} has a non-square input {tuple(size)}; not supported")
            size = size[0]
        if model.image_size is not None and model.image_size != int(size):
            raise ValueError(
                f"model.imageSize: {model.arch} takes {size} px images (its position embeddings fix it); "
                f"got {model.image_size} (leave imageSize unset)"
            )
        mean = tuple(model.image_mean) if model.image_mean else tuple(float(v) for v in merged["mean"])
        std = tuple(model.image_std) if model.image_std else tuple(float(v) for v in merged["std"])
        return PreprocessSpec(
            size=int(size), mean=mean, std=std, family="openclip",  # type: ignore[arg-type]
            interpolation=str(merged["interpolation"]), resize_mode=str(merged["resize_mode"]),
        )  # fmt: skip
    return PreprocessSpec(
        size=model.image_size or DEFAULT_IMAGE_SIZE,
        mean=tuple(model.image_mean) if model.image_mean else OPENAI_MEAN,  # type: ignore[arg-type]
        std=tuple(model.image_std) if model.image_std else OPENAI_STD,  # type: ignore[arg-type]
    )


@dataclass
class ImageTransform:
    """Encoded image bytes -> normalised float32 ``[3, S, S]`` model input. Picklable (DataLoader workers).

    ``random_crop`` selects the training geometry (random resized crop, area in ``[crop_min_scale, 1]``);
    otherwise resize + centre crop. Randomness comes only from ``sample_seed``: the same bytes and seed
    give the same tensor in any process. The torchvision / open_clip pipeline is built lazily in the
    process that uses it and is not pickled.
    """

    spec: PreprocessSpec
    random_crop: bool = False
    crop_min_scale: float = 0.9
    _pipeline: Callable[[Image.Image], Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.crop_min_scale <= 1:
            raise ValueError(f"data.cropMinScale: must lie in (0, 1], got {self.crop_min_scale}")

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "random_crop": self.random_crop, "crop_min_scale": self.crop_min_scale}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.spec = state["spec"]
        self.random_crop = state["random_crop"]
        self.crop_min_scale = state["crop_min_scale"]
        self._pipeline = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, S, S)``: the model's input shape."""
        return self.spec.image_shape

    def from_pixels(self, pixels: Tensor) -> Tensor:
        """In-memory ``[n, C, H, W]`` pixels in [0, 1] -> model input (grey -> RGB, bilinear resize, normalise).

        For sources that are tensors already (the digits demo); no crop, the image is resized whole.
        """
        if pixels.dim() != 4:
            raise ValueError(f"pixels: expected [n, C, H, W], got {tuple(pixels.shape)}")
        channels = self.spec.channels
        if pixels.shape[1] != channels:
            if pixels.shape[1] != 1:
                raise ValueError(f"pixels: {pixels.shape[1]} channels cannot become the model's {channels}")
            pixels = pixels.expand(-1, channels, -1, -1)
        if tuple(pixels.shape[-2:]) != (self.spec.size, self.spec.size):
            pixels = torch.nn.functional.interpolate(
                pixels, size=(self.spec.size, self.spec.size), mode="bilinear", align_corners=False
            )
        mean = torch.tensor(self.spec.mean, dtype=pixels.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.spec.std, dtype=pixels.dtype).view(1, -1, 1, 1)
        return ((pixels - mean) / std).to(torch.float32).contiguous()

    def _build(self) -> Callable[[Image.Image], Tensor]:
        if self.spec.family == "openclip":
            import open_clip

            return open_clip.image_transform(
                self.spec.size,
                is_train=self.random_crop,
                mean=self.spec.mean,
                std=self.spec.std,
                resize_mode=self.spec.resize_mode,
                interpolation=self.spec.interpolation,
                aug_cfg={"scale": (self.crop_min_scale, 1.0)},
            )
        from torchvision.transforms import v2

        mode = (
            v2.InterpolationMode.BICUBIC if self.spec.interpolation == "bicubic" else v2.InterpolationMode.BILINEAR
        )
        size = self.spec.size
        if self.random_crop:
            geometry: list[Any] = [v2.RandomResizedCrop(size, scale=(self.crop_min_scale, 1.0), ratio=CROP_ASPECT,
                                                         interpolation=mode, antialias=True)]
        elif self.spec.resize_mode == "squash":
            geometry = [v2.Resize((size, size), interpolation=mode, antialias=True)]
        else:
            geometry = [v2.Resize(size, interpolation=mode, antialias=True), v2.CenterCrop(size)]
        return v2.Compose(
            [
                v2.PILToTensor(),
                *geometry,
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(self.spec.mean), std=list(self.spec.std)),
            ]
        )

    def warm(self) -> None:
        """Build the pipeline now (imports torchvision / open_clip), so forked loader workers inherit it."""
        if self._pipeline is None:
            self._pipeline = self._build()

    def from_pil(self, picture: Image.Image, *, sample_seed: int | None = None) -> Tensor:
        """Transform an RGB Pillow image (already decoded by ``decode_rgb``)."""
        if self._pipeline is None:
            self._pipeline = self._build()
        if not self.random_crop:
            out = self._pipeline(picture)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0 if sample_seed is None else int(sample_seed) & 0x7FFF_FFFF_FFFF_FFFF)
                out = self._pipeline(picture)
        return out.to(torch.float32).contiguous()

    def __call__(self, payload: bytes, *, sample_seed: int | None = None) -> Tensor:
        """Decode ``payload`` and transform it (raises ``ImageDecodeError`` for undecodable bytes)."""
        scale = self.crop_min_scale**0.5 if self.random_crop else 1.0
        picture = decode_rgb(payload, draft_size=max(1, int(self.spec.size / scale)))
        if self.spec.channels == 1:
            picture = picture.convert("L")
        return self.from_pil(picture, sample_seed=sample_seed)


def build_image_transform(
    model: ModelConfig, data: DataConfig, *, train: bool, image_spec: ModelImageSpec | None = None
) -> ImageTransform:
    """The transform for training (``train=True``: random resized crop when ``data.randomResizedCrop``) or eval.

    Pass the built model's ``image_spec`` so the transform produces exactly what its ``encode_image`` takes.
    """
    return ImageTransform(
        preprocess_spec(model, image_spec),
        random_crop=bool(train and data.random_resized_crop),
        crop_min_scale=data.crop_min_scale,
    )


__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "ImageDecodeError",
    "ImageTransform",
    "ModelImageSpec",
    "PreprocessSpec",
    "build_image_transform",
    "decode_rgb",
    "preprocess_spec",
]
