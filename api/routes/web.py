"""The web page: `api/web/` served as static files at `/app/`, the bundled example images at `/app/examples/`, and
`/` redirecting there.

The page is a client of the public REST API like any other (it sends the API key as a Bearer header); these
routes need no key and stay out of the OpenAPI schema. The page is a set of ES modules (`app.js` the entry),
which a browser runs only when served with a JavaScript content type.
"""

from __future__ import annotations

import functools
import mimetypes
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles


WEB_DIR = Path(__file__).resolve().parent.parent / "web"
# The repository's example images (a checkout or an editable install; absent from a plain wheel).
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"

# StaticFiles takes the type from `mimetypes`, which also reads the host's tables (a Windows registry may say
# text/plain for .js, and a browser then refuses the modules): say it here, as RFC 9239 does.
mimetypes.add_type("text/javascript", ".js")

router = APIRouter(include_in_schema=False)


@router.get("/")
def root() -> RedirectResponse:
    """The page."""
    return RedirectResponse("/app/", status_code=307)


@functools.cache
def example_image_urls(folder: str | None) -> list[str]:
    """The URLs of a preset's bundled example images (`Preset.example_images`, a folder of `examples/`), in name
    order; empty when the preset has none or this installation does not carry them. Read once per process (the
    folder ships with the code), not at every `GET /v1/presets`."""
    if folder is None or not (EXAMPLES_DIR / folder).is_dir():
        return []
    return [f"/app/examples/{folder}/{p.name}" for p in sorted((EXAMPLES_DIR / folder).glob("*.png"))]


if EXAMPLES_DIR.is_dir():  # before `/app`, which would otherwise answer these paths with a 404
    router.mount("/app/examples", StaticFiles(directory=EXAMPLES_DIR), name="examples")
router.mount("/app", StaticFiles(directory=WEB_DIR, html=True), name="web")
