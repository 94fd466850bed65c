"""FastAPI dependencies: settings, a database session per request, the artifact store, the calling key."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from core import api_keys
from core.config import Settings
from core.errors import Unauthorized
from core.jobs.models import ApiKey
from core.storage import ArtifactStore


# The dependencies that do no I/O are `async def`: FastAPI runs a plain `def` dependency in the thread pool, and
# those hops and their GIL hand-overs showed in a py-spy profile of bench/service.py's polling (run_sync, solve_dependencies).


async def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for the request, committed by the handler, closed after it. Making one does no I/O: it connects
    on first use, in the handler's thread.

    At most as many sessions exist at once as the database pool has connections (`app.state.session_slots`; more
    requests wait here, in the event loop, holding nothing), so no thread ever waits for a connection while the
    session holding it waits for a thread (FastAPI still needs one to validate the response): under a burst that
    deadlocked every request for the pool's 30 s timeout. Closing rolls back on the database, so it runs in
    threads of its own (`app.state.session_closer`)."""
    slots: anyio.CapacityLimiter = request.app.state.session_slots
    holder = object()
    await slots.acquire_on_behalf_of(holder)
    session: Session = request.app.state.sessionmaker()
    session.info[_SLOT] = (slots, holder)
    try:
        yield session
    finally:
        with anyio.CancelScope(shield=True):  # closed also when the client went away
            closer = request.app.state.session_closer
            await asyncio.get_running_loop().run_in_executor(closer, session.close)
            if session.info.pop(_SLOT, None) is not None:
                slots.release_on_behalf_of(holder)


_SLOT = "dopsd_session_slot"


def end_session_early(session: Session) -> None:
    """Closes the request's session and gives its slot back, from a handler's thread, for a response that outlives
    it (a server-sent event stream opens short sessions of its own)."""
    session.close()
    held = session.info.pop(_SLOT, None)
    if held is not None:
        slots, holder = held
        anyio.from_thread.run_sync(slots.release_on_behalf_of, holder)


async def get_store(request: Request) -> ArtifactStore:
    """The artifact store."""
    store: ArtifactStore = request.app.state.store
    return store


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <api key>")

SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]


def get_principal(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey:
    """The key of the caller (every /v1 route requires one), within its request rate."""
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise Unauthorized("send `Authorization: Bearer <api key>`")
    key = api_keys.authenticate(session=session, key=credentials.credentials)
    # Give the connection back until the handler needs one: between this thread and the handler's, a request
    # must not hold a connection while it waits for a thread.
    session.commit()
    request.app.state.rate_limiter.check(key.id)
    return key


PrincipalDep = Annotated[ApiKey, Depends(get_principal)]
