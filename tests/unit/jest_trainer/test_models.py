"""Tests of the model towers: tokenizer, tiny towers, the real open_clip adapter and analytic FLOPs."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from jest_trainer.config import ModelConfig, NoiseConfig
from jest_trainer.data import load_digits_demo
from jest_trainer.models import (
    HASH_VOCAB_SIZE,
    INITIAL_LOGIT_BIAS,
    TINY_CONTEXT_LENGTH,
    OpenClipContrastiveModel,
    TinyContrastiveModel,
    build_model,
    convert_input,
    forward_flops_per_example,
    hash_tokenize,
    register_openclip_config,
    tiny_image_spec,
    to_model_input,
)

DIGITS_SHAPE = (1, 8, 8)
# a 2-layer ViT (width 64, 4x4 patches on 16x16 inputs) and a 2-layer text transformer (width 64)
TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 64, "patch_size": 4, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _siglip_loss(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Independent SigLIP loss (sum of pair softplus losses / batch) so these tests stand alone."""
    image, text = model(images, tokens)
    logits = model.logit_scale.exp() * image @ text.T + model.logit_bias
    labels = 2 * torch.eye(len(images)) - 1
    return F.softplus(-labels * logits).sum() / len(images)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny matmuls gain nothing from threads and suffer badly from oversubscription on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pairs() -> tuple[torch.Tensor, list[str]]:
    """16 curated digits as pixels in [0, 1] (tests convert them to each model's input)."""
    curated = load_digits_demo(NoiseConfig(), seed=0).curated
    return curated.images[:16], curated.captions[:16]


def test_hash_tokenizer_is_deterministic_and_stable_across_processes() -> None:
    tokens = hash_tokenize(["A handwritten THREE, thin", "a handwritten three thin", ""])
    assert tokens.dtype == torch.long and tokens.shape == (3, TINY_CONTEXT_LENGTH)
    assert torch.equal(tokens[0], tokens[1])  # case and punctuation do not matter
    assert torch.equal(tokens, hash_tokenize(["A handwritten THREE, thin", "a handwritten three thin", ""]))
    assert tokens[2].eq(0).all()
    assert int(tokens.max()) < HASH_VOCAB_SIZE and int(tokens[0, :4].min()) >= 1
    # golden ids: blake2b is not salted per process (unlike hash()), so these never change
    assert hash_tokenize(["three thin"])[0, :3].tolist() == [1706, 2510, 0]


def test_hash_tokenizer_truncates_long_captions() -> None:
    tokens = hash_tokenize([" ".join(f"w{i}" for i in range(100))])
    assert tokens.shape == (1, TINY_CONTEXT_LENGTH) and bool(tokens.ne(0).all())


def test_tiny_towers_embed_into_the_unit_sphere(pairs: tuple[torch.Tensor, list[str]]) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(embed_dim=48), image_shape=DIGITS_SHAPE)
    assert isinstance(model, TinyContrastiveModel)
    pixels, captions = pairs
    image, text = model(to_model_input(pixels, model.image_spec), model.tokenize(captions))
    assert image.shape == (16, 48) and text.shape == (16, 48)
    assert torch.allclose(image.norm(dim=-1), torch.ones(16), atol=1e-5)
    assert torch.allclose(text.norm(dim=-1), torch.ones(16), atol=1e-5)
    assert math.isclose(model.logit_scale.item(), math.log(10.0), rel_tol=1e-6)
    assert model.logit_bias.item() == INITIAL_LOGIT_BIAS
    with pytest.raises(ValueError, match="images"):
        model.encode_image(torch.rand(2, 3, 8, 8))


def test_tiny_colour_tower_ignores_each_image_background_colour() -> None:
    """A per-image colour cast (the background of a natural picture) does not move the embedding,
    while the picture's content does: the built-in tower centres colour input per image."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(image_size=16), image_shape=(3, 16, 16))
    images = torch.randn(4, 3, 16, 16)
    cast = torch.randn(4, 3, 1, 1) * 2.0
    with torch.no_grad():
        plain, shifted = model.encode_image(images), model.encode_image(images + cast)
        other = model.encode_image(torch.randn(4, 3, 16, 16))
    assert torch.allclose(plain, shifted, atol=1e-5)
    assert not torch.allclose(plain, other, atol=1e-2)


def test_tiny_towers_learn_digits_pairs(pairs: tuple[torch.Tensor, list[str]]) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(), image_shape=DIGITS_SHAPE)
    pixels, captions = pairs
    images = to_model_input(pixels, model.image_spec)
    tokens = model.tokenize(captions)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = _siglip_loss(model, images, tokens).item()
    for _ in range(40):
        optimizer.zero_grad()
        _siglip_loss(model, images, tokens).backward()
        optimizer.step()
    assert _siglip_loss(model, images, tokens).item() < 0.6 * first


@pytest.mark.parametrize(("embed_dim", "image_shape"), [(64, (1, 8, 8)), (32, (3, 64, 64))])
def test_tiny_flops_match_a_hand_count(embed_dim: int, image_shape: tuple[int, int, int]) -> None:
    model = build_model(ModelConfig(embed_dim=embed_dim), image_shape=image_shape)
    channels, size = image_shape[0], image_shape[-1]
    first = size if size <= 16 else size // 2  # the first conv strides by 2 above 16 px
    second = first // 2
    conv1 = 2 * first * first * 32 * channels * 9
    conv2 = 2 * second * second * 64 * 32 * 9
    hand_image = conv1 + conv2 + 2 * (64 * 16 * 256 + 256 * embed_dim)
    hand_text = 2 * (128 * 256 + 256 * embed_dim)  # mean pooling is elementwise, not counted
    assert forward_flops_per_example(model) == {"image": hand_image, "text": hand_text}


@pytest.mark.slow
def test_tiny_tower_learns_natural_rgb_where_the_background_is_not_zero() -> None:
    """RGB images on a bright, varying background: the conv tower on normalised input retrieves each
    image's caption (same-caption rows share a class, so the loss itself cannot reach zero)."""
    generator = torch.Generator().manual_seed(0)
    classes, per_class = 4, 8
    colours = torch.rand(classes, 3, 1, 1, generator=generator)
    background = 0.6 + 0.3 * torch.rand(classes * per_class, 3, 1, 1, generator=generator)
    pixels = background.expand(-1, -1, 32, 32).clone()
    labels = torch.arange(classes).repeat_interleave(per_class)
    for row, label in enumerate(labels.tolist()):  # a coloured square whose position encodes the class
        top, left = 4 + 12 * (label // 2), 4 + 12 * (label % 2)
        pixels[row, :, top : top + 10, left : left + 10] = colours[label]
    pixels = (pixels + 0.05 * torch.randn(pixels.shape, generator=generator)).clamp(0, 1)
    names = ("apple orchard", "boat harbour", "cloud sky", "drum music")
    captions = [names[label] for label in labels.tolist()]
    torch.manual_seed(0)
    model = build_model(ModelConfig(embed_dim=32, image_size=32), image_shape=(3, 32, 32))
    images, tokens = to_model_input(pixels, model.image_spec), model.tokenize(captions)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(100):
        optimizer.zero_grad()
        _siglip_loss(model, images, tokens).backward()
        optimizer.step()
    with torch.no_grad():
        image, text = model(images, tokens)
    assert ((image @ text.T).argmax(dim=1) // per_class == labels).float().mean() > 0.9


def test_image_specs_and_input_conversion() -> None:
    grey = tiny_image_spec((1, 8, 8))
    assert grey.shape == (1, 8, 8) and grey.mean == (0.5,) and grey.std == (0.5,)
    rgb = tiny_image_spec((3, 64, 64), ModelConfig(image_size=32))
    assert rgb.shape == (3, 32, 32) and len(rgb.mean) == 3
    pixels = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model_input = to_model_input(pixels, grey)
    assert torch.allclose(model_input, (pixels - 0.5) / 0.5)
    assert to_model_input(pixels, rgb).shape == (2, 3, 32, 32)
    assert convert_input(model_input, grey, grey) is model_input
    assert torch.allclose(convert_input(model_input, grey, rgb), to_model_input(pixels, rgb), atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        to_model_input(torch.rand(1, 2, 8, 8), rgb)


def test_openclip_tiny_vit_trains_a_step_on_digits(pairs: tuple[torch.Tensor, list[str]]) -> None:
    register_openclip_config("jest-test-tiny-vit", TINY_VIT)
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="openclip:jest-test-tiny-vit"), image_shape=DIGITS_SHAPE)
    assert isinstance(model, OpenClipContrastiveModel)
    assert model.embed_dim == 32 and model.image_spec.shape == (3, 16, 16)
    names = dict(model.named_parameters())
    assert "extra_logit_bias" in names and "clip.logit_scale" in names  # CLIP configs have no bias
    pixels, captions = pairs
    tokens = model.tokenize(captions)
    assert tokens.shape == (16, 16) and tokens.dtype == torch.long
    images = to_model_input(pixels, model.image_spec)
    assert images.shape == (16, 3, 16, 16)
    image, text = model(images, tokens)
    assert torch.allclose(image.norm(dim=-1), torch.ones(16), atol=1e-5)
    assert torch.allclose(text.norm(dim=-1), torch.ones(16), atol=1e-5)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = _siglip_loss(model, images, tokens).item()
    for _ in range(3):
        optimizer.zero_grad()
        _siglip_loss(model, images, tokens).backward()
        assert model.logit_bias.grad is not None and model.clip.visual.conv1.weight.grad is not None
        optimizer.step()
    after = _siglip_loss(model, images, tokens).item()
    assert math.isfinite(after) and after < before


def test_openclip_flops_match_the_vit_closed_form() -> None:
    register_openclip_config("jest-test-tiny-vit", TINY_VIT)
    model = build_model(ModelConfig(arch="openclip:jest-test-tiny-vit"), image_shape=DIGITS_SHAPE)
    width, mlp, embed = 64, 4 * 64, 32

    def encoder(tokens: int, layers: int) -> int:  # qkv, attention products, out projection, MLP
        per_layer = tokens * width * 3 * width + 2 * tokens * tokens * width + tokens * width * width
        return 2 * layers * (per_layer + 2 * tokens * width * mlp)

    patches = (16 // 4) ** 2
    image = 2 * patches * (3 * 4 * 4) * width + encoder(patches + 1, 2) + 2 * width * embed
    text = encoder(16, 2) + 2 * width * embed
    assert forward_flops_per_example(model) == {"image": image, "text": text}
    assert torch.backends.mha.get_fastpath_enabled()  # restored after counting


def test_openclip_config_from_a_json_path_and_a_local_checkpoint(tmp_path: Path) -> None:
    config_path = tmp_path / "my-tiny-clip.json"
    config_path.write_text(json.dumps(TINY_VIT))
    torch.manual_seed(1)
    first = build_model(ModelConfig(arch=f"openclip:{config_path}"), image_shape=(3, 16, 16))
    checkpoint = tmp_path / "open_clip_weights.pt"
    torch.save(first.clip.state_dict(), checkpoint)
    torch.manual_seed(2)
    pretrained = ModelConfig(arch=f"openclip:{config_path}", pretrained=str(checkpoint))
    loaded = build_model(pretrained, image_shape=(3, 16, 16))
    for (name, a), (_, b) in zip(first.clip.state_dict().items(), loaded.clip.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_tiny_model_loads_a_jest_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(3)
    trained = build_model(ModelConfig(), image_shape=DIGITS_SHAPE)
    torch.save({"model": trained.state_dict(), "step": 7}, tmp_path / "ckpt-00000007.pt")
    torch.manual_seed(4)
    loaded = build_model(ModelConfig(pretrained=str(tmp_path / "ckpt-00000007.pt")), image_shape=DIGITS_SHAPE)
    for name, value in trained.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name


def test_bad_model_configs_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model\.arch: unknown open_clip architecture 'NoSuchNet'"):
        build_model(ModelConfig(arch="openclip:NoSuchNet"), image_shape=DIGITS_SHAPE)
    with pytest.raises(ValueError, match=r"model\.arch: .* does not exist"):
        build_model(ModelConfig(arch=f"openclip:{tmp_path}/absent.json"), image_shape=DIGITS_SHAPE)
    (tmp_path / "partial.json").write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ValueError, match="vision_cfg, text_cfg"):
        build_model(ModelConfig(arch=f"openclip:{tmp_path}/partial.json"), image_shape=DIGITS_SHAPE)
    with pytest.raises(ValueError, match=r"model\.pretrained"):
        build_model(ModelConfig(pretrained=str(tmp_path / "missing.pt")), image_shape=DIGITS_SHAPE)


def test_openclip_sigmoid_config_keeps_its_own_bias() -> None:
    register_openclip_config("jest-test-tiny-sigmoid", {**TINY_VIT, "init_logit_bias": -10.0})
    model = build_model(ModelConfig(arch="openclip:jest-test-tiny-sigmoid"), image_shape=DIGITS_SHAPE)
    assert model.logit_bias is model.clip.logit_bias
    assert model.logit_bias.item() == -10.0
    assert "extra_logit_bias" not in dict(model.named_parameters())
