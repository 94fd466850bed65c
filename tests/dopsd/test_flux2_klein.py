"""FLUX.2-klein on the tiny preset: conventions match the pipeline, LoRA on the double-stream blocks only, the
edit-branch and VLM teacher contexts, and a trained adapter that diffusers loads and reproduces."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image

from dopsd import DOPSDConfig, train
from dopsd.cli import main as cli_main
from dopsd.lora import add_adapters, make_lora_config
from dopsd.models.flux2_klein import Flux2KleinFamily
from dopsd.models.loading import load_family
from dopsd.models.tiny import TINY_KLEIN_TEXT_LAYERS
from dopsd.presets import get_preset


def klein(teacher_context: str) -> Flux2KleinFamily:
    preset = get_preset("tiny-flux2-klein")
    family = load_family(
        preset, base=preset.base_model, teacher=preset.teacher_encoder, device=torch.device("cpu"),
        dtype=torch.float32, teacher_min_pixels=32 * 32, teacher_max_pixels=64 * 64, teacher_context=teacher_context,
    )  # fmt: skip
    assert isinstance(family, Flux2KleinFamily)
    return family


@pytest.fixture(scope="module")
def edit_family() -> Flux2KleinFamily:
    return klein("edit")


def test_euler_rollout_matches_the_pipeline(edit_family: Flux2KleinFamily) -> None:
    """predict + euler_step along the native 4-step schedule (empirical mu) reproduce Flux2KleinPipeline."""
    pipe = edit_family.pipeline
    cond = edit_family.encode_student(["a photo of sks"], 64)[0]
    expected = pipe(
        prompt_embeds=cond.embeds[None], height=64, width=64, num_inference_steps=4, guidance_scale=1.0,
        generator=torch.Generator().manual_seed(5), text_encoder_out_layers=TINY_KLEIN_TEXT_LAYERS,
        output_type="latent",
    ).images  # fmt: skip
    sigmas = edit_family.native_sigmas(4, 64, 64)
    assert len(sigmas) == 5 and sigmas[0] == pytest.approx(1.0) and sigmas[-1] == 0.0
    x = torch.randn((1, *edit_family.latent_shape(64, 64)), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for sigma, sigma_next in itertools.pairwise(sigmas):
            x = edit_family.euler_step(x, sigma, sigma_next, edit_family.predict(x, sigma, [cond]))
    bn_mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
    bn_std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    ours = pipe._unpatchify_latents(x * bn_std + bn_mean)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_x0_and_step_follow_the_sigma_convention(edit_family: Flux2KleinFamily) -> None:
    x0, noise = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    sigma = 0.6
    xt = (1 - sigma) * x0 + sigma * noise
    velocity = noise - x0  # FLUX.2 predicts toward the noise
    torch.testing.assert_close(edit_family.x0_from_prediction(xt, sigma, velocity), x0)
    torch.testing.assert_close(edit_family.euler_step(xt, sigma, 0.0, velocity), x0)


def test_edit_teacher_appends_reference_tokens_and_crops_the_output(edit_family: Flux2KleinFamily) -> None:
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    teacher = edit_family.encode_teacher(image, "a photo of sks", text_max_length=64, context_max_length=1024)
    student = edit_family.encode_student(["a photo of sks"], 64)[0]
    assert teacher.ref_tokens is not None and teacher.ref_ids is not None
    _, h, w = edit_family.latent_shape(64, 64)
    assert teacher.ref_tokens.shape == (h * w, 16)
    assert set(teacher.ref_ids[:, 0].tolist()) == {10}  # the reference image's time coordinate
    assert teacher.embeds.shape == student.embeds.shape == (64, 3 * 32)
    x = torch.randn(1, 16, h, w)
    with torch.no_grad():
        out_teacher = edit_family.predict(x, 0.5, [teacher])
        out_student = edit_family.predict(x, 0.5, [student])
    assert out_teacher.shape == out_student.shape == x.shape
    assert not torch.allclose(out_teacher, out_student)


def test_vlm_teacher_without_image_reproduces_student_features() -> None:
    family = klein("vlm")
    student = family.encode_student(["a photo of sks toy robot"], 64)[0]
    assert family.teacher_encoder is not None
    no_image = family.teacher_encoder.encode(
        None, "a photo of sks toy robot", max_length=1024, hidden_layers=TINY_KLEIN_TEXT_LAYERS, pad_to=64
    )
    torch.testing.assert_close(no_image, student.embeds, atol=1e-5, rtol=1e-5)
    with_image = family.encode_teacher(
        Image.new("RGB", (64, 64), "blue"), "a photo of sks toy robot", text_max_length=64, context_max_length=1024
    )
    assert with_image.embeds.shape[0] == 64 and with_image.ref_tokens is None


def test_lora_wraps_the_double_stream_blocks_only(edit_family: Flux2KleinFamily) -> None:
    transformer = klein("edit").transformer
    add_adapters(transformer, make_lora_config(4, 8.0, 0.0, Flux2KleinFamily.lora_target_modules), with_teacher=False)
    wrapped = sorted(name for name, m in transformer.named_modules() if hasattr(m, "lora_A"))
    expected = sorted(f"transformer_blocks.0.{suffix}" for suffix in Flux2KleinFamily.lora_target_modules)
    assert wrapped == expected
    assert not any(re.search(r"single_transformer_blocks|to_out$", n) for n in wrapped)
    assert isinstance(transformer.transformer_blocks[0].attn.to_out, torch.nn.ModuleList)


@pytest.fixture(scope="module")
def klein_run(tmp_path_factory: pytest.TempPathFactory, example_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("klein-run")
    code = cli_main(
        ["train", "--preset", "tiny-flux2-klein", "--images", str(example_dir), "--captions",
         str(example_dir / "captions.json"), "--trigger", "sks", "--steps", "30", "--out", str(out), "--quiet"]
    )  # fmt: skip
    assert code == 0
    return out


def test_klein_teacher_student_gap_falls_by_at_least_30_percent(klein_run: Path) -> None:
    gap = json.loads((klein_run / "metrics.json").read_text())["teacher_student_gap"]
    assert gap["after"] <= 0.7 * gap["before"], gap
    config = DOPSDConfig.load(klein_run / "config.json")
    assert (config.teacher_context, config.rollout_schedule, config.sample_steps) == ("edit", "released", 4)


def test_klein_adapter_loads_in_diffusers_and_reproduces_the_trainer_sample(
    klein_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    exported = tmp_path_factory.mktemp("tiny-klein")
    assert cli_main(["models", "export", "tiny-flux2-klein", str(exported)]) == 0
    pipe = Flux2KleinPipeline.from_pretrained(exported)
    pipe.set_progress_bar_config(disable=True)

    def generate() -> np.ndarray:
        image = pipe(
            prompt="a photo of sks", height=64, width=64, num_inference_steps=4, guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0), text_encoder_out_layers=TINY_KLEIN_TEXT_LAYERS,
            max_sequence_length=64, output_type="np",
        ).images[0]  # fmt: skip
        return np.asarray(image, dtype=np.float64) * 255

    base = generate()
    pipe.load_lora_weights(klein_run / "pytorch_lora_weights.safetensors")
    tuned = generate()
    samples = klein_run / "samples" / "step-00000030"
    trainer_student = np.asarray(Image.open(samples / "prompt-00-seed-0-adapter.png"), dtype=np.float64)
    trainer_base = np.asarray(Image.open(samples / "prompt-00-seed-0-base.png"), dtype=np.float64)
    assert np.abs(base - trainer_base).max() <= 1
    assert np.abs(tuned - trainer_student).max() <= 1
    # The toy klein's images barely depend on its conditioning, so the change is measured before quantisation.
    print("max change in 0-255 units:", np.abs(tuned - base).max())
    assert np.abs(tuned - base).max() > 0.5, "the adapter must change the output"


def test_klein_trains_with_the_vlm_teacher(example_dir: Path, tmp_path: Path) -> None:
    result = train(
        DOPSDConfig.for_preset(
            preset="tiny-flux2-klein",
            teacher_context="vlm",
            instance_data_dir=str(example_dir),
            output_dir=str(tmp_path),
            max_train_steps=3,
            validation_prompts=["[V]"],
            sample_seeds=[0],
            gap_eval_seeds=1,
        )
    )
    assert len(result.metrics["loss"]) == 3 and result.adapter_path.is_file()


def test_z_image_refuses_the_edit_teacher() -> None:
    with pytest.raises(ValueError, match="`teacher_context` 'edit' is not available for tiny-z-image"):
        DOPSDConfig.for_preset("tiny-z-image", teacher_context="edit")
