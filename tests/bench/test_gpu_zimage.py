"""The full-size GPU benchmark's quick mode runs on the CPU: every configuration, one JSON line each, and the
analytic FLOP count it reports MFU with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import gpu_zimage
from tests.bench.conftest import run_bench


def test_quick_mode_runs_every_configuration_and_writes_json_lines(tmp_path: Path) -> None:
    """`bench/gpu_zimage.py --quick`: setup line, D-OPSD/SFT at two sizes, the batching lever, checkpointing off,
    the reference-style step and its cached twin; each also appended to the --out file."""
    out = tmp_path / "gpu_zimage.jsonl"
    printed = run_bench(
        "gpu_zimage.py", "--quick", "--out", str(out), "--attention-backends", "native",
        "--compile", "--compile-backend", "aot_eager", "--fp8", timeout_s=300,
    )  # fmt: skip
    assert printed == [json.loads(line) for line in out.read_text().splitlines()]
    assert printed[0]["event"] == "setup" and printed[-1]["event"] == "done"
    steps = [r for r in printed if "step_s" in r]
    assert {(r["resolution"], r["method"], r["gradient_checkpointing"]) for r in steps} >= {
        (64, "dopsd", True), (64, "sft", True), (128, "dopsd", True), (128, "sft", True), (64, "dopsd-live", True),
        (64, "dopsd-live-batched", True), (64, "dopsd-ema-batched", True), (128, "dopsd", False),
        (128, "reference", True),
    }  # fmt: skip
    # The fast path's levers: an attention backend by name, and compiled blocks that compile in their first steps only.
    assert any(r.get("attention_backend") == "native" for r in steps)
    timed = [r for r in steps if r.get("compiled")]
    assert len(timed) == 2 and timed[0]["phase"] == "compile" and "compile_and_warmup_s" in timed[1]
    fp8 = next(r for r in printed if r.get("event") == "fp8_check")
    assert fp8["emulated"] and fp8["layers"] > 0 and fp8["gradient_cosine"] > 0.9
    assert any(r.get("fp8_base") for r in steps)
    compiled = next(r for r in printed if r.get("event") == "compiled")
    assert compiled["graphs_compile_phase"] > 0 and compiled["graphs_timed_steps"] == 0
    for record in steps:
        assert record["step_s"] > 0 and record["loss_finite"], record
        assert record["image_tokens"] == (record["resolution"] // 16) ** 2


def test_full_config_is_the_6b_model() -> None:
    """The real config, built on the meta device, has Z-Image-Turbo's 6.15B parameters."""
    assert gpu_zimage.count_parameters(gpu_zimage.REAL_TRANSFORMER) == pytest.approx(6.155e9, rel=1e-3)


def test_flop_count_matches_hand_arithmetic() -> None:
    """Forward linear FLOPs are 2 x weights x tokens (per block and embedder); a student pass is ~2x a forward."""
    cfg = gpu_zimage.REAL_TRANSFORMER
    f = gpu_zimage.forward_flops(cfg, 4096, 64, rank=64)
    block = 4 * 3840**2 + 3 * 3840 * 10240
    assert f["linear"] == pytest.approx(2 * block * (2 * 4096 + 2 * 64 + 30 * 4160), rel=0.01)
    assert f["attention"] == pytest.approx(4 * 3840 * (2 * 4096**2 + 2 * 64**2 + 30 * 4160**2))
    model, hardware = gpu_zimage.step_flops(cfg, "sft", 4096, 64, 642, checkpointing=True)
    forward = sum(f.values())
    assert 1.9 < model / forward < 2.2
    assert hardware == pytest.approx(model + forward)
    dopsd, _ = gpu_zimage.step_flops(cfg, "dopsd", 4096, 64, 642, checkpointing=False)
    assert 6.0 < dopsd / model < 6.5  # 4 teacher forwards (longer context) + 4 student passes vs 1 student pass


def test_peak_table() -> None:
    """Dense bf16 peaks by card name."""
    assert gpu_zimage.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert gpu_zimage.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_zimage.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_zimage.peak_bf16_tflops("cpu") is None
