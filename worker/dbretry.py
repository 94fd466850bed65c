"""Database writes of a running job that survive a database restart: retried with backoff (tenacity), not fatal."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_exponential


logger = logging.getLogger(__name__)
T = TypeVar("T")


def is_transient_db_error(exc: BaseException) -> bool:
    """Connection-level failures (the server is restarting or unreachable); a bad query is not one."""
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def retry_db(action: Callable[[], T], *, what: str, max_wait_s: float = 120.0) -> T:
    """Runs `action`, retrying connection-level database errors with exponential backoff (0.5 s doubling to at
    most 10 s) for up to `max_wait_s`; then the last error is raised as it was."""

    def log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        cause = type(getattr(exc, "orig", None) or exc).__name__
        delay = state.next_action.sleep if state.next_action else 0.0
        logger.warning("%s: database unavailable (%s); retrying in %.1fs", what, cause, delay)

    retrying = Retrying(
        retry=retry_if_exception(is_transient_db_error),
        wait=wait_exponential(multiplier=0.5, max=10.0),
        stop=stop_after_delay(max_wait_s),
        before_sleep=log_retry,
        reraise=True,
    )
    return retrying(action)
