"""The concept figures that need an image-embedding model, with a tiny CLIP built in code and saved to a folder
(loaded the way a configured local model is), and what the report says without one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from dopsd.evaluation import EmbedderError, ImageEmbedder, measure
from dopsd.lora import STUDENT_ADAPTER, add_adapters, make_lora_config, remove_adapters, student_parameters
from dopsd.models.tiny import build_tiny_tokenizer
from tests.dopsd.evaluation_helpers import evaluation_set, tiny_family


VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}


def _processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIP (text and image towers), its image processor and a byte-level tokenizer, saved to a folder."""
    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = "<|endoftext|>"
    text = {
        "vocab_size": len(tokenizer) + 8,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 128,
        "eos_token_id": 2,
    }
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=VISION, projection_dim=16)).save_pretrained(folder)
    _processor().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_embedder_loads_only_from_a_local_folder(clip_folder: Path, tmp_path: Path) -> None:
    embedder = ImageEmbedder.from_folder(clip_folder)
    assert embedder.has_text and "clip" in embedder.name
    vectors = embedder.embed_images(torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert vectors.shape == (3, 16) and torch.allclose(vectors.norm(dim=-1), torch.ones(3))
    assert embedder.embed_texts(["a photo of sks", "a red bowl of fruit"]).shape == (2, 16)
    with pytest.raises(EmbedderError, match="local folder"):
        ImageEmbedder.from_folder("openai/clip-vit-base-patch32")  # a hub id is never fetched
    with pytest.raises(EmbedderError, match="cannot load"):
        ImageEmbedder.from_folder(tmp_path)


def test_similarity_and_adherence_are_measured_with_a_model(
    clip_folder: Path, example_dir: Path, tmp_path: Path
) -> None:
    cfg, family = tiny_family("tiny-z-image")
    inputs = evaluation_set(family, cfg, example_dir, seeds=2, prompts=2, priors=2)
    torch.manual_seed(0)
    add_adapters(family.transformer, make_lora_config(4, 8.0, 0.0, family.lora_target_modules), with_teacher=False)
    with torch.no_grad():  # an adapter that changes the model: random B instead of zeros
        for p in student_parameters(family.transformer):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    vision_only = tmp_path / "vision-only"
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(vision_only)
    _processor().save_pretrained(vision_only)
    try:
        report = measure(family, inputs, adapter=STUDENT_ADAPTER, embedder=ImageEmbedder.from_folder(clip_folder))
        image_only = measure(family, inputs, embedder=ImageEmbedder.from_folder(vision_only))
    finally:
        remove_adapters(family.transformer)
    for name in ("reference_similarity", "prompt_adherence"):
        figure = report.figures[name]
        assert figure.not_measured is None and figure.per_seed is not None and len(figure.per_seed) == 2
        assert figure.base is not None and figure.adapter is not None and figure.base != figure.adapter
        assert figure.verdict in {"higher", "lower", "no clear change"}
    assert report.embedding_model is not None and "clip" in report.embedding_model
    assert image_only.figures["reference_similarity"].mean is not None
    assert "no text tower" in (image_only.figures["prompt_adherence"].not_measured or "")
