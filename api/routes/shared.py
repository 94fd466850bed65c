"""What the routes share: the error responses every `/v1` route may give, the multipart body and the
`Idempotency-Key` header of a submission (jobs and previews take the same upload), and how a replay answers."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Header, Response

from api.schemas import ErrorBody
from api.services.submit import Submitted


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 404, 409, 413, 415, 422, 429, 503)
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
                        "spec": {"type": "string", "description": "JSON object of JobSpec fields"},
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
