"""Zero-shot previews: the base model shown the concept through the teacher's multimodal context, before any
training is paid for. A preview is a short job on the same workers; its images arrive as a `sample` event."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request, Response

from api.deps import PrincipalDep, SessionDep, SettingsDep, StoreDep
from api.routes.shared import ERRORS, MULTIPART_BODY, IdempotencyKey, mark_replayed
from api.schemas import ErrorBody, PreviewPublic
from api.services import present, submit
from core.errors import NotFound
from core.jobs import client_side


router = APIRouter(prefix="/v1/previews", tags=["previews"], responses=ERRORS)


@router.post(
    "",
    status_code=202,
    response_model=PreviewPublic,
    openapi_extra=MULTIPART_BODY,
    operation_id="previews-create",
    responses={403: {"model": ErrorBody, "description": "`storage_quota_exceeded`"}},
)
async def create_preview(
    request: Request,
    response: Response,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    idempotency_key: IdempotencyKey = None,
) -> PreviewPublic:
    """Renders the concept zero-shot: for each reference image (at most 8) and each `spec.validation_prompts`
    entry, the base model conditioned on the teacher context of (image + prompt) at the native few-step setting.

    Same upload, validation and limits as `POST /v1/jobs`, and it counts as one against the key's: its images
    spend the per-minute pixel budget and are stored against the storage quota (403 `storage_quota_exceeded`), and
    it waits in the key's queued and running jobs. The preview runs as a short job (watch `/v1/jobs/{id}/events`,
    or poll `GET /v1/previews/{id}` until `preview_images` is filled)."""
    submitted = await submit.submit(
        request, owner_id=principal.id, session=session, settings=settings, store=store,
        idempotency_key=idempotency_key, kind="preview",
    )  # fmt: skip
    mark_replayed(response, submitted)
    return present.preview_public(submitted.job, session, store, settings.presigned_url_ttl_s)


@router.get("/{job_id}", response_model=PreviewPublic, operation_id="previews-read")
def read_preview(
    job_id: uuid.UUID, principal: PrincipalDep, session: SessionDep, store: StoreDep, settings: SettingsDep
) -> PreviewPublic:
    """A preview: its status and, once it succeeded, its images with short-lived URLs."""
    job = client_side.get_job(session=session, owner_id=principal.id, job_id=job_id)
    if job.kind != "preview":
        raise NotFound(f"preview {job_id} not found", code="job_not_found")
    return present.preview_public(job, session, store, settings.presigned_url_ttl_s)
