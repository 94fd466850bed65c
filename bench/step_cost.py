"""Cost of one D-OPSD training step against one plain flow-matching SFT (DreamBooth-style LoRA) step.

Same model, same student LoRA adapter, same AdamW settings, same machine, one run. Prints one JSON line per size:
`python bench/step_cost.py [--sizes tiny,small] [--repeats N] [--threads N] [--quick]`.
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
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ZImagePipeline
from PIL import Image

from dopsd.config import DISTILL4_SIGMAS
from dopsd.lora import add_adapters, ema_update, make_lora_config, student_parameters, teacher_parameters
from dopsd.losses import compute_x0_distillation_loss
from dopsd.models import tiny
from dopsd.models.base import Cond
from dopsd.models.loading import TINY_SEED, z_image_family
from dopsd.models.z_image import ZImageFamily
from dopsd.rollout import distillation_rollout


# name -> transformer dim, layers, refiner layers, heads, rope axes (sum = dim / heads), image resolution
SIZES: dict[str, tuple[int, int, int, int, list[int], int]] = {
    "tiny": (64, 2, 1, 2, [8, 12, 12], 64),
    "small": (256, 4, 2, 4, [16, 24, 24], 256),
}
warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # the second (teacher) adapter
CAPTION = "a photo of sks dog sitting on a wooden bench in a park"
WARMUP = 2


def build_family(size: str, device: torch.device, dtype: torch.dtype) -> ZImageFamily:
    """The tiny pipeline with a transformer of `size`, and the tiny Qwen3-VL teacher, as `load_family` builds them."""
    dim, layers, refiners, heads, axes, _ = SIZES[size]
    pipe: Any = tiny.build_tiny_z_image_pipeline(seed=TINY_SEED)  # diffusers pipelines are untyped
    if size != "tiny":
        torch.manual_seed(TINY_SEED + 1)
        transformer = tiny.build_tiny_z_image_transformer(dim, layers, refiners, heads, tuple(axes))
        pipe = ZImagePipeline(
            scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
            transformer=transformer,
        )  # fmt: skip
    return z_image_family(
        pipe, "tiny://qwen3-vl", device=device, dtype=dtype, teacher_min_pixels=32 * 32, teacher_max_pixels=64 * 64
    )


def target_image(resolution: int) -> Image.Image:
    """A fixed, non-trivial RGB target image (seeded noise over a colour gradient)."""
    gen = torch.Generator().manual_seed(123)
    y, x = torch.meshgrid(torch.linspace(0, 1, resolution), torch.linspace(0, 1, resolution), indexing="ij")
    rgb = 0.8 * torch.stack([x, y, 1 - x]) + 0.2 * torch.rand(3, resolution, resolution, generator=gen)
    return Image.fromarray((rgb.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy())


@torch.no_grad()
def encode_latents(family: ZImageFamily, image: Image.Image) -> torch.Tensor:
    """The image as scaled VAE latents [1, C, H, W] in fp32: (sample - shift_factor) * scaling_factor."""
    vae: Any = family.pipeline.vae
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    latents = vae.encode(x.to(family.device, vae.dtype)).latent_dist.sample(torch.Generator().manual_seed(0))
    return ((latents - vae.config.shift_factor) * vae.config.scaling_factor).float()


def sft_step(
    family: ZImageFamily, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, x0: torch.Tensor,
    conds: list[Cond], gen: torch.Generator,
) -> float:  # fmt: skip
    """One DreamBooth-style flow-matching LoRA step: one student forward/backward at a random sigma, clip, AdamW.

    x_t = (1 - sigma) x0 + sigma noise; Z-Image's raw output points toward the data, so the target is x0 - noise.
    """
    noise = torch.randn(x0.shape, generator=gen).to(family.device)
    sigma = float(torch.rand((), generator=gen))
    x_t = (1.0 - sigma) * x0 + sigma * noise
    with family.autocast():
        prediction = family.predict(x_t, sigma, conds)
    loss = F.mse_loss(prediction.float(), x0 - noise)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def live_batched_rollout(
    family: ZImageFamily, *, noise: torch.Tensor, student_conds: list[Cond], teacher_conds: list[Cond],
    sigmas: list[float], loss_scale: float = 1.0,
) -> float:  # fmt: skip
    """`distillation_rollout` for teacher_mode `live` (teacher = the student adapter) with the teacher forward batched
    into the student's: one forward of [x; x] with [c_S; c_T], the teacher half detached. The lever under test.

    Same values as the sequential roll-out, but autograd still runs the backward through the teacher half (its
    activations live in the same tensors), and the shorter student context is padded to the teacher's length.
    """
    batch, num_states, total, x = noise.shape[0], len(sigmas) - 1, 0.0, noise
    for k in range(num_states):
        x = x.detach()
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        with family.autocast():
            pred = family.predict(torch.cat([x, x]), sigma, [*student_conds, *teacher_conds])
        pred_student, pred_teacher = pred[:batch], pred[batch:].detach()
        loss = compute_x0_distillation_loss(
            family.x0_from_prediction(x, sigma, pred_student), family.x0_from_prediction(x, sigma, pred_teacher)
        )
        (loss * (loss_scale / num_states)).backward()
        total += float(loss.detach())
        x = family.euler_step(x, sigma, sigma_next, pred_student.detach())
    return total / num_states


def dopsd_step(
    family: ZImageFamily, params: list[torch.nn.Parameter], teacher: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer, shape: tuple[int, ...], conds: tuple[list[Cond], list[Cond]], gen: torch.Generator,
    mode: str = "ema",
) -> float:  # fmt: skip
    """One D-OPSD step exactly as `dopsd.trainer` runs it: 4-state roll-out, clip, AdamW, EMA of the teacher.

    `mode`: the teacher mode `ema` (the default: teacher adapter, EMA after the step), `live` (the student adapter
    is its own teacher, no EMA), or `live-batched` (`live` through `live_batched_rollout`).
    """
    noise = torch.randn(shape, generator=gen).to(family.device)
    if mode == "live-batched":
        loss = live_batched_rollout(
            family, noise=noise, student_conds=conds[0], teacher_conds=conds[1], sigmas=list(DISTILL4_SIGMAS)
        )
    else:
        loss = distillation_rollout(
            family, noise=noise, student_conds=conds[0], teacher_conds=conds[1], sigmas=list(DISTILL4_SIGMAS),
            teacher_adapter="teacher" if mode == "ema" else "student", loss_space="x0", loss_scale=1.0,
        )  # fmt: skip
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if mode == "ema":
        ema_update(teacher, params, 0.9999)
    return loss


def timed(step: Callable[[], float], device: torch.device) -> float:
    """Wall seconds of one call of `step`, synchronising CUDA around it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_size(size: str, repeats: int, threads: int) -> dict[str, object]:
    """Builds `size`, warms both steps up, then times them interleaved; returns the JSON record (medians)."""
    cuda = torch.cuda.is_available()
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    dim, layers, _, _, _, resolution = SIZES[size]
    family = build_family(size, device, dtype)
    image = target_image(resolution)
    student_conds = family.encode_student([CAPTION], 512)
    teacher_conds = [family.encode_teacher(image, CAPTION, text_max_length=512, context_max_length=1024)]
    x0 = encode_latents(family, image)
    shape = (1, *family.latent_shape(resolution, resolution))
    assert tuple(x0.shape) == shape, (x0.shape, shape)
    family.release_encoders()

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

    opt_d, opt_s = adamw(), adamw()
    gen_d, gen_s = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    steps: dict[str, Callable[[], float]] = {
        "dopsd": lambda: dopsd_step(family, params, teacher, opt_d, shape, (student_conds, teacher_conds), gen_d),
        "sft": lambda: sft_step(family, params, opt_s, x0, student_conds, gen_s),
    }
    for _ in range(WARMUP):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):  # interleaved, so slow drift of the machine hits both alike
        for name, step in steps.items():
            times[name].append(timed(step, device))
    d, s = statistics.median(times["dopsd"]), statistics.median(times["sft"])
    h, w = shape[-2:]
    return {
        "bench": "step_cost", "size": size, "dim": dim, "layers": layers, "resolution": resolution,
        "image_tokens": (h // 2) * (w // 2), "dopsd_step_s": round(d, 6), "sft_step_s": round(s, 6),
        "ratio": round(d / s, 4), "device": device.type, "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__.split("+")[0], "threads": threads, "repeats": repeats,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Parses the command line, sets the thread count, prints one JSON line per size."""
    parser = argparse.ArgumentParser(description="D-OPSD step vs plain SFT step, one JSON line per size")
    parser.add_argument("--sizes", default="tiny,small", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each kind (median reported)")
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2), help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help='only "tiny", 2 repeats (the test suite runs this)')
    args = parser.parse_args(argv)
    sizes = ["tiny"] if args.quick else [s.strip() for s in args.sizes.split(",") if s.strip()]
    repeats = 2 if args.quick else args.repeats
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or repeats < 1:
        parser.error(f"unknown sizes {unknown}" if unknown else "--repeats must be at least 1")
    torch.set_num_threads(args.threads)
    for size in sizes:
        print(json.dumps(bench_size(size, repeats, args.threads)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
