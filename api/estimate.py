"""How long a job will hold a GPU worker, told before it runs (`POST /v1/jobs?dry_run=true`).

The cost of one D-OPSD step comes from the service's own history (the median of the preset's last finished jobs),
and from the preset's hint until a job of the preset has run. A sampling forward costs about 1/16 of a step: a
step is 4 student forward/backward passes (~3 forwards each) and 4 teacher forwards.
"""

from __future__ import annotations

import statistics
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.events import EventType, TrainingSucceededPayload, succeeded_payload
from core.jobs.models import Job, JobEvent
from core.jobs.states import JobStatus
from dopsd.presets import Preset


FORWARDS_PER_STEP = 16
HISTORY = 20


def observed_step_seconds(*, session: Session, preset: str) -> float | None:
    """The median seconds per training step of the preset's last succeeded training jobs, if any ran.

    The jobs are chosen on the job table first, so their `succeeded` events are read by job id (indexed) instead
    of scanning an event log that holds every progress event ever written.
    """
    recent = (
        select(Job.id)
        .where(Job.preset == preset, Job.kind == "training", Job.status == JobStatus.SUCCEEDED)
        .order_by(Job.finished_at.desc())
        .limit(HISTORY)
    )
    rows = session.scalars(
        select(JobEvent.data).where(
            JobEvent.job_id.in_(recent.scalar_subquery()), JobEvent.type == EventType.SUCCEEDED
        )
    )
    outcomes = [succeeded_payload(data) for data in rows]
    per_step = [
        o.train_s / o.steps for o in outcomes if isinstance(o, TrainingSucceededPayload) and o.train_s and o.steps
    ]
    return statistics.median(per_step) if per_step else None


def _step_seconds(session: Session, preset: Preset, config: dict[str, Any]) -> float:
    observed = observed_step_seconds(session=session, preset=preset.name)
    if observed is not None:
        return observed
    default_res = int(preset.defaults.get("resolution") or config["resolution"])
    scale = (int(config["resolution"]) / default_res) ** 2
    return preset.step_seconds * scale * int(config["train_batch_size"]) * int(config["gradient_accumulation_steps"])


def estimate_gpu_seconds(*, session: Session, preset: Preset, config: dict[str, Any]) -> float:
    """Model load + training steps + sample renders for a resolved training config."""
    step_s = _step_seconds(session, preset, config)
    image_s = int(config["sample_steps"]) * step_s / FORWARDS_PER_STEP
    prompts, seeds = len(config.get("validation_prompts") or []), len(config.get("sample_seeds") or [])
    steps = int(config["max_train_steps"])
    every = int(config.get("sample_every") or 0)
    renders = (steps // every if every else 0) + 1
    sample_s = (renders + 1) * prompts * seeds * image_s  # +1: the base model's images, rendered once
    return round(preset.load_seconds + steps * step_s + sample_s, 1)
