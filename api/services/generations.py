"""Submitting a generation: resolve the request against its preset (sizes, native steps and guidance, seeds), check
each adapter is a succeeded training job of the same key and preset, apply the key's generation limits, replay an
`Idempotency-Key`, record the queued generation and ring its queue's doorbell.

A generation is a job of kind `generation` on a queue of its own (`generate.<family>`), so it shares everything a
job has (events, stream, webhooks, cancel, delete, retention, idempotency) without a second lifecycle.
"""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.generation_schemas import MAX_PROMPTS, MAX_SEED, GenerationSpec
from api.services.submit import Submitted, check_key_limits, dispatch, find_replay
from core.config import Settings
from core.errors import Conflict, InvalidSpec, TooManyRequests
from core.jobs import client_side, idempotency
from core.jobs.models import GENERATION, TRAINING
from core.jobs.states import JobStatus
from core.queue import generation_queue_for_family
from core.storage import ADAPTER_FILES
from core.webhooks import validate_webhook
from dopsd.config import DOPSDConfig
from dopsd.presets import Preset, get_preset


ADAPTER_FILE = ADAPTER_FILES["diffusers"]


@dataclass(frozen=True)
class ResolvedGeneration:
    """A generation request with every default filled in: what the worker renders, as the job's `config`."""

    preset: Preset
    config: dict[str, Any]


def resolve(spec: GenerationSpec, *, session: Session, owner_id: uuid.UUID, settings: Settings) -> ResolvedGeneration:
    """The request resolved and checked: 400 for what the preset or the limits do not allow, 404 for an adapter
    of another key (or none), 409 for one that has not succeeded yet."""
    try:
        preset = get_preset(spec.preset)
    except ValueError as exc:
        raise InvalidSpec(str(exc), code="unknown_preset") from exc
    prompts = spec.prompts
    if len(prompts) > MAX_PROMPTS:
        raise InvalidSpec(f"at most {MAX_PROMPTS} prompts per generation, got {len(prompts)}")
    if spec.seeds is not None and spec.num_images is not None and spec.num_images != len(spec.seeds):
        raise InvalidSpec("give `seeds` or `num_images`, or both with `num_images` equal to the number of seeds")
    seeds = list(spec.seeds) if spec.seeds is not None else _random_seeds(spec.num_images or 1)
    images = len(prompts) * len(seeds)
    if images > settings.generation_max_images:
        raise InvalidSpec(
            f"{len(prompts)} prompt(s) x {len(seeds)} seed(s) = {images} images, more than the limit of "
            f"{settings.generation_max_images} per generation",
            code="too_many_images",
            details={"images": images, "limit": settings.generation_max_images},
        )
    width, height = _size(spec, preset)
    adapters = [_adapter(session, owner_id, ref.job_id, ref.scale, preset) for ref in spec.adapters]
    trigger = adapters[0]["trigger"] if adapters else None
    rendered = [_with_trigger(p, trigger) for p in prompts]
    unknown = [f"{p!r}: {'; '.join(preset.caption_problems(p))}" for p in rendered if preset.caption_problems(p)]
    if unknown:
        raise InvalidSpec(
            f"the {preset.name} model cannot read these prompts: {'; '.join(unknown)}",
            code="prompt_outside_vocabulary",
        )
    config: dict[str, Any] = {
        "preset": preset.name,
        "prompts": rendered,
        "seeds": seeds,
        "width": width,
        "height": height,
        "steps": spec.steps if spec.steps is not None else preset.native_sample_steps,
        "guidance_scale": spec.guidance_scale if spec.guidance_scale is not None else preset.native_guidance_scale,
        # What prompts are padded or cut to: the trainer's caption length, so images match its samples.
        "max_sequence_length": _caption_length(preset.name),
        "adapters": adapters,
    }
    config["batch_key"] = batch_key(config)
    return ResolvedGeneration(preset=preset, config=config)


def batch_key(config: dict[str, Any]) -> str:
    """What two generations must share to be rendered in the same pipeline calls: the preset, the size, the steps,
    the guidance and the adapters with their scales (prompts and seeds may differ)."""
    shared = {k: config[k] for k in ("preset", "width", "height", "steps", "guidance_scale", "max_sequence_length")}
    shared["adapters"] = [(a["job_id"], a["scale"]) for a in config["adapters"]]
    return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:32]


@functools.cache
def _caption_length(preset_name: str) -> int:
    """The caption length a job of the preset trains with (a full config resolution: made once per preset)."""
    return int(DOPSDConfig.for_preset(preset_name).student_max_sequence_length)


def _random_seeds(count: int) -> list[int]:
    return [secrets.randbelow(MAX_SEED + 1) for _ in range(count)]


def _size(spec: GenerationSpec, preset: Preset) -> tuple[int, int]:
    sizes = preset.generation_sizes()
    if spec.width is None and spec.height is None:
        return sizes[0]  # square, at the preset's training resolution
    if spec.width is None or spec.height is None:
        raise InvalidSpec("give both `width` and `height`, or neither (the preset's default size)")
    if (spec.width, spec.height) not in sizes:
        listed = ", ".join(f"{w}x{h}" for w, h in sizes)
        raise InvalidSpec(
            f"{spec.width}x{spec.height} is not one of {preset.name}'s sizes: {listed}",
            code="unsupported_size",
            details={"sizes": [[w, h] for w, h in sizes]},
        )
    return spec.width, spec.height


def _adapter(session: Session, owner_id: uuid.UUID, job_id: uuid.UUID, scale: float, preset: Preset) -> dict[str, Any]:
    """One adapter as the worker needs it: its job, scale, stored file and trigger word."""
    job = client_side.get_job(session=session, owner_id=owner_id, job_id=job_id)  # 404 for another key's job
    if job.kind != TRAINING:
        raise InvalidSpec(f"job {job_id} is a {job.kind}, not a training job with an adapter", code="not_an_adapter")
    if job.job_status != JobStatus.SUCCEEDED:
        raise Conflict(
            f"job {job_id} is {job.status}; its adapter can be used once it succeeded", code="adapter_not_ready"
        )
    if job.preset != preset.name:
        raise InvalidSpec(
            f"job {job_id} trained an adapter for {job.preset}, not for {preset.name}", code="adapter_preset_mismatch"
        )
    artifact = next((a for a in job.artifacts if a.name == ADAPTER_FILE), None)
    if artifact is None:
        raise Conflict(f"job {job_id} has no stored adapter", code="adapter_not_ready")
    return {
        "job_id": str(job.id),
        "scale": scale,
        "key": artifact.key,
        "size": artifact.size,
        "trigger": str(job.config.get("trigger") or ""),
    }


def _with_trigger(prompt: str, trigger: str | None) -> str:
    if "[V]" not in prompt:
        return prompt
    if not trigger:
        raise InvalidSpec("a prompt has `[V]` but no adapter with a trigger word is applied", code="no_trigger")
    return prompt.replace("[V]", trigger)


def request_hash(spec: GenerationSpec) -> str:
    """What makes two generation requests the same request (for `Idempotency-Key`): the request as sent."""
    body = json.dumps({"kind": GENERATION, **spec.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def check_generation_limits(*, session: Session, owner_id: uuid.UUID, settings: Settings) -> None:
    """The key's standing generation limit (429 `too_many_queued_jobs`), and its storage quota (403)."""
    queued = client_side.count_queued(session=session, owner_id=owner_id, generations=True)
    if queued >= settings.max_queued_generations_per_key:
        raise TooManyRequests(
            f"this key already has {settings.max_queued_generations_per_key} queued generations", retry_after_s=10,
            code="too_many_queued_jobs",
        )  # fmt: skip
    check_key_limits(session=session, owner_id=owner_id, settings=settings, incoming_bytes=0, queued=False)


async def submit_generation(
    spec: GenerationSpec,
    *,
    owner_id: uuid.UUID,
    session: Session,
    settings: Settings,
    idempotency_key: str | None,
) -> Submitted:
    """The one submission path of generations: replay, or resolve, check, record and dispatch."""
    digest = request_hash(spec)
    if idempotency_key:
        earlier = find_replay(session, owner_id, idempotency_key, digest, settings)
        if earlier is not None:
            return Submitted(earlier, replayed=True)
    webhook_events = await run_in_threadpool(
        validate_webhook, spec.webhook_url, spec.webhook_events, allow_private=settings.webhook_allow_private
    )
    resolved = resolve(spec, session=session, owner_id=owner_id, settings=settings)
    check_generation_limits(session=session, owner_id=owner_id, settings=settings)
    job_id = uuid.uuid4()
    try:
        job = client_side.create_job(
            session=session, job_id=job_id, owner_id=owner_id, kind=GENERATION, preset=resolved.preset.name,
            queue=generation_queue_for_family(resolved.preset.family), spec=spec.model_dump(mode="json"),
            config=resolved.config, images=[], webhook_url=spec.webhook_url, webhook_events=webhook_events,
        )  # fmt: skip
        job.total_steps = len(resolved.config["prompts"]) * len(resolved.config["seeds"])
        if idempotency_key:
            idempotency.record_idempotency(
                session=session, owner_id=owner_id, key=idempotency_key, request_hash=digest, job_id=job_id,
                ttl_s=settings.idempotency_ttl_s,
            )  # fmt: skip
        session.commit()
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won the race: answer with its generation.
        session.rollback()
        earlier = find_replay(session, owner_id, idempotency_key or "", digest, settings)
        if earlier is None:
            raise
        return Submitted(earlier, replayed=True)
    await dispatch(settings, job)
    return Submitted(job, replayed=False)
