"""Image preprocessing on real encoded images: formats, colour modes, geometry, normalisation, determinism."""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from jest_trainer.config import DataConfig, ModelConfig
from jest_trainer.preprocess import (
    DEFAULT_IMAGE_SIZE,
    OPENAI_MEAN,
    OPENAI_STD,
    ImageDecodeError,
    ImageTransform,
    PreprocessSpec,
    build_image_transform,
    decode_rgb,
    preprocess_spec,
)
from PIL import Image


@dataclass(frozen=True)
class ImageSpec:
    """The model side's input description (the fields of ``models.ImageSpec`` the transform reads)."""

    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


IDENTITY = PreprocessSpec(size=4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _encode(picture: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _solid(mode: str, size: tuple[int, int], colour: object) -> Image.Image:
    return Image.new(mode, size, colour)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fmt", "options"), [("PNG", {}), ("JPEG", {"quality": 95}), ("WEBP", {"lossless": True})]
)
def test_every_format_decodes_to_rgb_of_the_same_colour(fmt: str, options: dict) -> None:
    payload = _encode(_solid("RGB", (40, 30), (200, 100, 50)), fmt, **options)
    image = ImageTransform(IDENTITY)(payload)
    assert image.shape == (3, 4, 4) and image.dtype == torch.float32
    expected = torch.tensor([200, 100, 50], dtype=torch.float32).view(3, 1, 1) / 255
    assert torch.allclose(image, expected.expand(3, 4, 4), atol=3 / 255)


def test_grey_becomes_rgb_and_transparency_is_composited_on_white() -> None:
    grey = decode_rgb(_encode(_solid("L", (5, 5), 128), "PNG"))
    assert grey.mode == "RGB" and grey.getpixel((2, 2)) == (128, 128, 128)
    clear = decode_rgb(_encode(_solid("RGBA", (5, 5), (10, 20, 30, 0)), "PNG"))
    assert clear.getpixel((0, 0)) == (255, 255, 255)
    half = decode_rgb(_encode(_solid("RGBA", (5, 5), (0, 0, 0, 128)), "PNG"))
    assert all(abs(v - 127) <= 1 for v in half.getpixel((0, 0)))
    palette = _solid("P", (5, 5), 0)
    palette.putpalette([0, 0, 0] * 256)
    assert decode_rgb(_encode(palette, "PNG", transparency=0)).getpixel((1, 1)) == (255, 255, 255)
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert decode_rgb(_encode(deep, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_undecodable_bytes_raise_image_decode_error() -> None:
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        ImageTransform(IDENTITY)(b"GIF89a but truncated")
    truncated = _encode(_solid("RGB", (64, 64), (1, 2, 3)), "JPEG")[:100]
    with pytest.raises(ImageDecodeError):
        decode_rgb(truncated)


def test_resize_then_centre_crop_keeps_the_middle_of_a_wide_image() -> None:
    # 12 x 4: left third red, middle green, right third blue -> shorter side 4 already, crop the middle 4 columns
    pixels = np.zeros((4, 12, 3), dtype=np.uint8)
    pixels[:, :4, 0] = pixels[:, 4:8, 1] = pixels[:, 8:, 2] = 255
    image = ImageTransform(IDENTITY)(_encode(Image.fromarray(pixels), "PNG"))
    assert torch.allclose(image[1], torch.ones(4, 4)) and float(image[0].max()) == 0 == float(image[2].max())
    big = ImageTransform(IDENTITY)(_encode(Image.fromarray(np.repeat(np.repeat(pixels, 10, 0), 10, 1)), "PNG"))
    assert big.shape == (3, 4, 4) and float(big[1].mean()) > 0.95


def test_normalisation_uses_mean_and_std() -> None:
    spec = PreprocessSpec(size=2, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    image = ImageTransform(spec)(_encode(_solid("RGB", (2, 2), (255, 255, 255)), "PNG"))
    assert torch.allclose(image[:, 0, 0], torch.tensor([1.0, 3.0, 0.5]))


def test_random_resized_crop_is_a_function_of_the_sample_seed() -> None:
    rng = np.random.default_rng(0)
    payload = _encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    transform = pickle.loads(pickle.dumps(ImageTransform(PreprocessSpec(size=16, mean=(0,) * 3, std=(1,) * 3),
                                                         random_crop=True, crop_min_scale=0.2)))  # fmt: skip
    first, again = transform(payload, sample_seed=7), transform(payload, sample_seed=7)
    assert torch.equal(first, again) and not torch.equal(first, transform(payload, sample_seed=8))
    centre = ImageTransform(transform.spec)
    assert torch.equal(centre(payload, sample_seed=1), centre(payload, sample_seed=2))


def test_built_in_towers_default_and_configured_spec() -> None:
    default = preprocess_spec(ModelConfig())
    assert (default.size, default.mean, default.std) == (DEFAULT_IMAGE_SIZE, OPENAI_MEAN, OPENAI_STD)
    assert default.family == "builtin"
    custom = preprocess_spec(ModelConfig(image_size=32, image_mean=[0.5] * 3, image_std=[0.2] * 3))
    assert (custom.size, custom.mean, custom.std) == (32, (0.5,) * 3, (0.2,) * 3)
    crop = DataConfig(random_resized_crop=True)
    assert build_image_transform(ModelConfig(), crop, train=True).random_crop
    assert not build_image_transform(ModelConfig(), crop, train=False).random_crop


def test_open_clip_uses_its_own_preprocessing_and_refuses_another_size() -> None:
    spec = preprocess_spec(ModelConfig(arch="openclip:ViT-B-32"))
    assert (spec.size, spec.family, spec.interpolation, spec.resize_mode) == (224, "openclip", "bicubic", "shortest")
    image = ImageTransform(spec)(_encode(_solid("RGB", (300, 200), (255, 0, 0)), "JPEG"))
    assert image.shape == (3, 224, 224)
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    assert torch.allclose(image[:, 100, 100], red, atol=0.05)
    with pytest.raises(ValueError, match=r"model\.imageSize: openclip:ViT-B-32 takes 224 px"):
        preprocess_spec(ModelConfig(arch="openclip:ViT-B-32", image_size=64))


def test_the_models_image_spec_is_the_source_of_truth_and_from_pixels_matches() -> None:
    grey = ImageSpec(channels=1, size=8, mean=(0.5,), std=(0.5,))
    transform = build_image_transform(ModelConfig(), DataConfig(), train=False, image_spec=grey)
    assert transform.image_shape == (1, 8, 8)
    image = transform(_encode(_solid("RGB", (16, 16), (255, 255, 255)), "PNG"))
    assert image.shape == (1, 8, 8) and torch.allclose(image, torch.ones(1, 8, 8))
    pixels = torch.rand(3, 1, 8, 8)
    assert torch.allclose(transform.from_pixels(pixels), (pixels - 0.5) / 0.5)
    rgb = build_image_transform(ModelConfig(), DataConfig(), train=False,
                                image_spec=ImageSpec(channels=3, size=16, mean=(0.1,) * 3, std=(0.3,) * 3))  # fmt: skip
    assert rgb.from_pixels(pixels).shape == (3, 3, 16, 16) and rgb.spec.mean == (0.1,) * 3


def test_config_rejects_bad_normalisation_naming_the_field() -> None:
    with pytest.raises(ValueError, match="imageStd"):
        ModelConfig(image_std=[0.2, 0.0, 0.2])
    with pytest.raises(ValueError, match=r"image_mean|imageMean"):
        ModelConfig(image_mean=[0.5, 0.5])
