"""An image-embedding model (CLIP, SigLIP or DINOv2 through transformers) loaded from a local folder, for the
concept figures that need one: similarity of samples to the reference images, and CLIP's text-image score.

Only ever a local folder (a setting or preset field names it), never a hub id at run time: a job must not depend on
the network, and an evaluation must say which weights judged it. Without a folder the report says "not measured".
The `shapes` world's preset names its own committed embedder, `shapes://embedder` (`dopsd.shapes.embedder`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

from dopsd.evaluation.latents import image_from_pixels
from dopsd.shapes import SCHEME


class EmbedderError(ValueError):
    """The folder does not hold a usable image-embedding model."""


class Embedder(Protocol):
    """What the report's similarity figures need of an embedding model."""

    name: str

    @property
    def has_text(self) -> bool:
        """Whether `embed_texts` works (a CLIP-style text tower)."""
        ...

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, D] unit vectors for images [N, 3, H, W] in [0, 1]."""
        ...

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """[N, D] unit vectors for texts, in the image embeddings' space."""
        ...


def load_embedder(name: str, *, device: torch.device | None = None) -> Embedder:
    """The embedder a preset or setting names: `shapes://embedder` (the shapes world's own), else a local folder."""
    if name.startswith(SCHEME):
        from dopsd.shapes.embedder import EMBEDDER_ID
        from dopsd.shapes.embedder import load_embedder as load_shapes_embedder

        if name != EMBEDDER_ID:
            raise EmbedderError(f"unknown embedder {name!r}; the shapes world ships {EMBEDDER_ID!r}")
        return load_shapes_embedder(device=device)
    return ImageEmbedder.from_folder(name, device=device)


def _features(output: Any) -> torch.Tensor:
    """transformers >= 5 returns a model output whose pooler_output holds the projected features; older a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is not None:
        return pooled
    return output.last_hidden_state[:, 0]


class ImageEmbedder:
    """Unit-norm embeddings of images (and of texts, where the model has a text tower and a tokenizer)."""

    def __init__(self, model: Any, processor: Any, tokenizer: Any | None, *, name: str, device: torch.device) -> None:
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.tokenizer = tokenizer
        self.name = name
        self.device = device

    @classmethod
    def from_folder(cls, folder: str | Path, *, device: torch.device | None = None) -> ImageEmbedder:
        """Loads the model, its image processor and (if present) its tokenizer from `folder`, offline, in fp32."""
        path = Path(folder)
        if not path.is_dir():
            raise EmbedderError(f"the embedding model must be a local folder; {str(folder)!r} is not one")
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
            processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise EmbedderError(f"cannot load an image-embedding model from {str(path)!r}: {exc}") from exc
        tokenizer = None
        if hasattr(model, "get_text_features"):
            try:
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError, KeyError, TypeError):
                tokenizer = None  # an image tower alone still gives the reference similarity
        where = device or torch.device("cpu")
        model.to(where)
        return cls(model, processor, tokenizer, name=f"{path.name} ({config.model_type})", device=where)

    @property
    def has_text(self) -> bool:
        """Whether prompt adherence (a text-image score) can be measured."""
        return self.tokenizer is not None and hasattr(self.model, "get_text_features")

    @torch.no_grad()
    def embed_images(self, pixels: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """[N, D] unit vectors for images [N, 3, H, W] in [0, 1], through the model's own preprocessing."""
        out = []
        for start in range(0, pixels.shape[0], batch_size):
            images = [image_from_pixels(p) for p in pixels[start : start + batch_size]]
            batch = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
            if hasattr(self.model, "get_image_features"):
                feats = _features(self.model.get_image_features(pixel_values=batch))
            else:
                feats = _features(self.model(pixel_values=batch))
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """[N, D] unit vectors for texts, in the image embeddings' space (CLIP-style models only)."""
        if not self.has_text:
            raise EmbedderError(f"{self.name} has no text tower and tokenizer")
        assert self.tokenizer is not None
        max_length = getattr(getattr(self.model.config, "text_config", None), "max_position_embeddings", 77)
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        feats = _features(self.model.get_text_features(**tokens))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu()
