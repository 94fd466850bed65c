"""Few-step renders for evaluation: the family's own Euler steps on its native schedule, from fixed noise, with the
teacher (the frozen base model with the reference in context) read at every state the student visits.

The render of a prompt is the image the unchanged pipeline gives for the same seed (a test checks it): the same
noise, schedule and update. Reading the teacher along the way costs one extra forward per state and gives the
teacher-student gap on the inference schedule for free.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from dopsd.full_weights import full_weights_of
from dopsd.lora import active_adapter
from dopsd.models.base import Cond, ModelFamily


@contextlib.contextmanager
def adapter_scope(family: ModelFamily, adapter: str | None) -> Iterator[None]:
    """Runs the block on `adapter` (`None`: the base model); a transformer without adapters is the base model,
    unless it is being fully fine-tuned (its weight sets stand in for the adapters)."""
    if getattr(family.transformer, "peft_config", None) or full_weights_of(family.transformer) is not None:
        with active_adapter(family.transformer, adapter):
            yield
    elif adapter is not None:
        raise ValueError(f"the model carries no adapter, so {adapter!r} cannot be evaluated")
    else:
        yield


@dataclass(frozen=True)
class Rollout:
    """What a batch of renders leaves: final latents and, where a teacher was read, the per-state gap figures."""

    latents: torch.Tensor  # [N, ...] final (clean) latents, CPU fp32
    gap: torch.Tensor | None  # [N, K] x0 MSE student vs teacher per state
    teacher_energy: torch.Tensor | None  # [N, K] mean squared teacher x0 per state
    student_x0_first: torch.Tensor | None  # [N, ...] x0 estimates at the first and last state (the gate uses them)
    teacher_x0_first: torch.Tensor | None
    student_x0_last: torch.Tensor | None
    teacher_x0_last: torch.Tensor | None
    forwards: int  # network forward passes spent (batched rows counted one by one)


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


@torch.no_grad()
def render(
    family: ModelFamily,
    *,
    noises: torch.Tensor,
    conds: Sequence[Cond],
    sigmas: Sequence[float],
    adapter: str | None,
    teacher_conds: Sequence[Cond] | None = None,
    batch_size: int = 4,
) -> Rollout:
    """Rolls `noises[i]` out with `conds[i]` on `adapter` along `sigmas` (ending at 0), `batch_size` rows at a time.

    With `teacher_conds`, the base model (adapters off) also predicts at each state with `teacher_conds[i]`; the
    student's steps are never changed by it.
    """
    if len(conds) != noises.shape[0] or (teacher_conds is not None and len(teacher_conds) != len(conds)):
        raise ValueError("one condition (and teacher condition) per noise")
    outs: list[torch.Tensor] = []
    gaps: list[torch.Tensor] = []
    energies: list[torch.Tensor] = []
    s_first: list[torch.Tensor] = []
    t_first: list[torch.Tensor] = []
    s_last: list[torch.Tensor] = []
    t_last: list[torch.Tensor] = []
    forwards = 0
    states = len(sigmas) - 1
    for start in range(0, len(conds), batch_size):
        x = noises[start : start + batch_size].to(family.device)
        rows = list(conds[start : start + batch_size])
        t_rows = list(teacher_conds[start : start + batch_size]) if teacher_conds is not None else None
        batch_gap, batch_energy = [], []
        for k in range(states):
            sigma, sigma_next = float(sigmas[k]), float(sigmas[k + 1])
            with adapter_scope(family, adapter), family.autocast():
                pred = family.predict(x, sigma, rows)
            forwards += len(rows)
            if t_rows is not None:
                with adapter_scope(family, None), family.autocast():
                    pred_t = family.predict(x, sigma, t_rows)
                forwards += len(rows)
                x0_s = family.x0_from_prediction(x, sigma, pred)
                x0_t = family.x0_from_prediction(x, sigma, pred_t)
                batch_gap.append(_mse(x0_s, x0_t).cpu())
                batch_energy.append(x0_t.float().pow(2).flatten(1).mean(1).cpu())
                if k == 0:
                    s_first.append(x0_s.float().cpu())
                    t_first.append(x0_t.float().cpu())
                if k == states - 1:
                    s_last.append(x0_s.float().cpu())
                    t_last.append(x0_t.float().cpu())
            x = family.euler_step(x, sigma, sigma_next, pred)
        outs.append(x.float().cpu())
        if t_rows is not None:
            gaps.append(torch.stack(batch_gap, dim=1))
            energies.append(torch.stack(batch_energy, dim=1))
    with_teacher = teacher_conds is not None
    return Rollout(
        latents=torch.cat(outs),
        gap=torch.cat(gaps) if with_teacher else None,
        teacher_energy=torch.cat(energies) if with_teacher else None,
        student_x0_first=torch.cat(s_first) if with_teacher else None,
        teacher_x0_first=torch.cat(t_first) if with_teacher else None,
        student_x0_last=torch.cat(s_last) if with_teacher else None,
        teacher_x0_last=torch.cat(t_last) if with_teacher else None,
        forwards=forwards,
    )
