"""`DOPSDClient`: the dopsd REST API for Python programs (httpx only; no service code, no torch).

Every method is one or a few HTTP requests; every error answer becomes a `DOPSDAPIError` carrying the API's stable
`code`, its `message` and `details` (for an image, the file that was refused).
"""

from __future__ import annotations

import builtins
import contextlib
import json
import mimetypes
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO
from urllib.parse import unquote, urlparse

import httpx


DEFAULT_API_URL = "http://127.0.0.1:8000"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
TERMINAL_EVENTS = TERMINAL_STATUSES
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
ADAPTER_NAME = "pytorch_lora_weights.safetensors"

Job = dict[str, Any]
Event = dict[str, Any]


class DOPSDAPIError(Exception):
    """An error answer of the API (or no answer at all: `status` 0, `code` "connection_error").

    `code` is the API's stable machine code (`invalid_spec`, `not_an_image`, `job_not_found`, ...), `message` its
    sentence for people, and `details` whatever it added (for image errors `{"file": name, "reason": text}`).
    """

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details

    @property
    def file(self) -> str | None:
        """The uploaded file an image error is about, if the API named one."""
        if isinstance(self.details, Mapping) and isinstance(self.details.get("file"), str):
            return str(self.details["file"])
        return None

    def __str__(self) -> str:
        """One readable line: the message, the file it is about, the field errors, and the code."""
        text = self.message
        if self.file and self.file not in text:
            text = f"{self.file}: {text}"
        if isinstance(self.details, list):
            fields = [
                f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('message')}"
                for d in self.details
                if isinstance(d, Mapping)
            ]
            if fields:
                text = f"{text} ({'; '.join(fields)})"
        return f"{text} [{self.code}]"

    def __repr__(self) -> str:
        return f"DOPSDAPIError(status={self.status}, code={self.code!r}, message={self.message!r})"


def image_files(paths: Sequence[Path | str]) -> builtins.list[Path]:
    """The images to upload: each file as given, and every PNG/JPEG/WebP file directly in each folder (sorted)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(p)
    return found


# The comment a server sends before it ends a stream at its lifetime (`DOPSD_STREAM_MAX_S`): a planned end.
LIFETIME_COMMENT = ": the stream's lifetime is over"


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str | None, str, str]]:
    """Server-sent events from a stream's lines: `(id, event type, data)` for each dispatched event."""
    event_id: str | None = None
    event_type = "message"
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield event_id, event_type, "\n".join(data)
            event_type, data = "message", []
            continue
        if line.startswith(":"):
            continue  # a comment: the server's keep-alive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event_type = value
        elif name == "id" and "\0" not in value:
            event_id = value
    if data:
        yield event_id, event_type, "\n".join(data)


def _error_from(response: httpx.Response) -> DOPSDAPIError:
    try:
        body = response.json()
        error = body["error"]
        return DOPSDAPIError(response.status_code, str(error["code"]), str(error["message"]), error.get("details"))
    except (ValueError, KeyError, TypeError):
        text = response.text.strip().splitlines()[0][:200] if response.text.strip() else response.reason_phrase
        return DOPSDAPIError(response.status_code, f"http_{response.status_code}", text or "no message")


def _filename(response: httpx.Response, fallback: str) -> str:
    """The file name a download announces (Content-Disposition, else the URL's last segment), made safe."""
    disposition = response.headers.get("content-disposition", "")
    match = re.search(r'filename="?([^";]+)"?', disposition)
    name = match.group(1) if match else unquote(urlparse(str(response.url)).path.rsplit("/", 1)[-1])
    name = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    return name if name and name not in {".", ".."} and name != "download" else fallback


class DOPSDClient:
    """A client of the dopsd API.

    `base_url` defaults to `$DOPSD_API_URL` (else http://127.0.0.1:8000) and `api_key` to `$DOPSD_API_KEY`.
    Use it as a context manager, or call `close()`.

        with DOPSDClient() as client:
            job = client.submit([Path("photos/a.png")], {"preset": "tiny-z-image", "trigger": "sks"})
            job = client.wait(job["id"])
            client.download_adapter(job["id"], Path("sks.safetensors"))
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout_s: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("DOPSD_API_URL") or DEFAULT_API_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("DOPSD_API_KEY", "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={**headers, "User-Agent": "dopsd-client/0.1"},
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            transport=transport,
        )
        # Short-lived download URLs are their own grant: fetched without the API key (it never leaves the API).
        self._downloads = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10.0), transport=transport)

    def close(self) -> None:
        """Closes the HTTP connections."""
        self._http.close()
        self._downloads.close()

    def __enter__(self) -> DOPSDClient:
        """The client itself; its connections are closed when the block ends."""
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Closes the connections."""
        self.close()

    # -- plumbing -------------------------------------------------------------------------------------------------

    def _send(self, method: str, path: str, *, retries: int = 0, **kwargs: Any) -> httpx.Response:
        """One request; an error answer raises `DOPSDAPIError`. `retries`: tries more after a 429 or 503."""
        for attempt in range(retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                # Nobody listening fails at once; a connection lost mid-request is tried again.
                if attempt < retries and not isinstance(exc, httpx.ConnectError):
                    time.sleep(min(2**attempt, 10))
                    continue
                raise DOPSDAPIError(0, "connection_error", f"cannot reach the API at {self.base_url}: {exc}") from exc
            if response.status_code in (429, 503) and attempt < retries:
                time.sleep(_retry_after(response, default=min(2**attempt, 10)))
                continue
            if response.is_error:
                raise _error_from(response)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        retries = 3 if method == "GET" else 0
        return self._send(method, path, retries=retries, **kwargs).json()

    @contextlib.contextmanager
    def _multipart(self, images: Sequence[Path | str], spec: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """The multipart body of a submission; the image files are streamed from disk, closed afterwards."""
        paths = image_files(images)
        if not paths:
            raise DOPSDAPIError(0, "no_images", "no images to upload (PNG, JPEG or WebP files, or a folder of them)")
        with contextlib.ExitStack() as stack:
            files: list[tuple[str, tuple[str, BinaryIO, str]]] = []
            for p in paths:
                try:
                    handle = stack.enter_context(p.open("rb"))
                except OSError as exc:
                    raise DOPSDAPIError(0, "unreadable_file", f"{p}: {exc.strerror}", {"file": str(p)}) from exc
                content_type = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
                files.append(("images", (p.name, handle, content_type)))
            yield {"files": files, "data": {"spec": json.dumps(dict(spec))}}

    # -- jobs -----------------------------------------------------------------------------------------------------

    def submit(
        self,
        images: Sequence[Path | str],
        spec: Mapping[str, Any],
        *,
        dry_run: bool = False,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Submits a training job: the images (files, or folders of them) and the spec (`JobSpec` fields).

        Returns the queued job, or with `dry_run=True` what the API would run (`config`, `estimated_gpu_seconds`,
        `queue_position`, `images`) without creating anything. With an `idempotency_key`, a repeated submission
        returns the same job.
        """
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        params = {"dry_run": "true"} if dry_run else {}
        with self._multipart(images, spec) as body:
            result: dict[str, Any] = self._send("POST", "/v1/jobs", params=params, headers=headers, **body).json()
        return result

    def preview(self, images: Sequence[Path | str], spec: Mapping[str, Any]) -> dict[str, Any]:
        """Starts a preview: the concept rendered zero-shot, the base model shown each reference image with each of
        the spec's `validation_prompts` (no training; at most 8 images).

        Returns the preview job (`kind` "preview"); follow it with `wait()` and read its images with
        `get_preview()`.
        """
        with self._multipart(images, spec) as body:
            result: dict[str, Any] = self._send("POST", "/v1/previews", **body).json()
        return result

    def get_preview(self, preview_id: str) -> dict[str, Any]:
        """A preview job, with `preview_images` (`prompt`, `seed`, `source`, short-lived `url`) once it succeeded."""
        result: dict[str, Any] = self._json("GET", f"/v1/previews/{preview_id}")
        return result

    def generate(
        self,
        prompt: str | Sequence[str],
        *,
        preset: str,
        seeds: Sequence[int] | None = None,
        num_images: int | None = None,
        adapters: Sequence[tuple[str, float]] = (),
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Queues a generation: each prompt x each seed, from `preset` with `adapters` (training job id, scale)
        combined; unset size, steps and guidance take the preset's native few-step setting. Returns the generation;
        `wait_generation()` follows it to its images."""
        body: dict[str, Any] = {
            "preset": preset,
            "prompt": prompt if isinstance(prompt, str) else list(prompt),
            "adapters": [{"job_id": job_id, "scale": scale} for job_id, scale in adapters],
        }
        optional = {"seeds": list(seeds) if seeds is not None else None, "num_images": num_images, "width": width,
                    "height": height, "steps": steps, "guidance_scale": guidance_scale}  # fmt: skip
        body.update({k: v for k, v in optional.items() if v is not None})
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        result: dict[str, Any] = self._send("POST", "/v1/generations", json=body, headers=headers).json()
        return result

    def get_generation(self, generation_id: str) -> dict[str, Any]:
        """A generation, with `images` (`url`, `prompt`, `seed`, `width`, `height`) once it succeeded."""
        result: dict[str, Any] = self._json("GET", f"/v1/generations/{generation_id}")
        return result

    def wait_generation(self, generation_id: str) -> dict[str, Any]:
        """Follows the generation's events until it has ended and returns it (its `status` says how)."""
        for _ in self.stream_events(generation_id):
            pass
        return self.get_generation(generation_id)

    def get(self, job_id: str) -> dict[str, Any]:
        """One job: status, queue position, progress, timestamps, resolved config, error, links."""
        result: dict[str, Any] = self._json("GET", f"/v1/jobs/{job_id}")
        return result

    def report(self, job_id: str) -> dict[str, Any] | None:
        """The job's evaluation report (the service's `report.json`): `verdicts` (`concept`: learned / not learned /
        inconclusive; `few_step_quality`: kept / degraded / inconclusive; each with its `summary`), `figures` (each
        with `title`, `unit`, `mean`, `ci95`, `noise_floor`, `verdict`, or why it was `not_measured`), the `step` it
        judged, `setting`, `thresholds`, `cost`. None until the job has one (it is made when training ends)."""
        report = self.get(job_id).get("report")
        return dict(report) if isinstance(report, dict) else None

    def list(
        self, *, status: str | None = None, limit: int = 20, cursor: str | None = None, kind: str | None = None
    ) -> dict[str, Any]:
        """One page of the caller's jobs, newest first: `{"data": [...], "next_cursor": ...}`."""
        params: dict[str, Any] = {"limit": limit}
        params.update({k: v for k, v in {"status": status, "cursor": cursor, "kind": kind}.items() if v})
        result: dict[str, Any] = self._json("GET", "/v1/jobs", params=params)
        return result

    def iter_jobs(self, *, status: str | None = None, kind: str | None = None) -> Iterator[dict[str, Any]]:
        """Every job of the caller, newest first, page after page."""
        cursor: str | None = None
        while True:
            page = self.list(status=status, cursor=cursor, kind=kind, limit=100)
            yield from page["data"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancels a job: a queued one at once, a running one within one training step. Returns the job."""
        result: dict[str, Any] = self._json("POST", f"/v1/jobs/{job_id}/cancel")
        return result

    def delete(self, job_id: str) -> None:
        """Cancels the job if needed and deletes everything stored for it."""
        self._send("DELETE", f"/v1/jobs/{job_id}", retries=3)

    def usage(self) -> dict[str, Any]:
        """What the key uses and may use: jobs and previews by status, GPU-seconds, stored bytes against its quota,
        and its limits (`GET /v1/usage`)."""
        result: dict[str, Any] = self._json("GET", "/v1/usage")
        return result

    def presets(self) -> builtins.list[dict[str, Any]]:
        """The model presets and the defaults each applies."""
        result: list[dict[str, Any]] = self._json("GET", "/v1/presets")
        return result

    # -- events ---------------------------------------------------------------------------------------------------

    def events(self, job_id: str, after: int = 0, *, limit: int = 100) -> dict[str, Any]:
        """One page of the job's event log after event id `after`: `{"data": [...], "next_after": N}`."""
        result: dict[str, Any] = self._json(
            "GET", f"/v1/jobs/{job_id}/events", params={"after": after, "limit": limit}
        )
        return result

    def stream_events(self, job_id: str, after: int = 0, *, max_reconnects: int = 20) -> Iterator[dict[str, Any]]:
        """The job's events live (server-sent events), from after event id `after` until the job has finished.

        Each item is an event: `{"id", "type", "created_at", "data"}`. A dropped connection is resumed where it
        stopped (`Last-Event-ID`), so no event is lost or repeated; after `max_reconnects` failed tries in a row
        the last error is raised.
        """
        last_id = after
        failures = 0
        while True:
            finished, planned_end = False, False
            try:
                headers = {"Accept": "text/event-stream", "Last-Event-ID": str(last_id)}
                timeout = httpx.Timeout(10.0, read=60.0)  # the server sends a keep-alive every 15 s
                with self._http.stream(
                    "GET", f"/v1/jobs/{job_id}/events", headers=headers, params={"after": last_id}, timeout=timeout
                ) as response:
                    if response.status_code in (429, 502, 503, 504):
                        response.read()
                        raise _Retry(_retry_after(response, default=min(2**failures, 10)), _error_from(response))
                    if response.is_error:
                        response.read()
                        raise _error_from(response)

                    def lines(response: httpx.Response = response) -> Iterator[str]:
                        nonlocal planned_end
                        for line in response.iter_lines():
                            planned_end = planned_end or line.startswith(LIFETIME_COMMENT)
                            yield line

                    for sse_id, sse_type, data in parse_sse(lines()):
                        event = _decode_event(sse_id, sse_type, data)
                        if isinstance(event.get("id"), int):
                            last_id = event["id"]
                        failures = 0
                        yield event
                        finished = finished or event.get("type") in TERMINAL_EVENTS
                if finished:
                    return
                if self.get(job_id)["status"] in TERMINAL_STATUSES:
                    yield from self._events_after(job_id, last_id)  # it ended between two polls of the stream
                    return
                if planned_end:  # the server ended it after its lifetime, as it does: not a failure
                    failures = 0
                    continue
                # The stream closed early (a restarted API): continue where it stopped.
                delay, error = 0.5, DOPSDAPIError(0, "stream_closed", "the event stream keeps closing early")
            except _Retry as retry:
                delay, error = retry.delay_s, retry.error
            except httpx.TransportError as exc:
                delay = min(2**failures * 0.5, 10)
                error = DOPSDAPIError(0, "connection_error", f"lost the event stream at {self.base_url}: {exc}")
            failures += 1
            if failures > max_reconnects:
                raise error
            time.sleep(delay)

    def _events_after(self, job_id: str, after: int) -> Iterator[dict[str, Any]]:
        while True:
            page = self.events(job_id, after, limit=500)
            yield from page["data"]
            if not page["data"]:
                return
            after = page["next_after"]

    def wait(
        self, job_id: str, on_event: Callable[[dict[str, Any]], None] | None = None, *, after: int = 0
    ) -> dict[str, Any]:
        """Follows the job's events until it has finished and returns the finished job.

        `on_event` is called with every event as it arrives (progress, samples, ...). Whether the job succeeded is
        the returned job's `status`; it is not an exception.
        """
        for event in self.stream_events(job_id, after=after):
            if on_event is not None:
                on_event(event)
        return self.get(job_id)

    # -- outputs --------------------------------------------------------------------------------------------------

    def artifacts(self, job_id: str) -> builtins.list[dict[str, Any]]:
        """Every output of a succeeded job: `name`, `kind` (adapter, sample, config, metrics), `size`, short-lived
        `url`."""
        result: list[dict[str, Any]] = self._json("GET", f"/v1/jobs/{job_id}/artifacts")["data"]
        return result

    def adapter_url(self, job_id: str, format: str = "diffusers") -> str:
        """A short-lived URL of the job's adapter, in `format` "diffusers" or "comfyui"."""
        params = {} if format == "diffusers" else {"format": format}
        response = self._send("GET", f"/v1/jobs/{job_id}/adapter", params=params, follow_redirects=False, retries=3)
        location = response.headers.get("location")
        if response.status_code not in (301, 302, 303, 307, 308) or not location:
            raise DOPSDAPIError(response.status_code, "unexpected_response", "the API did not redirect to the adapter")
        return str(location)

    def download_adapter(self, job_id: str, path: Path | str, format: str = "diffusers") -> Path:
        """Downloads the adapter of a succeeded job to `path` (a file, or a folder to put it in: an existing one, or
        a string ending in "/").

        Returns the written file. `format`: "diffusers" (`pipe.load_lora_weights(path)`) or "comfyui".
        """
        fallback = ADAPTER_NAME if format == "diffusers" else f"pytorch_lora_weights_{format}.safetensors"
        return self.download_url(self.adapter_url(job_id, format), path, fallback_name=fallback)

    def download_url(self, url: str, path: Path | str, *, fallback_name: str = "download") -> Path:
        """Downloads one short-lived URL (an artifact's, a sample's) to `path` (a file, or an existing folder).

        The file appears complete or not at all (written to a temporary file, then renamed). A `path` string ending
        in "/" is a folder, made if needed.
        """
        if isinstance(path, str) and path.endswith(("/", os.sep)):
            Path(path).mkdir(parents=True, exist_ok=True)
        path = Path(path)
        try:
            with self._downloads.stream("GET", url, follow_redirects=True) as response:
                if response.is_error:
                    response.read()
                    raise _error_from(response)
                target = path / _filename(response, fallback_name) if path.is_dir() else path
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
                try:
                    with os.fdopen(fd, "wb") as out:
                        for chunk in response.iter_bytes(1 << 20):
                            out.write(chunk)
                    os.replace(tmp, target)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
        except httpx.TransportError as exc:
            raise DOPSDAPIError(0, "connection_error", f"download failed: {exc}") from exc
        return target

    def download_samples(self, job_id: str, folder: Path | str) -> builtins.list[Path]:
        """Downloads every sample image and contact sheet of a succeeded job under `folder`, keeping their
        `samples/step-N/...` layout. Returns the written files."""
        folder = Path(folder)
        written = []
        for artifact in self.artifacts(job_id):
            if artifact["kind"] != "sample":
                continue
            relative = Path(*[p for p in artifact["name"].split("/") if p not in {"", ".", ".."}])
            written.append(self.download_url(artifact["url"], folder / relative))
        return written


class _Retry(Exception):
    def __init__(self, delay_s: float, error: DOPSDAPIError) -> None:
        super().__init__(delay_s)
        self.delay_s = delay_s
        self.error = error


def _retry_after(response: httpx.Response, *, default: float) -> float:
    try:
        return min(float(response.headers.get("retry-after", default)), 30.0)
    except ValueError:
        return default


def _decode_event(sse_id: str | None, sse_type: str, data: str) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        event = {"type": sse_type, "data": data}
    event.setdefault("type", sse_type)
    if "id" not in event and sse_id is not None and sse_id.isdigit():
        event["id"] = int(sse_id)
    return event


__all__ = ["DOPSDAPIError", "DOPSDClient", "image_files", "parse_sse"]
