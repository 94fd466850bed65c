"""Full fine-tuning's weights (`finetune: full`): three whole transformers where a LoRA run has one with adapters.
The student is an fp32 copy of the base, every parameter trained; the EMA teacher another fp32 copy, moved toward
the student after each step; the base is the transformer as loaded, untouched. The pipeline's `transformer` is the
student, and a teacher or base forward pass swaps the pipeline's module for the block (no copy).

The rest of the trainer speaks of adapters (`dopsd.lora.active_adapter(transformer, "teacher")`, `None` for the
base model, `adapter_state`, `load_adapter_state`); with full weights attached, those same calls act on these
modules, so the roll-out, the gap, the samples, the quick checks, the report and the checkpoints are the same code
for both kinds of run.

With several processes the student and the teacher are sharded across the ranks with FSDP2 (`fully_shard` on every
block of the transformer's block lists, then on the whole): each rank holds 1/N of their weights, gradients and
AdamW moments, and FSDP2 gathers a block's weights for its forward and backward and reduce-scatters (averages) its
gradients. The base stays whole on every rank. Rank 0's own work (samples, the gap, the report, checkpoints, the
outputs) runs on whole copies that every rank first gathers for it (`gathered`).

Memory, per copy of the transformer's weights (Z-Image-Turbo's 6.15B parameters: 24.6 GB in fp32, 12.3 GB in bf16):
the student in fp32 with its fp32 gradient and AdamW's two fp32 moments, the fp32 EMA teacher (a (1 - 0.9999) step
is far below bf16's resolution), and the base as loaded. On one process: 5 x 24.6 + 12.3 = 135 GB before
activations; on N ranks: 5 x 24.6 / N + 12.3 each (43 GB on 4 ranks), and rank 0 adds whole fp32 copies of student
and teacher (49 GB) while it samples, evaluates or writes.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch


_ATTRIBUTE = "_dopsd_full_weights"


@dataclass
class FullWeights:
    """The transformers of a full fine-tune and the pipeline whose `transformer` is the one forward passes run on.
    `teacher` is None for a frozen teacher (the base) or a live one (the student); `sharded` says whether the
    student and teacher are FSDP2-sharded across the ranks."""

    pipeline: Any
    base: torch.nn.Module
    student: torch.nn.Module
    teacher: torch.nn.Module | None
    sharded: bool = False

    def module(self, role: str | None) -> torch.nn.Module:
        """The transformer that plays `role`: `student`, `teacher`, or None for the base model."""
        if role is None:
            return self.base
        if role == "student":
            return self.student
        if role == "teacher" and self.teacher is not None:
            return self.teacher
        raise ValueError(f"this full fine-tuning run has no {role!r} weights")

    def base_tensors(self) -> dict[str, torch.Tensor]:
        """The base model's weights by parameter name (the student's and the teacher's names are the same)."""
        return {name: p.detach() for name, p in self.base.named_parameters()}


def attach_full_weights(pipeline: Any, *, with_teacher: bool, shard: bool = False) -> FullWeights:
    """Puts an fp32 student copy of `pipeline.transformer` in its place (every parameter trainable) and, `with_teacher`,
    makes a frozen fp32 teacher copy; `shard` shards both across the ranks of the running process group (FSDP2).
    `detach_full_weights` puts the base back."""
    base = pipeline.transformer
    student = _copy_of(base, trainable=True)
    teacher = _copy_of(base, trainable=False) if with_teacher else None
    if shard:
        for module in (student, teacher):
            if module is not None:
                shard_blocks(module)
    weights = FullWeights(pipeline=pipeline, base=base, student=student, teacher=teacher, sharded=shard)
    setattr(student, _ATTRIBUTE, weights)
    pipeline.transformer = student
    return weights


def _copy_of(base: torch.nn.Module, *, trainable: bool) -> torch.nn.Module:
    module = copy.deepcopy(base).to(torch.float32)
    module.requires_grad_(trainable)
    module.train(trainable)
    return module


def shard_blocks(module: torch.nn.Module) -> None:
    """FSDP2 on every block of each of the module's own block lists (the `nn.ModuleList`s among its children: the
    transformer's layers and refiners), then on the whole (what no block holds: embeddings, norms, the final
    layer)."""
    from torch.distributed.fsdp import fully_shard

    for child in module.children():
        if isinstance(child, torch.nn.ModuleList):
            for block in child:
                fully_shard(block)
    fully_shard(module)


def detach_full_weights(transformer: torch.nn.Module) -> None:
    """Puts the base model back in the pipeline as it was loaded and lets the student and teacher go: a worker's
    cached model leaves a full fine-tuning run as it came."""
    weights = full_weights_of(transformer)
    if weights is None:
        return
    weights.pipeline.transformer = weights.base
    delattr(weights.student, _ATTRIBUTE)


def full_weights_of(transformer: torch.nn.Module) -> FullWeights | None:
    """The full weights `transformer` is the student of (None: a LoRA run, or none)."""
    weights = getattr(transformer, _ATTRIBUTE, None)
    return weights if isinstance(weights, FullWeights) else None


@contextlib.contextmanager
def in_role(weights: FullWeights, role: str | None) -> Iterator[None]:
    """Runs the block with the pipeline's transformer playing `role` (see `FullWeights.module`), then the student
    again."""
    weights.pipeline.transformer = weights.module(role)
    try:
        yield
    finally:
        weights.pipeline.transformer = weights.student


@contextlib.contextmanager
def gathered(weights: FullWeights, *, is_main: bool) -> Iterator[None]:
    """For work rank 0 does alone (samples, the gap, the report, checkpoints, outputs): every rank takes part in
    gathering the sharded student and teacher, and inside the block rank 0's pipeline runs on whole, unsharded
    copies of them. Without sharding, the block runs on the modules as they are."""
    if not weights.sharded:
        yield
        return
    student_state = full_state(weights.student)
    teacher_state = full_state(weights.teacher) if weights.teacher is not None else None
    if not is_main:
        yield
        return
    sharded = (weights.student, weights.teacher)
    weights.student = _whole_copy(weights.base, student_state)
    weights.teacher = _whole_copy(weights.base, teacher_state) if teacher_state is not None else None
    setattr(weights.student, _ATTRIBUTE, weights)
    weights.pipeline.transformer = weights.student
    try:
        yield
    finally:
        weights.student, weights.teacher = sharded
        weights.pipeline.transformer = weights.student


def _whole_copy(base: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    module = _copy_of(base, trainable=False)
    module.load_state_dict(state)
    return module


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of `module`, whole, by parameter name: of a sharded module gathered on rank 0 (in host memory;
    the other ranks get an empty dict, and every rank must call it), of another one a copy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if full_weights_sharded(module):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return cast(dict[str, torch.Tensor], get_model_state_dict(module, options=options))
    return {name: p.detach().clone().contiguous() for name, p in module.named_parameters()}


def load_full_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Loads whole weights (from `full_state`, as every rank read them from a checkpoint) into `module`, sharded or
    not; a name missing on either side is an error."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    ours = {name for name, _ in module.named_parameters()}
    missing, extra = sorted(ours - set(state)), sorted(set(state) - ours)
    if missing or extra:
        raise ValueError(f"the weights do not match the transformer: missing {missing[:5]}, extra {extra[:5]}")
    set_model_state_dict(module, dict(state), options=StateDictOptions(full_state_dict=True))


def full_weights_sharded(module: torch.nn.Module) -> bool:
    """Whether `module` is FSDP2-sharded."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def weights_in_place(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Runs the block with `tensors` as an unsharded module's weights (pointer swaps, no copy), then its own again
    (the outputs write the student in its base's dtypes this way)."""
    own = {name: p.data for name, p in module.named_parameters()}
    try:
        for name, p in module.named_parameters():
            p.data = tensors[name]
        yield
    finally:
        for name, p in module.named_parameters():
            p.data = own[name]


def optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """AdamW's state for the student's parameters by parameter name, whole (of a sharded student gathered on rank 0,
    in host memory; every rank must call it), so a checkpoint resumes on any number of processes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=full_weights_sharded(module))
    return dict(get_optimizer_state_dict(module, optimizer, options=options))


def load_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Loads `optimizer_state` (as every rank read it from a checkpoint) for the student, sharded or not."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
