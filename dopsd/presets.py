"""Named model presets: which base weights, which teacher encoder, and the per-model training defaults.

Importable without torch, so the API can validate job specs against the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from dopsd.data import buckets_for_resolution, resolve_caption
from dopsd.shapes import vocabulary as shapes_vocabulary


@dataclass(frozen=True)
class Preset:
    """A ready-made model setup and the training defaults that suit it.

    Args:
        name: the preset's public name (`--preset NAME`, `spec.preset`).
        family: the model family adapter that runs it (`z_image`, later `flux2`).
        description: one line for `dopsd models list`.
        base_model: a hub id or local folder of the diffusers pipeline; `tiny://...` builds the tiny model in code.
        teacher_encoder: a hub id or local folder of the VLM whose language model becomes the teacher encoder;
            `None` when the base model itself supplies the teacher context.
        device: the device the preset is meant for (`cuda` or `cpu`).
        dtype: the weight dtype on that device.
        min_image_side: the smallest accepted short side of a training image, in pixels.
        native_sample_steps: the number of denoising steps the distilled model was made for.
        native_guidance_scale: the guidance scale of that few-step setting, as the family's pipeline takes it
            (Z-Image-Turbo 0.0: `ZImagePipeline` runs CFG for any value above 0; distilled FLUX.2-klein 1.0:
            `Flux2KleinPipeline` ignores guidance for a distilled model and its model card samples at 1.0).
        text_encoder_layers: hidden-state layers whose concatenation is the text feature (FLUX.2); empty when
            the family uses its pipeline's fixed choice (Z-Image: the second to last).
        defaults: training values for `DOPSDConfig` fields the user left unset (`config_defaults()` adds the
            weights, sampling steps and prompts).
        step_seconds: the expected wall time of one D-OPSD step at the default resolution on the preset's device
            (an estimate for users, replaced by the service's own history once jobs of the preset ran).
        load_seconds: the expected time to load the models on a cold worker.
        embedding_model: a local folder of a CLIP or DINOv2 model for the evaluation report's similarity figures,
            or `shapes://embedder`, the shapes world's own (`None`: those figures are reported as not measured
            unless the run names one).
        prior_prompts: the prompts without the concept on which the report measures prior drift (`None`: the
            built-in open-vocabulary set, `dopsd.evaluation.prompts.PRIOR_PROMPTS`).
        closed_vocabulary: whether captions and prompts must use the model's own word list (the `shapes` world's
            caption encoder knows 12 words); `caption_problems` says what a text breaks.
        example_images: the folder under the repository's `examples/` holding reference images of a concept the
            model has never seen, bundled for a first job (`None`: none; photo presets take the user's own).
    """

    name: str
    family: str
    description: str
    base_model: str
    teacher_encoder: str | None
    device: Literal["cuda", "cpu"]
    dtype: Literal["bfloat16", "float32"]
    min_image_side: int
    native_sample_steps: int
    native_guidance_scale: float
    text_encoder_layers: tuple[int, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)
    step_seconds: float = 0.05
    load_seconds: float = 1.0
    embedding_model: str | None = None
    prior_prompts: tuple[str, ...] | None = None
    closed_vocabulary: bool = False
    example_images: str | None = None

    @property
    def is_tiny(self) -> bool:
        """Whether the model is built in code (no weights, no download, CPU-sized)."""
        return self.base_model.startswith("tiny://")

    def generation_sizes(self) -> list[tuple[int, int]]:
        """The (width, height) sizes a generation may ask for: the aspect buckets of the preset's training
        `resolution` (`dopsd.data.buckets_for_resolution`), square first; every side a multiple of 16, which both
        families' pipelines need (VAE factor 8 x patch 2)."""
        return buckets_for_resolution(int(self.defaults["resolution"]))

    def vocabulary(self) -> tuple[str, ...]:
        """The words a caption or prompt of a closed-vocabulary preset may use (empty: any text)."""
        if not self.closed_vocabulary:
            return ()
        return tuple(w for w in shapes_vocabulary.VOCABULARY if w != shapes_vocabulary.PAD)

    def caption_problems(self, text: str, trigger: str = "[V]") -> list[str]:
        """Why the preset's text encoder cannot take `text` (with `[V]` replaced by `trigger`): empty for an
        open-vocabulary model, else the words it does not know or a caption over its length."""
        if not self.closed_vocabulary:
            return []
        return shapes_vocabulary.caption_problems(resolve_caption(text, trigger) if text.strip() else text)

    def config_defaults(self) -> dict[str, Any]:
        """The value of every preset-defaulted `DOPSDConfig` field: the weights, the native sampling steps, the
        held-out prompts and the training `defaults`. `DOPSDConfig.for_preset` takes each one the user left unset."""
        return {
            "pretrained_model_name_or_path": self.base_model,
            "teacher_encoder_path": self.teacher_encoder,
            "sample_steps": self.native_sample_steps,
            "validation_prompts": list(DEFAULT_VALIDATION_PROMPTS),
            **self.defaults,
        }


# Held-out prompts that keep `[V]` and change scene, light and view, as the authors evaluate.
DEFAULT_VALIDATION_PROMPTS: tuple[str, ...] = (
    "a photo of [V]",
    "[V] on a beach at sunset",
    "a watercolor painting of [V]",
    "[V] in a snowy forest, seen from above",
)

# Released D-OPSD hyperparameters for Z-Image-Turbo (the method page): rank 64 / alpha 128, lr 1e-4 constant,
# 2,000 steps, checkpoints every 500, samples every 100, teacher images at 512^2..768^2 pixels.
_Z_IMAGE_TURBO = Preset(
    name="z-image-turbo",
    family="z_image",
    description="Z-Image-Turbo (6B, 8 steps) with Qwen3-VL-4B-Instruct as teacher encoder; bf16 on CUDA",
    base_model="Tongyi-MAI/Z-Image-Turbo",
    teacher_encoder="Qwen/Qwen3-VL-4B-Instruct",
    device="cuda",
    dtype="bfloat16",
    min_image_side=256,
    native_sample_steps=8,
    native_guidance_scale=0.0,
    defaults={
        "learning_rate": 1e-4,
        "rank": 64,
        "lora_alpha": 128.0,
        "resolution": 1024,
        "max_train_steps": 2000,
        "checkpointing_steps": 500,
        "sample_every": 100,
        "teacher_min_pixels": 512 * 512,
        "teacher_max_pixels": 768 * 768,
        "rollout_schedule": "distill4",
        "teacher_context": "vlm",
        "student_max_sequence_length": 512,
    },
    # 4 student forward/backward + 4 teacher forwards of the 6B transformer at 1024^2 (~1e15 FLOPs) at ~40% of
    # an H100's bf16 peak; see docs/performance.md for the measured figure.
    step_seconds=3.0,
    load_seconds=120.0,
)

# The toy models' training settings, chosen so that `dopsd train --preset tiny-z-image --steps 30` visibly closes
# the teacher-student gap on CPU in seconds (tests assert a fall of at least 30%): a higher learning rate and a
# small rank suit a toy model, and 64 px images with a small teacher image keep every step cheap.
_TINY_TRAINING: dict[str, Any] = {
    "learning_rate": 2e-3,
    "rank": 8,
    "lora_alpha": 16.0,
    "resolution": 64,
    "max_train_steps": 50,
    "checkpointing_steps": 0,
    "sample_every": 0,
    "teacher_min_pixels": 32 * 32,
    "teacher_max_pixels": 64 * 64,
}

_TINY_Z_IMAGE = Preset(
    name="tiny-z-image",
    family="z_image",
    description="Z-Image architecture at toy size, random weights built in code; fp32 on CPU, for tests and demos",
    base_model="tiny://z-image",
    teacher_encoder="tiny://qwen3-vl",
    device="cpu",
    dtype="float32",
    min_image_side=32,
    native_sample_steps=8,
    native_guidance_scale=0.0,
    defaults={
        **_TINY_TRAINING,
        "rollout_schedule": "distill4",
        "teacher_context": "vlm",
        "student_max_sequence_length": 512,
    },
)

# FLUX.2-klein (the method page): 4 native steps, guidance 1.0, the released code's roll-out (the scheduler's
# `set_timesteps(4, mu)` with the empirical mu and no explicit sigmas; `native` is the pipeline's own 4 sigmas), the editing branch as the teacher context, lr 2e-5 for ~3,000 steps, text features from Qwen3 layers
# 9, 18 and 27. The `vlm` teacher context uses Qwen3-VL of the matching size.
_KLEIN_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-5,
    "rank": 64,
    "lora_alpha": 128.0,
    "resolution": 1024,
    "max_train_steps": 3000,
    "checkpointing_steps": 500,
    "sample_every": 100,
    "teacher_min_pixels": 512 * 512,
    "teacher_max_pixels": 768 * 768,
    "rollout_schedule": "released",
    "teacher_context": "edit",
    "student_max_sequence_length": 512,
}


def _real_klein(size: str, text_encoder: str, vlm: str, step_seconds: float) -> Preset:
    """A real FLUX.2-klein preset; the sizes differ only in weights and encoders."""
    return Preset(
        name=f"flux2-klein-{size.lower()}",
        family="flux2_klein",
        description=f"FLUX.2-klein {size} (4 steps, {text_encoder} text encoder), edit-branch teacher; bf16 on CUDA",
        base_model=f"black-forest-labs/FLUX.2-klein-{size}",
        teacher_encoder=f"Qwen/{vlm}",
        device="cuda",
        dtype="bfloat16",
        min_image_side=256,
        native_sample_steps=4,
        native_guidance_scale=1.0,
        text_encoder_layers=(9, 18, 27),
        defaults=dict(_KLEIN_DEFAULTS),
        step_seconds=step_seconds,
        load_seconds=90.0,
    )


_FLUX2_KLEIN_4B = _real_klein("4B", "Qwen3-4B", "Qwen3-VL-4B-Instruct", step_seconds=1.0)
_FLUX2_KLEIN_9B = _real_klein("9B", "Qwen3-8B", "Qwen3-VL-8B-Instruct", step_seconds=2.2)
_TINY_FLUX2_KLEIN = Preset(
    name="tiny-flux2-klein",
    family="flux2_klein",
    description="FLUX.2-klein architecture at toy size, random weights built in code; fp32 on CPU",
    base_model="tiny://flux2-klein",
    teacher_encoder="tiny://qwen3-vl",
    device="cpu",
    dtype="float32",
    min_image_side=32,
    native_sample_steps=4,
    native_guidance_scale=1.0,
    text_encoder_layers=(1, 2, 3),
    defaults={
        **_KLEIN_DEFAULTS,
        **_TINY_TRAINING,
        # The pipeline pads prompts to this many tokens and feeds every row to the transformer: 64 instead of
        # 512 keeps the toy model fast on a CPU without changing any code path.
        "student_max_sequence_length": 64,
    },
)

# The `shapes` world (docs/replication.md): a pretrained 0.9M-parameter FLUX.2-klein transformer over 16x16 pixels
# that ships with the project, so a concept (the held-out plus-shaped cross, "[V]") is visibly learned on a CPU.
# Captions name the colours: "a red [V] on a blue background"; images without one are captioned from their colours.
_SHAPES = Preset(
    name="shapes",
    family="shapes",
    description="The shapes world's pretrained 4-step FLUX.2-klein model (0.9M parameters, 16x16 pixels) that ships "
    "with the project; fp32 on CPU, a concept learned in minutes",
    base_model="shapes://base",
    teacher_encoder=None,
    device="cpu",
    dtype="float32",
    min_image_side=16,
    native_sample_steps=4,
    native_guidance_scale=1.0,
    defaults={
        "learning_rate": 1e-3,
        "rank": 8,
        "lora_alpha": 16.0,
        "resolution": 16,
        "max_train_steps": 200,
        "checkpointing_steps": 0,
        "sample_every": 50,
        "teacher_min_pixels": 16 * 16,
        "teacher_max_pixels": 16 * 16,
        "rollout_schedule": "native",
        "teacher_context": "edit",
        "student_max_sequence_length": shapes_vocabulary.MAX_TOKENS,
        "trigger": shapes_vocabulary.TRIGGER,
        "default_caption": None,
        "validation_prompts": [
            "a red [V] on a blue background",
            "a blue [V] on a green background",
            "a green [V] on a red background",
        ],
    },
    step_seconds=0.2,
    load_seconds=0.5,
    embedding_model="shapes://embedder",  # a CNN that never saw the cross: the report's similarity figure
    prior_prompts=(
        "a red circle on a green background",
        "a blue square on a red background",
        "a green triangle on a blue background",
        "a green circle on a blue background",
    ),
    closed_vocabulary=True,
    example_images="shapes",
)

DEFAULT_PRESET = "tiny-z-image"
PRESETS: dict[str, Preset] = {
    p.name: p for p in (_Z_IMAGE_TURBO, _TINY_Z_IMAGE, _FLUX2_KLEIN_4B, _FLUX2_KLEIN_9B, _TINY_FLUX2_KLEIN, _SHAPES)
}
# Which teacher contexts each family can build.
TEACHER_CONTEXTS: dict[str, tuple[str, ...]] = {
    "z_image": ("vlm",),
    "flux2_klein": ("edit", "vlm"),
    "shapes": ("edit",),
}


def get_preset(name: str) -> Preset:
    """Looks a preset up by name; an unknown name is a `ValueError` that lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise ValueError(f"unknown preset `{name}`; known presets: {known}") from None
