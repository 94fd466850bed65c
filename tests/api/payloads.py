"""Request bodies the submission tests send, shared by the in-process tier and the real-stack tests: small PNGs,
the table of invalid submissions (with the status and error code each must get) and hostile images."""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image


Files = list[tuple[str, tuple[str, bytes, str]]]


def png_bytes(size: tuple[int, int] = (64, 64)) -> bytes:
    """A plain green PNG of `size`."""
    buffer = io.BytesIO()
    Image.new("RGB", size, "green").save(buffer, format="PNG")
    return buffer.getvalue()


def encoded(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    """`image` saved in `fmt`, as bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


# (case, request parts, status, error code). `files` names an entry of `files_of`; the file limit of the tests'
# services is 2 MiB, so "huge" (3 MiB) is over it.
INVALID: list[tuple[str, dict[str, Any], int, str]] = [
    ("json body", {"json": {"spec": {}}}, 415, "unsupported_media_type"),
    ("no spec", {"files": "one"}, 422, "invalid_spec"),
    ("malformed spec", {"files": "one", "spec": "{not json"}, 422, "invalid_spec"),
    ("spec not an object", {"files": "one", "spec": "[1, 2]"}, 422, "invalid_spec"),
    ("unknown field", {"files": "one", "spec": {"preset": "tiny-z-image", "stpes": 3}}, 422, "invalid_spec"),
    ("steps out of range", {"files": "one", "spec": {"steps": 0}}, 422, "invalid_spec"),
    ("rank out of range", {"files": "one", "spec": {"rank": 100000}}, 422, "invalid_spec"),
    ("unknown preset", {"files": "one", "spec": {"preset": "sdxl"}}, 422, "unknown_preset"),
    ("two processes", {"files": "one", "spec": {"num_processes": 2}}, 422, "num_processes_unavailable"),
    ("zero files", {"files": "none", "spec": {}}, 422, "no_images"),
    ("caption for a missing file", {"files": "one", "spec": {"captions": {"x.png": ["[V]"]}}}, 422, "unknown_file"),
    ("text named png", {"files": "text", "spec": {}}, 422, "not_an_image"),
    ("truncated png", {"files": "truncated", "spec": {}}, 422, "unreadable_image"),
    ("too small", {"files": "small", "spec": {}}, 422, "image_too_small"),
    ("too many files", {"files": "many", "spec": {}}, 422, "too_many_files"),
    ("file over the limit", {"files": "huge", "spec": {}}, 413, "file_too_large"),
    ("extra form field", {"files": "one", "spec": {}, "extra": "x"}, 422, "invalid_request"),
]


def files_of(kind: str) -> Files:
    """The `images` parts of one kind of upload named in `INVALID`."""
    good = png_bytes()
    return {
        "none": [],
        "one": [("images", ("a.png", good, "image/png"))],
        "text": [
            ("images", ("a.png", good, "image/png")),
            ("images", ("notes.png", b"hello, not a png", "image/png")),
        ],
        "truncated": [("images", ("cut.png", good[: len(good) // 2], "image/png"))],
        "small": [("images", ("tiny.png", png_bytes((16, 16)), "image/png"))],
        "many": [("images", (f"{i}.png", good, "image/png")) for i in range(65)],
        "huge": [("images", ("big.png", good + b"\0" * (3 * 1024 * 1024), "image/png"))],
    }[kind]


def submission(request_parts: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of `client.post("/v1/jobs", ...)` for one row of `INVALID`."""
    if "json" in request_parts:
        return {"json": request_parts["json"]}
    data: dict[str, str] = {}
    if "spec" in request_parts:
        spec = request_parts["spec"]
        data["spec"] = spec if isinstance(spec, str) else json.dumps(spec)
    if "extra" in request_parts:
        data["extra"] = request_parts["extra"]
    files = files_of(request_parts["files"])
    return {"data": data, "files": files or {"spec": (None, data.pop("spec", "{}"))}}


HOSTILE: list[tuple[str, bytes, int, str]] = [
    (
        "drawing.svg",
        b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect/></svg>',
        422,
        "not_an_image",
    ),
    ("bomb.png", encoded(Image.new("1", (12000, 12000)), "PNG"), 422, "decompression_bomb"),
    ("anim.gif", encoded(Image.new("RGB", (64, 64), "red"), "GIF"), 422, "unsupported_format"),
    ("garbage.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 500, 422, "not_an_image"),
]
