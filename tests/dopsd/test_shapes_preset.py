"""The `shapes` preset through the project's own code paths: `ShapesPipeline` renders exactly what the model's own
sampler draws (with and without a reference in the edit branch), `dopsd train --preset shapes` trains an adapter on
the bundled cross images that the pipeline loads like a klein adapter, captions are made from the images' colours,
and captions outside the world's vocabulary are refused before anything loads. A toy-sized model stands in for the
shipped weights, so each test takes seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dopsd.cli import main as cli_main
from dopsd.config import DOPSDConfig
from dopsd.evaluation.latents import decode_latents, encode_reference
from dopsd.models.shapes import ShapesPipeline, pixels_from_image, shapes_family
from dopsd.presets import get_preset
from dopsd.shapes import world
from dopsd.shapes.model import ShapesModel, ShapesModelConfig, save_model, to_pixels, to_uint8


EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "shapes"
TOY = ShapesModelConfig(heads=1, head_dim=32, double_layers=1, single_layers=1, text_dim=16)


@pytest.fixture(scope="module")
def toy_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = ShapesModel(TOY)
    with torch.no_grad():  # a zero-initialised output layer would make every velocity 0 and every test vacuous
        for p in model.transformer.proj_out.parameters():
            p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("shapes") / "toy.safetensors"
    save_model(model, path, {"step": 0})
    return path


def test_the_pipeline_draws_what_the_model_samples(toy_weights: Path) -> None:
    from dopsd.shapes.model import load_model

    model = load_model(toy_weights)
    family = shapes_family(str(toy_weights), device=torch.device("cpu"), dtype=torch.float32)
    captions = ["a red circle on a blue background", "a green object on a red background"]
    images = family.text_to_image(
        captions, [torch.Generator().manual_seed(s) for s in (3, 4)], width=16, height=16, num_steps=4,
        guidance_scale=1.0,
    )  # fmt: skip
    for caption, seed, image in zip(captions, (3, 4), images, strict=True):
        expected = to_uint8(model.sample([caption], steps=4, generator=torch.Generator().manual_seed(seed)))[0]
        assert np.array_equal(np.asarray(image), expected)
    reference = world.render(world.sample_scene(np.random.default_rng(0), world.NEW_CONCEPT))
    cond = family.encode_teacher(Image.fromarray(reference), captions[1], text_max_length=8, context_max_length=8)
    with_ref = family.generate_one(cond, generator=torch.Generator().manual_seed(4), width=16, height=16, num_steps=4)
    sampled = model.sample(
        [captions[1]], steps=4, generator=torch.Generator().manual_seed(4), references=to_pixels([reference])
    )
    assert np.array_equal(np.asarray(with_ref), to_uint8(sampled)[0])
    assert not np.array_equal(np.asarray(with_ref), np.asarray(images[1]))  # the reference is seen


def test_latents_are_the_patchified_pixels(toy_weights: Path) -> None:
    family = shapes_family(str(toy_weights), device=torch.device("cpu"), dtype=torch.float32)
    image = Image.open(EXAMPLES / "cross-1.png")
    latents = encode_reference(family, image, 16, 16)
    assert latents.shape == (1, *family.latent_shape(16, 16))
    assert torch.allclose(decode_latents(family, latents)[0] * 2 - 1, pixels_from_image(image), atol=1e-6)


def test_captions_outside_the_vocabulary_are_refused_naming_the_words() -> None:
    with pytest.raises(ValueError, match=r"photo, of .*knows only these words: a, on, background"):
        DOPSDConfig.for_preset(preset="shapes", instance_data_dir="x", default_caption="a photo of [V]")
    with pytest.raises(ValueError, match="outside the world's vocabulary: sks"):
        DOPSDConfig.for_preset(preset="shapes", instance_data_dir="x", trigger="sks")
    cfg = DOPSDConfig.for_preset(preset="shapes", instance_data_dir="x")
    assert cfg.trigger == "[V]" and cfg.default_caption is None and cfg.resolution == 16
    assert DOPSDConfig.for_preset(preset="tiny-z-image", instance_data_dir="x").trigger == "sks"
    assert get_preset("shapes").caption_problems("a red [V] on a blue background") == []


def test_train_on_the_bundled_crosses_writes_an_adapter_the_pipeline_loads(toy_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = cli_main(
        [
            "train", "--preset", "shapes", "--base", str(toy_weights), "--images", str(EXAMPLES),
            "--steps", "3", "--out", str(out), "--force", "--eval-seeds", "0", "--sample-every", "0",
            "--learning-rate", "5e-2", "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    # No captions were given: each image is captioned from its own colours, with the trigger word.
    for name, captions in config["captions"].items():
        colour, background = world.palette_colours(np.asarray(Image.open(EXAMPLES / name).convert("RGB")))
        assert captions == [f"a {colour} [V] on a {background} background"]
    pipe = ShapesPipeline.from_weights(str(toy_weights))
    prompt = ["a red [V] on a blue background"]
    before = np.asarray(pipe(prompt, generator=torch.Generator().manual_seed(0)).images[0])
    pipe.load_lora_weights(str(out / "pytorch_lora_weights.safetensors"))
    after = np.asarray(pipe(prompt, generator=torch.Generator().manual_seed(0)).images[0])
    assert not np.array_equal(before, after)
    assert (out / "pytorch_lora_weights_comfyui.safetensors").exists() or "comfyui" not in config["output_formats"]
