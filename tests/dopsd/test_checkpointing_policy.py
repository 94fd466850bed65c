"""Gradient checkpointing left unset (`auto`): a step that runs out of GPU memory without checkpointing runs again
with it, on the same samples and noise, and the run goes on with it on; it then trains exactly what a run with
checkpointing on from the start trains. The out-of-memory error is torch's own, raised where the allocator would
raise it (the student's forward pass with gradients), since a CPU has no GPU memory to run out of."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from dopsd import DOPSDConfig, train
from dopsd.lora import LORA_WEIGHT_NAME
from dopsd.models.loading import load_family_for
from tests.dopsd.test_distributed import one_thread, run_settings


def test_a_step_out_of_memory_without_checkpointing_runs_again_with_it(tmp_path: Path, example_dir: Path) -> None:
    def config(out: Path, **given: Any) -> DOPSDConfig:
        return DOPSDConfig.for_preset(
            **run_settings(out, example_dir, max_train_steps=4, checkpointing_steps=0), **given
        )

    with one_thread():
        train(config(tmp_path / "on", gradient_checkpointing=True))
    auto = config(tmp_path / "auto")
    family = load_family_for(auto, device=torch.device("cpu"), dtype=torch.float32)
    refused: list[bool] = []

    def allocator(module: torch.nn.Module, args: Any) -> None:
        if torch.is_grad_enabled() and not module.is_gradient_checkpointing:  # type: ignore[attr-defined]
            refused.append(True)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    family.transformer.register_forward_pre_hook(allocator)
    with one_thread():
        train(auto, family=family)
    assert refused == [True]  # the first student pass; every later one had checkpointing on
    metrics = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    assert metrics["gradient_checkpointing"] == {"policy": "auto", "enabled": True, "turned_on_at_step": 1}
    assert metrics["steps"] == 4 and metrics["warnings"] == []
    on, retried = load_file(tmp_path / "on" / LORA_WEIGHT_NAME), load_file(tmp_path / "auto" / LORA_WEIGHT_NAME)
    assert on.keys() == retried.keys() and all(torch.equal(on[k], retried[k]) for k in on)


def test_checkpointing_set_on_or_off_is_kept(tmp_path: Path, example_dir: Path) -> None:
    with one_thread():
        train(
            DOPSDConfig.for_preset(
                **run_settings(tmp_path, example_dir, max_train_steps=1, gradient_checkpointing=False)
            )
        )
    summary = json.loads((tmp_path / "metrics.json").read_text())["gradient_checkpointing"]
    assert summary == {"policy": "off", "enabled": False, "turned_on_at_step": None}


def test_a_cached_model_does_not_carry_checkpointing_into_the_next_run(tmp_path: Path, example_dir: Path) -> None:
    cfg = DOPSDConfig.for_preset(**run_settings(tmp_path, example_dir, max_train_steps=1))
    family = load_family_for(cfg, device=torch.device("cpu"), dtype=torch.float32)
    with one_thread():
        train(cfg.with_changes(gradient_checkpointing=True), family=family)
        train(cfg.with_changes(output_dir=str(tmp_path / "next")), family=family)
    summary = json.loads((tmp_path / "next" / "metrics.json").read_text())["gradient_checkpointing"]
    assert summary["enabled"] is False and not family.transformer.is_gradient_checkpointing
