"""Streaming multipart parsing of job submissions: files go to temporary files on disk as they arrive, with the
per-file, total, file-count and spec-size limits enforced while reading, never after buffering the body."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO, Any

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from api.archives import looks_like_archive
from core.errors import InvalidRequest, PayloadTooLarge


@dataclass(frozen=True)
class UploadLimits:
    """How much one request may carry."""

    max_files: int
    max_file_bytes: int
    max_total_bytes: int
    max_field_bytes: int


@dataclass
class UploadedFile:
    """One received file: its client-side name (as given), a safe name, and where its bytes are."""

    index: int
    filename: str
    safe_name: str
    path: Path
    size: int = 0
    digest: Any = field(default_factory=hashlib.sha256, repr=False)


@dataclass
class ParsedUpload:
    """The fields and files of one multipart request."""

    fields: dict[str, str] = field(default_factory=dict)
    files: list[UploadedFile] = field(default_factory=list)


RESERVED_NAMES = frozenset({"captions.json"})  # the trainer reads this name from an image folder


def safe_display_name(filename: str, index: int, taken: set[str]) -> str:
    """A file name without any directory part or unusual characters, unique (case-insensitively) in the request.

    Used only as a display name and for caption matching; storage keys never contain it.
    """
    base = PureWindowsPath(PurePosixPath(filename).name).name
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")[:100]
    candidate, n = base, 0
    while not candidate or candidate.lower() in taken or candidate.lower() in RESERVED_NAMES:
        n += 1
        candidate = f"image-{index:02d}" + (f"-{n}" if n > 1 else "")
    taken.add(candidate.lower())
    return candidate


class _Collector:
    def __init__(self, tmpdir: Path, limits: UploadLimits) -> None:
        self.tmpdir = tmpdir
        self.limits = limits
        self.result = ParsedUpload()
        self.ended = False
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._field_name: str | None = None
        self._field_buffer = bytearray()
        self._file: UploadedFile | None = None
        self._handle: IO[bytes] | None = None
        self._taken: set[str] = set()
        self._file_limit = limits.max_file_bytes

    def callbacks(self) -> Any:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": self.header_field,
            "on_header_value": self.header_value,
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
            "on_end": self.end,
        }

    def end(self) -> None:
        self.ended = True

    def part_begin(self) -> None:
        self._headers = {}
        self._field_name, self._file, self._field_buffer = None, None, bytearray()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        if name is None:
            raise InvalidRequest("a multipart part has no name", code="invalid_multipart")
        self._field_name = name.decode("utf-8", "replace")
        if self._field_name not in ("images", "spec"):
            raise InvalidRequest(f"unexpected form field {self._field_name!r}; send `images` and `spec`")
        if self._field_name == "spec" and "spec" in self.result.fields:
            raise InvalidRequest("send `spec` once", code="invalid_multipart")
        if b"filename" in options:
            if self._field_name != "images":
                raise InvalidRequest(f"unexpected file field {self._field_name!r}; send images as `images`")
            index = len(self.result.files)
            if index >= self.limits.max_files:
                raise InvalidRequest(f"at most {self.limits.max_files} images per job", code="too_many_files")
            raw = options[b"filename"]
            filename = raw.decode("utf-8", "replace")
            self._file = UploadedFile(
                index=index,
                filename=filename,
                safe_name=safe_display_name(filename, index, self._taken),
                path=self.tmpdir / f"upload-{index:02d}",
            )
            content_type = self._headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip()
            if looks_like_archive(filename, content_type):  # one archive may carry the whole dataset
                self._file_limit = self.limits.max_total_bytes
            else:
                self._file_limit = self.limits.max_file_bytes
            self._handle = self._file.path.open("wb")
            self.result.files.append(self._file)

    def part_data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        if self._file is not None and self._handle is not None:
            self._file.size += n
            if self._file.size > self._file_limit:
                raise PayloadTooLarge(
                    f"{self._file.safe_name}: larger than {self._file_limit} bytes",
                    code="file_too_large",
                    details={"file": self._file.safe_name},
                )
            self._handle.write(data[start:end])
            self._file.digest.update(data[start:end])
        else:
            self._field_buffer += data[start:end]
            if len(self._field_buffer) > self.limits.max_field_bytes:
                raise PayloadTooLarge(
                    f"field {self._field_name!r} is larger than {self.limits.max_field_bytes} bytes",
                    code="field_too_large",
                )

    def part_end(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        elif self._field_name is not None:
            try:
                self.result.fields[self._field_name] = self._field_buffer.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidRequest(f"field {self._field_name!r} is not UTF-8 text") from exc

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


async def parse_multipart(request: Request, tmpdir: Path, limits: UploadLimits) -> ParsedUpload:
    """Reads a multipart/form-data body chunk by chunk into `tmpdir`; raises on the first limit crossed."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise InvalidRequest("send the job as multipart/form-data", code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_total_bytes + 64 * 1024:
        raise PayloadTooLarge(f"the request is larger than {limits.max_total_bytes} bytes", code="request_too_large")
    collector = _Collector(tmpdir, limits)
    total = 0
    try:
        parser = MultipartParser(params[b"boundary"], collector.callbacks())
        async for chunk in request.stream():
            # Every byte counts, headers and empty parts included, whatever Content-Length claimed.
            total += len(chunk)
            if total > limits.max_total_bytes + 64 * 1024:
                raise PayloadTooLarge(
                    f"the request is larger than {limits.max_total_bytes} bytes", code="request_too_large"
                )
            parser.write(chunk)
        parser.finalize()
    except (InvalidRequest, PayloadTooLarge):
        raise
    except Exception as exc:  # python-multipart's own parse errors
        raise InvalidRequest(f"malformed multipart body: {exc}", code="invalid_multipart") from exc
    finally:
        collector.close()
    if not collector.ended:
        raise InvalidRequest("the multipart body ends before its closing boundary", code="invalid_multipart")
    return collector.result
