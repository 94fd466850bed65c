"""Training jobs over HTTP: submit, read, list, cancel, delete, events (JSON or server-sent), adapter, artifacts
and webhook deliveries. Each route translates HTTP to one call of the service layer (`api.services`) and back."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from api.deps import PrincipalDep, SessionDep, SettingsDep, StoreDep
from api.routes.shared import ERRORS, MULTIPART_BODY, IdempotencyKey, events_response, mark_replayed
from api.schemas import ArtifactsPublic, DryRunPublic, EventsPublic, JobPublic, JobsPublic, WebhookDeliveriesPublic
from api.services import deletion, downloads, present, submit
from core.jobs import client_side
from core.jobs.states import JobStatus


router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERRORS)


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    openapi_extra=MULTIPART_BODY,
    operation_id="jobs-create_job",
    responses={200: {"model": DryRunPublic, "description": "`dry_run=true`: what would happen; nothing is created"}},
)
async def create_job(
    request: Request,
    response: Response,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    idempotency_key: IdempotencyKey = None,
    dry_run: Annotated[bool, Query(description="Validate and estimate only; create nothing.")] = False,
) -> Any:
    """Submits a training job: `images` (1 to 64 files) and `spec` (JSON) as multipart/form-data.

    With `dry_run=true`, validates everything and answers (200) with the resolved config, the estimated
    GPU-seconds and the queue position the job would get, without creating anything. With an `Idempotency-Key`
    header, repeating the same request within 24 hours returns the same job (200); the same key with a different
    request answers 409.
    """
    if dry_run:
        plan = await submit.dry_run(
            request, owner_id=principal.id, session=session, settings=settings, kind="training"
        )
        return JSONResponse(plan.model_dump(mode="json"), status_code=200)
    submitted = await submit.submit(
        request, owner_id=principal.id, session=session, settings=settings, store=store,
        idempotency_key=idempotency_key, kind="training",
    )  # fmt: skip
    mark_replayed(response, submitted)
    return present.job_public(submitted.job, session)


@router.get("", response_model=JobsPublic, operation_id="jobs-read_jobs")
def read_jobs(
    principal: PrincipalDep,
    session: SessionDep,
    status: JobStatus | None = None,
    kind: Literal["training", "preview"] = "training",
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> JobsPublic:
    """The caller's jobs (training jobs, or previews with `kind=preview`), newest first; pass `next_cursor` back
    as `cursor` for the next page."""
    jobs, next_cursor = client_side.list_jobs(
        session=session, owner_id=principal.id, status=status, limit=limit, cursor=cursor, kind=kind
    )
    return JobsPublic(data=[present.job_public(j, session) for j in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic, operation_id="jobs-read_job")
def read_job(job_id: uuid.UUID, principal: PrincipalDep, session: SessionDep) -> JobPublic:
    """One job: status, queue position, progress, timestamps, resolved config, error, links."""
    return present.job_public(client_side.get_job(session=session, owner_id=principal.id, job_id=job_id), session)


@router.post("/{job_id}/cancel", response_model=JobPublic, operation_id="jobs-cancel_job")
def cancel_job(job_id: uuid.UUID, principal: PrincipalDep, session: SessionDep) -> JobPublic:
    """Cancels a queued job now, or stops a running one within one training step."""
    job = client_side.get_job(session=session, owner_id=principal.id, job_id=job_id)
    client_side.request_cancel(session=session, job=job)
    session.commit()
    return present.job_public(job, session)


@router.delete("/{job_id}", status_code=204, operation_id="jobs-delete_job")
def delete_job(job_id: uuid.UUID, principal: PrincipalDep, session: SessionDep, store: StoreDep) -> Response:
    """Cancels the job if needed and deletes everything stored for it."""
    deletion.delete_job(session, store, client_side.get_job(session=session, owner_id=principal.id, job_id=job_id))
    return Response(status_code=204)


@router.get(
    "/{job_id}/events",
    response_model=EventsPublic,
    operation_id="jobs-read_events",
    responses={200: {"content": {"text/event-stream": {}}}},
)
def read_events(
    request: Request,
    job_id: uuid.UUID,
    principal: PrincipalDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    after: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    accept: Annotated[str | None, Header()] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Any:
    """The job's events after `after`; with `Accept: text/event-stream`, a live server-sent stream.

    A key holds at most `DOPSD_MAX_STREAMS_PER_KEY` streams at once (429 `too_many_streams` beyond); a stream ends
    when its key is revoked, and after `DOPSD_STREAM_MAX_S`: reconnect with `Last-Event-ID` to continue.

    Types: queued, started, model_loaded, progress, checkpoint, sample (image and contact-sheet URLs, valid for
    `expires_in_s`), cancel_requested, requeued, succeeded, failed, canceled."""
    client_side.get_job(session=session, owner_id=principal.id, job_id=job_id)
    return events_response(
        request, job_id, principal.id, session, store, settings, after=after, limit=limit, accept=accept,
        last_event_id=last_event_id,
    )  # fmt: skip


@router.get(
    "/{job_id}/adapter",
    status_code=302,
    response_class=RedirectResponse,
    operation_id="jobs-read_adapter",
    responses={302: {"description": "redirect to a short-lived download URL of the safetensors file"}},
)
def read_adapter(
    job_id: uuid.UUID,
    principal: PrincipalDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    format: Literal["diffusers", "comfyui"] = "diffusers",
) -> RedirectResponse:
    """Redirects to a short-lived URL of the adapter: `format=diffusers` (default; `load_lora_weights`) or
    `format=comfyui` (ComfyUI's LoRA loader). A format the job was not asked to write answers 404."""
    job = downloads.succeeded_job(session=session, owner_id=principal.id, job_id=job_id)
    return RedirectResponse(downloads.adapter_url(job, format, store, settings.presigned_url_ttl_s), status_code=302)


@router.get("/{job_id}/artifacts", response_model=ArtifactsPublic, operation_id="jobs-read_artifacts")
def read_artifacts(
    job_id: uuid.UUID, principal: PrincipalDep, session: SessionDep, store: StoreDep, settings: SettingsDep
) -> ArtifactsPublic:
    """Every output of a succeeded job (adapter, config.json, metrics.json, samples) with short-lived URLs."""
    job = downloads.succeeded_job(session=session, owner_id=principal.id, job_id=job_id)
    return present.artifacts_public(job.artifacts, store, settings.presigned_url_ttl_s)


@router.get(
    "/{job_id}/webhook-deliveries", response_model=WebhookDeliveriesPublic, operation_id="jobs-read_webhook_deliveries"
)
def read_webhook_deliveries(
    job_id: uuid.UUID, principal: PrincipalDep, session: SessionDep
) -> WebhookDeliveriesPublic:
    """Every webhook delivery of the job (one per announced event) with each attempt: when, the receiver's
    status code or the error, and how long it took."""
    job = client_side.get_job(session=session, owner_id=principal.id, job_id=job_id)
    return present.deliveries_public(session, job)
