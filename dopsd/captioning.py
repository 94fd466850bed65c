"""Captions made for the user: an image with no caption, in a run with no default caption, is described by the
VLM the teacher encoder comes from (real presets), naming the concept by the trigger word; tiny presets, whose
VLM has random weights, get a template caption instead.

The teacher's own VLM cannot caption: its language model is overwritten by the diffusion text encoder. The
captioner therefore loads the VLM afresh from the same weights, and is freed before training starts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen3VLForConditionalGeneration

from dopsd.config import DOPSDConfig
from dopsd.data import image_files, load_image
from dopsd.errors import ModelLoadError
from dopsd.presets import Preset, get_preset


logger = logging.getLogger(__name__)

INSTRUCTION = (
    "Write one short sentence describing this image as a caption for training an image generator. "
    "Refer to the main subject as '{trigger}'. Answer with the caption only."
)
MAX_CAPTION_CHARS = 300
_SENTINEL = "\x00IMAGE\x00"


def template_caption(trigger: str) -> str:
    """The caption given when no model can describe the image."""
    return f"a photo of {trigger}"


def with_trigger(text: str, trigger: str) -> str:
    """A generated caption cleaned to one line, cut to `MAX_CAPTION_CHARS`, and naming the trigger word (put in
    front when the model did not use it): the concept must be in every caption for the LoRA to bind to it."""
    clean = re.sub(r"\s+", " ", text).strip().strip('"').strip()[:MAX_CAPTION_CHARS]
    if not clean:
        return template_caption(trigger)
    if re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", clean) is None:
        clean = f"{trigger}, {clean}"
    return clean


class VLMCaptioner:
    """Describes images with a Qwen3-VL model (greedy decoding, so a job's captions are reproducible)."""

    def __init__(
        self, model: Any, tokenizer: PreTrainedTokenizerBase, image_processor: Any, *, max_new_tokens: int = 60
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_new_tokens = max_new_tokens
        image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert isinstance(image_token_id, int)
        self.image_token_id = image_token_id

    @classmethod
    def load(cls, path: str, *, device: torch.device, dtype: torch.dtype, image_processor: Any) -> VLMCaptioner:
        """The captioner of a VLM folder or hub id (the preset's teacher encoder weights)."""
        try:
            model = Qwen3VLForConditionalGeneration.from_pretrained(
                path, torch_dtype=dtype, local_files_only=Path(path).is_dir()
            )
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=Path(path).is_dir())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the captioning VLM from {path!r}: {exc}") from exc
        model.to(device)  # type: ignore[arg-type]  # transformers' .to stub does not take a device
        return cls(model, tokenizer, image_processor)

    @torch.no_grad()
    def caption(self, image: Image.Image, trigger: str) -> str:
        """One caption of `image` that names the subject `trigger`."""
        device = next(self.model.parameters()).device
        pixels = self.image_processor(images=[image.convert("RGB")], return_tensors="pt")
        grid = pixels["image_grid_thw"]
        merge = int(getattr(self.image_processor, "merge_size", 2))
        span = "<|vision_start|>" + "<|image_pad|>" * (int(grid.prod()) // (merge * merge)) + "<|vision_end|>"
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": _SENTINEL + INSTRUCTION.format(trigger=trigger)}],
            tokenize=False,
            add_generation_prompt=True,
        )
        assert isinstance(text, str)
        ids = self.tokenizer(text.replace(_SENTINEL, span), return_tensors="pt").input_ids.to(device)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels["pixel_values"].to(device, next(self.model.parameters()).dtype),
            image_grid_thw=grid.to(device),
            mm_token_type_ids=torch.eq(ids, self.image_token_id).int(),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
        )
        return with_trigger(str(self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)), trigger)


def uncaptioned(images: Sequence[str], captions: Mapping[str, Sequence[str] | str] | None) -> list[str]:
    """The image names that have no caption of their own."""
    given = captions or {}
    return [name for name in images if not given.get(name)]


def auto_captions(
    images: Mapping[str, Image.Image],
    *,
    trigger: str,
    preset: Preset,
    teacher_path: str | None,
    device: torch.device,
    dtype: torch.dtype,
    min_pixels: int,
    max_pixels: int,
) -> dict[str, str]:
    """A caption for each image: the preset's VLM describes it (real presets; images sized as the teacher sees
    them, `min_pixels`..`max_pixels`), the world's caption from its colours (`shapes`), or the template (tiny
    ones)."""
    if preset.family == "shapes":
        from dopsd.shapes.world import caption_for

        return {name: caption_for(np.asarray(image.convert("RGB")), trigger) for name, image in images.items()}
    if preset.is_tiny or teacher_path is None:
        return {name: template_caption(trigger) for name in images}
    from dopsd.models.loading import qwen_image_processor

    processor = qwen_image_processor(teacher_path, min_pixels, max_pixels)
    captioner = VLMCaptioner.load(teacher_path, device=device, dtype=dtype, image_processor=processor)
    try:
        result = {name: captioner.caption(image, trigger) for name, image in images.items()}
    finally:
        del captioner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for name, caption in result.items():
        logger.info("caption of %s: %s", name, caption)
    return result


def with_auto_captions(cfg: DOPSDConfig, *, device: torch.device, dtype: torch.dtype) -> DOPSDConfig:
    """`cfg` with a made caption for every image of `instance_data_dir` that has none (for runs with no default
    caption to fall back on); the captions end up in `config.json` like the user's own."""
    if cfg.instance_data_dir is None:
        return cfg  # nothing to caption: loading the dataset reports the missing folder
    preset = get_preset(cfg.preset)
    missing = uncaptioned([p.name for p in image_files(cfg.instance_data_dir)], cfg.captions)
    if not missing:
        return cfg
    folder = Path(cfg.instance_data_dir)
    images = {n: load_image(folder / n, min_side=preset.min_image_side, name=n) for n in missing}
    made = auto_captions(
        images,
        trigger=cfg.trigger,
        preset=preset,
        teacher_path=cfg.teacher_encoder_path,
        device=device,
        dtype=dtype,
        min_pixels=cfg.teacher_min_pixels,
        max_pixels=cfg.teacher_max_pixels,
    )
    logger.info("made captions for %d image(s) without one", len(made))
    return cfg.with_changes(captions={**(cfg.captions or {}), **{n: [c] for n, c in made.items()}})
