"""Copies between a local folder and object storage, with retries (tenacity) for a storage server that blinks."""

from __future__ import annotations

import functools
import logging
import mimetypes
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from core.errors import ServiceUnavailable
from core.storage import ArtifactStore


logger = logging.getLogger(__name__)
T = TypeVar("T")


def with_retries(action: Callable[[], T], *, what: str, attempts: int | None = None, first_delay_s: float = 0.5) -> T:
    """Runs `action`, retrying `ServiceUnavailable` up to `attempts` tries in all (default: the
    `storage_retry_attempts` setting) with exponential backoff from `first_delay_s`; then the last error is raised."""
    if attempts is None:
        from core.config import get_settings

        attempts = get_settings().storage_retry_attempts

    def log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        reason = exc.message if isinstance(exc, ServiceUnavailable) else type(exc).__name__
        delay = state.next_action.sleep if state.next_action else 0.0
        logger.warning("%s failed (%s); retry %d in %.1fs", what, reason, state.attempt_number, delay)

    retrying = Retrying(
        retry=retry_if_exception_type(ServiceUnavailable),
        wait=wait_exponential(multiplier=first_delay_s),
        stop=stop_after_attempt(attempts),
        before_sleep=log_retry,
        reraise=True,
    )
    return retrying(action)


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
