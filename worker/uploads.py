"""Copies between a local folder and object storage, retried (tenacity) through a storage outage of up to the
outage tolerance."""

from __future__ import annotations

import functools
import logging
import mimetypes
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.orm import Session, sessionmaker
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from core.db import session_scope
from core.errors import ServiceUnavailable
from core.jobs import usage
from core.storage import ArtifactStore, job_prefix
from worker.dbretry import backoff_cap_s, outage_tolerance_s


logger = logging.getLogger(__name__)
T = TypeVar("T")


def with_retries(
    action: Callable[[], T], *, what: str, max_wait_s: float | None = None, first_delay_s: float = 0.5
) -> T:
    """Runs `action`, retrying `ServiceUnavailable` with exponential backoff from `first_delay_s` for up to
    `max_wait_s` (default: the outage tolerance, `DOPSD_OUTAGE_TOLERANCE_S`), so a storage outage shorter than that
    delays the job instead of failing it; then `ServiceUnavailable` saying how long storage was unreachable."""
    limit = outage_tolerance_s() if max_wait_s is None else max_wait_s
    started = time.monotonic()

    def log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        reason = exc.message if isinstance(exc, ServiceUnavailable) else type(exc).__name__
        delay = state.next_action.sleep if state.next_action else 0.0
        logger.warning("%s failed (%s); retry %d in %.1fs", what, reason, state.attempt_number, delay)

    retrying = Retrying(
        retry=retry_if_exception_type(ServiceUnavailable),
        wait=wait_exponential(multiplier=first_delay_s, max=backoff_cap_s(limit)),
        stop=stop_after_delay(limit),
        before_sleep=log_retry,
        reraise=True,
    )
    try:
        return retrying(action)
    except ServiceUnavailable as exc:
        waited = time.monotonic() - started
        raise ServiceUnavailable(f"object storage was unreachable for {waited:.0f} s (during the {what})") from exc


def content_type_of(path: Path) -> str:
    """The MIME type of an output file."""
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def upload_tree(
    store: ArtifactStore, folder: Path, prefix: str, *, skip: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Uploads every file under `folder` (but the top-level folders in `skip`) to `prefix`; returns records of
    (relative name, key, size, content type)."""
    records = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative.split("/", 1)[0] in skip:
            continue
        key = prefix + relative
        content_type = content_type_of(path)
        size = with_retries(functools.partial(store.put_file, key, path, content_type), what=f"upload of {key}")
        records.append({"name": relative, "key": key, "size": size, "content_type": content_type})
    return records


def download_prefix(store: ArtifactStore, prefix: str, folder: Path) -> list[Path]:
    """Downloads every object under `prefix` into `folder`, keeping relative paths."""
    paths = []
    for obj in with_retries(functools.partial(store.list, prefix), what=f"listing {prefix}"):
        target = folder / obj.key[len(prefix) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        with_retries(functools.partial(store.get_file, obj.key, target), what=f"download of {obj.key}")
        paths.append(target)
    return paths


def record_stored_bytes(sessions: sessionmaker[Session], store: ArtifactStore, job_id: uuid.UUID) -> None:
    """Records on the job the bytes listed under its prefix (inputs, checkpoints, samples, outputs), as an attempt
    ends: what its key's storage quota and `GET /v1/usage` count. A failure (storage or database unreachable) is
    logged, and the job keeps its previous figure until an attempt records it again."""
    try:
        objects = store.list(job_prefix(job_id))  # once: the attempt is over, nothing waits on this
        with session_scope(sessions) as session:
            usage.record_stored_bytes(session=session, job_id=job_id, nbytes=sum(o.size for o in objects))
    except Exception:
        logger.warning("job %s: could not record its stored bytes", job_id, exc_info=True)
