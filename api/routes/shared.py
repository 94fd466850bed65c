"""What the routes share: the error responses every `/v1` route may give, the multipart body and the
`Idempotency-Key` header of a submission (jobs and previews take the same upload), how a replay answers, and the
events of a job or a generation (JSON pages or a server-sent stream)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import FastAPI, Header, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from api.deps import end_session_early
from api.schemas import ErrorBody, EventsPublic, JobSpec
from api.services import present
from api.services.event_stream import StreamBounds, event_stream, resume_point
from api.services.submit import Submitted
from core.config import Settings
from core.jobs import client_side
from core.storage import ArtifactStore


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 409, 413, 415, 422, 429, 503)
}

MULTIPART_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["images", "spec"],
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "spec": {
                            "type": "string",
                            "description": "JSON object of JobSpec fields",
                            "contentMediaType": "application/json",
                            "contentSchema": {"$ref": "#/components/schemas/JobSpec"},
                        },
                    },
                }
            }
        },
    }
}

IdempotencyKey = Annotated[str | None, Header(max_length=200, pattern=r"^[\x21-\x7e]+$")]


def mark_replayed(response: Response, submitted: Submitted) -> None:
    """An `Idempotency-Key` replay answers 200 with `Idempotent-Replayed: true` instead of 202."""
    if submitted.replayed:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"


def publish_job_spec(app: FastAPI) -> None:
    """Adds `JobSpec` to the OpenAPI components: the multipart `spec` field refers to it, so clients and the web
    page read the spec's fields, bounds and defaults from the published document instead of repeating them."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = build()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        spec = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(spec.pop("$defs", {}))
        schemas["JobSpec"] = spec
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def events_response(
    request: Request,
    job_id: uuid.UUID,
    owner_id: uuid.UUID,
    session: Session,
    store: ArtifactStore,
    settings: Settings,
    *,
    after: int,
    limit: int,
    accept: str | None,
    last_event_id: str | None,
) -> StreamingResponse | EventsPublic:
    """The events of a job the caller owns (checked by the route) after `after`: a page of JSON, or with
    `Accept: text/event-stream` a live stream within the key's stream slots and `DOPSD_STREAM_MAX_S`."""
    ttl = settings.presigned_url_ttl_s
    if accept and "text/event-stream" in accept:
        end_session_early(session)  # the stream opens its own short sessions: hold nothing for its lifetime
        slots = request.app.state.stream_slots
        bounds = StreamBounds(owner_id, slots, slots.acquire(owner_id), settings.stream_max_s)
        stream = event_stream(
            request.app.state.database, job_id, resume_point(after, last_event_id), store, ttl,
            request.is_disconnected, bounds,
        )  # fmt: skip
        return StreamingResponse(
            stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
    events = client_side.list_events(session=session, job_id=job_id, after=after, limit=limit)
    return EventsPublic(
        data=[present.event_public(e, store, ttl) for e in events], next_after=events[-1].id if events else after
    )
