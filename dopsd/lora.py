"""Student and teacher LoRA adapters on one base transformer, and the diffusers-format adapter file.

peft quirk handled here: `set_adapter` makes the active adapter trainable and freezes the others, so every switch
goes through `active_adapter`, which always returns to the student and re-freezes the teacher.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dopsd.data import DataError
from dopsd.full_weights import full_state, full_weights_of, in_role, load_full_state


STUDENT_ADAPTER = "student"
TEACHER_ADAPTER = "teacher"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # the header key diffusers' `save_lora_weights` writes the config to


def make_lora_config(rank: int, alpha: float, dropout: float, target_modules: tuple[str, ...]) -> LoraConfig:
    """The method's LoRA: gaussian A, zero B, so a fresh adapter is exactly the base model."""
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )


def add_adapters(transformer: torch.nn.Module, config: LoraConfig, *, with_teacher: bool) -> None:
    """Adds the trainable student adapter and, for an EMA teacher, an identical frozen teacher adapter."""
    transformer.add_adapter(config, adapter_name=STUDENT_ADAPTER)  # type: ignore[operator]
    if with_teacher:
        # The teacher never drops out: its targets must not depend on the student's regulariser.
        teacher_config = copy.deepcopy(config)
        teacher_config.lora_dropout = 0.0
        with warnings.catch_warnings():  # peft warns on any second adapter; two are the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            transformer.add_adapter(teacher_config, adapter_name=TEACHER_ADAPTER)  # type: ignore[operator]
        load_adapter_state(transformer, TEACHER_ADAPTER, adapter_state(transformer, STUDENT_ADAPTER))
    transformer.set_adapter(STUDENT_ADAPTER)  # type: ignore[operator]
    # Both adapters stay fp32 under bf16 base weights: the student for AdamW, and the teacher because an EMA step
    # of (1 - 0.9999) is far below bf16's resolution and would round away.
    for p in student_parameters(transformer) + teacher_parameters(transformer):
        p.data = p.data.float()


def remove_adapters(transformer: torch.nn.Module) -> None:
    """Deletes the student and teacher adapters, leaving the base model as it was loaded (for model caching)."""
    names = [a for a in (STUDENT_ADAPTER, TEACHER_ADAPTER) if a in getattr(transformer, "peft_config", {})]
    with warnings.catch_warnings():  # peft warns that the active adapter goes away, which is the intent
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
        if names:
            transformer.delete_adapters(names)  # type: ignore[operator]


def _adapter_params(transformer: torch.nn.Module, adapter: str) -> list[tuple[str, torch.nn.Parameter]]:
    marker = f".{adapter}."
    return [(n, p) for n, p in transformer.named_parameters() if "lora_" in n and marker in n]


def _without_adapter(name: str, adapter: str) -> str:
    """`layers.0.to_q.lora_A.student.weight` -> `layers.0.to_q.lora_A.weight`: the name both adapters share."""
    parts = name.split(".")
    kept = [p for i, p in enumerate(parts) if not (p == adapter and i > 0 and parts[i - 1].startswith("lora_"))]
    return ".".join(kept)


class AdapterParameters(tuple[torch.nn.Parameter, ...]):
    """One adapter's LoRA parameters: a tuple the optimizer and gradient clipping take as is, which also knows
    each parameter's adapter-free name (`names`), so the EMA can pair teacher and student by name."""

    names: tuple[str, ...]

    def __new__(cls, named: Iterable[tuple[str, torch.nn.Parameter]]) -> AdapterParameters:
        pairs = list(named)
        self = super().__new__(cls, (p for _, p in pairs))
        self.names = tuple(n for n, _ in pairs)
        return self

    def named(self) -> dict[str, torch.nn.Parameter]:
        """Adapter-free name -> parameter."""
        return dict(zip(self.names, self, strict=True))


def adapter_parameters(transformer: torch.nn.Module, adapter: str) -> AdapterParameters:
    """`adapter`'s LoRA parameters in module order, named without the adapter segment."""
    return AdapterParameters((_without_adapter(n, adapter), p) for n, p in _adapter_params(transformer, adapter))


def student_parameters(transformer: torch.nn.Module) -> AdapterParameters:
    """The student's LoRA parameters, in a fixed order: all the optimizer ever sees."""
    return adapter_parameters(transformer, STUDENT_ADAPTER)


def teacher_parameters(transformer: torch.nn.Module) -> AdapterParameters:
    """The teacher adapter's parameters, named like the student's (empty without an EMA teacher)."""
    return adapter_parameters(transformer, TEACHER_ADAPTER)


def _named(params: AdapterParameters | Mapping[str, torch.Tensor], role: str) -> Mapping[str, torch.Tensor]:
    if isinstance(params, AdapterParameters):
        return params.named()
    if isinstance(params, Mapping):
        return params
    raise TypeError(f"ema_update pairs parameters by name: pass the {role}'s `AdapterParameters` or a name mapping")


@torch.no_grad()
def ema_update(
    teacher: AdapterParameters | Mapping[str, torch.Tensor],
    student: AdapterParameters | Mapping[str, torch.Tensor],
    decay: float,
) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, after every optimizer step.

    Pairs the tensors by name, strictly: a name on one side only, or a shape that differs, raises `ValueError`
    naming them (pairing by position would silently average unrelated layers if the orders ever differed).
    """
    t_named, s_named = _named(teacher, "teacher"), _named(student, "student")
    problems = [f"missing in student: {n}" for n in t_named if n not in s_named]
    problems += [f"missing in teacher: {n}" for n in s_named if n not in t_named]
    problems += [
        f"shape mismatch: {n} (teacher {tuple(t.shape)}, student {tuple(s_named[n].shape)})"
        for n, t in t_named.items()
        if n in s_named and t.shape != s_named[n].shape
    ]
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ValueError(f"teacher and student adapters do not pair up by name: {shown}")
    names = list(t_named)
    if not names:
        return
    targets = [t_named[n].data for n in names]
    torch._foreach_lerp_(
        targets, [s_named[n].data.to(t.dtype) for n, t in zip(names, targets, strict=True)], 1 - decay
    )


def teacher_adapter_for(mode: str, *, from_adapter: bool = False) -> str | None:
    """The adapter that plays the teacher in `teacher_mode` `mode`: `ema` the EMA adapter, `frozen` the model the
    run starts from (the base model: no adapter; with `from_adapter`, a run that continues an earlier adapter: the
    teacher adapter, loaded with those weights and never moved), `live` the student itself (run without gradient)."""
    adapters: dict[str, str | None] = {
        "ema": TEACHER_ADAPTER,
        "frozen": TEACHER_ADAPTER if from_adapter else None,
        "live": STUDENT_ADAPTER,
    }
    if mode not in adapters:
        raise ValueError(f"unknown teacher mode {mode!r}; use one of {', '.join(adapters)}")
    return adapters[mode]


def needs_teacher_adapter(mode: str, *, from_adapter: bool = False) -> bool:
    """Whether a run keeps a teacher adapter beside the student: the EMA teacher, and the frozen teacher of a run
    that continues an earlier adapter."""
    return teacher_adapter_for(mode, from_adapter=from_adapter) == TEACHER_ADAPTER


@contextlib.contextmanager
def active_adapter(transformer: torch.nn.Module, adapter: str | None) -> Iterator[None]:
    """Runs the block with `adapter` active (`None`: all adapters off = the base model), then back to the student.
    On a fully fine-tuned transformer (`dopsd.full_weights`) the teacher and the base are its weight sets."""
    full = full_weights_of(transformer)
    if full is not None:
        with in_role(full, adapter):
            yield
        return
    if adapter is None:
        transformer.disable_adapters()  # type: ignore[operator]
    elif adapter != STUDENT_ADAPTER:
        transformer.set_adapter(adapter)  # type: ignore[operator]
    try:
        yield
    finally:
        if adapter is None:
            transformer.enable_adapters()  # type: ignore[operator]
        transformer.set_adapter(STUDENT_ADAPTER)  # type: ignore[operator]
        for p in teacher_parameters(transformer):
            p.requires_grad_(False)


def adapter_state(transformer: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The adapter's LoRA tensors with peft's un-prefixed names (`layers.0.attention.to_q.lora_A.weight`); on a
    fully fine-tuned transformer, every weight of the student or of the EMA teacher."""
    full = full_weights_of(transformer)
    if full is not None:
        return full_state(full.module(adapter))
    state = get_peft_model_state_dict(transformer, adapter_name=adapter)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def load_adapter_state(transformer: torch.nn.Module, adapter: str, state: dict[str, torch.Tensor]) -> None:
    """Loads tensors from `adapter_state` into an existing adapter; any unmatched key is an error."""
    full = full_weights_of(transformer)
    if full is not None:
        load_full_state(full.module(adapter), state)
        return
    result = set_peft_model_state_dict(transformer, state, adapter_name=adapter)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    if unexpected:
        raise ValueError(f"adapter {adapter!r} has no place for: {', '.join(unexpected[:10])}")


def add_file_metadata(path: Path, extra: dict[str, str]) -> None:
    """Rewrites a safetensors file with `extra` added to its header metadata (atomically)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    metadata.update(extra)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_file_metadata(path: str | Path) -> dict[str, Any]:
    """The header metadata of a safetensors file, JSON values decoded."""
    with safe_open(str(path), framework="pt") as f:
        raw = dict(f.metadata() or {})
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# -- an earlier adapter to start from ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterFile:
    """A diffusers-format adapter file read back to start a run from: its LoRA tensors under peft's un-prefixed
    names (as `adapter_state` gives them), and its rank, alpha and target modules from the file's header."""

    path: Path
    state: dict[str, torch.Tensor]
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    metadata: dict[str, Any]

    @property
    def steps(self) -> int | None:
        """The optimizer steps of the run that wrote it (`dopsd.steps`), where it says."""
        steps = self.metadata.get("dopsd.steps")
        return int(steps) if isinstance(steps, int | float | str) and str(steps).isdigit() else None


def adapter_file_path(path: str | Path) -> Path:
    """The adapter file of `path`: the file itself, or the `pytorch_lora_weights.safetensors` of a run's output
    folder. A path that is neither is a `DataError` (code `invalid_init_adapter`)."""
    p = Path(path)
    file = p / LORA_WEIGHT_NAME if p.is_dir() else p
    if not file.is_file():
        raise DataError("invalid_init_adapter", f"no adapter file at {file}", file=str(path))
    return file


def lora_shape(metadata: Mapping[str, Any], file: str) -> tuple[int, float, tuple[str, ...]]:
    """Rank, alpha and target modules of a file's header (`read_file_metadata`): the peft `LoraConfig` diffusers
    writes under `lora_adapter_metadata` (keys `transformer.r`, `transformer.lora_alpha`, ...). A file without it,
    or with a LoRA variant this trainer does not train (rsLoRA, DoRA, per-module ranks or alphas), is refused."""
    config = metadata.get(ADAPTER_METADATA_KEY)
    if not isinstance(config, dict) or "transformer.r" not in config:
        raise DataError(
            "invalid_init_adapter",
            f"the adapter's header has no `{ADAPTER_METADATA_KEY}` with its rank, alpha and target modules (it is "
            "written by diffusers' `save_lora_weights(..., transformer_lora_adapter_metadata=...)`, as this trainer "
            "writes every adapter)",
            file=file,
        )
    for flag in ("use_rslora", "use_dora"):
        if config.get(f"transformer.{flag}"):
            raise DataError(
                "invalid_init_adapter", f"the adapter has {flag}=True, which this trainer does not train", file
            )
    if config.get("transformer.rank_pattern") or config.get("transformer.alpha_pattern"):
        raise DataError("invalid_init_adapter", "the adapter has per-module ranks or alphas", file=file)
    targets = config.get("transformer.target_modules")
    if not isinstance(targets, list) or not targets:
        raise DataError("invalid_init_adapter", "the adapter's header names no target modules", file=file)
    return int(config["transformer.r"]), float(config["transformer.lora_alpha"]), tuple(str(t) for t in targets)


def init_adapter_settings(path: str | Path) -> dict[str, Any]:
    """The `DOPSDConfig` values an adapter file fixes for a run that starts from it: `rank` and `lora_alpha`
    (`DOPSDConfig.for_preset(..., init_adapter=path, **init_adapter_settings(path))`)."""
    file = adapter_file_path(path)
    rank, alpha, _ = lora_shape(read_file_metadata(file), str(file))
    return {"rank": rank, "lora_alpha": alpha}


def read_adapter_file(path: str | Path, *, family: str | None = None) -> AdapterFile:
    """Reads an adapter file (or a run folder's) to start from. With `family`, a file whose header names another
    model family (`dopsd.family`) is refused; tensors are loaded to the CPU in fp32 (the dtype both adapters
    train in)."""
    file = adapter_file_path(path)
    try:
        metadata = read_file_metadata(file)
        tensors = load_file(str(file))
    except (OSError, ValueError, RuntimeError) as exc:  # safetensors raises its own errors as these
        raise DataError("invalid_init_adapter", f"unreadable adapter file: {exc}", file=str(file)) from exc
    rank, alpha, targets = lora_shape(metadata, str(file))
    written_for = metadata.get("dopsd.family")
    if family is not None and written_for is not None and written_for != family:
        raise DataError(
            "invalid_init_adapter",
            f"the adapter was trained for model family {written_for!r}; this run's model is {family!r}",
            file=str(file),
        )
    if not tensors or not all(".lora_A." in k or ".lora_B." in k for k in tensors):
        raise DataError("invalid_init_adapter", "the file holds tensors that are not LoRA A/B weights", file=str(file))
    state = {k.removeprefix("transformer."): v.float().contiguous() for k, v in tensors.items()}
    return AdapterFile(file, state, rank, alpha, targets, metadata)


def start_from(transformer: torch.nn.Module, state: dict[str, torch.Tensor], *, teacher: bool = True) -> None:
    """Loads an earlier adapter's tensors into the student and (`teacher`), where the run has one, the teacher
    adapter: both start from the same weights, as both start from the base model in a fresh run; without
    `teacher` the teacher adapter stays as `add_adapters` made it (the base model). Every module of the run's
    adapters must be in `state` (a partial load would leave gaussian A with zero B: silently the base model)."""
    expected = set(adapter_state(transformer, STUDENT_ADAPTER))
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        shown = [f"missing: {', '.join(missing[:5])}"] if missing else []
        shown += [f"not in this model: {', '.join(extra[:5])}"] if extra else []
        raise DataError("invalid_init_adapter", f"the adapter does not fit this model ({'; '.join(shown)})")
    shapes = adapter_state(transformer, STUDENT_ADAPTER)
    wrong = [k for k, v in state.items() if v.shape != shapes[k].shape]
    if wrong:
        raise DataError("invalid_init_adapter", f"the adapter's tensors have other shapes: {', '.join(wrong[:5])}")
    load_adapter_state(transformer, STUDENT_ADAPTER, state)
    if teacher and teacher_parameters(transformer):
        load_adapter_state(transformer, TEACHER_ADAPTER, state)
