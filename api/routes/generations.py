"""Generations over HTTP: images from a preset's base model with the key's trained adapters. Submit (JSON), read,
list, cancel, delete, events (JSON or server-sent) and webhook deliveries, in the shape of the jobs API."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from sqlalchemy.orm import Session

from api.deps import PrincipalDep, SessionDep, SettingsDep, StoreDep
from api.generation_schemas import GenerationPublic, GenerationSpec, GenerationsPublic
from api.routes.shared import ERRORS, IdempotencyKey, events_response, mark_replayed
from api.schemas import EventsPublic, WebhookDeliveriesPublic
from api.services import deletion, present
from api.services.generations import submit_generation
from api.services.present_generation import generation_public
from core.errors import NotFound
from core.jobs import client_side
from core.jobs.models import GENERATION, Job
from core.jobs.states import JobStatus


router = APIRouter(prefix="/v1/generations", tags=["generations"], responses=ERRORS)


def _generation(session: Session, owner_id: uuid.UUID, generation_id: uuid.UUID) -> Job:
    """The caller's generation; 404 for another key's, a missing one, or a job that is not a generation."""
    job = client_side.get_job(session=session, owner_id=owner_id, job_id=generation_id)
    if job.kind != GENERATION:
        raise NotFound(f"generation {generation_id} not found", code="generation_not_found")
    return job


@router.post("", status_code=202, response_model=GenerationPublic, operation_id="generations-create")
async def create_generation(
    body: GenerationSpec,
    response: Response,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    idempotency_key: IdempotencyKey = None,
) -> GenerationPublic:
    """Queues a generation: `prompt` (or several) x `seeds` images from `preset`, with `adapters` (succeeded
    training jobs of this key and preset, each at its `scale`) combined. Size, steps and guidance default to the
    preset's native few-step setting. Runs on the preset's generation workers, apart from training.

    Another key's adapter answers 404; an adapter whose job has not succeeded, 409 `adapter_not_ready`. With an
    `Idempotency-Key`, the same request within 24 hours returns the same generation (200)."""
    submitted = await submit_generation(
        body, owner_id=principal.id, session=session, settings=settings, idempotency_key=idempotency_key
    )
    mark_replayed(response, submitted)
    return generation_public(submitted.job, session, store, settings.presigned_url_ttl_s)


@router.get("", response_model=GenerationsPublic, operation_id="generations-list")
def read_generations(
    principal: PrincipalDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> GenerationsPublic:
    """The caller's generations, newest first (the gallery); pass `next_cursor` back as `cursor` for more."""
    jobs, next_cursor = client_side.list_jobs(
        session=session, owner_id=principal.id, status=status, limit=limit, cursor=cursor, kind=GENERATION
    )
    ttl = settings.presigned_url_ttl_s
    return GenerationsPublic(data=[generation_public(j, session, store, ttl) for j in jobs], next_cursor=next_cursor)


@router.get("/{generation_id}", response_model=GenerationPublic, operation_id="generations-read")
def read_generation(
    generation_id: uuid.UUID, principal: PrincipalDep, session: SessionDep, store: StoreDep, settings: SettingsDep
) -> GenerationPublic:
    """One generation: status, queue position, the resolved request and, once succeeded, its images."""
    job = _generation(session, principal.id, generation_id)
    return generation_public(job, session, store, settings.presigned_url_ttl_s)


@router.post("/{generation_id}/cancel", response_model=GenerationPublic, operation_id="generations-cancel")
def cancel_generation(
    generation_id: uuid.UUID, principal: PrincipalDep, session: SessionDep, store: StoreDep, settings: SettingsDep
) -> GenerationPublic:
    """Cancels a queued generation now, or a running one before its next pipeline call."""
    job = _generation(session, principal.id, generation_id)
    client_side.request_cancel(session=session, job=job)
    session.commit()
    return generation_public(job, session, store, settings.presigned_url_ttl_s)


@router.delete("/{generation_id}", status_code=204, operation_id="generations-delete")
def delete_generation(
    generation_id: uuid.UUID, principal: PrincipalDep, session: SessionDep, store: StoreDep
) -> Response:
    """Cancels the generation if needed and deletes its images."""
    deletion.delete_job(session, store, _generation(session, principal.id, generation_id))
    return Response(status_code=204)


@router.get(
    "/{generation_id}/events",
    response_model=EventsPublic,
    operation_id="generations-read_events",
    responses={200: {"content": {"text/event-stream": {}}}},
)
def read_generation_events(
    request: Request,
    generation_id: uuid.UUID,
    principal: PrincipalDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    after: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    accept: Annotated[str | None, Header()] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Any:
    """The generation's events after `after`; with `Accept: text/event-stream`, a live server-sent stream (the
    same bounds as a job's). Types: queued, started, model_loaded, sample (the images, kind `generation`),
    succeeded, failed, cancel_requested, canceled."""
    _generation(session, principal.id, generation_id)
    return events_response(
        request, generation_id, principal.id, session, store, settings, after=after, limit=limit, accept=accept,
        last_event_id=last_event_id,
    )  # fmt: skip


@router.get(
    "/{generation_id}/webhook-deliveries",
    response_model=WebhookDeliveriesPublic,
    operation_id="generations-read_webhook_deliveries",
)
def read_generation_webhook_deliveries(
    generation_id: uuid.UUID, principal: PrincipalDep, session: SessionDep
) -> WebhookDeliveriesPublic:
    """Every webhook delivery of the generation, with each attempt."""
    return present.deliveries_public(session, _generation(session, principal.id, generation_id))
