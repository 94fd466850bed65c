"""What the training-step benchmarks share: model builders (Z-Image family with encoders of chosen sizes) and the
step bodies (SFT, D-OPSD through the trainer's own roll-out, the reference-style step, the batching experiment).

Every step here is the trainer's code path: `ZImageFamily.predict` / `encode_*`, `dopsd.rollout.distillation_rollout`,
`dopsd.lora`'s adapters and EMA, AdamW and gradient clipping as `dopsd.trainer` configures them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ZImagePipeline, ZImageTransformer2DModel
from PIL import Image
from transformers import Qwen3Config, Qwen3Model, Qwen3VLConfig, Qwen3VLModel

from dopsd.config import DISTILL4_SIGMAS
from dopsd.lora import ema_update
from dopsd.losses import compute_x0_distillation_loss
from dopsd.models import tiny
from dopsd.models.base import Cond
from dopsd.models.loading import TINY_SEED, qwen_image_processor
from dopsd.models.qwen_teacher import QwenVLTeacherEncoder, copy_text_encoder_into_vlm
from dopsd.models.z_image import ZImageFamily
from dopsd.rollout import distillation_rollout


# (Qwen3 text config values, Qwen3-VL vision config, M-RoPE sections): the encoders of a reference-style step
Encoders = tuple[dict[str, Any], dict[str, Any], list[int]]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Builds modules directly in `dtype` (no fp32 copy of billions of parameters)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def text_config(values: dict[str, Any]) -> Qwen3Config:
    """A Qwen3 config from a flat dict (`rope_theta` becomes the rope parameters)."""
    rest = {k: v for k, v in values.items() if k != "rope_theta"}
    return Qwen3Config(**rest, rope_parameters={"rope_type": "default", "rope_theta": values["rope_theta"]},
                       pad_token_id=0)  # fmt: skip


def vlm_config(text: Qwen3Config, vision: dict[str, Any], mrope: list[int], tokenizer: Any) -> Qwen3VLConfig:
    """Qwen3-VL whose language model has the text encoder's shapes; special-token ids from `tokenizer`."""
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps")  # fmt: skip
    text_cfg: dict[str, Any] = {k: getattr(text, k) for k in keys}
    rope = text.rope_parameters
    assert isinstance(rope, dict)
    text_cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": rope["rope_theta"], "mrope_section": mrope,
                                   "mrope_interleaved": True}  # fmt: skip
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in (("image_token_id", "<|image_pad|>"),
           ("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
           ("vision_end_token_id", "<|vision_end|>"))}  # fmt: skip
    return Qwen3VLConfig(text_config=text_cfg, vision_config=vision, **ids)


def build_family(
    transformer: ZImageTransformer2DModel,
    *,
    device: torch.device,
    dtype: torch.dtype,
    encoders: Encoders | None,
    teacher_pixels: tuple[int, int],
) -> ZImageFamily:
    """Our `ZImageFamily` around `transformer`, with the tiny pipeline's scheduler, VAE and byte-level tokenizer.

    `encoders`: random encoders of those sizes, built on `device` in `dtype` (as the released code keeps them);
    `None`: the tiny pipeline's encoders, built on the CPU in fp32 (`encode_*` moves them to the device when called).
    The Qwen3-VL teacher's language model is always a copy of the text encoder, as `load_family` builds it.
    """
    base: Any = tiny.build_tiny_z_image_pipeline(seed=TINY_SEED)  # diffusers pipelines are untyped
    text_encoder = base.text_encoder
    where, enc_dtype = (device, dtype) if encoders is not None else (torch.device("cpu"), torch.float32)
    if encoders is not None:
        text_values, vision, mrope = encoders
        t_cfg = text_config(text_values)
        torch.manual_seed(TINY_SEED + 20)
        with torch.device(where), default_dtype(enc_dtype):
            text_encoder = Qwen3Model(t_cfg)
        vl_cfg = vlm_config(t_cfg, vision, mrope, base.tokenizer)
    else:
        vl_cfg = tiny.tiny_vlm_config(base.text_encoder.config, base.tokenizer)
    torch.nn.Module.to(text_encoder, device=where, dtype=enc_dtype)
    torch.manual_seed(TINY_SEED + 10)
    with torch.device(where), default_dtype(enc_dtype):
        vlm = Qwen3VLModel(vl_cfg)
    torch.nn.Module.to(vlm, device=where, dtype=enc_dtype)
    copy_text_encoder_into_vlm(text_encoder, vlm.language_model)
    pipe = ZImagePipeline(
        scheduler=base.scheduler, vae=base.vae, text_encoder=text_encoder, tokenizer=base.tokenizer,
        transformer=transformer,
    )  # fmt: skip
    teacher = QwenVLTeacherEncoder(
        vlm, qwen_image_processor(None, *teacher_pixels), base.tokenizer,
        chat_template_kwargs=ZImageFamily.chat_template_kwargs,
    )  # fmt: skip
    return ZImageFamily(pipe, teacher, device=device, dtype=dtype)


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
    vae.to(family.device)
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


@contextlib.contextmanager
def per_sample_adapters(transformer: torch.nn.Module, names: list[str]) -> Iterator[None]:
    """Runs every LoRA layer of `transformer` with one adapter per batch row (`__base__`: none), through peft's
    layer-level mixed-batch path (`adapter_names`). peft's model wrappers refuse `adapter_names` in training mode;
    the layers themselves take it, so a forward pre-hook passes it to each of them while the block runs (forward and
    any checkpointed recomputation in backward)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    def hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return args, {**kwargs, "adapter_names": names}

    handles = [
        m.register_forward_pre_hook(hook, with_kwargs=True)
        for m in transformer.modules()
        if isinstance(m, BaseTunerLayer)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def batched_rollout(
    family: ZImageFamily, *, noise: torch.Tensor, student_conds: list[Cond], teacher_conds: list[Cond],
    sigmas: list[float], teacher_adapter: str | None, loss_scale: float = 1.0,
) -> float:  # fmt: skip
    """`distillation_rollout` with the teacher forward batched into the student's: one forward of [x; x] with
    [c_S; c_T] per state, the student rows on the student adapter, the teacher rows on `teacher_adapter` (`None`:
    the base model), the teacher half detached. The lever under test; same values as the sequential roll-out.

    Gradients reach only the student's LoRA (the teacher's is frozen and its rows' outputs are detached), but
    autograd still runs the backward through the teacher rows' activations (they live in the same tensors), and the
    shorter student context is padded to the teacher's length.
    """
    batch, num_states, total, x = noise.shape[0], len(sigmas) - 1, 0.0, noise
    names = ["student"] * batch + [teacher_adapter or "__base__"] * batch
    mixed = (
        per_sample_adapters(family.transformer, names) if teacher_adapter != "student" else contextlib.nullcontext()
    )
    with mixed:
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

    `mode`: the teacher mode, `ema` (the default: teacher adapter, EMA after the step), `frozen` (the base model)
    or `live` (the student adapter is its own teacher); with `-batched`, through `batched_rollout`.
    """
    noise = torch.randn(shape, generator=gen).to(family.device)
    teacher_mode = mode.removesuffix("-batched")
    teacher_adapter = {"ema": "teacher", "frozen": None, "live": "student"}[teacher_mode]
    if mode.endswith("-batched"):
        loss = batched_rollout(
            family, noise=noise, student_conds=conds[0], teacher_conds=conds[1], sigmas=list(DISTILL4_SIGMAS),
            teacher_adapter=teacher_adapter,
        )  # fmt: skip
    else:
        loss = distillation_rollout(
            family, noise=noise, student_conds=conds[0], teacher_conds=conds[1], sigmas=list(DISTILL4_SIGMAS),
            teacher_adapter=teacher_adapter, loss_space="x0", loss_scale=1.0,
        )  # fmt: skip
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if teacher_mode == "ema":
        ema_update(teacher, params, 0.9999)
    return loss


def encode_pair(
    family: ZImageFamily, image: Image.Image, caption: str, *, text_max_length: int, context_max_length: int
) -> tuple[list[Cond], list[Cond]]:
    """Student and teacher features of one (image, caption) pair, through the family's own encoders."""
    student = family.encode_student([caption], text_max_length)
    teacher = family.encode_teacher(
        image, caption, text_max_length=text_max_length, context_max_length=context_max_length
    )
    return student, [teacher]


def timed(step: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call of `step`, synchronising CUDA around it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start
