"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from api.database import Database
from core.queue import producer


router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a dependency is unreachable"}})
async def readyz(request: Request) -> JSONResponse:
    """The database, the broker and the artifact storage are all reachable. The database is asked in a session of
    the API's own database slots (`api.database`), as a request would be: probes never take a connection that a
    request's session was promised."""
    state = request.app.state
    database: Database = state.database
    checks: dict[str, Any] = {}
    try:
        await database.run(lambda session: session.execute(text("SELECT 1")))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    checks.update(await run_in_threadpool(_broker_and_storage, state))
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "unavailable", "checks": checks}, 200 if ready else 503)


def _broker_and_storage(state: Any) -> dict[str, str]:
    checks: dict[str, str] = {}
    try:
        with producer(state.settings).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    try:
        state.store.check()
        checks["storage"] = "ok"
    except Exception as exc:
        checks["storage"] = f"unavailable: {type(exc).__name__}"
    return checks
