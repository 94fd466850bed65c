"""FastAPI dependencies: settings, a database session per request, the artifact store, the calling key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.database import Database, end_early
from api.principals import Principals
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
    """A session for the request, in one of the API's database slots (`api.database`: a request waits for one in
    the event loop, holding nothing), committed by the handler, closed after it. Making it does no I/O: it
    connects on first use, in the handler's thread (or the key lookup's)."""
    database: Database = request.app.state.database
    async with database.session() as session:
        yield session


def end_session_early(session: Session) -> None:
    """Closes the request's session and gives its slot back, from a handler's thread, for a response that outlives
    it (a server-sent event stream opens short sessions of its own)."""
    end_early(session)


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
    """The key of the caller (every /v1 route requires one), within its request rate. A key this process
    authenticated a moment ago, and that no revocation has touched since, costs no database read
    (`api.principals`). If the session is used, it keeps its connection into the handler: there are never more
    sessions than connections (`api.database`), so holding one while waiting for the handler's thread cannot
    starve a thread of one."""
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise Unauthorized("send `Authorization: Bearer <api key>`")
    principals: Principals = request.app.state.principals
    return principals.authenticate(session, credentials.credentials)


PrincipalDep = Annotated[ApiKey, Depends(get_principal)]
