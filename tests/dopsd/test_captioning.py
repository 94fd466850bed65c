"""Captions made for images that have none: the trigger word is always in them, the VLM path runs on a tiny
Qwen3-VL built in code, and a run without any caption trains and records the captions it used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from PIL import Image
from transformers import Qwen3VLForConditionalGeneration

from dopsd import DOPSDConfig, train
from dopsd.captioning import VLMCaptioner, template_caption, uncaptioned, with_trigger
from dopsd.models.loading import qwen_image_processor
from dopsd.models.tiny import build_tiny_z_image_pipeline, tiny_vlm_config


def test_generated_captions_always_name_the_trigger() -> None:
    assert with_trigger("  A robot   on a table.\n", "sks") == "sks, A robot on a table."
    assert with_trigger("a sks robot on a table", "sks") == "a sks robot on a table"
    assert with_trigger("asks for help", "sks") == "sks, asks for help"  # a word inside another is not the trigger
    assert with_trigger('   ""  ', "sks") == template_caption("sks")
    assert len(with_trigger("x" * 1000, "sks")) <= 305


def test_uncaptioned_lists_images_without_their_own_caption() -> None:
    assert uncaptioned(["a.png", "b.png", "c.png"], {"a.png": ["x"], "b.png": []}) == ["b.png", "c.png"]
    assert uncaptioned(["a.png"], None) == ["a.png"]


def test_vlm_captioner_describes_an_image_with_a_tiny_qwen3_vl() -> None:
    pipe = build_tiny_z_image_pipeline()
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(tiny_vlm_config(pipe.text_encoder.config, pipe.tokenizer))
    captioner = VLMCaptioner(model, pipe.tokenizer, qwen_image_processor(None, 32 * 32, 64 * 64), max_new_tokens=8)
    image = Image.new("RGB", (64, 48), (200, 40, 40))
    first = captioner.caption(image, "sks")
    assert "sks" in first and first.strip() == first
    assert captioner.caption(image, "sks") == first  # greedy: the same image gets the same caption


def test_a_run_without_captions_makes_and_records_them(example_dir: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted(example_dir.glob("*.png"))[:2]:
        shutil.copy(p, images / p.name)
    config = DOPSDConfig.for_preset(
        preset="tiny-z-image",
        instance_data_dir=str(images),
        output_dir=str(tmp_path / "out"),
        trigger="zwx",
        default_caption=None,
        max_train_steps=2,
        validation_prompts=["a photo of [V]"],
        sample_seeds=[0],
    )
    result = train(config)
    saved = json.loads((result.output_dir / "config.json").read_text())["captions"]
    assert saved == {p.name: ["a photo of zwx"] for p in sorted(images.glob("*.png"))}
    assert result.metrics["captions"] == saved
