"""Full fine-tuning's weights (`finetune: full`): the student is every parameter of the transformer itself; the EMA
teacher and the base model are whole sets of tensors kept beside it, put in place for a teacher or base forward
pass by pointing each parameter at their storage (no copy) and back.

The rest of the trainer speaks of adapters (`dopsd.lora.active_adapter(transformer, "teacher")`, `None` for the
base model, `adapter_state`, `load_adapter_state`); with full weights attached to the transformer those same calls
act on these sets, so the roll-out, the gap, the samples, the quick checks, the report and the checkpoints work
unchanged for both kinds of run.

Memory, per copy of the transformer's weights (Z-Image-Turbo's 6.15B parameters: 24.6 GB in fp32, 12.3 GB in bf16):
the student in fp32 (AdamW's master weights) with its fp32 gradient and AdamW's two fp32 moments, the EMA teacher
in fp32 (a (1 - 0.9999) step is far below bf16's resolution), and the base as loaded (bf16 on a GPU, no copy: the
loaded tensors themselves). That is 5 x 24.6 + 12.3 = 135 GB for Z-Image-Turbo before activations, on every rank:
one H200 holds it only without activations to spare, which is what sharding across ranks is for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch


_ATTRIBUTE = "_dopsd_full_weights"


@dataclass
class FullWeights:
    """The sets of tensors a fully fine-tuned transformer carries beside its own parameters (the student): the
    base model as loaded (`base`, in the loaded dtypes), and the EMA teacher (`teacher`; None for a frozen teacher,
    which is the base, or a live one, which is the student)."""

    base: dict[str, torch.Tensor]
    teacher: dict[str, torch.Tensor] | None


def attach_full_weights(transformer: torch.nn.Module, *, with_teacher: bool) -> FullWeights:
    """Makes every parameter of `transformer` trainable in fp32 (the student), keeps the loaded tensors as the base
    and, `with_teacher`, an fp32 copy of them as the EMA teacher. `detach_full_weights` undoes it."""
    base: dict[str, torch.Tensor] = {}
    for name, p in transformer.named_parameters():
        base[name] = p.data
        p.data = p.data.to(torch.float32, copy=True)  # storage of its own, even where the base is fp32 already
        p.requires_grad_(True)
    teacher = {name: tensor.to(torch.float32, copy=True) for name, tensor in base.items()} if with_teacher else None
    weights = FullWeights(base=base, teacher=teacher)
    setattr(transformer, _ATTRIBUTE, weights)
    return weights


def detach_full_weights(transformer: torch.nn.Module) -> None:
    """Puts the base model back as it was loaded (its own tensors, frozen) and forgets the student and teacher: a
    worker's cached model leaves a full fine-tuning run as it came."""
    weights = full_weights_of(transformer)
    if weights is None:
        return
    for name, p in transformer.named_parameters():
        p.data = weights.base[name]
        p.requires_grad_(False)
        p.grad = None
    delattr(transformer, _ATTRIBUTE)


def full_weights_of(transformer: torch.nn.Module) -> FullWeights | None:
    """The full weights attached to `transformer` (None: a LoRA run, or none)."""
    weights = getattr(transformer, _ATTRIBUTE, None)
    return weights if isinstance(weights, FullWeights) else None


@contextlib.contextmanager
def weights_in_place(transformer: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Runs the block with `tensors` as the transformer's weights (pointer swaps, no copy), then puts the student
    back. The student's autograd graph must not span the block: the roll-out back-propagates each state before its
    next teacher pass."""
    student = {name: p.data for name, p in transformer.named_parameters()}
    try:
        for name, p in transformer.named_parameters():
            p.data = tensors[name]
        yield
    finally:
        for name, p in transformer.named_parameters():
            p.data = student[name]


def student_state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every student weight, by parameter name."""
    return {name: p.detach().clone().contiguous() for name, p in transformer.named_parameters()}


def load_student_state(transformer: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copies `state` (from `student_state`) into the student's weights; a name missing on either side is an
    error."""
    named = dict(transformer.named_parameters())
    _same_names(named, state, "student")
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(state[name])


def load_teacher_state(weights: FullWeights, state: Mapping[str, torch.Tensor]) -> None:
    """Copies `state` into the EMA teacher's tensors."""
    if weights.teacher is None:
        raise ValueError("this run has no EMA teacher to load")
    _same_names(weights.teacher, state, "teacher")
    for name, tensor in weights.teacher.items():
        tensor.copy_(state[name])


def _same_names(ours: Mapping[str, object], theirs: Mapping[str, object], what: str) -> None:
    missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if missing or extra:
        raise ValueError(f"the {what} weights do not match the transformer: missing {missing[:5]}, extra {extra[:5]}")
