"""`DOPSDConfig` and the preset registry: the method's defaults, validation from the declarations, the resolved
frozen config, the client's copy of the public fields, and no torch at import."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dopsd.config import (
    CLIENT_SPEC_FILE,
    DISTILL4_SIGMAS,
    DOPSDConfig,
    client_spec_json,
    config_values_from_spec,
    public_settings,
    settings,
)
from dopsd.presets import PRESETS, get_preset


def test_defaults_follow_the_released_method() -> None:
    cfg = DOPSDConfig.for_preset("z-image-turbo")
    assert (cfg.rank, cfg.lora_alpha, cfg.learning_rate, cfg.max_train_steps) == (64, 128.0, 1e-4, 2000)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon, cfg.adam_weight_decay) == (0.9, 0.999, 1e-8, 0.0)
    assert cfg.max_grad_norm == 1.0 and cfg.ema_decay == 0.9999 and cfg.teacher_mode == "ema"
    assert cfg.loss_space == "x0" and cfg.rollout_schedule == "distill4"
    assert (cfg.checkpointing_steps, cfg.sample_every, cfg.sample_steps) == (500, 100, 8)
    assert (cfg.teacher_min_pixels, cfg.teacher_max_pixels) == (512 * 512, 768 * 768)
    assert (cfg.student_max_sequence_length, cfg.teacher_max_sequence_length) == (512, 1024)
    assert cfg.pretrained_model_name_or_path == "Tongyi-MAI/Z-Image-Turbo"
    assert cfg.teacher_encoder_path == "Qwen/Qwen3-VL-4B-Instruct" and len(cfg.validation_prompts) == 4
    assert DISTILL4_SIGMAS == (1.0, 0.9, 0.75, 0.5, 0.0)


def test_user_values_win_over_preset_defaults_and_none_means_the_presets() -> None:
    cfg = DOPSDConfig.for_preset("z-image-turbo", rank=16, learning_rate=3e-5, resolution=None)
    assert (cfg.rank, cfg.learning_rate, cfg.lora_alpha, cfg.resolution) == (16, 3e-5, 128.0, 1024)


def test_every_preset_supplies_every_preset_defaulted_field() -> None:
    needed = {s.name for s in settings() if s.declaration.preset}
    for preset in PRESETS.values():
        assert needed <= set(preset.config_defaults()), preset.name
        DOPSDConfig.for_preset(preset.name)  # and the values are valid


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "`rank` must be >= 1, got 0"),
        ({"rank": "8"}, "`rank` must be an integer, got '8'"),
        ({"rank": True}, "`rank` must be an integer, got True"),
        ({"learning_rate": -1.0}, "`learning_rate` must be > 0, got -1.0"),
        ({"learning_rate": float("nan")}, "`learning_rate` must be a finite number"),
        ({"ema_decay": 1.0}, "`ema_decay` must be in [0, 1), got 1.0"),
        ({"teacher_mode": "copy"}, "`teacher_mode` must be one of ema, frozen, live, got 'copy'"),
        ({"loss_space": "l1"}, "`loss_space` must be one of x0, velocity"),
        ({"resolution": 100}, "`resolution` must be a multiple of 16, got 100"),
        ({"teacher_max_sequence_length": 8}, "`teacher_max_sequence_length` must be >= 16, got 8"),
        ({"gradient_checkpointing": "yes"}, "`gradient_checkpointing` must be true or false"),
        (
            {"preset": "sdxl"},
            "unknown preset `sdxl`; known presets: flux2-klein-4b, flux2-klein-9b, shapes, tiny-flux2",
        ),
        ({"trigger": "two words"}, "`trigger` must be one word"),
        ({"captions": {"a.png": []}}, "`captions['a.png']` must be a non-empty list"),
        ({"teacher_min_pixels": 10, "teacher_max_pixels": 5}, "must not exceed `teacher_max_pixels`"),
        ({"sample_seeds": []}, "`sample_seeds` must have at least 1 item, got []"),
        ({"sample_seeds": [0, -1]}, "`sample_seeds[1]` must be in [0, 9223372036854775808), got -1"),
        ({"sample_seeds": [0.5]}, "`sample_seeds` must be a list of integers, got [0.5]"),
        ({"validation_prompts": ["[V]", " "]}, "`validation_prompts` must not contain empty prompts"),
        ({"validation_prompts": [""]}, "`validation_prompts[0]` must have at least 1 character, got ''"),
        ({"rnak": 4}, "unknown DOPSDConfig fields: rnak"),
    ],
)
def test_validation_names_the_field_and_value(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        DOPSDConfig.for_preset(**kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ValueError) as info:
        DOPSDConfig.for_preset(rank=0, lora_alpha=-1.0)
    assert "`rank` must be >= 1" in str(info.value) and "`lora_alpha` must be > 0" in str(info.value)


def test_the_resolved_config_is_complete_and_frozen() -> None:
    cfg = DOPSDConfig.for_preset(lora_alpha=16)
    assert cfg.lora_alpha == 16.0 and isinstance(cfg.lora_alpha, float)  # stored in its declared type
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 4  # type: ignore[misc]
    moved = cfg.with_changes(output_dir="/tmp/elsewhere", resume_from="/tmp/elsewhere")
    assert (moved.output_dir, moved.rank, cfg.output_dir) == ("/tmp/elsewhere", cfg.rank, "dopsd-output")
    with pytest.raises(ValueError, match="`rank` must be >= 1"):
        cfg.with_changes(rank=0)
    with pytest.raises(TypeError):
        DOPSDConfig(preset="tiny-z-image")  # type: ignore[call-arg]  # preset-defaulted fields are required


def test_json_round_trip_and_unknown_or_missing_fields(tmp_path: Path) -> None:
    cfg = DOPSDConfig.for_preset(rank=4, captions={"a.png": ["a photo of [V]"]}, validation_prompts=["[V]"])
    cfg.save(tmp_path / "config.json")
    assert DOPSDConfig.load(tmp_path / "config.json") == cfg
    data = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(ValueError, match="unknown DOPSDConfig fields: rnak"):
        DOPSDConfig.from_dict({**data, "rnak": 4})
    del data["rank"], data["sample_steps"]
    with pytest.raises(ValueError, match="missing DOPSDConfig fields: rank, sample_steps"):
        DOPSDConfig.from_dict(data)


def test_every_field_has_help_and_spec_names_are_unique() -> None:
    assert [s.name for s in settings() if not s.help] == []
    names = [s.spec_name for s in public_settings()]
    assert len(names) == len(set(names)) and "steps" in names and "max_train_steps" not in names
    assert config_values_from_spec({"steps": 5, "rank": 4}) == {"max_train_steps": 5, "rank": 4}
    with pytest.raises(ValueError, match="unknown job spec fields: max_train_steps"):
        config_values_from_spec({"max_train_steps": 5})


def test_the_clients_spec_file_matches_the_declaration() -> None:
    """`dopsd_client/spec_fields.json` is the client's copy of the public fields (it imports no project code).
    After changing a declaration, regenerate it with
    `.venv/bin/python -c "from dopsd.config import write_client_spec_fields; write_client_spec_fields()"`."""
    assert CLIENT_SPEC_FILE.read_text() == client_spec_json(), "regenerate dopsd_client/spec_fields.json"
    fields = {f["name"]: f for f in json.loads(client_spec_json())["fields"]}
    assert fields["steps"]["type"] == "integer" and fields["learning_rate"]["aliases"] == ["--lr"]
    assert fields["output_formats"] == {
        **fields["output_formats"],
        "items": "string",
        "choices": ["diffusers", "comfyui"],
    }


def test_presets_are_complete() -> None:
    assert set(PRESETS) == {
        "z-image-turbo", "tiny-z-image", "flux2-klein-4b", "flux2-klein-9b", "tiny-flux2-klein", "shapes"
    }  # fmt: skip
    for name in ("flux2-klein-4b", "flux2-klein-9b"):
        klein = get_preset(name)
        assert klein.native_sample_steps == 4 and klein.text_encoder_layers == (9, 18, 27)
        assert klein.defaults["learning_rate"] == 2e-5 and klein.defaults["max_train_steps"] == 3000
        assert klein.defaults["teacher_context"] == "edit" and klein.defaults["rollout_schedule"] == "released"
    tiny = get_preset("tiny-z-image")
    assert tiny.is_tiny and tiny.device == "cpu" and tiny.dtype == "float32"
    real = get_preset("z-image-turbo")
    assert not real.is_tiny and real.dtype == "bfloat16" and real.min_image_side == 256


def test_config_presets_and_data_import_without_torch_or_pydantic() -> None:
    code = (
        "import sys, dopsd, dopsd.config, dopsd.presets, dopsd.data\n"
        "dopsd.DOPSDConfig.for_preset()\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'peft', 'pydantic') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
