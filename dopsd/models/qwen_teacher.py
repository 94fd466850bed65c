"""The teacher encoder: a Qwen3-VL whose language model carries the diffusion model's own text-encoder weights.

Shown (target image + caption), it yields features in the same space as the student's text-only features, so the
unchanged denoiser can read them. The token stream is the student's chat template with the image span inserted
before the caption, so with no image both paths give the same features (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dopsd.errors import ModelLoadError


_SENTINEL = "\x00DOPSD_IMAGE\x00"


def copy_text_encoder_into_vlm(text_encoder: PreTrainedModel, language_model: torch.nn.Module) -> int:
    """Overwrites the VLM's language model with the text encoder's weights, matched by name and shape.

    Every tensor must match (Qwen3-4B into Qwen3-VL-4B: all of them); anything else is a `ModelLoadError` that lists
    the offending names, because a partial copy would silently give the teacher a different feature space.
    Returns the number of tensors copied.
    """
    source = text_encoder.base_model.state_dict()
    target = language_model.state_dict()
    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    mismatched = sorted(k for k in set(source) & set(target) if source[k].shape != target[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing in text encoder: {', '.join(missing[:20])}")
        if unexpected:
            parts.append(f"not in VLM language model: {', '.join(unexpected[:20])}")
        if mismatched:
            shapes = [f"{k} {tuple(source[k].shape)} vs {tuple(target[k].shape)}" for k in mismatched[:20]]
            parts.append(f"shape mismatch: {', '.join(shapes)}")
        raise ModelLoadError(
            f"text encoder ({len(source)} tensors) does not match the VLM language model ({len(target)}): "
            + "; ".join(parts)
        )
    language_model.load_state_dict(source, strict=True)
    return len(source)


class QwenVLTeacherEncoder:
    """Encodes (image, caption) with a Qwen3-VL model whose language model is the diffusion text encoder."""

    def __init__(
        self,
        vlm: torch.nn.Module,
        image_processor: Any,
        tokenizer: PreTrainedTokenizerBase,
        *,
        chat_template_kwargs: dict[str, Any],
        image_token: str = "<|image_pad|>",
    ) -> None:
        self.vlm = vlm.eval().requires_grad_(False)
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template_kwargs = chat_template_kwargs
        self.image_token = image_token
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        assert isinstance(image_token_id, int)
        self.image_token_id = image_token_id

    def render(self, caption: str, num_image_tokens: int) -> str:
        """The student's chat-template text with `<|vision_start|>`, image pads and `<|vision_end|>` before the caption."""
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": _SENTINEL + caption}],
            tokenize=False,
            add_generation_prompt=True,
            **self.chat_template_kwargs,
        )
        assert isinstance(text, str)
        span = "<|vision_start|>" + self.image_token * num_image_tokens + "<|vision_end|>" if num_image_tokens else ""
        return text.replace(_SENTINEL, span)

    def _token_ids(self, caption: str, num_image_tokens: int, max_length: int) -> torch.Tensor:
        ids = self.tokenizer(self.render(caption, num_image_tokens), return_tensors="pt").input_ids
        excess = ids.shape[1] - max_length
        if excess > 0:
            # Cut the caption's tail, never the image span or the template.
            caption_ids = self.tokenizer(caption, add_special_tokens=False).input_ids
            if excess >= len(caption_ids):
                raise ValueError(
                    f"teacher context needs {ids.shape[1] - len(caption_ids)} tokens without the caption, "
                    f"over the limit of {max_length}; lower the teacher image size"
                )
            caption = str(self.tokenizer.decode(caption_ids[: len(caption_ids) - excess]))
            ids = self.tokenizer(self.render(caption, num_image_tokens), return_tensors="pt").input_ids[:, :max_length]
        return ids

    @torch.no_grad()
    def encode(
        self,
        image: Image.Image | None,
        caption: str,
        *,
        max_length: int,
        hidden_layers: Sequence[int] = (-2,),
        pad_to: int | None = None,
    ) -> torch.Tensor:
        """Features [L, D * len(hidden_layers)] of (image + caption); without an image, of the caption alone.

        With `pad_to`, the sequence is right-padded to at least that many tokens and every row is returned, as
        pipelines that feed padded text features to their transformer (FLUX.2) encode their prompts.
        """
        device = next(self.vlm.parameters()).device
        kwargs: dict[str, Any] = {}
        num_image_tokens = 0
        if image is not None:
            pixels = self.image_processor(images=[image], return_tensors="pt")
            grid = pixels["image_grid_thw"]
            merge = int(getattr(self.image_processor, "merge_size", 2))
            num_image_tokens = int(grid.prod()) // (merge * merge)
            kwargs = {
                "pixel_values": pixels["pixel_values"].to(device, next(self.vlm.parameters()).dtype),
                "image_grid_thw": grid.to(device),
            }
        ids = self._token_ids(caption, num_image_tokens, max_length).to(device)
        if pad_to is not None and ids.shape[1] < pad_to:
            mask = torch.zeros((1, pad_to), dtype=torch.long, device=device)
            mask[:, : ids.shape[1]] = 1
            pad_id = self.tokenizer.pad_token_id or 0
            ids = torch.cat([ids, torch.full((1, pad_to - ids.shape[1]), pad_id, device=device)], dim=1)
            kwargs["attention_mask"] = mask
        if image is not None:
            # transformers >= 5 needs the token types for M-RoPE; the processor would add them, but it cannot be
            # built without torchvision, so they are derived here (1 = image token).
            kwargs["mm_token_type_ids"] = torch.eq(ids, self.image_token_id).int()
        out = self.vlm(input_ids=ids, output_hidden_states=True, **kwargs)
        feats = torch.cat([out.hidden_states[i][0] for i in hidden_layers], dim=-1)
        return feats
