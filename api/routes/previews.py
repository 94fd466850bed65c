"""Zero-shot previews: the base model shown the concept through the teacher's multimodal context, before any
training is paid for. A preview is a short job on the same workers; its images arrive as a `sample` event."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from sqlalchemy import select

from api.deps import PrincipalDep, SessionDep, SettingsDep, StoreDep
from api.routes.jobs import ERRORS, MULTIPART_BODY, submit, to_public
from api.schemas import DryRunPublic, PreviewImagePublic, PreviewPublic
from core.errors import NotFound
from core.jobs import service
from core.jobs.models import Job, JobEvent
from core.storage import LocalStore, S3Store


router = APIRouter(prefix="/v1/previews", tags=["previews"], responses=ERRORS)


def _preview_public(job: Job, session: SessionDep, store: LocalStore | S3Store, ttl_s: int) -> PreviewPublic:
    public = to_public(job, session)
    images: list[PreviewImagePublic] = []
    if job.status == "succeeded":
        event = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.type == "sample").order_by(JobEvent.id.desc())
        ).first()
        for image in event.data.get("images", []) if event else []:
            url = store.download_url(image["key"], filename=image["name"].rsplit("/", 1)[-1], ttl_s=ttl_s)
            images.append(
                PreviewImagePublic(prompt=image["prompt"], seed=image["seed"], source=image["source"] or "", url=url)
            )
    return PreviewPublic(**public.model_dump(), preview_images=images)


@router.post(
    "", status_code=202, response_model=PreviewPublic, openapi_extra=MULTIPART_BODY, operation_id="previews-create"
)
async def create_preview(
    request: Request,
    response: Response,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    idempotency_key: Annotated[str | None, Header(max_length=200, pattern=r"^[\x21-\x7e]+$")] = None,
) -> PreviewPublic:
    """Renders the concept zero-shot: for each reference image (at most 8) and each `spec.validation_prompts`
    entry, the base model conditioned on the teacher context of (image + prompt) at the native few-step setting.

    Same upload, validation and limits as `POST /v1/jobs`; the preview runs as a short job (watch
    `/v1/jobs/{id}/events`, or poll `GET /v1/previews/{id}` until `preview_images` is filled)."""
    job = await submit(
        request, response, principal=principal, session=session, settings=settings, store=store,
        idempotency_key=idempotency_key, kind="preview",
    )  # fmt: skip
    assert not isinstance(job, DryRunPublic)
    return _preview_public(job, session, store, settings.presigned_url_ttl_s)


@router.get("/{job_id}", response_model=PreviewPublic, operation_id="previews-read")
def read_preview(
    job_id: uuid.UUID, principal: PrincipalDep, session: SessionDep, store: StoreDep, settings: SettingsDep
) -> PreviewPublic:
    """A preview: its status and, once it succeeded, its images with short-lived URLs."""
    job = service.get_job(session=session, owner_id=principal.id, job_id=job_id)
    if job.kind != "preview":
        raise NotFound(f"preview {job_id} not found", code="job_not_found")
    return _preview_public(job, session, store, settings.presigned_url_ttl_s)
