"""`train()`: one D-OPSD LoRA run, from reference images to a diffusers-loadable adapter.

Reads like the method page: cache the student and teacher features once, free the encoders, then per step roll
the student out for K steps from noise, pull it toward the teacher at every state, clip, AdamW, EMA the teacher.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dopsd import __version__
from dopsd.callbacks import StepState, TrainerCallback, TrainerControl
from dopsd.captioning import auto_captions, uncaptioned
from dopsd.checkpoint import (
    TrainerState,
    load_checkpoint,
    random_state_from_json,
    random_state_to_json,
    save_checkpoint,
)
from dopsd.config import DISTILL4_SIGMAS, DOPSDConfig
from dopsd.data import (
    ConceptDataset,
    buckets_for_resolution,
    image_files,
    load_concept_dataset,
    load_image,
    nearest_bucket,
    resize_to_cover,
    resolve_caption,
)
from dopsd.errors import TrainingCancelled
from dopsd.lora import (
    LORA_WEIGHT_NAME,
    STUDENT_ADAPTER,
    TEACHER_ADAPTER,
    active_adapter,
    adapter_state,
    add_adapters,
    add_file_metadata,
    ema_update,
    load_adapter_state,
    make_lora_config,
    remove_adapters,
    student_parameters,
    teacher_parameters,
)
from dopsd.lora_formats import COMFYUI_WEIGHT_NAME, write_comfyui_lora
from dopsd.models.base import Cond, ModelFamily
from dopsd.models.loading import load_family_for
from dopsd.presets import Preset, get_preset
from dopsd.rollout import distillation_rollout, teacher_student_gap
from dopsd.sampling import SampleRenderer, SampleSet


logger = logging.getLogger(__name__)

GAP_SEED_OFFSET = 1_000_003  # held-out noise for the gap metric never coincides with training noise
MAX_GAP_PAIRS = 8


@dataclass(frozen=True)
class TrainingResult:
    """Where a finished run put its outputs, and its headline metrics."""

    output_dir: Path
    adapter_path: Path
    metrics: dict[str, Any]


@dataclass
class _Pair:
    item: int
    bucket: tuple[int, int]
    student: Cond
    teacher: Cond


def resolve_device(config: DOPSDConfig) -> tuple[torch.device, torch.dtype]:
    """The device and weight dtype of a run: CUDA when present; bf16 there unless off or the preset is fp32."""
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    wanted = config.mixed_precision == "bf16" or (
        config.mixed_precision == "auto" and get_preset(config.preset).dtype == "bfloat16"
    )
    bf16 = use_cuda and wanted
    return device, (torch.bfloat16 if bf16 else torch.float32)


def _teacher_adapter(mode: str) -> str | None:
    return {"ema": TEACHER_ADAPTER, "frozen": None, "live": STUDENT_ADAPTER}[mode]


def _with_auto_captions(cfg: DOPSDConfig, preset: Preset) -> DOPSDConfig:
    """`cfg` with a made caption for every image that has none (there is no default caption to fall back on);
    the captions end up in `config.json` like the user's own."""
    assert cfg.instance_data_dir is not None
    names = [p.name for p in image_files(cfg.instance_data_dir)]
    missing = uncaptioned(names, cfg.captions)
    if not missing:
        return cfg
    device, dtype = resolve_device(cfg)
    folder = Path(cfg.instance_data_dir)
    images = {n: load_image(folder / n, min_side=preset.min_image_side, name=n) for n in missing}
    made = auto_captions(
        images,
        trigger=cfg.trigger,
        preset=preset,
        teacher_path=cfg.teacher_encoder_path,
        device=device,
        dtype=dtype,
        min_pixels=cfg.teacher_min_pixels or 0,
        max_pixels=cfg.teacher_max_pixels or 0,
    )
    logger.info("made captions for %d image(s) without one", len(made))
    return dataclasses.replace(cfg, captions={**(cfg.captions or {}), **{n: [c] for n, c in made.items()}})


def train(
    config: DOPSDConfig,
    callbacks: Sequence[TrainerCallback] = (),
    *,
    family: ModelFamily | None = None,
    dataset: ConceptDataset | None = None,
) -> TrainingResult:
    """Trains a student LoRA with D-OPSD and writes adapter, config, metrics and samples to `output_dir`.

    `family` lets a long-lived worker pass an already loaded model (its adapters are removed again at the end);
    `dataset` lets a caller pass images it already validated. Raises `TrainingCancelled` when a callback stops the
    run (after checkpointing), `DataError` for bad input, `CheckpointError` for a bad resume.
    """
    cfg = config.resolved()
    if dataset is None and cfg.default_caption is None:
        cfg = _with_auto_captions(cfg, get_preset(cfg.preset))
    assert cfg.max_train_steps is not None and cfg.learning_rate is not None and cfg.resolution is not None
    assert cfg.rank is not None and cfg.lora_alpha is not None and cfg.sample_steps is not None
    assert cfg.student_max_sequence_length is not None
    preset = get_preset(cfg.preset)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    if dataset is None:
        dataset = load_concept_dataset(
            cfg.instance_data_dir,
            trigger=cfg.trigger,
            default_caption=cfg.default_caption,
            captions=cfg.captions,
            min_side=preset.min_image_side,
        )
    device, dtype = resolve_device(cfg)
    if family is None:
        family = load_family_for(cfg, device=device, dtype=dtype)
    load_s = time.perf_counter() - t_start

    # 1. Features, computed once per (image, caption); the encoders then leave the device.
    buckets = buckets_for_resolution(cfg.resolution)
    item_buckets = [nearest_bucket(it.image.width, it.image.height, buckets) for it in dataset.items]
    captions = sorted({c for _, c in dataset.pairs})
    student_feats = dict(zip(captions, family.encode_student(captions, cfg.student_max_sequence_length), strict=True))
    pairs = [
        _Pair(
            item=i,
            bucket=item_buckets[i],
            student=student_feats[caption],
            teacher=family.encode_teacher(
                resize_to_cover(dataset.items[i].image, item_buckets[i]),
                caption,
                text_max_length=cfg.student_max_sequence_length,
                context_max_length=cfg.teacher_max_sequence_length,
            ),
        )
        for i, caption in dataset.pairs
    ]
    assert cfg.validation_prompts is not None
    prompts = [resolve_caption(p, cfg.trigger) for p in cfg.validation_prompts]
    prompt_conds = family.encode_student(prompts, cfg.student_max_sequence_length)
    family.release_encoders()
    first_pair_of_item = {p.item: p for p in reversed(pairs)}
    renderer = SampleRenderer(
        family,
        prompts=prompts,
        prompt_conds=prompt_conds,
        teacher_samples=[(dataset.items[i].name, first_pair_of_item[i].teacher) for i in range(len(dataset.items))],
        seeds=cfg.sample_seeds,
        width=cfg.resolution,
        height=cfg.resolution,
        num_steps=cfg.sample_steps,
    )

    # 2. Adapters and optimizer: the optimizer holds the student's LoRA parameters and nothing else.
    transformer = family.transformer
    torch.manual_seed(cfg.seed)
    lora_config = make_lora_config(cfg.rank, cfg.lora_alpha, cfg.lora_dropout, family.lora_target_modules)
    add_adapters(transformer, lora_config, with_teacher=cfg.teacher_mode == "ema")
    try:
        return _train_loop(cfg, family, dataset, pairs, renderer, lora_config.to_dict(), callbacks, out, load_s)
    finally:
        remove_adapters(transformer)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _train_loop(
    cfg: DOPSDConfig,
    family: ModelFamily,
    dataset: ConceptDataset,
    pairs: list[_Pair],
    renderer: SampleRenderer,
    lora_metadata: dict[str, Any],
    callbacks: Sequence[TrainerCallback],
    out: Path,
    load_s: float,
) -> TrainingResult:
    assert cfg.max_train_steps is not None and cfg.learning_rate is not None and cfg.resolution is not None
    transformer = family.transformer
    params = student_parameters(transformer)
    teacher_params = teacher_parameters(transformer)
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.adam_weight_decay,
        fused=family.device.type == "cuda",
    )
    use_checkpointing = cfg.gradient_checkpointing
    if use_checkpointing is None:
        use_checkpointing = family.device.type == "cuda"
    if use_checkpointing:
        transformer.enable_gradient_checkpointing()
    teacher_adapter = _teacher_adapter(cfg.teacher_mode)

    def sigmas_for(bucket: tuple[int, int]) -> list[float]:
        if cfg.rollout_schedule == "native":
            assert cfg.sample_steps is not None
            return family.native_sigmas(cfg.sample_steps, *bucket)
        return list(DISTILL4_SIGMAS)

    # Held-out noise for the gap metric: fixed seeds, never drawn from the training generator.
    gap_pairs = pairs[:: max(1, len(pairs) // MAX_GAP_PAIRS)][:MAX_GAP_PAIRS]
    gap_cases = [
        (p, torch.randn((1, *family.latent_shape(*p.bucket)), generator=torch.Generator().manual_seed(seed)))
        for seed in range(GAP_SEED_OFFSET, GAP_SEED_OFFSET + cfg.gap_eval_seeds)
        for p in gap_pairs
    ]

    def measure_gap() -> float | None:
        if not gap_cases:
            return None
        transformer.eval()  # no LoRA dropout in measurements
        by_bucket: dict[tuple[int, int], list[tuple[_Pair, torch.Tensor]]] = {}
        for p, noise in gap_cases:
            by_bucket.setdefault(p.bucket, []).append((p, noise))
        values = []
        for bucket, cases in by_bucket.items():
            gap = teacher_student_gap(
                family,
                noises=[n.to(family.device) for _, n in cases],
                student_conds=[p.student for p, _ in cases],
                teacher_conds=[p.teacher for p, _ in cases],
                sigmas=sigmas_for(bucket),
                teacher_adapter=teacher_adapter,
            )
            values.extend([gap] * len(cases))
        return sum(values) / len(values)

    data_rng = random.Random(cfg.seed)
    noise_rng = torch.Generator().manual_seed(cfg.seed)
    state = TrainerState(step=0, data_rng=None)
    if cfg.resume_from:
        ckpt = load_checkpoint(cfg.resume_from, cfg)
        load_adapter_state(transformer, STUDENT_ADAPTER, ckpt.student)
        if ckpt.teacher is not None and teacher_params:
            load_adapter_state(transformer, TEACHER_ADAPTER, ckpt.teacher)
        optimizer.load_state_dict(ckpt.optimizer)
        noise_rng.set_state(ckpt.noise_rng)
        if ckpt.torch_rng is not None:
            torch.set_rng_state(ckpt.torch_rng)
        data_rng.setstate(random_state_from_json(ckpt.state.data_rng))
        state = ckpt.state
        logger.info("resumed from %s at step %d", ckpt.path, state.step)
    else:
        state.metrics["gap_before"] = measure_gap()

    by_bucket: dict[tuple[int, int], list[_Pair]] = {}
    for p in pairs:
        by_bucket.setdefault(p.bucket, []).append(p)

    def next_batch() -> list[_Pair]:
        first = data_rng.choice(pairs)
        same = by_bucket[first.bucket]
        return [first] + [data_rng.choice(same) for _ in range(cfg.train_batch_size - 1)]

    def checkpoint() -> Path:
        state.data_rng = random_state_to_json(data_rng)
        path = save_checkpoint(
            out / "checkpoints",
            state=state,
            student=adapter_state(transformer, STUDENT_ADAPTER),
            teacher=adapter_state(transformer, TEACHER_ADAPTER) if teacher_params else None,
            optimizer=optimizer,
            noise_rng=noise_rng,
            config=cfg,
            keep=cfg.checkpoints_total_limit,
        )
        for cb in callbacks:
            cb.on_checkpoint(state.step, path)
        return path

    def render_samples(step: int, final: bool = False) -> SampleSet:
        transformer.eval()
        samples = renderer.render(out / "samples" / f"step-{step:08d}", step, final=final)
        for cb in callbacks:
            cb.on_samples(samples)
        return samples

    total = cfg.max_train_steps
    for cb in callbacks:
        cb.on_train_begin(total, state.step)
    t_loop = time.perf_counter()
    start_step = state.step
    while state.step < total:
        transformer.train()  # LoRA dropout (if any) acts on the student only; the teacher adapter has none
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(cfg.gradient_accumulation_steps):
            batch = next_batch()
            shape = (len(batch), *family.latent_shape(*batch[0].bucket))
            noise = torch.randn(shape, generator=noise_rng).to(family.device)
            step_loss += (
                distillation_rollout(
                    family,
                    noise=noise,
                    student_conds=[p.student for p in batch],
                    teacher_conds=[p.teacher for p in batch],
                    sigmas=sigmas_for(batch[0].bucket),
                    teacher_adapter=teacher_adapter,
                    loss_space=cfg.loss_space,
                    loss_scale=1.0 / cfg.gradient_accumulation_steps,
                )
                / cfg.gradient_accumulation_steps
            )
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        if teacher_params:
            ema_update(teacher_params, params, cfg.ema_decay)
        state.step += 1
        state.loss_history.append(step_loss)

        elapsed = time.perf_counter() - t_loop
        done = state.step - start_step
        step_state = StepState(
            step=state.step,
            total_steps=total,
            loss=step_loss,
            learning_rate=cfg.learning_rate,
            elapsed_s=elapsed,
            eta_s=elapsed / done * (total - state.step),
        )
        control = TrainerControl()
        for cb in callbacks:
            answer = cb.on_step_end(step_state)
            if answer is not None:
                control.should_stop |= answer.should_stop
                control.should_save |= answer.should_save
        due = cfg.checkpointing_steps and state.step % cfg.checkpointing_steps == 0 and state.step < total
        if control.should_save or control.should_stop or due:
            path = checkpoint()
            if control.should_stop:
                raise TrainingCancelled(state.step, str(path))
        if cfg.sample_every and state.step % cfg.sample_every == 0 and state.step < total:
            render_samples(state.step)

    transformer.eval()
    # 3. Outputs: adapter (diffusers format + our header metadata), config, samples, metrics.
    train_s = time.perf_counter() - t_loop
    state.metrics["gap_after"] = measure_gap()
    final_samples = render_samples(state.step, final=True)
    cfg.save(out / "config.json")
    adapter_path = out / LORA_WEIGHT_NAME
    family.save_lora_weights(str(out), adapter_state(transformer, STUDENT_ADAPTER), lora_metadata)
    add_file_metadata(
        adapter_path,
        {
            "dopsd.method": "D-OPSD (arXiv 2605.05204)",
            "dopsd.version": __version__,
            "dopsd.base_model": str(cfg.pretrained_model_name_or_path),
            "dopsd.preset": cfg.preset,
            "dopsd.family": family.name,
            "dopsd.trigger": cfg.trigger,
            "dopsd.rank": str(cfg.rank),
            "dopsd.alpha": str(cfg.lora_alpha),
            "dopsd.steps": str(state.step),
        },
    )
    if "comfyui" in cfg.output_formats:  # converted from the diffusers file, so that one is always written
        write_comfyui_lora(adapter_path, out / COMFYUI_WEIGHT_NAME, family.name)
    gap_before, gap_after = state.metrics.get("gap_before"), state.metrics.get("gap_after")
    metrics = {
        "steps": state.step,
        "loss": state.loss_history,
        "final_loss": state.loss_history[-1] if state.loss_history else None,
        "teacher_student_gap": {
            "before": gap_before,
            "after": gap_after,
            "relative_change": (gap_after - gap_before) / gap_before if gap_before and gap_after is not None else None,
            "definition": "mean x0 MSE between student and teacher along the student's roll-out, "
            f"{cfg.gap_eval_seeds} held-out noise seeds x {len({id(p) for p, _ in gap_cases})} training pairs",
        },
        "timing_s": {"load": load_s, "train": train_s, "per_step": train_s / max(1, state.step - start_step)},
        "images": [it.name for it in dataset.items],
        "captions": {it.name: list(it.captions) for it in dataset.items},
        "samples": [str(p.path.relative_to(out)) for p in final_samples.images],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    for cb in callbacks:
        cb.on_train_end(out)
    return TrainingResult(out, adapter_path, metrics)


__all__ = ["TrainingResult", "active_adapter", "resolve_device", "train"]
