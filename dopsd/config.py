"""`DOPSDConfig`: every knob of a D-OPSD training run, each declared once, resolved against a preset once, frozen.

A field is one annotated line of `DOPSDConfig`: its name and type, and in `setting(...)` its help text, bounds,
default (or `preset=True`: the preset supplies it) and, with `public=Public(...)`, its place in the REST API's job
spec. Everything else follows from those lines: the validation (`validation_errors`), the API's `JobSpec`
(`api.schemas`, built from `public_settings()`), the `dopsd train` flags (`dopsd.cli`) and the REST client's
options (`dopsd_client/spec_fields.json`, written by `write_client_spec_fields`).

A `DOPSDConfig` is always complete: build one with `DOPSDConfig.for_preset(preset, **given)`, which fills every
preset-defaulted field the caller left unset, or read a saved one back with `from_dict` / `load`. Importable
without torch or pydantic: the API validates job specs with it before anything is queued.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, dataclass_transform

from dopsd.presets import DEFAULT_PRESET, DEFAULT_VALIDATION_PROMPTS, TEACHER_CONTEXTS, get_preset


LossSpace = Literal["x0", "velocity"]
TeacherMode = Literal["ema", "frozen", "live"]
RolloutSchedule = Literal["distill4", "native", "released"]
KeepAdapter = Literal["last", "best"]
InitTeacher = Literal["adapter", "base"]
TeacherContext = Literal["vlm", "edit"]
MixedPrecision = Literal["auto", "no", "bf16"]
OutputFormat = Literal["diffusers", "comfyui"]
Device = Literal["auto", "cpu", "cuda"]
Finetune = Literal["lora", "full"]

# The released code's 4-step training roll-out, in sigma (1 = noise): model time t = 0, .1, .25, .5, then clean.
DISTILL4_SIGMAS: tuple[float, ...] = (1.0, 0.9, 0.75, 0.5, 0.0)

CLIENT_SPEC_FILE = Path(__file__).resolve().parent.parent / "dopsd_client" / "spec_fields.json"


# -- the vocabulary of a declaration ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """Limits on a number (`ge`, `gt`, `le`, `lt`, `multiple_of`) or on a length (`min_length`, `max_length`: the
    characters of a string or the items of a list). The names are pydantic's, so the API passes them on as is."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    multiple_of: int | None = None
    min_length: int | None = None
    max_length: int | None = None

    def tightened_by(self, other: Bounds) -> Bounds:
        """These bounds where `other` sets a bound in their place: a lower bound of `other` (`ge` or `gt`) replaces
        both of ours, an upper bound both upper ones, the rest one by one (the API's job spec tightens the library's
        limits this way: `rank >= 1` in the library, `1 <= rank <= 256` in the service)."""
        lower = (other.ge, other.gt) if (other.ge, other.gt) != (None, None) else (self.ge, self.gt)
        upper = (other.le, other.lt) if (other.le, other.lt) != (None, None) else (self.le, self.lt)
        return Bounds(
            ge=lower[0],
            gt=lower[1],
            le=upper[0],
            lt=upper[1],
            multiple_of=other.multiple_of if other.multiple_of is not None else self.multiple_of,
            min_length=other.min_length if other.min_length is not None else self.min_length,
            max_length=other.max_length if other.max_length is not None else self.max_length,
        )

    def as_kwargs(self) -> dict[str, float]:
        """The bounds that are set, as keyword arguments (of pydantic's `Field`, or a JSON document)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def violation(self, value: Any) -> str | None:
        """What `value` breaks (`must be >= 1`), or `None` when it keeps every bound."""
        if isinstance(value, str | list | tuple | dict):
            unit = "character" if isinstance(value, str) else "item"
            if self.min_length is not None and len(value) < self.min_length:
                return f"must have at least {_count(self.min_length, unit)}"
            if self.max_length is not None and len(value) > self.max_length:
                return f"must have at most {_count(self.max_length, unit)}"
            return None
        if not isinstance(value, int | float) or isinstance(value, bool):
            return None
        low_ok = (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
        high_ok = (self.le is None or value <= self.le) and (self.lt is None or value < self.lt)
        if not (low_ok and high_ok):
            return f"must be {self._range()}"
        if self.multiple_of is not None and value % self.multiple_of:
            return f"must be a multiple of {self.multiple_of}"
        return None

    def _range(self) -> str:
        low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
        high = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None
        if low is not None and high is not None:
            return f"in {low}, {high}"
        if low is not None:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        assert high is not None
        return ("<= " if high[-1] == "]" else "< ") + high[:-1]


def _count(n: int, unit: str) -> str:
    return f"{n} {unit}" + ("" if n == 1 else "s")


def _num(value: float | None) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Public:
    """A setting's place in the REST API's job spec (`api.schemas.JobSpec`).

    Args:
        name: the spec's name when it differs from the config's (`steps` for `max_train_steps`).
        description: the API document's text (it speaks to API users); `None` leaves the field without one.
        bounds: the service's limits, tightening the setting's own (see `Bounds.tightened_by`).
        items: the service's limits on the items of a list.
        type: the spec's type when it differs from the config's (the default: preset-defaulted fields take
            `None` for "the preset's", tuples are lists).
        default_factory: the spec's default when it differs (e.g. `{}` where the config holds `None`).
    """

    name: str | None = None
    description: str | None = None
    bounds: Bounds = Bounds()
    items: Bounds = Bounds()
    type: Any = None
    default_factory: Callable[[], Any] | None = None


@dataclass(frozen=True)
class Declaration:
    """What `setting(...)` says about one field (its name and type are the `DOPSDConfig` attribute's)."""

    help: str
    preset: bool
    bounds: Bounds
    items: Bounds
    public: Public | None
    aliases: tuple[str, ...]


_NO_DEFAULT: Any = dataclasses.MISSING


def setting(
    *,
    help: str,
    default: Any = _NO_DEFAULT,
    default_factory: Callable[[], Any] | None = None,
    preset: bool = False,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    multiple_of: int | None = None,
    min_length: int | None = None,
    max_length: int | None = None,
    items: Bounds = Bounds(),
    public: Public | None = None,
    aliases: tuple[str, ...] = (),
) -> Any:
    """Declares a `DOPSDConfig` field: its help text, default (`preset=True`: the preset's; the field is then
    required in a resolved config), bounds, the bounds of its list items, its job spec entry and extra flags."""
    if preset == (default is not _NO_DEFAULT or default_factory is not None):
        raise TypeError("a setting has either a default or `preset=True`")
    declaration = Declaration(
        help=help,
        preset=preset,
        bounds=Bounds(ge, gt, le, lt, multiple_of, min_length, max_length),
        items=items,
        public=public,
        aliases=aliases,
    )
    metadata = {"setting": declaration}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_T = typing.TypeVar("_T")


@dataclass_transform(kw_only_default=True, frozen_default=True, field_specifiers=(setting,))
def _config_class(cls: type[_T]) -> type[_T]:
    """`dataclass(frozen=True, kw_only=True)`, with `setting` known to type checkers as its field specifier."""
    return dataclass(frozen=True, kw_only=True)(cls)


# -- the declaration --------------------------------------------------------------------------------------------------


@_config_class
class DOPSDConfig:
    """The resolved configuration of one D-OPSD LoRA training run: every field set, validated, frozen.

    Build one with `DOPSDConfig.for_preset(preset, **given)` (unset preset-defaulted fields take the preset's
    values, see `dopsd.presets`), read one back with `from_dict` / `load`, change run paths with `with_changes`.
    The fields and what each one does are the declarations below (`dopsd train --help` prints them too).
    `output_formats`: `diffusers` is `pytorch_lora_weights.safetensors` (diffusers' module names, loads with
    `load_lora_weights`, always written since the others are converted from it); `comfyui` adds
    `pytorch_lora_weights_comfyui.safetensors` (the original models' names, kohya keys, ComfyUI's LoRA loader).
    """

    # Model and data
    preset: str = setting(
        default=DEFAULT_PRESET,
        help="Model preset (`dopsd models list`).",
        public=Public(description="Model preset; see GET /v1/presets."),
    )
    pretrained_model_name_or_path: str = setting(
        preset=True,
        help="Local folder or hub id of the base diffusers pipeline (default: the preset's).",
        aliases=("--base",),
    )
    teacher_encoder_path: str | None = setting(
        preset=True,
        help="Local folder or hub id of the teacher VLM (default: the preset's).",
        aliases=("--teacher-encoder",),
    )
    instance_data_dir: str | None = setting(
        default=None, help="Folder with the concept's reference images.", aliases=("--images",)
    )
    trigger: str = setting(
        default="sks",
        help="Trigger word that replaces `[V]` in captions.",
        public=Public(description="The word that names the concept.", bounds=Bounds(min_length=1, max_length=50)),
    )
    default_caption: str | None = setting(
        default="a photo of [V]",
        help="Caption for images without their own captions.",
        public=Public(bounds=Bounds(max_length=1000)),
        aliases=("--caption",),
    )
    captions: dict[str, list[str]] | None = setting(
        default=None,
        help="Mapping of image file name to a list of captions.",
        public=Public(
            description="Uploaded file name -> captions (several allowed).",
            type=dict[str, list[str]],
            default_factory=dict,
        ),
    )
    output_dir: str = setting(default="dopsd-output", help="Output folder.", aliases=("--out",))

    # Optimisation (released: AdamW (0.9, 0.999), eps 1e-8, wd 0, constant lr, no warmup, clip 1.0)
    max_train_steps: int = setting(
        preset=True,
        ge=1,
        help="Optimizer steps (preset default).",
        public=Public(
            name="steps", description="Optimizer steps (preset default if unset).", bounds=Bounds(le=10_000)
        ),
        aliases=("--steps",),
    )
    learning_rate: float = setting(
        preset=True,
        gt=0,
        help="Constant learning rate (preset default).",
        public=Public(bounds=Bounds(le=1e-2)),
        aliases=("--lr",),
    )
    train_batch_size: int = setting(
        default=1, ge=1, help="Roll-outs per micro-batch.", public=Public(bounds=Bounds(le=16))
    )
    gradient_accumulation_steps: int = setting(
        default=1, ge=1, help="Micro-batches per optimizer step.", public=Public(bounds=Bounds(le=64))
    )
    num_processes: int = setting(
        default=1,
        ge=1,
        help="Processes (one GPU each) that train the run together, data-parallel: the global batch is "
        "num_processes x train_batch_size x gradient_accumulation_steps. `dopsd train` launches them through "
        "torchrun (docs/distributed.md).",
        public=Public(
            description="GPUs the job trains on together (data-parallel); the global batch is num_processes x "
            "train_batch_size x gradient_accumulation_steps.",
            bounds=Bounds(le=8),
        ),
    )
    adam_beta1: float = setting(default=0.9, ge=0, lt=1, help="AdamW beta1.")
    adam_beta2: float = setting(default=0.999, ge=0, lt=1, help="AdamW beta2.")
    adam_epsilon: float = setting(default=1e-8, gt=0, help="AdamW epsilon.")
    adam_weight_decay: float = setting(
        default=0.0, ge=0, help="AdamW weight decay.", public=Public(bounds=Bounds(le=1))
    )
    max_grad_norm: float = setting(
        default=1.0, ge=0, help="Gradient clipping norm (0 disables).", public=Public(bounds=Bounds(le=100))
    )
    seed: int = setting(
        default=0,
        help="Seed of the LoRA init, the data order and the roll-out noise.",
        public=Public(bounds=Bounds(ge=0, le=2**31 - 1)),
    )

    # What is trained: a LoRA (the customized-concept setting) or every weight (the paper's domain adaptation)
    finetune: Finetune = setting(
        default="lora",
        help="`lora`: a student LoRA on the frozen base (default); `full`: every weight of the transformer, with a "
        "full EMA copy as the teacher; writes transformer/ (diffusers' save_pretrained) and, with "
        "extract_lora_rank, the difference to the base as a LoRA (docs/distributed.md, Full fine-tuning).",
        public=Public(
            description="`lora` (default) or `full`: every transformer weight trained; the output is the transformer "
            "in diffusers' format, and with `extract_lora_rank` also an adapter of its difference to the base."
        ),
    )
    extract_lora_rank: int | None = setting(
        default=None,
        ge=1,
        help="With finetune full: also write the difference to the base as a LoRA of this rank (a truncated SVD of "
        "each LoRA target layer's change), in output_formats, loadable like any adapter.",
        public=Public(bounds=Bounds(le=256)),
    )

    # LoRA (released: rank 64, alpha 128, gaussian init)
    rank: int = setting(preset=True, ge=1, help="LoRA rank (preset default).", public=Public(bounds=Bounds(le=256)))
    lora_alpha: float = setting(
        preset=True, gt=0, help="LoRA alpha (preset default).", public=Public(bounds=Bounds(le=1024))
    )
    lora_dropout: float = setting(default=0.0, ge=0, lt=1, help="LoRA dropout.", public=Public())
    output_formats: tuple[OutputFormat, ...] = setting(
        default=("diffusers", "comfyui"),
        min_length=1,
        help="Adapter files to write: `diffusers` (always written: the source of the others) and `comfyui` "
        "(pytorch_lora_weights_comfyui.safetensors, ComfyUI's key names).",
        public=Public(
            description="Adapter files to write: diffusers (`load_lora_weights`) and/or ComfyUI's LoRA loader.",
            bounds=Bounds(max_length=2),
        ),
    )

    # Method
    loss_space: LossSpace = setting(
        default="x0",
        help="`x0`: MSE of x0 predictions (released code); `velocity`: paper's v-MSE.",
        public=Public(),
    )
    teacher_mode: TeacherMode = setting(
        default="ema",
        help="`ema` adapter (default), `frozen` base model, or `live` copy of the student.",
        public=Public(),
    )
    ema_decay: float = setting(default=0.9999, ge=0, lt=1, help="Decay of the EMA teacher adapter.", public=Public())
    rollout_schedule: RolloutSchedule = setting(
        preset=True,
        help="`distill4`: sigmas 1, .9, .75, .5 -> 0 (Z-Image's released recipe); `native`: the pipeline's own schedule; "
        "`released`: the released code's (Z-Image: distill4; FLUX.2-klein: set_timesteps(4, mu), no explicit sigmas).",
        public=Public(),
    )
    teacher_context: TeacherContext = setting(
        preset=True,
        help="`vlm`: Qwen3-VL features of (image + caption); `edit`: FLUX.2's reference-image branch.",
        public=Public(),
    )
    student_max_sequence_length: int = setting(
        preset=True, ge=1, help="Token length of the caption features (the pipeline's own, 512)."
    )
    teacher_max_sequence_length: int = setting(
        default=1024, ge=16, help="Token limit of the teacher context (image tokens included)."
    )
    teacher_min_pixels: int = setting(preset=True, ge=0, help="Min pixels of the teacher's image input.")
    teacher_max_pixels: int = setting(preset=True, ge=0, help="Max pixels of the teacher's image input.")

    # Run control
    resolution: int = setting(
        preset=True,
        ge=16,
        multiple_of=16,
        help="Side of the square bucket; others keep its area.",
        public=Public(bounds=Bounds(ge=64, le=2048)),
    )
    checkpointing_steps: int = setting(
        preset=True, ge=0, help="Checkpoint every N steps (0: never).", public=Public(bounds=Bounds(le=10_000))
    )
    checkpoints_total_limit: int = setting(default=2, ge=1, help="Checkpoints kept on disk (oldest removed).")
    resume_from: str | None = setting(
        default=None,
        help="Checkpoint folder, or an output folder (its latest checkpoint), to resume.",
        aliases=("--resume",),
    )
    # In a service job this holds the earlier job's id (what its resolved config shows); its worker puts the folder
    # it downloaded that job's adapter and final samples to in its place.
    init_adapter: str | None = setting(
        default=None,
        min_length=1,
        help="Continue from an earlier adapter: its pytorch_lora_weights.safetensors, or the output folder of the "
        "run that wrote it (whose final samples the report's retention section renders again). The student and "
        "the teacher start from its weights; rank, alpha and target modules are the file's. A checkpoint to "
        "resume wins over it.",
    )
    init_teacher: InitTeacher = setting(
        default="adapter",
        help="The teacher adapter (EMA or frozen) of a run that continues an earlier adapter: `adapter` starts "
        "from that adapter's weights, as the student does; `base` from the base model, as the earlier run's EMA "
        "teacher nearly was (docs/evaluation.md, Retention, compares the two).",
    )
    sample_every: int = setting(
        preset=True,
        ge=0,
        help="Render samples every N steps (0: at end only).",
        public=Public(bounds=Bounds(le=10_000)),
    )
    validation_prompts: list[str] = setting(
        preset=True,
        items=Bounds(min_length=1),
        help="Sample prompts (`[V]` allowed); default: built from the trigger word.",
        public=Public(bounds=Bounds(max_length=16), items=Bounds(max_length=1000)),
    )
    sample_seeds: list[int] = setting(
        default_factory=lambda: [0, 1],
        min_length=1,
        items=Bounds(ge=0, lt=2**63),
        help="Seeds of the sample images.",
        public=Public(bounds=Bounds(max_length=8), items=Bounds(le=2**32 - 1)),
    )
    sample_steps: int = setting(
        preset=True,
        ge=1,
        help="Sampling steps (the model's native few-step).",
        public=Public(bounds=Bounds(le=100)),
    )
    gap_eval_seeds: int = setting(default=2, ge=0, help="Held-out noise seeds for the teacher-student gap.")

    # Evidence (docs/evaluation.md): the teacher gate before the first step, quick checks at sample steps, the report
    eval_seeds: int = setting(
        default=4,
        ge=0,
        help="Seeds of the evaluation report, base and adapter paired on each (0: no report, no quick checks).",
        public=Public(bounds=Bounds(le=8)),
    )
    prior_prompts: list[str] = setting(
        default_factory=list,
        items=Bounds(min_length=1),
        help="Prompts without the trigger, added to the built-in ones on which the report measures prior drift.",
        public=Public(bounds=Bounds(max_length=8), items=Bounds(max_length=1000)),
    )
    keep: KeepAdapter = setting(
        default="last",
        help="`last`: the adapter of the last step; `best`: of the evaluated sample step with the lowest held-out "
        "gap whose few-step quality is not degraded.",
        public=Public(),
    )
    force: bool = setting(
        default=False,
        help="Train even when the teacher gate finds that the model cannot see the concept in its references.",
        public=Public(),
    )
    eval_embedding_model: str | None = setting(
        default=None,
        help="Local folder of a CLIP or DINOv2 model for the report's similarity figures (never downloaded).",
    )
    fp8_base: bool = setting(
        default=False,
        help="FP8 matmuls of the frozen base's linear layers in the blocks (torchao float8 training, tensorwise "
        "scaling; a GPU of compute capability 8.9 or more, emulated on the CPU); LoRA runs only.",
    )
    compile_blocks: bool = setting(
        default=False,
        help="torch.compile the transformer's repeated blocks (diffusers' compile_repeated_blocks, dynamic shapes); "
        "the teacher, student and base variants compile in the first step and never again (metrics.json: compile).",
        public=Public(description="Compile the transformer's repeated blocks with torch.compile (GPU workers)."),
    )
    compile_backend: str = setting(
        default="inductor",
        min_length=1,
        help="torch.compile backend of compile_blocks (`aot_eager` traces without generating code: the CPU tests').",
    )
    mixed_precision: MixedPrecision = setting(default="auto", help="`bf16` on CUDA by default; `no`.")
    device: Device = setting(default="auto", help="`auto` picks CUDA when present.")
    gradient_checkpointing: bool | None = setting(
        default=None,
        help="Recompute activations in the backward pass (less memory, slower steps). Unset: off until a step runs "
        "out of GPU memory without it, then that step again with it, and on from there (several GPUs: on).",
    )

    def __post_init__(self) -> None:
        errors = validation_errors(self)
        if errors:
            raise ValueError("invalid DOPSDConfig: " + "; ".join(errors))
        for s in settings():  # JSON and the CLI give lists for tuples and ints for floats: store the declared type
            object.__setattr__(self, s.name, s.normalise(getattr(self, s.name)))

    @classmethod
    def for_preset(cls, preset: str = DEFAULT_PRESET, **given: Any) -> DOPSDConfig:
        """The config of a run of `preset`: the `given` fields, and for every preset-defaulted one left unset (or
        `None`) the preset's value. Raises `ValueError` naming unknown fields and every invalid value."""
        _refuse_unknown(given)
        chosen = get_preset(preset)
        defaults = chosen.config_defaults()
        values = {**replaced_defaults(chosen, given), **given}
        for s in settings():
            if s.declaration.preset and values.get(s.name) is None:
                values[s.name] = copy.deepcopy(defaults[s.name])
        return cls(preset=preset, **values)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DOPSDConfig:
        """The config a `to_dict` (a job row, a `config.json`) holds, as it is; unknown or missing keys are an
        error that names them."""
        _refuse_unknown(data)
        missing = [s.name for s in settings() if s.declaration.preset and s.name not in data]
        if missing:
            raise ValueError(f"missing DOPSDConfig fields: {', '.join(missing)} (build it with for_preset)")
        return cls(**data)

    def with_changes(self, **changes: Any) -> DOPSDConfig:
        """A copy with some fields replaced (validated again, not resolved again): e.g. a worker's run paths."""
        _refuse_unknown(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (what job rows and `config.json` hold)."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Writes the config as pretty JSON (saved beside every output)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> DOPSDConfig:
        """Reads a config written by `save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def default_validation_prompts() -> list[str]:
    """Held-out prompts that keep `[V]` and change scene, light and view, as the authors evaluate."""
    return list(DEFAULT_VALIDATION_PROMPTS)


# -- reading the declaration ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One declared field of `DOPSDConfig`: name, type, default and what `setting(...)` said about it."""

    name: str
    type: Any
    default: Any  # dataclasses.MISSING for preset-defaulted fields
    default_factory: Any  # dataclasses.MISSING unless the default is made afresh
    declaration: Declaration

    @property
    def help(self) -> str:
        """The setting's help text."""
        return self.declaration.help

    @property
    def spec_name(self) -> str:
        """The name of the setting in the job spec (its config name unless `Public.name` says otherwise)."""
        public = self.declaration.public
        return public.name if public is not None and public.name else self.name

    @property
    def value_type(self) -> Any:
        """The type without `None` (`int` for `int | None`)."""
        return _without_none(self.type)

    @property
    def choices(self) -> tuple[Any, ...] | None:
        """The allowed values of a `Literal` type, or of the items of a list or tuple of one."""
        base = self.value_type
        if typing.get_origin(base) in (list, tuple):
            base = typing.get_args(base)[0]
        return typing.get_args(base) if typing.get_origin(base) is Literal else None

    def default_value(self) -> Any:
        """A fresh copy of the default (`dataclasses.MISSING` for a preset-defaulted field)."""
        if self.default_factory is not dataclasses.MISSING:
            return self.default_factory()
        return copy.deepcopy(self.default)

    def normalise(self, value: Any) -> Any:
        """A valid value in the declared type: lists become tuples for tuple fields, ints floats for float ones."""
        base = self.value_type
        if value is None:
            return None
        if typing.get_origin(base) is tuple and isinstance(value, list):
            return tuple(value)
        if base is float and isinstance(value, int):
            return float(value)
        return value


@functools.cache
def settings() -> tuple[Setting, ...]:
    """Every declared field, in declaration order."""
    hints = typing.get_type_hints(DOPSDConfig)
    return tuple(
        Setting(f.name, hints[f.name], f.default, f.default_factory, f.metadata["setting"])
        for f in dataclasses.fields(DOPSDConfig)
    )


def public_settings() -> tuple[Setting, ...]:
    """The fields a client of the REST API may set, in declaration order."""
    return tuple(s for s in settings() if s.declaration.public is not None)


def replaced_defaults(preset: Any, given: Iterable[str]) -> dict[str, Any]:
    """The values `preset` puts in place of fields' fixed declared defaults (`shapes`: its trigger word and no
    default caption, since "sks" and "a photo of [V]" are outside its vocabulary), for the fields not in `given`.
    `for_preset` applies them; the API applies them to a spec's unset fields before it reads the captions."""
    named = set(given)
    return {
        s.name: copy.deepcopy(preset.defaults[s.name])
        for s in settings()
        if not s.declaration.preset and s.name in preset.defaults and s.name not in named
    }


def config_values_from_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A job spec's values under their config names (`steps` -> `max_train_steps`), ready for `for_preset`."""
    by_spec_name = {s.spec_name: s.name for s in public_settings()}
    unknown = sorted(set(spec) - set(by_spec_name))
    if unknown:
        raise ValueError(f"unknown job spec fields: {', '.join(unknown)}")
    return {by_spec_name[k]: v for k, v in spec.items()}


def _refuse_unknown(data: Mapping[str, Any]) -> None:
    known = {s.name for s in settings()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown DOPSDConfig fields: {', '.join(unknown)}")


def _without_none(tp: Any) -> Any:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else typing.Union[tuple(args)]  # noqa: UP007
    return tp


# -- validation from the declaration ----------------------------------------------------------------------------------


def _kind_error(value: Any, tp: Any) -> str | None:
    """What `value` should be to have type `tp` (`an integer`), or `None` when it has it."""
    if typing.get_origin(tp) is Literal:
        options = typing.get_args(tp)
        return None if value in options else "one of " + ", ".join(map(str, options))
    if tp is bool:
        return None if isinstance(value, bool) else "true or false"
    if tp is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "a finite number"
    if tp is str:
        return None if isinstance(value, str) else "a string"
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        item = typing.get_args(tp)[0]
        if not isinstance(value, list | tuple) or any(_kind_error(v, item) for v in value):
            return "a list of " + _plural(item)
        return None
    if origin is dict:
        return None if isinstance(value, dict) else "an object"
    return None


def _plural(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "values from " + ", ".join(map(str, typing.get_args(tp)))
    return {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(tp, "values")


def _field_errors(s: Setting, value: Any) -> list[str]:
    if value is None:
        return [] if s.value_type != s.type else [f"`{s.name}` must be set"]
    kind = _kind_error(value, s.value_type)
    if kind is not None:
        return [f"`{s.name}` must be {kind}, got {value!r}"]
    errors = []
    if (broken := s.declaration.bounds.violation(value)) is not None:
        errors.append(f"`{s.name}` {broken}, got {value!r}")
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            if (broken := s.declaration.items.violation(item)) is not None:
                errors.append(f"`{s.name}[{i}]` {broken}, got {item!r}")
    return errors


def _vocabulary_errors(cfg: DOPSDConfig, preset: Any) -> list[str]:
    """For a preset with a closed caption vocabulary (`shapes`): every caption and prompt it cannot encode."""
    if not preset.closed_vocabulary or not isinstance(cfg.trigger, str):
        return []
    texts: list[tuple[str, Any]] = [("default_caption", cfg.default_caption)]
    texts += [
        (f"captions[{n!r}]", c) for n, caps in (cfg.captions or {}).items() if isinstance(caps, list) for c in caps
    ]
    for name in ("validation_prompts", "prior_prompts"):
        value = getattr(cfg, name)
        texts += [(f"{name}[{i}]", p) for i, p in enumerate(value)] if isinstance(value, list) else []
    problems = [
        f"`{field_name}` {text!r}: {problem}"
        for field_name, text in texts
        if isinstance(text, str) and text.strip()
        for problem in preset.caption_problems(text, cfg.trigger)
    ]
    if problems:
        problems[-1] += f" (the {preset.name} model knows only these words: {', '.join(preset.vocabulary())})"
    return problems


def validation_errors(cfg: DOPSDConfig) -> list[str]:
    """Every problem of `cfg`, each naming its field: the declared types, choices and bounds, then the rules
    that span fields (the teacher context of the preset's family, min <= max pixels, the captions' shape)."""
    errors = [e for s in settings() for e in _field_errors(s, getattr(cfg, s.name))]
    try:
        preset = get_preset(cfg.preset)
    except ValueError as exc:
        errors.append(str(exc))
    else:
        allowed_contexts = TEACHER_CONTEXTS[preset.family]
        if cfg.teacher_context in typing.get_args(TeacherContext) and cfg.teacher_context not in allowed_contexts:
            errors.append(
                f"`teacher_context` {cfg.teacher_context!r} is not available for {preset.name}; "
                f"use one of {', '.join(allowed_contexts)}"
            )
        errors += _vocabulary_errors(cfg, preset)
    if isinstance(cfg.trigger, str) and (not cfg.trigger.strip() or any(c.isspace() for c in cfg.trigger.strip())):
        errors.append(f"`trigger` must be one word, got {cfg.trigger!r}")
    if isinstance(cfg.default_caption, str) and not cfg.default_caption.strip():
        errors.append("`default_caption` must not be empty")
    if isinstance(cfg.captions, dict):
        for name, caps in cfg.captions.items():
            if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
                errors.append(f"`captions[{name!r}]` must be a non-empty list of non-empty strings")
    if cfg.finetune == "full":
        if cfg.init_adapter is not None:
            errors.append("`init_adapter` continues a LoRA; `finetune: full` starts from the base model's weights")
        if cfg.keep == "best":
            errors.append("`keep: best` is for LoRA runs (it keeps a copy per evaluated step); use `keep: last`")
        if cfg.fp8_base:
            errors.append("`fp8_base` runs a frozen base in FP8; `finetune: full` trains every weight")
    elif cfg.extract_lora_rank is not None:
        errors.append("`extract_lora_rank` is for `finetune: full` (a LoRA run writes its adapter as it is)")
    pixels = (cfg.teacher_min_pixels, cfg.teacher_max_pixels)
    if all(isinstance(p, int) for p in pixels) and pixels[0] > pixels[1]:
        errors.append("`teacher_min_pixels` must not exceed `teacher_max_pixels`")
    if isinstance(cfg.validation_prompts, list) and not all(
        isinstance(p, str) and p.strip() for p in cfg.validation_prompts
    ):
        errors.append("`validation_prompts` must not contain empty prompts")
    if isinstance(cfg.prior_prompts, list) and isinstance(cfg.trigger, str):
        named = [p for p in cfg.prior_prompts if "[V]" in p or cfg.trigger.strip() in p.split()]
        if named:
            errors.append(f"`prior_prompts` must not name the concept (`[V]` or the trigger), got {named[0]!r}")
    return errors


# -- the REST client's copy of the public fields ----------------------------------------------------------------------


def _json_type(tp: Any) -> str:
    base = _without_none(tp)
    origin = typing.get_origin(base)
    if origin is Literal:
        return _json_type(type(typing.get_args(base)[0]))
    if origin in (list, tuple):
        return "array"
    if origin is dict:
        return "object"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}[base]


def client_spec_fields() -> list[dict[str, Any]]:
    """The public job spec fields as the REST client needs them (it may not import this package): spec name,
    JSON type (and item type), choices, help and extra flags. `dopsd_client/spec_fields.json` holds this list."""
    fields = []
    for s in public_settings():
        public = s.declaration.public
        assert public is not None
        base = s.value_type
        entry: dict[str, Any] = {"name": s.spec_name, "type": _json_type(base)}
        if typing.get_origin(base) in (list, tuple):
            entry["items"] = _json_type(typing.get_args(base)[0])
        if s.choices is not None:
            entry["choices"] = list(s.choices)
        entry["help"] = public.description or s.help
        entry["aliases"] = [a for a in s.declaration.aliases if a != "--" + s.spec_name.replace("_", "-")]
        fields.append(entry)
    return fields


def client_spec_json() -> str:
    """The text of `dopsd_client/spec_fields.json`."""
    return json.dumps({"fields": client_spec_fields()}, indent=2) + "\n"


def write_client_spec_fields(path: Path = CLIENT_SPEC_FILE) -> Path:
    """Regenerates the client's copy of the public fields after a declaration changed:
    `python -c "from dopsd.config import write_client_spec_fields; write_client_spec_fields()"`."""
    path.write_text(client_spec_json())
    return path
