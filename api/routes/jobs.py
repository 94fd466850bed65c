"""Training jobs: submit, read, list, cancel, delete, events (JSON or server-sent), adapter and artifacts."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.deps import PrincipalDep, SessionDep, SettingsDep, StoreDep
from api.estimate import estimate_gpu_seconds
from api.public_events import public_event_data
from api.schemas import (
    ArtifactPublic,
    ArtifactsPublic,
    DryRunPublic,
    ErrorBody,
    EventPublic,
    EventsPublic,
    ImagePublic,
    JobError,
    JobPublic,
    JobsPublic,
    Progress,
    WebhookAttemptPublic,
    WebhookDeliveriesPublic,
    WebhookDeliveryPublic,
)
from api.submission import ValidatedJob, validate_submission
from api.uploads import UploadLimits, parse_multipart
from core.config import Settings
from core.errors import Conflict, NotFound, TooManyRequests
from core.jobs import service
from core.jobs.models import Job
from core.jobs.states import JobStatus
from core.queue import enqueue_training, queue_for_family
from core.storage import ADAPTER_FILES, LocalStore, S3Store, input_key, job_prefix
from core.webhooks import list_deliveries, validate_webhook


logger = logging.getLogger(__name__)

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 404, 409, 413, 415, 422, 429, 503)
}
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERRORS)

MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["images", "spec"],
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "spec": {"type": "string", "description": "JSON object of JobSpec fields"},
                    },
                }
            }
        },
    }
}


def to_public(job: Job, session: Session) -> JobPublic:
    """The job resource a client sees."""
    base = f"/v1/jobs/{job.id}"
    links = {"self": base, "events": f"{base}/events", "cancel": f"{base}/cancel"}
    if job.webhook_url:
        links["webhook_deliveries"] = f"{base}/webhook-deliveries"
    if job.status == JobStatus.SUCCEEDED.value:
        links["artifacts"] = f"{base}/artifacts"
        if job.kind == "training":
            links["adapter"] = f"{base}/adapter"
    started = job.started_at is not None
    return JobPublic(
        id=job.id,
        kind=job.kind,
        status=job.status,
        preset=job.preset,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        queue_position=service.queue_position(session=session, job=job),
        progress=Progress(step=job.step, total_steps=job.total_steps, loss=job.loss, eta_s=job.eta_s)
        if started
        else None,
        attempt=job.attempt,
        gpu_seconds=None if job.gpu_seconds is None else round(job.gpu_seconds, 3),
        cancel_requested=job.cancel_requested,
        images=[ImagePublic(name=i["name"], size=i["size"]) for i in job.images],
        config=job.config,
        error=JobError(code=job.error_code, message=job.error_message or "") if job.error_code is not None else None,
        links=links,
    )


def _request_hash(validated: ValidatedJob, kind: str) -> str:
    """What makes two submissions the same request: the kind, the spec and every file's name and bytes."""
    spec = json.dumps({"kind": kind, **validated.spec.model_dump(mode="json")}, sort_keys=True)
    digest = hashlib.sha256(spec.encode())
    for upload, _, _ in validated.images:
        digest.update(f"\n{upload.safe_name}:{upload.digest.hexdigest()}".encode())
    return digest.hexdigest()


def _idempotent_replay(
    session: Session, owner_id: uuid.UUID, key: str, request_hash: str, settings: Settings, response: Response
) -> Job | None:
    job = service.find_idempotent_job(
        session=session, owner_id=owner_id, key=key, request_hash=request_hash, ttl_s=settings.idempotency_ttl_s
    )
    if job is None:
        return None
    response.status_code = 200
    response.headers["Idempotent-Replayed"] = "true"
    return job


def _store_inputs(store: LocalStore | S3Store, job_id: uuid.UUID, validated: ValidatedJob) -> list[dict[str, Any]]:
    images = []
    for upload, ext, content_type in validated.images:
        key = input_key(job_id, upload.index, ext)
        size = store.put_file(key, upload.path, content_type)
        images.append({"name": upload.safe_name, "key": key, "size": size, "content_type": content_type})
    return images


async def submit(
    request: Request,
    response: Response,
    *,
    principal: Any,
    session: Session,
    settings: Settings,
    store: LocalStore | S3Store,
    idempotency_key: str | None,
    kind: str,
    dry_run: bool = False,
) -> Job | DryRunPublic:
    """The one submission path of training jobs and previews: stream and check the upload, then either answer
    what would happen (`dry_run`) or store the images and the job, and dispatch it. An invalid request leaves
    nothing behind; a replayed `Idempotency-Key` answers with the job it made."""
    limits = UploadLimits(
        max_files=settings.max_images,
        max_file_bytes=settings.max_file_bytes,
        max_total_bytes=settings.max_total_bytes,
        max_field_bytes=settings.max_spec_bytes,
    )
    with tempfile.TemporaryDirectory(prefix="dopsd-upload-") as tmp:
        upload = await parse_multipart(request, Path(tmp), limits)
        max_images = settings.max_images if kind == "training" else min(settings.max_images, MAX_PREVIEW_IMAGES)
        validated = await run_in_threadpool(validate_submission, upload, max_images)
        webhook_events = await run_in_threadpool(
            validate_webhook,
            validated.spec.webhook_url,
            validated.spec.webhook_events,
            allow_private=settings.webhook_allow_private,
        )
        if dry_run:
            return _dry_run(session, validated)
        request_hash = _request_hash(validated, kind)
        if idempotency_key:
            replay = _idempotent_replay(session, principal.id, idempotency_key, request_hash, settings, response)
            if replay is not None:
                return replay
        if service.count_queued(session=session, owner_id=principal.id) >= settings.max_queued_per_key:
            raise TooManyRequests(
                f"this key already has {settings.max_queued_per_key} queued jobs", retry_after_s=60,
                code="too_many_queued_jobs",
            )  # fmt: skip
        job_id = uuid.uuid4()
        try:
            images = await run_in_threadpool(_store_inputs, store, job_id, validated)
            job = service.create_job(
                session=session,
                job_id=job_id,
                owner_id=principal.id,
                kind=kind,
                preset=validated.preset.name,
                queue=queue_for_family(validated.preset.family),
                spec=validated.spec.model_dump(mode="json"),
                config=validated.config,
                images=images,
                webhook_url=validated.spec.webhook_url,
                webhook_events=webhook_events,
            )
            if idempotency_key:
                service.record_idempotency(
                    session=session, owner_id=principal.id, key=idempotency_key, request_hash=request_hash,
                    job_id=job_id, ttl_s=settings.idempotency_ttl_s,
                )  # fmt: skip
            session.commit()
        except IntegrityError:
            # A concurrent request with the same Idempotency-Key won the race: answer with its job.
            session.rollback()
            await run_in_threadpool(store.delete_prefix, job_prefix(job_id))
            assert idempotency_key is not None
            replay = _idempotent_replay(session, principal.id, idempotency_key, request_hash, settings, response)
            if replay is None:
                raise
            return replay
        except BaseException:
            session.rollback()
            await run_in_threadpool(store.delete_prefix, job_prefix(job_id))
            raise
    try:
        await run_in_threadpool(enqueue_training, settings, job.id, job.queue)
    except Exception as exc:
        # The job is committed and queued: the reaper sends its message once the broker is back.
        logger.warning("job %s: broker unreachable (%s); the reaper will dispatch it", job.id, type(exc).__name__)
    return job


MAX_PREVIEW_IMAGES = 8


def _dry_run(session: Session, validated: ValidatedJob) -> DryRunPublic:
    queue = queue_for_family(validated.preset.family)
    return DryRunPublic(
        config=validated.config,
        images=[ImagePublic(name=u.safe_name, size=u.size) for u, _, _ in validated.images],
        estimated_gpu_seconds=estimate_gpu_seconds(session=session, preset=validated.preset, config=validated.config),
        queue_position=service.queued_in(session=session, queue=queue) + 1,
    )


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
    idempotency_key: Annotated[str | None, Header(max_length=200, pattern=r"^[\x21-\x7e]+$")] = None,
    dry_run: Annotated[bool, Query(description="Validate and estimate only; create nothing.")] = False,
) -> Any:
    """Submits a training job: `images` (1 to 64 files) and `spec` (JSON) as multipart/form-data.

    With `dry_run=true`, validates everything and answers (200) with the resolved config, the estimated
    GPU-seconds and the queue position the job would get, without creating anything. With an `Idempotency-Key`
    header, repeating the same request within 24 hours returns the same job (200); the same key with a different
    request answers 409.
    """
    result = await submit(
        request, response, principal=principal, session=session, settings=settings, store=store,
        idempotency_key=idempotency_key, kind="training", dry_run=dry_run,
    )  # fmt: skip
    if isinstance(result, DryRunPublic):
        return JSONResponse(result.model_dump(mode="json"), status_code=200)
    return to_public(result, session)


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
    jobs, next_cursor = service.list_jobs(
        session=session, owner_id=principal.id, status=status, limit=limit, cursor=cursor, kind=kind
    )
    return JobsPublic(data=[to_public(j, session) for j in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic, operation_id="jobs-read_job")
def read_job(job_id: uuid.UUID, principal: PrincipalDep, session: SessionDep) -> JobPublic:
    """One job: status, queue position, progress, timestamps, resolved config, error, links."""
    return to_public(service.get_job(session=session, owner_id=principal.id, job_id=job_id), session)


@router.post("/{job_id}/cancel", response_model=JobPublic, operation_id="jobs-cancel_job")
def cancel_job(job_id: uuid.UUID, principal: PrincipalDep, session: SessionDep) -> JobPublic:
    """Cancels a queued job now, or stops a running one within one training step."""
    job = service.get_job(session=session, owner_id=principal.id, job_id=job_id)
    service.request_cancel(session=session, job=job)
    session.commit()
    return to_public(job, session)


@router.delete("/{job_id}", status_code=204, operation_id="jobs-delete_job")
def delete_job(job_id: uuid.UUID, principal: PrincipalDep, session: SessionDep, store: StoreDep) -> Response:
    """Cancels the job if needed and deletes everything stored for it."""
    job = service.get_job(session=session, owner_id=principal.id, job_id=job_id)
    if not job.job_status.is_terminal:
        service.request_cancel(session=session, job=job)
        session.commit()
    # Objects first: if storage is down the client gets 503 and can retry the delete; the job stays visible.
    store.delete_prefix(job_prefix(job.id))
    job.deleted = True  # hidden from now on; a worker still running it stops and deletes what it wrote
    session.commit()
    return Response(status_code=204)


def _event_public(e: Any, store: LocalStore | S3Store, ttl_s: int) -> EventPublic:
    data = public_event_data(e.type, e.data, store, ttl_s)
    return EventPublic(id=e.id, type=e.type, created_at=e.created_at, data=data)


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

    Types: queued, started, model_loaded, progress, checkpoint, sample (image and contact-sheet URLs, valid for
    `expires_in_s`), cancel_requested, requeued, succeeded, failed, canceled."""
    service.get_job(session=session, owner_id=principal.id, job_id=job_id)
    if accept and "text/event-stream" in accept:
        session.close()  # the stream opens its own short sessions: hold no transaction for its lifetime
        start = int(last_event_id) if last_event_id and re.fullmatch(r"[0-9]{1,18}", last_event_id) else after
        return StreamingResponse(
            _event_stream(request, job_id, start, store, settings.presigned_url_ttl_s),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    events = service.list_events(session=session, job_id=job_id, after=after, limit=limit)
    ttl = settings.presigned_url_ttl_s
    return EventsPublic(
        data=[_event_public(e, store, ttl) for e in events], next_after=events[-1].id if events else after
    )


async def _event_stream(
    request: Request, job_id: uuid.UUID, after: int, store: LocalStore | S3Store, ttl_s: int
) -> AsyncIterator[str]:
    """Server-sent events: polls the event log, ends once the job is finished and its events are sent."""
    factory = request.app.state.sessionmaker
    idle = 0.0
    while not await request.is_disconnected():

        def poll(cursor: int) -> tuple[list[EventPublic], bool]:
            with factory() as s:
                found = service.list_events(session=s, job_id=job_id, after=cursor, limit=200)
                events = [_event_public(e, store, ttl_s) for e in found]
                job = s.get(Job, job_id)
                done = job is None or job.deleted or JobStatus(job.status).is_terminal
                return events, done

        events, done = await run_in_threadpool(poll, after)
        for e in events:
            after = e.id
            yield f"id: {e.id}\nevent: {e.type}\ndata: {json.dumps(e.model_dump(mode='json'))}\n\n"
        if done and not events:
            return
        if events:
            idle = 0.0
        else:
            idle += 0.5
            if idle >= 15:
                idle = 0.0
                yield ": keep-alive\n\n"
        await asyncio.sleep(0.5)


def _succeeded_job(session: Session, owner_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    job = service.get_job(session=session, owner_id=owner_id, job_id=job_id)
    if job.status != JobStatus.SUCCEEDED.value:
        raise Conflict(f"job {job.id} is {job.status}; artifacts exist once it succeeded", code="job_not_finished")
    return job


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
    job = _succeeded_job(session, principal.id, job_id)
    adapter = next((a for a in job.artifacts if a.name == ADAPTER_FILES[format]), None)
    if adapter is None:
        raise NotFound(
            f"job {job.id} has no {format} adapter (see spec.output_formats)", code="adapter_format_not_written"
        )
    url = store.download_url(adapter.key, filename=adapter.name, ttl_s=settings.presigned_url_ttl_s)
    return RedirectResponse(url, status_code=302)


@router.get("/{job_id}/artifacts", response_model=ArtifactsPublic, operation_id="jobs-read_artifacts")
def read_artifacts(
    job_id: uuid.UUID, principal: PrincipalDep, session: SessionDep, store: StoreDep, settings: SettingsDep
) -> ArtifactsPublic:
    """Every output of a succeeded job (adapter, config.json, metrics.json, samples) with short-lived URLs."""
    job = _succeeded_job(session, principal.id, job_id)
    ttl = settings.presigned_url_ttl_s
    return ArtifactsPublic(
        data=[
            ArtifactPublic(
                name=a.name,
                kind=a.kind,
                size=a.size,
                content_type=a.content_type,
                url=store.download_url(a.key, filename=a.name.rsplit("/", 1)[-1], ttl_s=ttl),
                expires_in_s=ttl,
            )
            for a in job.artifacts
        ]
    )


@router.get(
    "/{job_id}/webhook-deliveries", response_model=WebhookDeliveriesPublic, operation_id="jobs-read_webhook_deliveries"
)
def read_webhook_deliveries(
    job_id: uuid.UUID, principal: PrincipalDep, session: SessionDep
) -> WebhookDeliveriesPublic:
    """Every webhook delivery of the job (one per announced event) with each attempt: when, the receiver's
    status code or the error, and how long it took."""
    service.get_job(session=session, owner_id=principal.id, job_id=job_id)
    return WebhookDeliveriesPublic(
        data=[
            WebhookDeliveryPublic(
                id=d.id,
                event_id=d.event_id,
                event_type=d.event_type,
                url=d.url,
                status=d.status,
                next_attempt_at=d.next_attempt_at if d.status == "pending" else None,
                attempts=[WebhookAttemptPublic.model_validate(a) for a in d.attempts],
            )
            for d in list_deliveries(session=session, job_id=job_id)
        ]
    )


__all__ = ["Settings", "router"]
