"""Database writes of a running job that survive a database restart: retried with backoff, not fatal."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError


logger = logging.getLogger(__name__)
T = TypeVar("T")


def retry_db(action: Callable[[], T], *, what: str, max_wait_s: float = 120.0) -> T:
    """Runs `action`, retrying connection-level database errors with exponential backoff for up to `max_wait_s`."""
    delay, waited = 0.5, 0.0
    while True:
        try:
            return action()
        except (OperationalError, DBAPIError) as exc:
            if not getattr(exc, "connection_invalidated", False) and not isinstance(exc, OperationalError):
                raise
            if waited >= max_wait_s:
                raise
            logger.warning("%s: database unavailable (%s); retrying in %.1fs", what, type(exc.orig).__name__, delay)
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 10.0)
