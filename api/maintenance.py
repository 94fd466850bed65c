"""Maintenance as the service wires it: the passes of `core.maintenance` with the broker as their sender and the
API's presentation of event data (signed URLs) for webhook bodies. Used by `dopsd maintain` (its own process) and
by the API in embedded mode."""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from api.public_events import public_event_data
from core.config import Settings
from core.maintenance.loops import Maintenance, MaintenanceDeps
from core.queue import enqueue
from core.storage import ArtifactStore


def service_maintenance(settings: Settings, sessions: sessionmaker[Session], store: ArtifactStore) -> Maintenance:
    """Maintenance (not yet started) over this database, store and broker."""

    def public_data(type_: str, data: dict[str, Any]) -> dict[str, Any]:
        return public_event_data(type_, data, store, settings.presigned_url_ttl_s)

    return Maintenance(
        MaintenanceDeps(
            settings=settings,
            sessions=sessions,
            store=store,
            dispatch=functools.partial(enqueue, settings),
            public_data=public_data,
        )
    )
