"""`spec.images_url` through HTTP on the in-process API, against real HTTPS servers on loopback (a self-signed
certificate, its CA given by `DOPSD_IMAGES_URL_CA_BUNDLE`): an archive fetched over https becomes a job, a dry run or
a preview whose config shows its captions, after at most the allowed redirects; a replayed `Idempotency-Key` is not
fetched again. Everything else is refused with its code and creates nothing (no job, no stored file, no broker
message): http://, private addresses (named, literal, or a redirect's), too many redirects, the size cap (declared
or streamed), the time cap (a trickling server, cut at the cap), a non-2xx answer, a certificate for another name,
not an archive, an archive attack.

The servers have names of their own (`archive.test` on 127.0.0.2 stands for a public host, `inside.test` on
127.0.0.3 for a private one), given to the app through its resolver hook; its address policy is the production
one (`public_only`) with 127.0.0.2 let through, so what is refused is refused by the real checks.
"""

from __future__ import annotations

import io
import ipaddress
import json
import socket
import ssl
import subprocess
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.commands import migrate
from api.main import create_app
from core.db import make_engine, make_sessionmaker
from core.jobs.models import Job
from core.outbound import IPAddress, public_only
from tests.api.local_api import LocalApi, tier_settings
from tests.api.payloads import png_bytes
from tests.conftest import EXAMPLES, quick_spec


PUBLIC, PRIVATE = "127.0.0.2", "127.0.0.3"
NAMES = {"archive.test": [PUBLIC], "inside.test": [PRIVATE], "other.test": [PUBLIC]}  # other.test: not on the cert
MAX_BYTES = 256 * 1024
TIMEOUT_S = 1.5
MAX_REDIRECTS = 2
ROBOTS = sorted(EXAMPLES.glob("*.png"))


def zip_of(members: dict[str, bytes]) -> bytes:
    """A deflated zip of `members` (name: bytes)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


GOOD = zip_of({
    "robots/robot-1.png": ROBOTS[0].read_bytes(), "robots/robot-1.txt": b"a photo of [V] on a desk\n",
    "robots/robot-2.png": ROBOTS[1].read_bytes(),
})  # fmt: skip
TRAVERSAL = zip_of({"robot-1.png": ROBOTS[0].read_bytes(), "../escape.png": ROBOTS[0].read_bytes()})


Handler = Callable[[BaseHTTPRequestHandler], None]


def send(status: int, body: bytes = b"", **headers: str) -> Handler:
    """An answer: `status`, the headers (`content_length=None` for none) and `body`."""

    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        length = headers.get("content_length", str(len(body)))
        if length != "None":
            handler.send_header("content-length", length)
        for name, value in headers.items():
            if name != "content_length":
                handler.send_header(name.replace("_", "-"), value)
        handler.end_headers()
        try:
            handler.wfile.write(body)
        except OSError:
            pass  # the fetch hung up, as it should past a cap

    return answer


def trickle(handler: BaseHTTPRequestHandler) -> None:
    """A byte every 0.1 s of a 10,000-byte answer: no single read is ever slow."""
    handler.send_response(200)
    handler.send_header("content-length", "10000")
    handler.end_headers()
    try:
        for _ in range(10000):
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(0.1)
    except OSError:
        pass


@dataclass
class Server:
    """An HTTPS server on `host` with the certificate and key `tls`: `routes` by path (the rest answers 404); it
    records each request's path and headers, and each TLS server name it was sent."""

    host: str
    tls: tuple[Path, Path]
    port: int = 0
    routes: dict[str, Handler] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    names: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        server = self

        class Handle(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                server.routes.get(self.path.split("?")[0], send(404, b"no such file"))(self)

            def log_message(self, *args: Any) -> None:
                pass

        def note_name(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            self.names.append(name)

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*self.tls)
        context.sni_callback = note_name
        self.http = ThreadingHTTPServer((self.host, self.port), Handle)
        self.http.daemon_threads = True
        self.http.socket = context.wrap_socket(self.http.socket, server_side=True)
        self.port = self.http.server_address[1]
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def paths(self) -> list[str]:
        """The paths requested so far, in order."""
        return [path for path, _ in self.requests]

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for archive.test and inside.test, and its key (openssl), as files."""
    cert, key = folder / "archive.crt", folder / "archive.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=archive.test",
         "-addext", "subjectAltName=DNS:archive.test,DNS:inside.test"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@dataclass
class Servers:
    public: Server  # archive.test
    private: Server  # inside.test, on the same port

    def url(self, path: str, *, host: str = "archive.test", scheme: str = "https") -> str:
        return f"{scheme}://{host}:{self.public.port}{path}"


def resolve(host: str, _port: int) -> list[str]:
    """The tests' names (the system resolver knows none of them)."""
    if host not in NAMES:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return NAMES[host]


def public_and_the_test_server(address: IPAddress) -> bool:
    """The production policy, with the `archive.test` server's loopback address standing for a public one."""
    return address == ipaddress.ip_address(PUBLIC) or public_only(address)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    files = certificate(tmp_path_factory.mktemp("tls"))
    public = Server(PUBLIC, files)
    private = Server(PRIVATE, files, port=public.port)
    for server in (public, private):
        server.routes.update({"/robots.zip": send(200, GOOD), "/traversal.zip": send(200, TRAVERSAL)})
    running = Servers(public, private)
    public.routes.update({
        "/start": send(302, location="/robots.zip"),
        "/to-inside": send(302, location=running.url("/robots.zip", host="inside.test")),
        "/to-http": send(301, location=running.url("/robots.zip", scheme="http")),
        **{f"/loop/{i}": send(307, location=f"/loop/{i + 1}") for i in range(10)},
        "/big-declared": send(200, b"PK\x03\x04", content_length=str(MAX_BYTES + 1)),
        "/big-streamed": send(200, b"PK\x03\x04" + bytes(MAX_BYTES), content_length="None"),
        "/trickle": trickle,
        "/image.png": send(200, png_bytes()),
        "/broken": send(503, b"try later"),
    })  # fmt: skip
    yield running
    public.close()
    private.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, broker_dir: Path, servers: Servers) -> Iterator[LocalApi]:
    """The in-process app with the production default (no private address, https only), small caps, the servers'
    CA, and the tests' names."""
    settings = tier_settings(tmp_path_factory.mktemp("images-url"), broker_dir).model_copy(
        update={
            "images_url_ca_bundle": servers.public.tls[0], "images_url_max_bytes": MAX_BYTES,
            "images_url_timeout_s": TIMEOUT_S, "images_url_max_redirects": MAX_REDIRECTS,
        }
    )  # fmt: skip
    assert settings.images_url_allow_private is False
    migrate(settings.database_url)
    app = create_app(settings)
    app.state.images_url_resolver = resolve
    app.state.images_url_policy = public_and_the_test_server
    with TestClient(app, base_url=settings.public_url) as started:
        yield LocalApi(settings, started)


def post(api: LocalApi, key: str, spec: dict[str, Any], *, path: str = "/v1/jobs", **kwargs: Any) -> Any:
    """A submission whose only part is `spec` (multipart, as the API takes it)."""
    with api.client(key) as client:
        return client.post(path, files={"spec": (None, json.dumps(spec))}, **kwargs)


def stored_spec(api: LocalApi, job_id: str) -> dict[str, Any]:
    engine = make_engine(api.settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            job = session.get(Job, uuid.UUID(job_id))
            assert job is not None
            return dict(job.spec)
    finally:
        engine.dispose()


CAPTIONS = {"robot-1.png": ["a photo of [V] on a desk"]}  # robot-2 has no sidecar: it takes the default caption


def test_an_archive_behind_a_redirect_becomes_a_job_with_its_captions(api: LocalApi, servers: Servers) -> None:
    key = api.create_key("images-url")
    requests_before = len(servers.public.requests)
    url = servers.url("/start?sig=secret")
    response = post(api, key, {**quick_spec(), "default_caption": "a photo of [V]", "images_url": url})
    assert response.status_code == 202, response.text
    job = response.json()
    assert [i["name"] for i in job["images"]] == ["robot-1.png", "robot-2.png"]
    with api.client(key) as client:
        assert client.get(f"/v1/jobs/{job['id']}").json()["config"]["captions"] == CAPTIONS
    assert stored_spec(api, job["id"])["images_url"] == url
    assert len([p for p in api.stored() if f"jobs/{job['id']}/inputs/" in p]) == 2
    (start, _), (archive, headers) = servers.public.requests[requests_before:]
    assert (start, archive) == ("/start?sig=secret", "/robots.zip")
    # Connected to the checked address, with the URL's name as Host and TLS server name; raw bytes asked for.
    assert headers["host"] == f"archive.test:{servers.public.port}" and servers.public.names[-1] == "archive.test"
    assert headers["accept-encoding"] == "identity" and headers["user-agent"].startswith("dopsd-images-url/")


def test_a_dry_run_and_a_preview_take_an_images_url(api: LocalApi, servers: Servers) -> None:
    key = api.create_key("images-url-dry")
    before = api.stored()
    spec = {**quick_spec(), "default_caption": "a photo of [V]", "images_url": servers.url("/robots.zip")}
    dry = post(api, key, spec, params={"dry_run": "true"})
    assert dry.status_code == 200, dry.text
    assert dry.json()["config"]["captions"] == CAPTIONS and api.stored() == before
    preview = post(api, key, spec, path="/v1/previews")
    assert preview.status_code == 202, preview.text
    assert len(preview.json()["images"]) == 2


def test_a_replayed_idempotency_key_answers_before_fetching_again(api: LocalApi, servers: Servers) -> None:
    key = api.create_key("images-url-idem")
    spec = {**quick_spec(), "images_url": servers.url("/robots.zip")}
    fetches = servers.public.paths().count("/robots.zip")
    first = post(api, key, spec, headers={"Idempotency-Key": "dataset-1"})
    again = post(api, key, spec, headers={"Idempotency-Key": "dataset-1"})
    assert (first.status_code, again.status_code) == (202, 200), again.text
    assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    assert servers.public.paths().count("/robots.zip") == fetches + 1
    # The same key with another URL is another request: 409, and nothing is fetched for it either.
    other = {**spec, "images_url": servers.url("/robots.zip?v=2")}
    conflict = post(api, key, other, headers={"Idempotency-Key": "dataset-1"})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_key_reused"
    assert "/robots.zip?v=2" not in servers.public.paths()


def test_images_and_an_images_url_together_are_refused(api: LocalApi, servers: Servers) -> None:
    spec = json.dumps({**quick_spec(), "images_url": servers.url("/robots.zip")})
    with api.client(api.create_key("images-url-both")) as client:
        response = client.post(
            "/v1/jobs", files=[("images", ("a.png", png_bytes(), "image/png")), ("spec", (None, spec))]
        )
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_spec"
    assert "not both" in response.json()["error"]["message"]


REFUSED: list[tuple[str, dict[str, str], int, str, str]] = [
    # (case, url parts, status, code, in the message)
    ("http to a public name", {"path": "/robots.zip", "scheme": "http"}, 422, "images_url_refused", "https://"),
    ("not an http url", {"path": "/robots.zip", "scheme": "ftp"}, 422, "images_url_invalid", "http"),
    ("a name on a private address", {"path": "/robots.zip", "host": "inside.test"}, 422, "images_url_refused", "private or loopback"),
    ("a private address literal", {"path": "/robots.zip", "host": "127.0.0.1"}, 422, "images_url_refused", "private or loopback"),
    ("a redirect to a private address", {"path": "/to-inside"}, 422, "images_url_refused", "redirects to https://inside.test"),
    ("a redirect to http", {"path": "/to-http"}, 422, "images_url_refused", "must use https://"),
    ("too many redirects", {"path": "/loop/0"}, 422, "images_url_refused", f"more than {MAX_REDIRECTS} times"),
    ("over the size cap, declared", {"path": "/big-declared"}, 413, "images_url_too_large", str(MAX_BYTES)),
    ("over the size cap, streamed", {"path": "/big-streamed"}, 413, "images_url_too_large", str(MAX_BYTES)),
    ("a non-2xx answer", {"path": "/broken"}, 422, "images_url_unreachable", "answered 503"),
    ("a missing file", {"path": "/missing.zip"}, 422, "images_url_unreachable", "answered 404"),
    ("a name that does not resolve", {"path": "/robots.zip", "host": "nowhere.test"}, 422, "images_url_unreachable", "does not resolve"),
    ("a certificate for another name", {"path": "/robots.zip", "host": "other.test"}, 422, "images_url_unreachable", "CERTIFICATE_VERIFY_FAILED"),
    ("not an archive", {"path": "/image.png"}, 422, "archive_invalid", "image.png: not a zip or tar archive"),
    ("an archive attack", {"path": "/traversal.zip"}, 422, "archive_unsafe_member", "traversal.zip: ../escape.png"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "parts", "status", "code", "message"), REFUSED, ids=[r[0] for r in REFUSED])
def test_a_refused_images_url_answers_its_code_and_creates_nothing(
    api: LocalApi, servers: Servers, case: str, parts: dict[str, str], status: int, code: str, message: str
) -> None:
    before, messages, inside = api.stored(), api.messages(), len(servers.private.requests)
    key = api.create_key(f"images-url-{code}")
    response = post(api, key, {**quick_spec(), "images_url": servers.url(**parts)})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and message in error["message"], error
    with api.client(key) as client:
        assert client.get("/v1/jobs").json()["data"] == []
    assert api.stored() == before and api.messages() == messages
    assert len(servers.private.requests) == inside  # nothing was ever sent to the private address
    if case == "too many redirects":
        assert servers.public.paths()[-(MAX_REDIRECTS + 1) :] == [f"/loop/{i}" for i in range(MAX_REDIRECTS + 1)]


def test_a_trickling_server_is_cut_at_the_time_cap(api: LocalApi, servers: Servers) -> None:
    before, key = api.stored(), api.create_key("images-url-slow")
    began = time.monotonic()
    response = post(api, key, {**quick_spec(), "images_url": servers.url("/trickle")})
    took = time.monotonic() - began
    assert response.status_code == 422 and response.json()["error"]["code"] == "images_url_timeout", response.text
    # The cap is on the whole fetch: one byte per 0.1 s never trips a per-read timeout, 10,000 of them take 1000 s.
    assert TIMEOUT_S <= took < TIMEOUT_S + 3, took
    assert api.stored() == before
