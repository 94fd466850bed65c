"""Full-size Z-Image D-OPSD and SFT training steps on one GPU: step time, peak memory and MFU.

A randomly initialised `ZImageTransformer2DModel` with the real Z-Image-Turbo config (~6.15B parameters, built
directly on the GPU in bf16), the trainer's rank-64 student and teacher LoRA adapters, gradient checkpointing on,
and random cached features of the right shapes instead of the encoders (the trainer caches features and frees the
encoders before the first step). Steps go through the trainer's own code: `dopsd.models.z_image.ZImageFamily`
around the transformer and `dopsd.rollout.distillation_rollout` (see `bench/step_cost.py` for the step bodies).

One JSON line per (resolution, method, configuration), printed and appended to `$OUT/gpu_zimage.jsonl` (or
`--out`) as it goes, so a timeout still leaves the finished configurations. The script budgets itself
(`--budget-s`): a configuration that would start after the budget is skipped.

`python bench/gpu_zimage.py [--budget-s 300] [--repeats 3]`; `--quick` runs a tiny config on the CPU in seconds.

Model FLOPs (what MFU counts; documented in docs/performance.md):
  forward F(S_img, S_cap) = 2 * sum over blocks of (linear weights + LoRA weights) * tokens the block sees
                            + 4 * S^2 * dim per block for attention (QK^T and AV) + embedders and final layer.
  Blocks: 2 noise refiners see the image tokens, 2 context refiners the caption tokens, 30 main layers both.
  A LoRA student forward+backward is 2 * F: the base weights are frozen, so backward computes input gradients only
  (one matmul per forward matmul); attention backward is counted as 2x its forward and LoRA weight gradients add
  one LoRA forward. Teacher passes are forward only. Checkpointing's recomputed forward is not model FLOPs: it is
  reported separately as hardware FLOPs (HFU).
  D-OPSD step = 4 * F(img, teacher ctx) + 4 * (2 * F(img, caption));  SFT step = 2 * F(img, caption).
"""

from __future__ import annotations

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, not installed
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse
import gc
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import ZImageTransformer2DModel
from peft.helpers import disable_input_dtype_casting
from PIL import Image

from bench.common import build_family, default_dtype, dopsd_step, sft_step, target_image, timed
from dopsd.config import DISTILL4_SIGMAS
from dopsd.fast_path import (
    CompiledGraphs,
    compile_blocks,
    fp8_base_layers,
    restore_linear_layers,
    set_attention_backend,
)
from dopsd.lora import add_adapters, make_lora_config, student_parameters, teacher_parameters
from dopsd.models import tiny
from dopsd.models.base import Cond
from dopsd.models.loading import TINY_SEED
from dopsd.models.z_image import ZImageFamily
from dopsd.rollout import distillation_rollout


warnings.filterwarnings("ignore", message="Already found a `peft_config`")

# Z-Image-Turbo's transformer/config.json (Tongyi-MAI/Z-Image-Turbo; the same values as diffusers' defaults except
# axes_lens, whose first entry the released config raises to 1536).
REAL_TRANSFORMER: dict[str, Any] = {
    "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 3840, "n_layers": 30,
    "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": 2560,
    "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
}  # fmt: skip
# Qwen3-4B (Z-Image's text encoder) and Qwen3-VL-4B-Instruct's vision tower: only for the reference-style step,
# which keeps both encoders resident and runs them every step as the released code does.
REAL_TEXT: dict[str, Any] = {
    "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
}  # fmt: skip
REAL_VISION: dict[str, Any] = {
    "depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "patch_size": 16,
    "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 2560, "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [5, 11, 17],
}  # fmt: skip
REAL_MROPE = [24, 20, 20]
QUICK_TRANSFORMER: dict[str, Any] = {
    **REAL_TRANSFORMER, "dim": 64, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2,
    "cap_feat_dim": tiny.TINY_TEXT_HIDDEN, "axes_dims": [8, 12, 12], "axes_lens": [256, 64, 64],
}  # fmt: skip
QUICK_TEXT: dict[str, Any] = {
    **REAL_TEXT, "vocab_size": 300, "hidden_size": tiny.TINY_TEXT_HIDDEN, "intermediate_size": 64,
    "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
    "max_position_embeddings": 4096,
}  # fmt: skip
QUICK_VISION: dict[str, Any] = {
    **REAL_VISION, "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
    "out_hidden_size": tiny.TINY_TEXT_HIDDEN, "num_position_embeddings": 64, "deepstack_visual_indexes": [0],
}  # fmt: skip
QUICK_MROPE = [4, 2, 2]

RANK, ALPHA = 64, 128  # the released recipe
CAPTION_TOKENS = 64  # a medium caption in the chat template (Qwen BPE), padded by the model to a multiple of 32
# The teacher's image goes to the VLM processor at 512^2..768^2 pixels: 16-pixel patches merged 2x2, so one token
# per 32x32 pixels; a 512 bucket gives 256 image tokens, a 1024 bucket is capped at 768^2 = 576.
TEACHER_MIN_PIXELS, TEACHER_MAX_PIXELS = 512 * 512, 768 * 768
# Reference-style caption: ~64 tokens with the byte-level tokenizer the benchmark uses (its token ids are all below
# the real vocabulary size, so the full-size random encoders read them).
REFERENCE_CAPTION = "a photo of sks dog sitting on a wooden bench"


def peak_bf16_tflops(name: str) -> float | None:
    """The card's dense bf16 peak (vendor datasheets): H100/H200 SXM 989, H100 NVL 835, H100 PCIe 756."""
    if "H100" in name and "PCIe" in name:
        return 756.0
    if "H100" in name and "NVL" in name:
        return 835.0
    if "H100" in name or "H200" in name or "GH200" in name:
        return 989.0
    if "A100" in name:
        return 312.0
    return None


def _pad32(n: int) -> int:
    return n + (-n) % 32


def forward_flops(cfg: dict[str, Any], img_tokens: int, cap_tokens: int, rank: int) -> dict[str, float]:
    """Analytic forward FLOPs of the transformer with LoRA (see the module docstring): base linear, LoRA, attention."""
    dim, hidden = cfg["dim"], int(cfg["dim"] / 3 * 8)
    patch = cfg["all_patch_size"][0] ** 2 * cfg["in_channels"]
    s_img, s_cap = _pad32(img_tokens), _pad32(cap_tokens)
    s_all = s_img + s_cap
    block_linear = 4 * dim * dim + 3 * dim * hidden  # q, k, v, out (n_kv_heads = n_heads) + SwiGLU w1, w2, w3
    block_lora = rank * (4 * 2 * dim + 3 * (dim + hidden))  # the seven targets, A and B
    refiners, layers = cfg["n_refiner_layers"], cfg["n_layers"]
    block_tokens = refiners * s_img + refiners * s_cap + layers * s_all
    linear = 2.0 * block_linear * block_tokens + 2.0 * (patch * dim * s_img + cfg["cap_feat_dim"] * dim * s_cap)
    linear += 2.0 * dim * patch * s_all  # final layer (runs on the unified sequence)
    attention = 4.0 * dim * (refiners * s_img**2 + refiners * s_cap**2 + layers * s_all**2)
    return {"linear": linear, "lora": 2.0 * block_lora * block_tokens, "attention": attention}


def step_flops(
    cfg: dict[str, Any], method: str, img_tokens: int, cap_tokens: int, ctx_tokens: int, checkpointing: bool
) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one training step of `method` (`dopsd`, `reference`, `sft`)."""

    def student(f: dict[str, float]) -> float:  # forward + backward of a frozen-base LoRA model
        return (f["linear"] + f["lora"] + f["attention"]) + (f["linear"] + 2 * f["lora"] + 2 * f["attention"])

    def forward(f: dict[str, float]) -> float:
        return f["linear"] + f["lora"] + f["attention"]

    f_s = forward_flops(cfg, img_tokens, cap_tokens, RANK)
    passes = 1 if method == "sft" else 4
    model = passes * student(f_s)
    if method != "sft":
        model += 4 * forward(forward_flops(cfg, img_tokens, ctx_tokens, RANK))
    hardware = model + (passes * forward(f_s) if checkpointing else 0.0)
    return model, hardware


def build_transformer(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype) -> ZImageTransformer2DModel:
    """The transformer built on `device` in `dtype`, random weights; the pad tokens (`torch.empty`) get N(0, 0.02)."""
    torch.manual_seed(TINY_SEED + 1)
    with torch.device(device), default_dtype(dtype):
        transformer = ZImageTransformer2DModel(**cfg)
    if device.type != "meta":
        with torch.no_grad():
            for name, p in transformer.named_parameters():
                if name.endswith("pad_token"):
                    p.normal_(0.0, 0.02)
    return transformer.eval().requires_grad_(False)


def count_parameters(cfg: dict[str, Any]) -> int:
    """Parameter count of the config, built on the meta device (no memory)."""
    return sum(p.numel() for p in build_transformer(cfg, torch.device("meta"), torch.bfloat16).parameters())


def teacher_image_tokens(resolution: int, min_pixels: int, max_pixels: int) -> int:
    """Image tokens of a `resolution`^2 training image in the teacher context (the processor's size clamp)."""
    area = min(max(resolution * resolution, min_pixels), max_pixels)
    side = round(area**0.5 / 32)
    return side * side


@dataclass
class Bench:
    """The state every configuration shares: one model, one set of adapters, one optimizer."""

    family: ZImageFamily
    cfg: dict[str, Any]
    params: list[torch.nn.Parameter]
    teacher: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    device: torch.device
    dtype: torch.dtype
    n_params: int
    peak_tflops: float | None
    emit: Callable[[dict[str, Any]], None]
    t0: float
    budget_s: float


def add_lora(family: ZImageFamily, device: torch.device) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """The trainer's student + teacher adapters (rank 64, alpha 128, gaussian A, zero B), created on `device`."""
    torch.manual_seed(0)
    config = make_lora_config(rank=RANK, alpha=ALPHA, dropout=0.0, target_modules=family.lora_target_modules)
    with torch.device(device):
        add_adapters(family.transformer, config, with_teacher=True)
    return student_parameters(family.transformer), teacher_parameters(family.transformer)


def random_features(length: int, dim: int, device: torch.device, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Cached-feature stand-in: [length, dim] with the scale of a normalised hidden state."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((length, dim), generator=gen).to(device, dtype)


def run_config(
    bench: Bench, *, resolution: int, method: str, checkpointing: bool, warmup: int, repeats: int,
    conds: tuple[list[Cond], list[Cond]], reference: Callable[[], tuple[list[Cond], list[Cond]]] | None = None,
    extra: dict[str, Any] | None = None, batch: int = 1,
) -> dict[str, Any]:  # fmt: skip
    """Warms up and times `method` steps of `batch` samples at `resolution`; emits and returns the record."""
    family, device = bench.family, bench.device
    shape = (batch, *family.latent_shape(resolution, resolution))
    conds = (conds[0] * batch, conds[1] * batch)
    img_tokens = (shape[-2] // 2) * (shape[-1] // 2)
    cap_tokens, ctx_tokens = int(conds[0][0].shape[0]), int(conds[1][0].shape[0])
    record: dict[str, Any] = {
        "bench": "gpu_zimage", "resolution": resolution, "method": method, "gradient_checkpointing": checkpointing,
        "batch": batch, "image_tokens": img_tokens, "caption_tokens": cap_tokens, "teacher_context_tokens": ctx_tokens,
        **(extra or {}),
    }  # fmt: skip
    elapsed = time.perf_counter() - bench.t0
    if elapsed > bench.budget_s:
        record["skipped"] = f"budget: {elapsed:.0f} s of {bench.budget_s:.0f} s used"
        bench.emit(record)
        return record
    if checkpointing:
        family.transformer.enable_gradient_checkpointing()
    else:
        family.transformer.disable_gradient_checkpointing()
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(8)).to(device)  # SFT: `batch` training images

    base_method = method.removesuffix("-nocast")

    def step() -> float:
        # `-nocast`: peft keeps activations in bf16 for the fp32 LoRA weights (autocast runs the LoRA matmuls in
        # bf16) instead of copying every targeted layer's input to fp32 first.
        no_cast = disable_input_dtype_casting(family.transformer) if method.endswith("-nocast") else nullcontext()
        with no_cast:
            if base_method == "sft":
                return sft_step(family, bench.params, bench.optimizer, x0, conds[0], gen)
            step_conds = reference() if reference is not None else conds
            mode = base_method.removeprefix("dopsd-") if base_method.startswith("dopsd-") else "ema"
            return dopsd_step(family, bench.params, bench.teacher, bench.optimizer, shape, step_conds, gen, mode=mode)

    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        losses = [step() for _ in range(warmup)]
        times = []

        def logged() -> float:
            losses.append(step())
            return losses[-1]

        for _ in range(repeats):
            times.append(timed(logged, device))
    except torch.OutOfMemoryError as exc:
        bench.optimizer.zero_grad(set_to_none=True)
        record["error"] = f"out of memory: {str(exc).splitlines()[0][:200]}"
        if cuda:
            record["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.empty_cache()
        bench.emit(record)
        return record
    median = statistics.median(times)
    model, hardware = step_flops(bench.cfg, base_method, img_tokens, cap_tokens, ctx_tokens, checkpointing)
    model, hardware = model * batch, hardware * batch
    record.update({
        "step_s": round(median, 4), "sample_s": round(median / batch, 4), "step_s_all": [round(t, 4) for t in times], "warmup": warmup, "repeats": repeats,
        "loss_finite": all(math.isfinite(v) for v in losses),
        "model_tflop_per_step": round(model / 1e12, 2), "hardware_tflop_per_step": round(hardware / 1e12, 2),
        "achieved_tflops": round(model / median / 1e12, 1),
    })  # fmt: skip
    if bench.peak_tflops:
        record["mfu"] = round(model / median / 1e12 / bench.peak_tflops, 4)
        record["hfu"] = round(hardware / median / 1e12 / bench.peak_tflops, 4)
    if cuda:
        record["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        record["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        record["fits_24gb"] = torch.cuda.max_memory_allocated() <= 24 * 10**9
    bench.emit(record)
    return record


def run_fast_path(
    bench: Bench, args: argparse.Namespace, top: int, warmup: int, repeats: int,
    conds: tuple[list[Cond], list[Cond]],
) -> None:  # fmt: skip
    """The D-OPSD step with each `--attention-backends` backend, then (`--compile`) with the repeated blocks
    compiled: its first step's compile time and the graphs made in the timed steps (none, if switching teacher and
    student adapters never recompiles) in the record."""
    for backend in [b for b in args.attention_backends.split(",") if b]:
        try:
            set_attention_backend(bench.family, backend)
        except Exception as exc:  # not installed, or not for this card
            bench.emit({"bench": "gpu_zimage", "method": "dopsd", "attention_backend": backend, "error": str(exc)})
            continue
        run_config(bench, resolution=top, method="dopsd", checkpointing=True, warmup=warmup, repeats=repeats,
                   conds=conds, extra={"attention_backend": backend})  # fmt: skip
        set_attention_backend(bench.family, "native")
    if args.fp8:
        run_fp8(bench, top, warmup, repeats, conds, emulate=bench.device.type != "cuda")
    if args.compile:
        started = time.perf_counter()
        compile_blocks(bench.family, args.compile_backend)
        graphs = CompiledGraphs(enabled=True)
        graphs.start()  # the first steps compile every variant the roll-out needs (timed: the step after them)
        run_config(bench, resolution=top, method="dopsd", checkpointing=True, warmup=max(1, warmup), repeats=1,
                   conds=conds, extra={"compiled": args.compile_backend, "phase": "compile"})  # fmt: skip
        graphs.end(first=True)
        compile_s = time.perf_counter() - started
        graphs.start()
        run_config(bench, resolution=top, method="dopsd", checkpointing=True, warmup=0, repeats=repeats, conds=conds,
                   extra={"compiled": args.compile_backend, "compile_and_warmup_s": round(compile_s, 1)})  # fmt: skip
        graphs.end(first=False)
        bench.emit({"bench": "gpu_zimage", "event": "compiled", "backend": args.compile_backend,
                    "graphs_compile_phase": graphs.first_step, "graphs_timed_steps": graphs.later_steps})  # fmt: skip


def rollout_and_gradient(
    bench: Bench, shape: tuple[int, ...], conds: tuple[list[Cond], list[Cond]]
) -> tuple[float, torch.Tensor]:
    """One D-OPSD roll-out's loss and the student's LoRA gradient (flattened, fp32) on fixed noise; no step."""
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(11)).to(bench.device)
    bench.optimizer.zero_grad(set_to_none=True)
    loss = distillation_rollout(
        bench.family, noise=noise, student_conds=conds[0], teacher_conds=conds[1], sigmas=list(DISTILL4_SIGMAS),
        teacher_adapter="teacher", loss_space="x0", loss_scale=1.0,
    )  # fmt: skip
    grad = torch.cat([p.grad.float().reshape(-1) for p in bench.params if p.grad is not None])
    bench.optimizer.zero_grad(set_to_none=True)
    return loss, grad


def run_fp8(
    bench: Bench, top: int, warmup: int, repeats: int, conds: tuple[list[Cond], list[Cond]], *, emulate: bool
) -> None:
    """FP8 matmuls of the frozen base: first the loss and LoRA gradient of one roll-out against bf16 on the same
    batch and noise, then the timed D-OPSD step, then the base back as it was."""
    shape = (1, *bench.family.latent_shape(top, top))
    exact_loss, exact_grad = rollout_and_gradient(bench, shape, conds)
    try:
        converted = fp8_base_layers(bench.family.transformer, emulate=emulate)
    except Exception as exc:  # torchao missing, or a card without FP8
        bench.emit({"bench": "gpu_zimage", "method": "dopsd", "fp8_base": True, "error": str(exc)})
        return
    try:
        fp8_loss, fp8_grad = rollout_and_gradient(bench, shape, conds)
        bench.emit({
            "bench": "gpu_zimage", "event": "fp8_check", "resolution": top, "layers": converted, "emulated": emulate,
            "loss_bf16": exact_loss, "loss_fp8": fp8_loss, "loss_relative_difference": abs(fp8_loss / exact_loss - 1),
            "gradient_cosine": float(torch.nn.functional.cosine_similarity(fp8_grad, exact_grad, dim=0)),
            "gradient_norm_ratio": float(fp8_grad.norm() / exact_grad.norm()),
        })  # fmt: skip
        run_config(bench, resolution=top, method="dopsd", checkpointing=True, warmup=warmup, repeats=repeats,
                   conds=conds, extra={"fp8_base": True, "emulated": emulate})  # fmt: skip
    finally:
        restore_linear_layers(bench.family.transformer)


def main(argv: list[str] | None = None) -> int:
    """Parses the command line, builds the model once, runs the configurations in priority order."""
    parser = argparse.ArgumentParser(description="Full-size Z-Image D-OPSD / SFT steps on one GPU, JSON lines")
    parser.add_argument("--quick", action="store_true", help="tiny config on the CPU, seconds (the test suite)")
    parser.add_argument("--resolutions", default="512,1024")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=300.0, help="no configuration starts after this")
    parser.add_argument("--out", default=None, help="JSON-lines file (default: $OUT/gpu_zimage.jsonl if $OUT)")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-style step")
    parser.add_argument("--count-only", action="store_true", help="print the meta-device parameter count and exit")
    parser.add_argument(
        "--batches",
        default="",
        help="also time D-OPSD and SFT with these batch sizes at the top resolution (e.g. 2,4)",
    )
    parser.add_argument(
        "--only-batches", action="store_true", help="time only batch 1 and --batches at the top resolution"
    )
    parser.add_argument(
        "--attention-backends",
        default="",
        help="also time the D-OPSD step at the top resolution with each of these diffusers attention backends "
        "(e.g. flash,_native_cudnn,_native_flash), against native in the same run",
    )
    parser.add_argument(
        "--compile", action="store_true", help="last, time the D-OPSD step with the repeated blocks compiled"
    )
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --compile")
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="time the D-OPSD step with the frozen base in FP8 (torchao), after comparing its loss and LoRA "
        "gradients with bf16 on the same batch (emulated FP8 with --quick)",
    )
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    cfg = QUICK_TRANSFORMER if args.quick else REAL_TRANSFORMER
    n_params = count_parameters(cfg)
    out_path = (
        Path(args.out) if args.out else (Path(os.environ["OUT"]) / "gpu_zimage.jsonl" if "OUT" in os.environ else None)
    )

    def emit(record: dict[str, Any]) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if out_path is not None:
            with out_path.open("a") as f:
                f.write(line + "\n")

    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    header = {
        "bench": "gpu_zimage", "event": "setup", "device": name, "params": n_params, "quick": args.quick,
        "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "peak_bf16_tflops": (
            peak_bf16_tflops(name) if cuda else None),
    }  # fmt: skip
    if args.count_only:
        emit(header)
        return 0
    if not cuda and not args.quick:
        parser.error("no CUDA device: use --quick on the CPU")
    transformer = build_transformer(cfg, device, dtype)
    family = build_family(transformer, device=device, dtype=dtype, encoders=None,
                          teacher_pixels=(TEACHER_MIN_PIXELS, TEACHER_MAX_PIXELS))  # fmt: skip
    params, teacher = add_lora(family, device)
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=cuda)
    header.update({"build_s": round(time.perf_counter() - t0, 1), "lora_params": sum(p.numel() for p in params)})
    if cuda:
        header["static_allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    emit(header)
    bench = Bench(family, cfg, params, teacher, optimizer, device, dtype, n_params, header["peak_bf16_tflops"],
                  emit, t0, args.budget_s)  # fmt: skip
    resolutions = [64, 128] if args.quick else [int(r) for r in args.resolutions.split(",")]
    warmup, repeats = (1, 2) if args.quick else (args.warmup, args.repeats)
    dim = cfg["cap_feat_dim"]
    caption = random_features(CAPTION_TOKENS, dim, device, dtype, seed=1)
    ok: dict[int, bool] = {}

    def conds_for(resolution: int) -> tuple[list[Cond], list[Cond]]:
        pixels = (TEACHER_MIN_PIXELS, TEACHER_MAX_PIXELS) if not args.quick else (32 * 32, 64 * 64)
        ctx = CAPTION_TOKENS + 2 + teacher_image_tokens(resolution, *pixels)
        return [caption], [random_features(ctx, dim, device, dtype, seed=2)]

    batches = [int(b) for b in args.batches.split(",") if b]
    if args.only_batches:
        # The batch lever alone: the released recipe's global batch of 4 on one GPU, against batch 1, same run.
        top = resolutions[-1]
        for batch in [1, *batches]:
            # The trainer's roll-out keeps LoRA inputs in bf16 itself (ModelFamily.lora_inputs_uncast); the plain
            # SFT step does not, so `sft-nocast` against `sft` still measures that lever.
            for method in ("dopsd", "sft", "sft-nocast") if batch == 1 else ("dopsd", "sft"):
                run_config(bench, resolution=top, method=method, checkpointing=True, warmup=warmup, repeats=repeats,
                           conds=conds_for(top), batch=batch)  # fmt: skip
        emit({"bench": "gpu_zimage", "event": "done", "total_s": round(time.perf_counter() - t0, 1)})
        return 0
    # 1. The goals: D-OPSD and SFT with gradient checkpointing, 512 first; 1024 only if 512 went fine.
    for i, resolution in enumerate(resolutions):
        if i and not all(ok.values()):
            emit({"bench": "gpu_zimage", "resolution": resolution, "skipped": "a smaller resolution failed"})
            continue
        for method in ("dopsd", "sft"):
            rec = run_config(bench, resolution=resolution, method=method, checkpointing=True, warmup=warmup,
                             repeats=repeats, conds=conds_for(resolution))  # fmt: skip
            ok[resolution] = ok.get(resolution, True) and "step_s" in rec
    top = resolutions[-1]
    # 2. The batching lever: teacher and student rows in one forward (live: one adapter; ema: one per row), against
    #    the sequential roll-out (`dopsd` above is ema sequential).
    low = resolutions[0]
    if ok.get(low):
        for method in ("dopsd-live", "dopsd-live-batched", "dopsd-ema-batched"):
            run_config(bench, resolution=low, method=method, checkpointing=True, warmup=warmup, repeats=repeats,
                       conds=conds_for(low))  # fmt: skip
    # 3. Checkpointing off at the top resolution: the speed it costs, and whether memory needs it.
    if ok.get(top):
        for method in ("dopsd", "sft"):
            run_config(bench, resolution=top, method=method, checkpointing=False, warmup=warmup, repeats=repeats,
                       conds=conds_for(top))  # fmt: skip
    # 4. Batch sizes at the top resolution (the released recipe trains with a global batch of 4).
    if ok.get(top):
        for batch in batches:
            for method in ("dopsd", "sft"):
                run_config(bench, resolution=top, method=method, checkpointing=True, warmup=warmup, repeats=repeats,
                           conds=conds_for(top), batch=batch)  # fmt: skip
    # 5. Reference-style: both encoders resident and run every step (no feature caching), then the same D-OPSD step.
    if not args.no_reference and ok.get(top):
        run_reference(bench, args.quick, top, warmup, repeats)
    # 6. The fast path's levers at the top resolution, each against `dopsd` (native attention, eager) above.
    if ok.get(top):
        run_fast_path(bench, args, top, warmup, repeats, conds_for(top))
    emit({"bench": "gpu_zimage", "event": "done", "total_s": round(time.perf_counter() - t0, 1)})
    return 0


def run_reference(bench: Bench, quick: bool, resolution: int, warmup: int, repeats: int) -> None:
    """The released code's shape: Qwen3-4B and Qwen3-VL-4B (random, full size) on the GPU, both run every step."""
    if time.perf_counter() - bench.t0 > bench.budget_s:
        bench.emit({"bench": "gpu_zimage", "method": "reference", "skipped": "budget"})
        return
    device, dtype = bench.device, bench.dtype
    pixels = (32 * 32, 64 * 64) if quick else (TEACHER_MIN_PIXELS, TEACHER_MAX_PIXELS)
    encoders = (QUICK_TEXT, QUICK_VISION, QUICK_MROPE) if quick else (REAL_TEXT, REAL_VISION, REAL_MROPE)
    try:
        family = build_family(bench.family.transformer, device=device, dtype=dtype, encoders=encoders,
                              teacher_pixels=pixels)  # fmt: skip
    except torch.OutOfMemoryError as exc:
        bench.emit({"bench": "gpu_zimage", "method": "reference", "error": f"out of memory building encoders: {exc}"})
        return
    encoder_params = sum(p.numel() for p in family.pipeline.text_encoder.parameters())
    assert family.teacher_encoder is not None
    encoder_params += sum(p.numel() for p in family.teacher_encoder.vlm.parameters())
    image: Image.Image = target_image(resolution)

    def encode() -> tuple[list[Cond], list[Cond]]:
        student = family.encode_student([REFERENCE_CAPTION], 512)
        teacher = family.encode_teacher(image, REFERENCE_CAPTION, text_max_length=512, context_max_length=1024)
        return student, [teacher]

    conds = encode()
    enc_s = []
    for _ in range(2):
        enc_s.append(timed(lambda: float(len(encode())), device))
    saved = bench.family
    bench.family = family
    try:
        extra = {"encoder_params": encoder_params, "encode_s": round(statistics.median(enc_s), 4)}
        run_config(bench, resolution=resolution, method="reference", checkpointing=True, warmup=warmup,
                   repeats=repeats, conds=conds, reference=encode, extra=extra)  # fmt: skip
        # The same step with the features cached, on the same warm machine, for the ratio.
        run_config(bench, resolution=resolution, method="dopsd", checkpointing=True, warmup=1, repeats=repeats,
                   conds=conds, extra={"features": "cached, same as reference"})  # fmt: skip
    finally:
        bench.family = saved


if __name__ == "__main__":
    raise SystemExit(main())
