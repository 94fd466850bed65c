"""What a key uses and may use, for `GET /v1/usage`: its jobs, previews and generations by status, GPU-seconds, bytes stored
against its quota, and the per-key limits its requests meet."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from core.config import Settings
from core.jobs import usage


class KeyLimitsPublic(BaseModel):
    """The per-key limits of this service (the upload limits are per API process)."""

    max_queued_jobs: int = Field(description="Queued jobs and previews at once (429 `too_many_queued_jobs`).")
    max_running_jobs: int = Field(description="Jobs and previews that run at once; more wait queued.")
    max_uploads_at_once: int = Field(
        description="Uploads streaming or being checked at once (429 `too_many_uploads`)."
    )
    upload_pixels_per_minute: int = Field(
        description="Image pixels checked per minute, jobs, dry runs and previews alike (429 `upload_budget_exceeded`)."
    )
    max_image_pixels: int = Field(description="Pixels of one image (413 `image_too_large`).")
    max_request_pixels: int = Field(description="Pixels of all images of one request (413 `too_many_pixels`).")
    requests_per_minute: int = Field(description="Requests of every kind (429 `rate_limited`).")
    max_queued_generations: int = Field(description="Queued generations at once (429 `too_many_queued_jobs`).")
    max_running_generations: int = Field(description="Generations that run at once, apart from training jobs.")
    max_images_per_generation: int = Field(description="Prompts x seeds of one generation (422 `too_many_images`).")


class UsagePublic(BaseModel):
    """One key's usage and limits."""

    jobs: dict[str, int] = Field(description="Training jobs by status (deleted jobs excluded).")
    previews: dict[str, int] = Field(description="Previews by status (deleted ones excluded).")
    generations: dict[str, int] = Field(description="Generations by status (deleted ones excluded).")
    gpu_seconds: float = Field(description="GPU-seconds of every job and preview this key ran, deleted ones included.")
    stored_bytes: int = Field(description="Bytes stored across this key's jobs and previews now.")
    quota_bytes: int | None = Field(description="The storage quota (null: none).")
    available_bytes: int | None = Field(description="What a submission may still store (null: no quota).")
    limits: KeyLimitsPublic


def usage_public(*, session: Session, owner_id: uuid.UUID, settings: Settings) -> UsagePublic:
    """The key's usage (three aggregate queries) and the limits `settings` set."""
    used = usage.key_usage(session=session, owner_id=owner_id)
    quota = settings.max_stored_bytes_per_key or None
    return UsagePublic(
        jobs=used.jobs_by_status,
        previews=used.previews_by_status,
        generations=used.generations_by_status,
        gpu_seconds=round(used.gpu_seconds, 3),
        stored_bytes=used.stored_bytes,
        quota_bytes=quota,
        available_bytes=None if quota is None else max(0, quota - used.stored_bytes),
        limits=KeyLimitsPublic(
            max_queued_jobs=settings.max_queued_per_key,
            max_running_jobs=settings.max_running_per_key,
            max_uploads_at_once=settings.max_uploads_per_key,
            upload_pixels_per_minute=settings.upload_pixels_per_minute,
            max_image_pixels=settings.max_image_pixels,
            max_request_pixels=settings.max_request_pixels,
            requests_per_minute=settings.rate_limit_per_minute,
            max_queued_generations=settings.max_queued_generations_per_key,
            max_running_generations=settings.max_running_generations_per_key,
            max_images_per_generation=settings.generation_max_images,
        ),
    )
