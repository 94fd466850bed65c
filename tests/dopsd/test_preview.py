"""Zero-shot previews on the tiny model: one image per reference image and prompt, a contact sheet, and no
captions needed (the prompts are the text)."""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image

from dopsd import DOPSDConfig
from dopsd.preview import preview


def test_preview_renders_each_reference_with_each_prompt_without_captions(example_dir: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted(example_dir.glob("*.png"))[:2]:
        shutil.copy(p, images / p.name)
    config = DOPSDConfig.for_preset(
        preset="tiny-z-image",
        instance_data_dir=str(images),
        output_dir=str(tmp_path / "out"),
        trigger="sks",
        default_caption=None,  # no caption anywhere: a training run would make some, a preview needs none
        validation_prompts=["a photo of [V]", "[V] in the snow"],
    )
    samples = preview(config, tmp_path / "preview")
    assert sorted((i.source, i.prompt) for i in samples.images) == sorted(
        (name, prompt) for name in ("robot-1.png", "robot-2.png") for prompt in ("a photo of sks", "sks in the snow")
    )
    assert all(i.kind == "preview" and Image.open(i.path).size == (64, 64) for i in samples.images)
    sheet = Image.open(samples.contact_sheet)
    assert sheet.width >= 2 * 64 and sheet.height >= 2 * 64
