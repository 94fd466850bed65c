"""Downloads of the local store (embedded mode), behind signed, expiring URLs; S3 serves its own."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from api.deps import StoreDep
from core.errors import NotFound
from core.storage import LocalStore


router = APIRouter(prefix="/v1/files", tags=["files"])


@router.get("/{key:path}", response_class=FileResponse)
def download_file(
    key: str,
    store: StoreDep,
    expires: Annotated[int, Query()],
    sig: Annotated[str, Query(max_length=128)],
    filename: Annotated[str, Query(max_length=200)] = "download",
) -> FileResponse:
    """One stored object, if the URL's signature is valid and not expired (no API key: the URL is the grant)."""
    if not isinstance(store, LocalStore):
        raise NotFound("downloads are served by the object store")
    path = store.open_signed(key, expires, sig)
    return FileResponse(path, filename=filename)
