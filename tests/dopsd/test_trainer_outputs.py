"""What a user of `dopsd train` gets: an adapter diffusers loads, samples, config, metrics, a shrinking gap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline
from PIL import Image
from safetensors import safe_open

from dopsd.config import DOPSDConfig
from dopsd.data import resolve_caption
from dopsd.lora import read_file_metadata


def test_teacher_student_gap_falls_by_at_least_30_percent(cli_run: Path) -> None:
    gap = json.loads((cli_run / "metrics.json").read_text())["teacher_student_gap"]
    assert gap["before"] > 0
    assert gap["after"] <= 0.7 * gap["before"], gap


def test_outputs_are_complete(cli_run: Path) -> None:
    metrics = json.loads((cli_run / "metrics.json").read_text())
    assert metrics["steps"] == 30 and len(metrics["loss"]) == 30
    assert all(np.isfinite(metrics["loss"]))
    config = DOPSDConfig.load(cli_run / "config.json")
    assert config.max_train_steps == 30 and config.rank == 8 and config.trigger == "sks"
    sheet = Image.open(cli_run / "samples" / "step-00000030" / "contact_sheet.png")
    # Rows: the base model, the adapter at step 30, the teacher context; a column per prompt and seed.
    prompts, seeds = len(config.validation_prompts), len(config.sample_seeds)
    assert sheet.width >= prompts * seeds * 64 and sheet.height >= 3 * 64
    teacher = sorted((cli_run / "samples" / "step-00000030").glob("teacher-*.png"))
    assert [p.name for p in teacher] == [f"teacher-robot-{i}.png" for i in range(1, 5)]


def test_adapter_file_is_diffusers_format_with_metadata(cli_run: Path) -> None:
    path = cli_run / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    meta = read_file_metadata(path)
    assert meta["dopsd.preset"] == "tiny-z-image" and meta["dopsd.trigger"] == "sks"
    assert meta["dopsd.rank"] == 8 and meta["dopsd.alpha"] == 16.0 and meta["dopsd.steps"] == 30
    assert meta["dopsd.base_model"] == "tiny://z-image"
    assert meta["lora_adapter_metadata"]["transformer.lora_alpha"] == 16.0


def test_diffusers_pipeline_with_adapter_reproduces_trainer_sample(cli_run: Path, exported_tiny: Path) -> None:
    """The exported base + load_lora_weights, sampled like the trainer does, gives the trainer's student image."""
    config = DOPSDConfig.load(cli_run / "config.json")
    prompt = resolve_caption(config.validation_prompts[0], "sks")
    pipe = ZImagePipeline.from_pretrained(exported_tiny)
    pipe.set_progress_bar_config(disable=True)

    def generate() -> np.ndarray:
        image = pipe(
            prompt,
            height=64,
            width=64,
            num_inference_steps=8,
            guidance_scale=0.0,
            generator=torch.Generator().manual_seed(0),
        ).images[0]
        return np.asarray(image, dtype=np.int16)

    base = generate()
    pipe.load_lora_weights(cli_run / "pytorch_lora_weights.safetensors")
    tuned = generate()
    samples = cli_run / "samples" / "step-00000030"
    trainer_student = np.asarray(Image.open(samples / "prompt-00-seed-0-adapter.png"), dtype=np.int16)
    trainer_base = np.asarray(Image.open(samples / "prompt-00-seed-0-base.png"), dtype=np.int16)
    assert np.abs(base - trainer_base).max() <= 1
    assert np.abs(tuned - trainer_student).max() <= 1
    assert np.abs(tuned - base).max() > 10, "the adapter must change the output"


@pytest.mark.parametrize("flag", ["--steps=0", "--rank=-2", "--loss-space=l1", "--preset=nope"])
def test_cli_rejects_bad_config_with_one_line(
    flag: str, example_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dopsd.cli import main

    try:
        code = main(["train", "--images", str(example_dir), flag])
    except SystemExit as exc:  # argparse's own choice errors
        code = int(exc.code or 0)
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "error" in err[-1]


def test_cli_bad_image_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dopsd.cli import main

    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_text("not an image")
    assert main(["train", "--images", str(tmp_path), "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: broken.png")
