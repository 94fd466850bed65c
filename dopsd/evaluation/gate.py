"""The fail-fast gate: before the first training step, does the teacher carry information about the concept?

D-OPSD can teach no more than the teacher shows. On the base model, with the cached evaluation conditions, the gate
rolls the text-only student out on the inference schedule and reads the teacher (same base model, reference image in
context) at every state. Three figures:
- visibility (decides): how far the reference moves the model's first x0 prediction, relative to how far swapping
  the prompt for an unrelated one moves it. A teacher whose context is the student's own scores exactly 0.
- normalised gap: the teacher-student x0 gap along the roll-out, divided by the teacher's x0 energy (the
  evaluation's "before" figure).
- reference gain: whether the teacher's final x0 is closer to the encoded reference image than the student's
  (reported; on the random tiny models it is noise, so it does not decide until measured on real weights).
Its cost is bounded by `max_cases` roll-outs: 2 forwards per state per case, plus one.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch

from dopsd.evaluation.image_metrics import mse_per_sample
from dopsd.evaluation.inputs import EvaluationInputs
from dopsd.evaluation.render import adapter_scope, render
from dopsd.evaluation.thresholds import DEFAULT_THRESHOLDS, Thresholds
from dopsd.models.base import ModelFamily


BLIND_MESSAGE = (
    "the model cannot see your concept in its reference images; training would not learn it; "
    "try a preview, other images or another model"
)
DEFAULT_MAX_CASES = 4


@dataclass(frozen=True)
class VisibilityResult:
    """The gate's answer: `blind` and the figures, thresholds, cost and message behind it."""

    blind: bool
    visibility: float
    visibility_per_case: list[float]
    normalised_gap: float
    reference_gain: float
    teacher_closer_fraction: float
    cases: list[dict[str, Any]]
    thresholds: dict[str, float]
    message: str | None
    seconds: float
    forward_passes: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    def render_text(self) -> str:
        """One line for a terminal."""
        head = f"teacher {'BLIND' if self.blind else 'sees the concept'}"
        figures = (
            f"visibility {self.visibility:.3g} (blind below {self.thresholds['visibility_min']:.3g}), "
            f"normalised gap {self.normalised_gap:.3g}, reference gain {self.reference_gain:+.3g}"
        )
        return f"{head}: {figures}; {self.seconds:.2f} s" + (f"\n{self.message}" if self.message else "")


@torch.no_grad()
def teacher_visibility(
    family: ModelFamily,
    inputs: EvaluationInputs,
    *,
    max_cases: int = DEFAULT_MAX_CASES,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
    batch_size: int = 4,
) -> VisibilityResult:
    """Measures on the base model (adapters off) whether the teacher context shows the concept.

    Cases are (held-out prompt with its reference image, seed), prompts first so each reference is covered before
    a second seed is used, at most `max_cases` of them.
    """
    start = time.perf_counter()
    pairs = [(s, c) for s in range(len(inputs.seeds)) for c in range(len(inputs.concept_prompts))][:max_cases]
    noises = inputs.noises[[s for s, _ in pairs]]
    transformer = family.transformer
    was_training = bool(transformer.training)
    transformer.eval()
    try:
        rollout = render(
            family,
            noises=noises,
            conds=[inputs.concept_conds[c] for _, c in pairs],
            teacher_conds=[inputs.teacher_conds[c] for _, c in pairs],
            sigmas=inputs.sigmas,
            adapter=None,
            batch_size=batch_size,
        )
        # The prompt effect: the same first state with an unrelated prompt (a prior prompt) instead.
        sigma = float(inputs.sigmas[0])
        others = [inputs.prior_conds[c % len(inputs.prior_conds)] for _, c in pairs]
        firsts = []
        for i in range(0, len(pairs), batch_size):
            x = noises[i : i + batch_size].to(family.device)
            with adapter_scope(family, None), family.autocast():
                pred = family.predict(x, sigma, others[i : i + batch_size])
            firsts.append(family.x0_from_prediction(x, sigma, pred).float().cpu())
    finally:
        transformer.train(was_training)
    other_first = torch.cat(firsts)
    assert rollout.gap is not None and rollout.teacher_energy is not None
    assert rollout.student_x0_first is not None and rollout.teacher_x0_first is not None
    assert rollout.student_x0_last is not None and rollout.teacher_x0_last is not None
    image_effect = mse_per_sample(rollout.teacher_x0_first, rollout.student_x0_first)
    prompt_effect = mse_per_sample(other_first, rollout.student_x0_first)
    visibility = float(image_effect.sum() / prompt_effect.sum().clamp_min(1e-30))
    refs = torch.cat([inputs.reference_latents[inputs.case_references[c]] for _, c in pairs])
    d_teacher = mse_per_sample(rollout.teacher_x0_last, refs)
    d_student = mse_per_sample(rollout.student_x0_last, refs)
    gain = (d_student - d_teacher) / d_student.clamp_min(1e-30)
    blind = visibility < thresholds.visibility_min
    per_case = [float(image_effect[i] / prompt_effect[i].clamp_min(1e-30)) for i in range(len(pairs))]
    cases: list[dict[str, Any]] = [
        {
            "prompt": inputs.concept_prompts[c],
            "reference": inputs.reference_names[inputs.case_references[c]],
            "seed": inputs.seeds[s],
            "visibility": per_case[i],
            "normalised_gap": float(rollout.gap[i].sum() / rollout.teacher_energy[i].sum()),
            "reference_gain": float(gain[i]),
        }
        for i, (s, c) in enumerate(pairs)
    ]
    return VisibilityResult(
        blind=blind,
        visibility=visibility,
        visibility_per_case=per_case,
        normalised_gap=float(rollout.gap.sum() / rollout.teacher_energy.sum()),
        reference_gain=float(gain.mean()),
        teacher_closer_fraction=float((d_teacher < d_student).float().mean()),
        cases=cases,
        thresholds={"visibility_min": thresholds.visibility_min},
        message=BLIND_MESSAGE if blind else None,
        seconds=time.perf_counter() - start,
        forward_passes=rollout.forwards + len(pairs),
    )
