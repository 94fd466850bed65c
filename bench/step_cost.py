"""Cost of one D-OPSD training step against one plain flow-matching SFT (DreamBooth-style LoRA) step and against a
reference-style D-OPSD step (the released code's shape: encoders resident and run on every step, no feature cache).

Same model, same student LoRA adapter, same AdamW settings, same machine, one run, the steps interleaved. Prints one
JSON line per size: `python bench/step_cost.py [--sizes tiny,small] [--repeats N] [--threads N] [--quick]`.
Wall-clock medians, and medians of the process's CPU time (steadier on a shared machine). `--levers` instead times
the teacher-batching lever (`bench.common.batched_rollout`) against the trainer's sequential roll-out per teacher mode.
"""

from __future__ import annotations

import os


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from diffusers import ZImageTransformer2DModel


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python bench/step_cost.py`

from bench.common import (
    Encoders,
    build_family,
    dopsd_step,
    encode_latents,
    encode_pair,
    sft_step,
    target_image,
    timed,
)
from dopsd.lora import add_adapters, make_lora_config, student_parameters, teacher_parameters
from dopsd.models import tiny
from dopsd.models.loading import TINY_SEED
from dopsd.models.z_image import ZImageFamily


@dataclass(frozen=True)
class Size:
    """A benchmark size: the transformer, the training resolution, and the encoders of the reference-style step."""

    dim: int
    layers: int
    refiners: int
    heads: int
    axes: tuple[int, int, int]  # rope axes, sum = dim / heads
    resolution: int
    encoders: Encoders | None  # None: the tiny pipeline's own encoders
    teacher_pixels: tuple[int, int]  # the VLM processor's min/max pixels for the teacher image
    text_max_length: int  # what the text encoder pads a caption to (ZImagePipeline pads to max_sequence_length)


# "small" keeps the full-size model's proportions (Z-Image 6.15B; Qwen3-4B 3.6B without embeddings = 0.59x; the
# Qwen3-VL-4B vision tower 0.41B = 0.07x; the teacher image at 0.75x the training side, so its tokens are 0.14x the
# transformer's image tokens as 576 / 4096 at 1024 px). The caption is padded to 96 tokens, not 512: the byte-level
# test tokenizer needs ~4x Qwen's tokens per caption, and 512 would overstate the encoders' share of the step.
SMALL_TEXT: dict[str, Any] = {
    "vocab_size": 300, "hidden_size": 192, "intermediate_size": 736, "num_hidden_layers": 10,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 48, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
}  # fmt: skip
SMALL_VISION: dict[str, Any] = {
    "depth": 6, "hidden_size": 64, "intermediate_size": 256, "num_heads": 2, "patch_size": 16,
    "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 192, "num_position_embeddings": 144,
    "deepstack_visual_indexes": [3],
}  # fmt: skip
SIZES: dict[str, Size] = {
    "tiny": Size(64, 2, 1, 2, (8, 12, 12), 64, None, (32 * 32, 64 * 64), 96),
    "small": Size(256, 4, 2, 4, (16, 24, 24), 256, (SMALL_TEXT, SMALL_VISION, [8, 8, 8]), (128 * 128, 192 * 192), 96),
}
warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # the second (teacher) adapter
CAPTION = "a photo of sks dog sitting on a wooden bench in a park"
WARMUP = 2


def build_size(size: Size, device: torch.device, dtype: torch.dtype) -> ZImageFamily:
    """The family of `size`: its transformer (reading the text encoder's width) with its encoders."""
    cap_dim = size.encoders[0]["hidden_size"] if size.encoders else tiny.TINY_TEXT_HIDDEN
    torch.manual_seed(TINY_SEED + 1)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=tiny.TINY_LATENT_CHANNELS, dim=size.dim,
        n_layers=size.layers, n_refiner_layers=size.refiners, n_heads=size.heads, n_kv_heads=size.heads,
        norm_eps=1e-5, qk_norm=True, cap_feat_dim=cap_dim, rope_theta=256.0, t_scale=1000.0,
        axes_dims=list(size.axes), axes_lens=[256, 64, 64],
    ).to(device, dtype)  # fmt: skip
    return build_family(
        transformer, device=device, dtype=dtype, encoders=size.encoders, teacher_pixels=size.teacher_pixels
    )


def parameter_count(module: torch.nn.Module) -> int:
    """Base parameters of `module`: no LoRA adapters, no token-embedding tables (lookups, not FLOPs)."""
    return sum(p.numel() for n, p in module.named_parameters() if "lora_" not in n and "embed_tokens" not in n)


def interleaved(
    steps: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds of each step, `repeats` rounds, the steps interleaved within each round (so slow
    drift of a shared machine hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.process_time()
            times[name].append(timed(step, device))
            cpu[name].append(time.process_time() - start)
    return times, cpu


def bench_levers(name: str, repeats: int, threads: int) -> dict[str, object]:
    """The teacher-batching lever on size `name`: per teacher mode, the trainer's sequential roll-out against one
    batched forward of teacher and student rows (`bench.common.batched_rollout`); ratios batched / sequential."""
    cuda = torch.cuda.is_available()
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    size = SIZES[name]
    family = build_size(size, device, dtype)
    conds = encode_pair(
        family, target_image(size.resolution), CAPTION, text_max_length=size.text_max_length, context_max_length=1024
    )
    torch.manual_seed(0)
    lora = make_lora_config(rank=64, alpha=128, dropout=0.0, target_modules=family.lora_target_modules)
    add_adapters(family.transformer, lora, with_teacher=True)
    params, teacher = student_parameters(family.transformer), teacher_parameters(family.transformer)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    shape = (1, *family.latent_shape(size.resolution, size.resolution))
    gen = torch.Generator().manual_seed(1)
    modes = [m + b for m in ("ema", "frozen", "live") for b in ("", "-batched")]
    steps: dict[str, Callable[[], object]] = {
        m: (lambda m=m: dopsd_step(family, params, teacher, optimizer, shape, conds, gen, mode=m))  # type: ignore[misc]
        for m in modes
    }
    for step in steps.values():
        step()
    times, cpu = interleaved(steps, repeats, device)
    record: dict[str, object] = {"bench": "step_cost_levers", "size": name, "device": device.type,
                                 "threads": threads, "repeats": repeats}  # fmt: skip
    for mode in ("ema", "frozen", "live"):
        seq, bat = statistics.median(times[mode]), statistics.median(times[mode + "-batched"])
        record[f"{mode}_step_s"] = round(seq, 6)
        record[f"{mode}_batched_step_s"] = round(bat, 6)
        record[f"{mode}_batched_over_sequential"] = round(bat / seq, 4)
        record[f"cpu_{mode}_batched_over_sequential"] = round(
            statistics.median(cpu[mode + "-batched"]) / statistics.median(cpu[mode]), 4
        )
    return record


def bench_size(name: str, repeats: int, threads: int) -> dict[str, object]:
    """Builds size `name`, warms the three steps up, then times them interleaved; returns the JSON record (medians).

    `dopsd`: the trainer's step on features cached once (encoders idle). `sft`: one flow-matching step on a VAE-encoded
    target. `reference`: the released code's shape, both encoders resident and run on every step (student text
    features and the teacher VLM on image + caption), then the same D-OPSD step on those fresh features.
    """
    cuda = torch.cuda.is_available()
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    size = SIZES[name]
    family = build_size(size, device, dtype)
    image = target_image(size.resolution)

    def encode() -> tuple[list[Any], list[Any]]:
        return encode_pair(family, image, CAPTION, text_max_length=size.text_max_length, context_max_length=1024)

    conds = encode()  # cached once, as the trainer does
    x0 = encode_latents(family, image)
    shape = (1, *family.latent_shape(size.resolution, size.resolution))
    assert tuple(x0.shape) == shape, (x0.shape, shape)

    transformer = family.transformer
    torch.manual_seed(0)
    lora = make_lora_config(rank=64, alpha=128, dropout=0.0, target_modules=family.lora_target_modules)
    add_adapters(transformer, lora, with_teacher=True)
    if cuda:  # as the trainer does by default on CUDA
        transformer.enable_gradient_checkpointing()
    params, teacher = student_parameters(transformer), teacher_parameters(transformer)

    def adamw() -> torch.optim.Optimizer:
        """The trainer's AdamW on the student LoRA parameters."""
        return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=cuda)

    opt_d, opt_s, opt_r = adamw(), adamw(), adamw()
    gen_d, gen_s, gen_r = (torch.Generator().manual_seed(i) for i in (1, 2, 3))
    steps: dict[str, Callable[[], object]] = {
        "dopsd": lambda: dopsd_step(family, params, teacher, opt_d, shape, conds, gen_d),
        "sft": lambda: sft_step(family, params, opt_s, x0, conds[0], gen_s),
        "reference": lambda: dopsd_step(family, params, teacher, opt_r, shape, encode(), gen_r),
        "encode": encode,  # the reference's extra work alone
    }
    for _ in range(WARMUP):
        for step in steps.values():
            step()
    times, cpu = interleaved(steps, repeats, device)
    d, s, r, e = (statistics.median(times[k]) for k in ("dopsd", "sft", "reference", "encode"))
    cd, cs, cr = (statistics.median(cpu[k]) for k in ("dopsd", "sft", "reference"))
    assert family.teacher_encoder is not None
    h, w = shape[-2:]
    return {
        "bench": "step_cost", "size": name, "dim": size.dim, "layers": size.layers, "resolution": size.resolution,
        "image_tokens": (h // 2) * (w // 2), "caption_tokens": int(conds[0][0].shape[0]),
        "teacher_context_tokens": int(conds[1][0].shape[0]), "dopsd_step_s": round(d, 6), "sft_step_s": round(s, 6),
        "reference_step_s": round(r, 6), "encode_s": round(e, 6), "ratio": round(d / s, 4),
        "dopsd_over_sft": round(d / s, 4), "reference_over_dopsd": round(r / d, 4),
        "cpu_dopsd_over_sft": round(cd / cs, 4), "cpu_reference_over_dopsd": round(cr / cd, 4),
        "transformer_params": parameter_count(transformer),
        "text_encoder_params": parameter_count(family.pipeline.text_encoder),
        "vision_params": parameter_count(cast(torch.nn.Module, family.teacher_encoder.vlm.visual)),
        "device": device.type, "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__.split("+")[0],
        "threads": threads, "repeats": repeats,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Parses the command line, sets the thread count, prints one JSON line per size."""
    parser = argparse.ArgumentParser(description="D-OPSD step vs plain SFT step, one JSON line per size")
    parser.add_argument("--sizes", default="tiny,small", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each kind (median reported)")
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2), help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help='only "tiny", 2 repeats (the test suite runs this)')
    parser.add_argument("--levers", action="store_true", help="time the teacher-batching lever instead")
    args = parser.parse_args(argv)
    sizes = ["tiny"] if args.quick else [s.strip() for s in args.sizes.split(",") if s.strip()]
    repeats = 2 if args.quick else args.repeats
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or repeats < 1:
        parser.error(f"unknown sizes {unknown}" if unknown else "--repeats must be at least 1")
    torch.set_num_threads(args.threads)
    for size in sizes:
        record = bench_levers(size, repeats, args.threads) if args.levers else bench_size(size, repeats, args.threads)
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
