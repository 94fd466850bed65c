"""Database writes of a running job that survive a database outage: retried with backoff (tenacity) for up to
the outage tolerance (`DOPSD_OUTAGE_TOLERANCE_S`), then `DatabaseUnavailable`, which fails the job with a code that
names the database."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_exponential


logger = logging.getLogger(__name__)
T = TypeVar("T")


class DatabaseUnavailable(Exception):
    """The database stayed unreachable for longer than the job may wait for it."""

    def __init__(self, what: str, waited_s: float) -> None:
        super().__init__(f"the database was unreachable for {waited_s:.0f} s (during the {what})")
        self.message = str(self)


def is_transient_db_error(exc: BaseException) -> bool:
    """Connection-level failures (the server is restarting or unreachable); a bad query is not one."""
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def outage_tolerance_s() -> float:
    """How long a running job waits for a dependency that is down (`DOPSD_OUTAGE_TOLERANCE_S`)."""
    from core.config import get_settings

    return get_settings().outage_tolerance_s


def backoff_cap_s(max_wait_s: float) -> float:
    """The longest pause between two tries: short enough that a job notices a recovered dependency within a small
    part of what it may wait (at most 15 s)."""
    return max(0.5, min(15.0, max_wait_s / 8))


def retry_db(action: Callable[[], T], *, what: str, max_wait_s: float | None = None) -> T:
    """Runs `action`, retrying connection-level database errors with exponential backoff for up to `max_wait_s`
    (default: the outage tolerance); then `DatabaseUnavailable`. Other errors are raised as they are, at once."""
    limit = outage_tolerance_s() if max_wait_s is None else max_wait_s
    started = time.monotonic()

    def log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        cause = type(getattr(exc, "orig", None) or exc).__name__
        delay = state.next_action.sleep if state.next_action else 0.0
        logger.warning("%s: database unavailable (%s); retrying in %.1fs", what, cause, delay)

    retrying = Retrying(
        retry=retry_if_exception(is_transient_db_error),
        wait=wait_exponential(multiplier=0.5, max=backoff_cap_s(limit)),
        stop=stop_after_delay(limit),
        before_sleep=log_retry,
        reraise=True,
    )
    try:
        return retrying(action)
    except Exception as exc:
        if is_transient_db_error(exc):
            raise DatabaseUnavailable(what, time.monotonic() - started) from exc
        raise
