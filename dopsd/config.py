"""`DOPSDConfig`: every knob of a D-OPSD training run, with the method's defaults and validation.

Importable without torch: the API validates job specs with it before anything is queued.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dopsd.presets import TEACHER_CONTEXTS, get_preset


LossSpace = Literal["x0", "velocity"]
TeacherMode = Literal["ema", "frozen", "live"]
RolloutSchedule = Literal["distill4", "native"]
TeacherContext = Literal["vlm", "edit"]
MixedPrecision = Literal["auto", "no", "bf16"]
OutputFormat = Literal["diffusers", "comfyui"]
Device = Literal["auto", "cpu", "cuda"]

# The released code's 4-step training roll-out, in sigma (1 = noise): model time t = 0, .1, .25, .5, then clean.
DISTILL4_SIGMAS: tuple[float, ...] = (1.0, 0.9, 0.75, 0.5, 0.0)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class DOPSDConfig:
    """Configuration of one D-OPSD LoRA training run.

    Fields left as `None` take the preset's default (see `dopsd.presets`); `resolved()` fills them in.

    > Model and data
    Args:
        preset: name of the model preset.
        pretrained_model_name_or_path: local folder (or hub id) of the diffusers base pipeline; overrides the preset.
        teacher_encoder_path: local folder (or hub id) of the VLM used as teacher encoder; overrides the preset.
        instance_data_dir: folder of the concept's reference images.
        trigger: the word that names the concept; replaces `[V]` in captions.
        default_caption: caption for images without their own captions.
        captions: file name -> captions (several per image allowed).
        output_dir: where the adapter, config, metrics, samples and checkpoints go.

    > Optimisation
        max_train_steps, learning_rate, train_batch_size, gradient_accumulation_steps, adam_*, max_grad_norm, seed.

    > LoRA
        rank, lora_alpha, lora_dropout.
        output_formats: adapter files to write. `diffusers` is `pytorch_lora_weights.safetensors` (diffusers'
            module names, loads with `load_lora_weights`); `comfyui` adds `pytorch_lora_weights_comfyui.safetensors`
            (the original models' names, kohya `lora_down`/`lora_up`/`alpha` keys, for ComfyUI's LoRA loader). The
            diffusers file is always written, since the ComfyUI file is converted from it.

    > Method (the D-OPSD loss, teacher and roll-out)
        loss_space, teacher_mode, ema_decay, rollout_schedule, student_max_sequence_length,
        teacher_max_sequence_length, teacher_min_pixels, teacher_max_pixels.

    > Run control
        resolution, checkpointing_steps, checkpoints_total_limit, resume_from, sample_every, validation_prompts,
        sample_seeds, sample_steps, gap_eval_seeds, mixed_precision, device, gradient_checkpointing.
    """

    # Model and data
    preset: str = field(default="tiny-z-image", metadata=_help("Model preset (`dopsd models list`)."))
    pretrained_model_name_or_path: str | None = field(
        default=None, metadata=_help("Local folder or hub id of the base diffusers pipeline (overrides the preset).")
    )
    teacher_encoder_path: str | None = field(
        default=None, metadata=_help("Local folder or hub id of the teacher VLM (overrides the preset).")
    )
    instance_data_dir: str | None = field(default=None, metadata=_help("Folder with the concept's reference images."))
    trigger: str = field(default="sks", metadata=_help("Trigger word that replaces `[V]` in captions."))
    default_caption: str | None = field(
        default="a photo of [V]", metadata=_help("Caption for images without their own captions.")
    )
    captions: dict[str, list[str]] | None = field(
        default=None, metadata=_help("Mapping of image file name to a list of captions.")
    )
    output_dir: str = field(default="dopsd-output", metadata=_help("Output folder."))

    # Optimisation (released: AdamW (0.9, 0.999), eps 1e-8, wd 0, constant lr, no warmup, clip 1.0)
    max_train_steps: int | None = field(default=None, metadata=_help("Optimizer steps (preset default if unset)."))
    learning_rate: float | None = field(default=None, metadata=_help("Constant learning rate (preset default)."))
    train_batch_size: int = field(default=1, metadata=_help("Roll-outs per micro-batch."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimizer step."))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1."))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW beta2."))
    adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW epsilon."))
    adam_weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm (0 disables)."))
    seed: int = field(default=0, metadata=_help("Seed of the LoRA init, the data order and the roll-out noise."))

    # LoRA (released: rank 64, alpha 128, gaussian init)
    rank: int | None = field(default=None, metadata=_help("LoRA rank (preset default)."))
    lora_alpha: float | None = field(default=None, metadata=_help("LoRA alpha (preset default)."))
    lora_dropout: float = field(default=0.0, metadata=_help("LoRA dropout."))
    output_formats: tuple[OutputFormat, ...] = field(
        default=("diffusers", "comfyui"),
        metadata=_help(
            "Adapter files to write: `diffusers` (always written: the source of the others) and `comfyui` "
            "(pytorch_lora_weights_comfyui.safetensors, ComfyUI's key names)."
        ),
    )

    # Method
    loss_space: LossSpace = field(
        default="x0", metadata=_help("`x0`: MSE of x0 predictions (released code); `velocity`: paper's v-MSE.")
    )
    teacher_mode: TeacherMode = field(
        default="ema", metadata=_help("`ema` adapter (default), `frozen` base model, or `live` copy of the student.")
    )
    ema_decay: float = field(default=0.9999, metadata=_help("Decay of the EMA teacher adapter."))
    rollout_schedule: RolloutSchedule | None = field(
        default=None,
        metadata=_help("`distill4`: sigmas 1, .9, .75, .5 -> 0 (Z-Image); `native`: the model's own (FLUX.2)."),
    )
    teacher_context: TeacherContext | None = field(
        default=None,
        metadata=_help("`vlm`: Qwen3-VL features of (image + caption); `edit`: FLUX.2's reference-image branch."),
    )
    student_max_sequence_length: int | None = field(
        default=None, metadata=_help("Token length of the caption features (the pipeline's own, 512).")
    )
    teacher_max_sequence_length: int = field(
        default=1024, metadata=_help("Token limit of the teacher context (image tokens included).")
    )
    teacher_min_pixels: int | None = field(default=None, metadata=_help("Min pixels of the teacher's image input."))
    teacher_max_pixels: int | None = field(default=None, metadata=_help("Max pixels of the teacher's image input."))

    # Run control
    resolution: int | None = field(default=None, metadata=_help("Side of the square bucket; others keep its area."))
    checkpointing_steps: int | None = field(default=None, metadata=_help("Checkpoint every N steps (0: never)."))
    checkpoints_total_limit: int = field(default=2, metadata=_help("Checkpoints kept on disk (oldest removed)."))
    resume_from: str | None = field(
        default=None, metadata=_help("Checkpoint folder, or an output folder (its latest checkpoint), to resume.")
    )
    sample_every: int | None = field(default=None, metadata=_help("Render samples every N steps (0: at end only)."))
    validation_prompts: list[str] | None = field(
        default=None, metadata=_help("Sample prompts (`[V]` allowed); default: built from the trigger word.")
    )
    sample_seeds: list[int] = field(default_factory=lambda: [0, 1], metadata=_help("Seeds of the sample images."))
    sample_steps: int | None = field(default=None, metadata=_help("Sampling steps (the model's native few-step)."))
    gap_eval_seeds: int = field(default=2, metadata=_help("Held-out noise seeds for the teacher-student gap."))
    mixed_precision: MixedPrecision = field(default="auto", metadata=_help("`bf16` on CUDA by default; `no`."))
    device: Device = field(default="auto", metadata=_help("`auto` picks CUDA when present."))
    gradient_checkpointing: bool | None = field(default=None, metadata=_help("Default: on for CUDA, off on CPU."))

    def __post_init__(self) -> None:
        if isinstance(self.output_formats, list):  # JSON and the CLI give a list; keep the field a tuple
            self.output_formats = tuple(self.output_formats)
        errors = self._validate()
        if errors:
            raise ValueError("invalid DOPSDConfig: " + "; ".join(errors))

    def _validate(self) -> list[str]:
        errors: list[str] = []

        def positive(name: str, value: float | None, strict: bool = True) -> None:
            if value is not None and (value <= 0 if strict else value < 0):
                errors.append(f"`{name}` must be {'> 0' if strict else '>= 0'}, got {value!r}")

        try:
            preset = get_preset(self.preset)
            allowed_contexts = TEACHER_CONTEXTS[preset.family]
            if self.teacher_context is not None and self.teacher_context not in allowed_contexts:
                errors.append(
                    f"`teacher_context` {self.teacher_context!r} is not available for {preset.name}; "
                    f"use one of {', '.join(allowed_contexts)}"
                )
        except ValueError as exc:
            errors.append(str(exc))
        for name in ("max_train_steps", "learning_rate", "train_batch_size", "gradient_accumulation_steps"):
            positive(name, getattr(self, name))
        for name in ("rank", "lora_alpha", "resolution", "sample_steps", "adam_epsilon"):
            positive(name, getattr(self, name))
        for name in ("adam_weight_decay", "max_grad_norm", "lora_dropout", "checkpointing_steps", "sample_every"):
            positive(name, getattr(self, name), strict=False)
        positive("checkpoints_total_limit", self.checkpoints_total_limit)
        positive("gap_eval_seeds", self.gap_eval_seeds, strict=False)
        for name in ("adam_beta1", "adam_beta2", "ema_decay"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                errors.append(f"`{name}` must be in [0, 1), got {value!r}")
        if self.lora_dropout >= 1.0:
            errors.append(f"`lora_dropout` must be < 1, got {self.lora_dropout!r}")
        if self.resolution is not None and self.resolution % 16:
            errors.append(f"`resolution` must be a multiple of 16, got {self.resolution}")
        for name, allowed in (
            ("loss_space", LossSpace),
            ("teacher_mode", TeacherMode),
            ("rollout_schedule", RolloutSchedule),
            ("teacher_context", TeacherContext),
            ("mixed_precision", MixedPrecision),
            ("device", Device),
        ):
            options = allowed.__args__  # type: ignore[attr-defined]
            if getattr(self, name) is not None and getattr(self, name) not in options:
                errors.append(f"`{name}` must be one of {', '.join(options)}, got {getattr(self, name)!r}")
        if not self.trigger.strip() or any(c.isspace() for c in self.trigger.strip()):
            errors.append(f"`trigger` must be one word, got {self.trigger!r}")
        if self.default_caption is not None and not self.default_caption.strip():
            errors.append("`default_caption` must not be empty")
        if self.captions is not None:
            for name, caps in self.captions.items():
                if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
                    errors.append(f"`captions[{name!r}]` must be a non-empty list of non-empty strings")
        if (self.student_max_sequence_length or 16) < 16 or self.teacher_max_sequence_length < 16:
            errors.append("`student_max_sequence_length` and `teacher_max_sequence_length` must be >= 16")
        if (
            self.teacher_min_pixels is not None
            and self.teacher_max_pixels is not None
            and self.teacher_min_pixels > self.teacher_max_pixels
        ):
            errors.append("`teacher_min_pixels` must not exceed `teacher_max_pixels`")
        if not self.sample_seeds:
            errors.append("`sample_seeds` must list at least one seed")
        elif not all(isinstance(s, int) and 0 <= s < 2**63 for s in self.sample_seeds):
            errors.append(f"`sample_seeds` must be integers in [0, 2**63), got {self.sample_seeds!r}")
        formats = OutputFormat.__args__  # type: ignore[attr-defined]
        if not isinstance(self.output_formats, tuple):
            errors.append(f"`output_formats` must be a list of {', '.join(formats)}, got {self.output_formats!r}")
        elif not self.output_formats:
            errors.append(f"`output_formats` must list at least one of {', '.join(formats)}")
        elif unknown_formats := [f for f in self.output_formats if f not in formats]:
            errors.append(f"`output_formats` must be a subset of {', '.join(formats)}, got {unknown_formats!r}")
        if self.validation_prompts is not None and not all(p.strip() for p in self.validation_prompts):
            errors.append("`validation_prompts` must not contain empty prompts")
        return errors

    def resolved(self) -> DOPSDConfig:
        """A copy with every unset field filled from the preset (and validated again)."""
        preset = get_preset(self.preset)
        updates: dict[str, Any] = {
            name: value for name, value in preset.defaults.items() if getattr(self, name, None) is None
        }
        if self.sample_steps is None:
            updates["sample_steps"] = preset.native_sample_steps
        if self.validation_prompts is None:
            updates["validation_prompts"] = default_validation_prompts()
        if self.pretrained_model_name_or_path is None:
            updates["pretrained_model_name_or_path"] = preset.base_model
        if self.teacher_encoder_path is None:
            updates["teacher_encoder_path"] = preset.teacher_encoder
        return dataclasses.replace(self, **updates)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DOPSDConfig:
        """Builds a config from a dict; unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DOPSDConfig fields: {', '.join(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Writes the config as pretty JSON (saved beside every output)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> DOPSDConfig:
        """Reads a config written by `save` (or by hand)."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def default_validation_prompts() -> list[str]:
    """Held-out prompts that keep `[V]` and change scene, light and view, as the authors evaluate."""
    return [
        "a photo of [V]",
        "[V] on a beach at sunset",
        "a watercolor painting of [V]",
        "[V] in a snowy forest, seen from above",
    ]
