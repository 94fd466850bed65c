"""Structured logs: one JSON object per line (or plain text in development), and the id of the job being worked
on in every line a worker writes while it runs that job."""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from pythonjsonlogger.json import JsonFormatter


current_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("current_job_id", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [job %(job_id)s] %(message)s"


class JobIdFilter(logging.Filter):
    """Stamps each record with the job this thread of work is running (`job_id`, None outside a job)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Adds `job_id` and keeps the record."""
        if not hasattr(record, "job_id"):
            record.job_id = current_job_id.get()
        return True


@contextmanager
def job_context(job_id: object) -> Iterator[None]:
    """Every log line written inside the block (in this thread or context) carries `job_id`."""
    token = current_job_id.set(str(job_id))
    try:
        yield
    finally:
        current_job_id.reset(token)


def configure_logging(fmt: str = "json", level: int = logging.INFO) -> None:
    """Sends the root logger to stderr as JSON lines (`fmt="json"`) or text, every line with its `job_id`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(JobIdFilter())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(job_id)s %(process)d",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger", "process": "pid"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
