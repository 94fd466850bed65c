"""`DOPSDConfig` and the preset registry: the method's defaults, validation messages, and no torch at import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dopsd.config import DISTILL4_SIGMAS, DOPSDConfig
from dopsd.presets import PRESETS, get_preset


def test_defaults_follow_the_released_method() -> None:
    cfg = DOPSDConfig(preset="z-image-turbo").resolved()
    assert (cfg.rank, cfg.lora_alpha, cfg.learning_rate, cfg.max_train_steps) == (64, 128.0, 1e-4, 2000)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon, cfg.adam_weight_decay) == (0.9, 0.999, 1e-8, 0.0)
    assert cfg.max_grad_norm == 1.0 and cfg.ema_decay == 0.9999 and cfg.teacher_mode == "ema"
    assert cfg.loss_space == "x0" and cfg.rollout_schedule == "distill4"
    assert (cfg.checkpointing_steps, cfg.sample_every, cfg.sample_steps) == (500, 100, 8)
    assert (cfg.teacher_min_pixels, cfg.teacher_max_pixels) == (512 * 512, 768 * 768)
    assert (cfg.student_max_sequence_length, cfg.teacher_max_sequence_length) == (512, 1024)
    assert cfg.pretrained_model_name_or_path == "Tongyi-MAI/Z-Image-Turbo"
    assert DISTILL4_SIGMAS == (1.0, 0.9, 0.75, 0.5, 0.0)


def test_user_values_win_over_preset_defaults() -> None:
    cfg = DOPSDConfig(preset="z-image-turbo", rank=16, learning_rate=3e-5).resolved()
    assert (cfg.rank, cfg.learning_rate, cfg.lora_alpha) == (16, 3e-5, 128.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "`rank` must be > 0, got 0"),
        ({"learning_rate": -1.0}, "`learning_rate` must be > 0"),
        ({"ema_decay": 1.0}, "`ema_decay` must be in [0, 1)"),
        ({"teacher_mode": "copy"}, "`teacher_mode` must be one of ema, frozen, live"),
        ({"loss_space": "l1"}, "`loss_space` must be one of x0, velocity"),
        ({"resolution": 100}, "`resolution` must be a multiple of 16"),
        ({"preset": "sdxl"}, "unknown preset `sdxl`; known presets: flux2-klein-4b, flux2-klein-9b, tiny-flux2"),
        ({"trigger": "two words"}, "`trigger` must be one word"),
        ({"captions": {"a.png": []}}, "`captions['a.png']` must be a non-empty list"),
        ({"teacher_min_pixels": 10, "teacher_max_pixels": 5}, "must not exceed `teacher_max_pixels`"),
        ({"sample_seeds": []}, "`sample_seeds` must list at least one seed"),
    ],
)
def test_validation_names_the_field_and_value(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        DOPSDConfig(**kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_json_round_trip_and_unknown_fields(tmp_path: Path) -> None:
    cfg = DOPSDConfig(rank=4, captions={"a.png": ["a photo of [V]"]}, validation_prompts=["[V]"])
    cfg.save(tmp_path / "config.json")
    assert DOPSDConfig.load(tmp_path / "config.json") == cfg
    data = json.loads((tmp_path / "config.json").read_text())
    data["rnak"] = 4
    with pytest.raises(ValueError, match="unknown DOPSDConfig fields: rnak"):
        DOPSDConfig.from_dict(data)


def test_every_field_has_help() -> None:
    import dataclasses

    missing = [f.name for f in dataclasses.fields(DOPSDConfig) if not f.metadata.get("help")]
    assert missing == []


def test_presets_are_complete() -> None:
    assert set(PRESETS) == {"z-image-turbo", "tiny-z-image", "flux2-klein-4b", "flux2-klein-9b", "tiny-flux2-klein"}
    for name in ("flux2-klein-4b", "flux2-klein-9b"):
        klein = get_preset(name)
        assert klein.native_sample_steps == 4 and klein.text_encoder_layers == (9, 18, 27)
        assert klein.defaults["learning_rate"] == 2e-5 and klein.defaults["max_train_steps"] == 3000
        assert klein.defaults["teacher_context"] == "edit" and klein.defaults["rollout_schedule"] == "native"
    tiny = get_preset("tiny-z-image")
    assert tiny.is_tiny and tiny.device == "cpu" and tiny.dtype == "float32"
    real = get_preset("z-image-turbo")
    assert not real.is_tiny and real.dtype == "bfloat16" and real.min_image_side == 256


def test_config_presets_and_data_import_without_torch() -> None:
    code = (
        "import sys, dopsd, dopsd.config, dopsd.presets, dopsd.data\n"
        "dopsd.DOPSDConfig().resolved()\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
