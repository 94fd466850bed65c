"""The Z-Image family on the tiny preset: conventions match the pipeline, LoRA lands on every block, and the
teacher encoder is the student's encoder plus an image."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from PIL import Image

from dopsd.errors import ModelLoadError
from dopsd.lora import add_adapters, make_lora_config
from dopsd.models.base import ModelFamily
from dopsd.models.loading import load_family
from dopsd.models.qwen_teacher import copy_text_encoder_into_vlm
from dopsd.presets import get_preset


@pytest.fixture(scope="module")
def family() -> ModelFamily:
    preset = get_preset("tiny-z-image")
    return load_family(
        preset,
        base=preset.base_model,
        teacher=preset.teacher_encoder,
        device=torch.device("cpu"),
        dtype=torch.float32,
        teacher_min_pixels=32 * 32,
        teacher_max_pixels=64 * 64,
    )


def test_native_sigmas_are_the_turbo_schedule(family: ModelFamily) -> None:
    """Shift 3 on linspace(1, 1/4, 4) gives exactly the method's 4-step training sigmas."""
    assert family.native_sigmas(4, 64, 64) == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    assert len(family.native_sigmas(8, 64, 64)) == 9


def test_euler_rollout_matches_the_pipeline(family: ModelFamily) -> None:
    """Our prediction, x0 and Euler step reproduce ZImagePipeline's own sampling loop."""
    cond = family.encode_student(["a photo of sks"], 512)
    generator = torch.Generator().manual_seed(3)
    expected = family.pipeline(
        prompt_embeds=cond, height=64, width=64, num_inference_steps=8, guidance_scale=0.0,
        generator=generator, output_type="latent",
    ).images  # fmt: skip
    x = torch.randn((1, *family.latent_shape(64, 64)), generator=torch.Generator().manual_seed(3))
    sigmas = family.native_sigmas(8, 64, 64)
    with torch.no_grad():
        for sigma, sigma_next in itertools.pairwise(sigmas):
            x = family.euler_step(x, sigma, sigma_next, family.predict(x, sigma, cond))
    torch.testing.assert_close(x, expected, atol=1e-4, rtol=1e-4)


def test_x0_from_prediction_inverts_the_flow(family: ModelFamily) -> None:
    """With x_t = (1 - sigma) x0 + sigma noise and the exact velocity x0 - noise, x0 comes back exactly."""
    x0, noise = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8)
    sigma = 0.3
    xt = (1 - sigma) * x0 + sigma * noise
    torch.testing.assert_close(family.x0_from_prediction(xt, sigma, x0 - noise), x0)
    torch.testing.assert_close(family.euler_step(xt, sigma, 0.0, x0 - noise), x0)


def test_lora_wraps_all_seven_kinds_in_every_block() -> None:
    preset = get_preset("tiny-z-image")
    fam = load_family(
        preset, base=preset.base_model, teacher=preset.teacher_encoder, device=torch.device("cpu"),
        dtype=torch.float32, teacher_min_pixels=1024, teacher_max_pixels=4096,
    )  # fmt: skip
    transformer = fam.transformer
    add_adapters(transformer, make_lora_config(4, 8.0, 0.0, fam.lora_target_modules), with_teacher=False)
    wrapped = {name for name, m in transformer.named_modules() if hasattr(m, "lora_A")}
    blocks = {m.group(1) for n in wrapped if (m := re.match(r"((?:layers|noise_refiner|context_refiner)\.\d+)\.", n))}
    expected_blocks = (
        {f"layers.{i}" for i in range(len(transformer.layers))}
        | {f"noise_refiner.{i}" for i in range(len(transformer.noise_refiner))}
        | {f"context_refiner.{i}" for i in range(len(transformer.context_refiner))}
    )
    assert blocks == expected_blocks
    kinds = (
        "attention.to_q",
        "attention.to_k",
        "attention.to_v",
        "attention.to_out.0",
        *tuple(f"feed_forward.w{i}" for i in (1, 2, 3)),
    )
    for block in expected_blocks:
        assert {f"{block}.{k}" for k in kinds} <= wrapped, block
    assert len(wrapped) == 7 * len(expected_blocks)


def test_teacher_without_image_reproduces_student_features(family: ModelFamily) -> None:
    caption = "a photo of sks toy robot"
    student = family.encode_student([caption], 512)[0]
    teacher_no_image = family.teacher_encoder.encode(None, caption, max_length=1024)  # type: ignore[attr-defined]
    torch.testing.assert_close(teacher_no_image, student, atol=1e-5, rtol=1e-5)


def test_teacher_context_adds_exactly_the_image_span(family: ModelFamily) -> None:
    caption = "a photo of sks"
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    student = family.encode_student([caption], 512)[0]
    teacher = family.encode_teacher(image, caption, text_max_length=512, context_max_length=1024)
    encoder = family.teacher_encoder  # type: ignore[attr-defined]
    # 64x64 px at patch 16, merge 2: a 4x4 patch grid -> 4 image tokens, plus vision start/end markers.
    assert teacher.shape == (student.shape[0] + 4 + 2, student.shape[1])
    text = encoder.render(caption, 4)
    assert "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>" + caption in text
    assert text.replace("<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>", "") == (
        family.pipeline.tokenizer.apply_chat_template(
            [{"role": "user", "content": caption}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
    )
    # The tokens before the image span see the same text: their features are the student's.
    torch.testing.assert_close(teacher[:3], student[:3], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(teacher[-3:], student[-3:])


def test_teacher_context_respects_the_token_limit(family: ModelFamily) -> None:
    image = Image.new("RGB", (64, 64), "blue")
    long_caption = "sks " * 200
    feats = family.encode_teacher(image, long_caption, text_max_length=512, context_max_length=64)
    assert feats.shape[0] == 64


def test_copying_a_mismatched_text_encoder_lists_the_names(family: ModelFamily) -> None:
    from transformers import Qwen3Config, Qwen3Model

    other = Qwen3Model(Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16))  # fmt: skip
    with pytest.raises(ModelLoadError, match=r"missing in text encoder: .*layers\.2\.") as info:
        copy_text_encoder_into_vlm(other, family.teacher_encoder.vlm.language_model)  # type: ignore[attr-defined]
    assert "shape mismatch: embed_tokens.weight" in str(info.value)
