"""What the routes share: the error responses every `/v1` route may give, the multipart body and the
`Idempotency-Key` header of a submission (jobs and previews take the same upload), and how a replay answers."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Header, Response

from api.schemas import ErrorBody, JobSpec
from api.services.submit import Submitted


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
