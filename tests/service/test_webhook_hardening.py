"""Webhooks that cannot hurt the service, through the real sender against real receivers on loopback and a real
PostgreSQL outbox: a receiver's gzip bomb or endless answer costs `dopsd maintain` no memory and the attempt is
recorded; a name that rebinds after the check is sent to the address that was checked; a malformed URL, a slow
receiver or an error of one attempt touches no other delivery; every attempt is signed with its own time; two
senders never send one delivery at once nor lose an attempt record; logs carry no query strings."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import ssl
import struct
import subprocess
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks.webhooks import Webhook

from core import api_keys
from core.db import make_engine, make_sessionmaker
from core.jobs import client_side
from core.jobs.models import JobEvent, WebhookDelivery
from core.webhooks import (
    DeliveryLimits,
    WebhookTargetError,
    WebhookUrlInvalid,
    any_address,
    check_target,
    deliver_due,
    list_deliveries,
    public_only,
)
from scripts import stack
from tests.conftest import REPO, migrated_database
from tests.pace import eventually


Respond = Callable[[BaseHTTPRequestHandler], None]


class Receiver:
    """A webhook receiver on loopback (on `host`, and `port` if given). It records each request (arrival time,
    headers, body) and answers with `respond(handler)`, by default a bare 200 (or the next of `codes`)."""

    def __init__(
        self,
        respond: Respond | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        codes: list[int] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.requests: list[tuple[float, dict[str, str], bytes]] = []
        self.codes = list(codes or [])
        self.in_flight: dict[str, int] = {}
        self.overlaps: list[str] = []
        receiver, lock = self, threading.Lock()

        def answer(handler: BaseHTTPRequestHandler) -> None:
            handler.send_response(receiver.codes.pop(0) if receiver.codes else 200)
            handler.send_header("content-length", "0")
            handler.end_headers()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                msg_id = headers.get("webhook-id", "")
                with lock:
                    receiver.requests.append((time.monotonic(), headers, body))
                    receiver.in_flight[msg_id] = receiver.in_flight.get(msg_id, 0) + 1
                    if receiver.in_flight[msg_id] > 1:
                        receiver.overlaps.append(msg_id)
                try:
                    (respond or answer)(self)
                finally:
                    with lock:
                        receiver.in_flight[msg_id] -= 1

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://{host}:{self.port}/hooks/dopsd"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    """Makes receivers (`Receiver(...)` arguments) and closes them after the test."""
    made: list[Receiver] = []

    def make(*args: Any, **kwargs: Any) -> Receiver:
        made.append(Receiver(*args, **kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture(scope="module")
def own_database(services: None) -> Iterator[str]:
    """A database of this module's own, so no other sender acts on its deliveries."""
    yield from migrated_database("hooks")


@pytest.fixture
def sessions(own_database: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(own_database)
    yield make_sessionmaker(engine)
    engine.dispose()


def job_with_webhook(sessions: sessionmaker[Session], url: str) -> tuple[uuid.UUID, str]:
    """A queued job of a new key whose webhook wants `queued`: one delivery, due now. Returns the job's id and
    the key's webhook secret."""
    with sessions() as s:
        owner, _ = api_keys.create_api_key(session=s, name="hooks")
        job = client_side.create_job(
            session=s, job_id=uuid.uuid4(), owner_id=owner.id, preset="tiny-z-image", queue="train.z_image",
            spec={}, config={"max_train_steps": 5}, images=[], webhook_url=url, webhook_events=["queued"],
        )  # fmt: skip
        s.commit()
        return job.id, str(owner.webhook_secret)


def delivery_of(sessions: sessionmaker[Session], job_id: uuid.UUID) -> WebhookDelivery:
    with sessions() as s:
        (delivery,) = list_deliveries(session=s, job_id=job_id)
        return delivery


def one_pass(sessions: sessionmaker[Session], **overrides: Any) -> int:
    """One sender pass as maintenance runs it, on loopback receivers (long retry delays, so a delivery this
    test failed is not due again in a later test of the module)."""
    kwargs: dict[str, Any] = {
        "public_data": lambda _type, data: data,
        "retry_delays_s": [600],
        "limits": DeliveryLimits(attempt_timeout_s=5),
        "policy": any_address,
    }
    kwargs.update(overrides)
    return deliver_due(sessions, **kwargs)


# A receiver's answer cannot cost memory -------------------------------------------------------------------------


def gzip_of_zeros(mib: int) -> bytes:
    """A valid gzip stream of `mib` MiB of zeros, about 1 KiB per MiB, made in a fraction of a second (one
    self-contained deflate block repeated)."""
    block = zlib.compressobj(9, zlib.DEFLATED, -15)
    one = block.compress(bytes(1 << 20)) + block.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(bytes(1 << 20), crc)
    end = zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + one * mib + end + struct.pack("<II", crc, (mib << 20) % 2**32)


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc")


def current_rss_mib(pid: int) -> float:
    """The process's resident memory now (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc")


BOMB_MIB = 256


def test_a_gzip_bomb_or_an_endless_answer_costs_dopsd_maintain_no_memory_and_the_attempt_is_recorded(
    own_database: str, sessions: sessionmaker[Session], receivers: Callable[..., Receiver], tmp_path: Path
) -> None:
    bomb = gzip_of_zeros(BOMB_MIB)  # 256 KiB on the wire, 256 MiB once decompressed

    def send_bomb(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("content-encoding", "gzip")
        handler.send_header("content-length", str(len(bomb)))
        handler.end_headers()
        handler.wfile.write(bomb)

    def send_forever(handler: BaseHTTPRequestHandler) -> None:  # 256 MiB, as fast as loopback takes it
        handler.send_response(200)
        handler.send_header("content-length", str(BOMB_MIB << 20))
        handler.end_headers()
        chunk = bytes(1 << 20)
        try:
            for _ in range(BOMB_MIB):
                handler.wfile.write(chunk)
        except OSError:
            pass  # the sender hung up, as it should

    env = {k: v for k, v in os.environ.items() if not k.startswith("DOPSD_")}
    env.update(
        DOPSD_ENVIRONMENT="development",
        DOPSD_DATABASE_URL=own_database,
        DOPSD_BROKER_URL="filesystem://",
        DOPSD_BROKER_DIR=str(tmp_path / "broker"),
        DOPSD_STORAGE_BACKEND="local",
        DOPSD_STORAGE_DIR=str(tmp_path / "artifacts"),
        DOPSD_REAPER_INTERVAL_S="60",
        DOPSD_WEBHOOK_POLL_INTERVAL_S="0.2",
        DOPSD_WEBHOOK_ALLOW_PRIVATE="true",
        DOPSD_WEBHOOK_RETRY_DELAYS_S="[600]",
        DOPSD_LOG_FORMAT="text",
        PYTHONPATH=str(REPO),
    )
    log = tmp_path / "maintain.log"
    process = stack.start_maintain(env, log)
    try:
        before_mib = current_rss_mib(process.pid)
        jobs = [job_with_webhook(sessions, receivers(send).url)[0] for send in (send_bomb, send_forever)]

        def attempted() -> list[WebhookDelivery]:
            return [delivery_of(sessions, job_id) for job_id in jobs]

        deliveries = eventually(attempted, lambda ds: all(d.attempts for d in ds), "both attempts recorded")
        peak_mib = peak_rss_mib(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    assert [d.status for d in deliveries] == ["delivered", "delivered"], [d.attempts for d in deliveries]
    assert [d.attempts[0]["status_code"] for d in deliveries] == [200, 200]
    # Without the bounds the sender decompresses and keeps the whole answer: 256 MiB or more for each.
    assert peak_mib - before_mib < 64, f"peak {peak_mib:.0f} MiB, {before_mib:.0f} MiB before the deliveries"


# The address that was checked is the one connected to -----------------------------------------------------------


def test_a_name_that_rebinds_after_the_check_is_sent_to_the_address_that_was_checked(
    sessions: sessionmaker[Session], receivers: Callable[..., Receiver]
) -> None:
    checked = receivers(host="127.0.0.2")
    rebound = receivers(host="127.0.0.3", port=checked.port)  # the same port on another loopback address
    answers = iter([["127.0.0.2"]])  # the first resolution answers the allowed address, every later one the other

    def rebinding(host: str, port: int) -> list[str]:
        assert (host, port) == ("hooks.rebind.test", checked.port)
        return next(answers, ["127.0.0.3"])

    job_id, _ = job_with_webhook(sessions, f"http://hooks.rebind.test:{checked.port}/hook?to=me")
    allowed = ipaddress.ip_address("127.0.0.2")
    assert one_pass(sessions, resolver=rebinding, policy=lambda address: address == allowed) == 1
    assert rebound.requests == []
    ((_, headers, _),) = checked.requests
    assert headers["host"] == f"hooks.rebind.test:{checked.port}"  # the URL's host, not the address
    assert delivery_of(sessions, job_id).status == "delivered"


def certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for the host `name` and its key (openssl), as files."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls_to_a_pinned_address_keeps_the_urls_name_for_sni_and_the_certificate_check(
    sessions: sessionmaker[Session], receivers: Callable[..., Receiver], tmp_path: Path
) -> None:
    cert, key = certificate(tmp_path, "hooks.tls.test")
    names: list[str | None] = []
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    server_side.sni_callback = lambda _sock, name, _ctx: names.append(name)
    receiver = receivers(tls=server_side)
    trusting = ssl.create_default_context(cafile=str(cert))
    to_loopback = lambda host, _port: ["127.0.0.1"]  # noqa: E731
    good, _ = job_with_webhook(sessions, f"https://hooks.tls.test:{receiver.port}/hook")
    one_pass(sessions, resolver=to_loopback, ssl_context=trusting)
    assert delivery_of(sessions, good).status == "delivered"
    assert names == ["hooks.tls.test"] and receiver.requests[0][1]["host"] == f"hooks.tls.test:{receiver.port}"
    # A name the certificate does not carry is refused, though the address is the same.
    other, _ = job_with_webhook(sessions, f"https://other.tls.test:{receiver.port}/hook")
    one_pass(sessions, resolver=to_loopback, ssl_context=trusting)
    (attempt,) = delivery_of(sessions, other).attempts
    assert attempt["status_code"] is None and "CERTIFICATE_VERIFY_FAILED" in attempt["error"]
    assert len(receiver.requests) == 1


def test_a_target_is_checked_again_at_delivery(
    sessions: sessionmaker[Session], receivers: Callable[..., Receiver]
) -> None:
    """A host that moved to a private address after submission gets nothing: the delivery fails for good."""
    receiver = receivers()
    job_id, _ = job_with_webhook(sessions, receiver.url)
    assert one_pass(sessions, policy=public_only) == 1
    assert receiver.requests == []
    delivery = delivery_of(sessions, job_id)
    assert delivery.status == "failed" and "loopback" in delivery.attempts[0]["error"]


# One delivery cannot stall the others ---------------------------------------------------------------------------


def test_a_malformed_url_or_a_slow_receiver_delays_no_other_delivery(
    sessions: sessionmaker[Session], receivers: Callable[..., Receiver], caplog: pytest.LogCaptureFixture
) -> None:
    hung_up: list[float] = []

    def drip(handler: BaseHTTPRequestHandler) -> None:  # a byte every 0.2 s: never a per-read timeout
        try:
            handler.wfile.write(b"HTTP/1.1 200 OK\r\nx-slow: ")
            for _ in range(150):  # 30 s at most
                handler.wfile.write(b"a")
                handler.wfile.flush()
                time.sleep(0.2)
        except OSError:
            hung_up.append(time.monotonic())

    slow, healthy = receivers(drip), receivers()
    # Stored before URLs were checked at submission: a broken IPv6 literal and an out-of-range port.
    malformed = [job_with_webhook(sessions, url)[0] for url in ("http://[::1/hook", "http://hooks.example:99999/hook")]
    dripping, _ = job_with_webhook(sessions, slow.url + "?token=s3cret")
    fine, _ = job_with_webhook(sessions, healthy.url)
    with caplog.at_level(logging.INFO, logger="core.webhooks"):
        assert one_pass(sessions, limits=DeliveryLimits(attempt_timeout_s=1.5)) == 4
    broken_ipv6, bad_port = (delivery_of(sessions, job_id) for job_id in malformed)
    assert broken_ipv6.status == "failed" and "not a valid URL" in broken_ipv6.attempts[0]["error"]
    assert bad_port.status == "failed" and "port 99999" in bad_port.attempts[0]["error"]
    timed_out = delivery_of(sessions, dripping)
    assert timed_out.status == "pending" and timed_out.attempts[0]["error"] == "no answer within 1.5 s"
    assert 1500 <= timed_out.attempts[0]["duration_ms"] < 10_000  # bounded in all, not per read
    assert delivery_of(sessions, fine).status == "delivered"
    eventually(lambda: hung_up, bool, "the sender hanging up on the slow receiver")
    assert healthy.requests[0][0] < hung_up[0]  # the healthy delivery did not wait for the slow one
    assert "s3cret" not in caplog.text and "failed: no answer within 1.5 s" in caplog.text


def test_one_tenant_with_many_due_deliveries_takes_a_share_of_a_pass_not_all_of_it(
    sessions: sessionmaker[Session], receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers()
    with sessions() as s:
        owner, _ = api_keys.create_api_key(session=s, name="busy")
        busy = [
            client_side.create_job(
                session=s, job_id=uuid.uuid4(), owner_id=owner.id, preset="tiny-z-image", queue="train.z_image",
                spec={}, config={}, images=[], webhook_url=receiver.url, webhook_events=["queued"],
            ).id
            for _ in range(6)
        ]  # fmt: skip
        s.commit()
    other, _ = job_with_webhook(sessions, receiver.url)  # due last, but another tenant's
    assert one_pass(sessions, limits=DeliveryLimits(concurrency=4, per_key=2)) == 3
    assert delivery_of(sessions, other).status == "delivered"
    assert sum(delivery_of(sessions, j).status == "delivered" for j in busy) == 2
    while one_pass(sessions):
        pass
    assert all(delivery_of(sessions, j).status == "delivered" for j in busy)


# Signing, claims and records ------------------------------------------------------------------------------------


def test_every_attempt_is_signed_with_its_own_time_so_a_late_retry_verifies(
    sessions: sessionmaker[Session], receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers(codes=[503])
    job_id, secret = job_with_webhook(sessions, receiver.url)
    event_time = datetime.now(UTC) - timedelta(minutes=10)  # the event happened ten minutes ago
    with sessions() as s:
        s.execute(update(JobEvent).where(JobEvent.job_id == job_id).values(created_at=event_time))
        s.commit()

    def attempt() -> str:
        one_pass(sessions, retry_delays_s=[0.1])
        return delivery_of(sessions, job_id).status

    eventually(attempt, lambda status: status == "delivered", "the retry delivered")
    assert [len(receiver.requests), receiver.requests[0][1]["webhook-id"]] == [
        2,
        receiver.requests[1][1]["webhook-id"],
    ]
    for _, headers, body in receiver.requests:
        payload = Webhook(secret).verify(body, headers)  # refuses a timestamp more than five minutes off
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
        assert datetime.fromisoformat(payload["timestamp"]) == event_time  # the body keeps the event's own time


def test_two_senders_never_send_one_delivery_at_once_nor_lose_an_attempt_record(
    sessions: sessionmaker[Session], receivers: Callable[..., Receiver]
) -> None:
    def slowly(handler: BaseHTTPRequestHandler) -> None:  # every first attempt fails, slowly; retries succeed
        time.sleep(0.3)
        seen = sum(h["webhook-id"] == handler.headers["webhook-id"] for _, h, _ in receiver.requests)
        handler.send_response(500 if seen == 1 else 200)
        handler.send_header("content-length", "0")
        handler.end_headers()

    receiver = receivers(slowly)
    jobs = [job_with_webhook(sessions, receiver.url)[0] for _ in range(6)]
    stop = threading.Event()

    def sender() -> None:
        limits = DeliveryLimits(attempt_timeout_s=3, concurrency=4)
        while not stop.is_set():
            if not one_pass(sessions, retry_delays_s=[0.05, 0.05], limits=limits):
                stop.wait(0.02)

    threads = [threading.Thread(target=sender) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        settled = eventually(
            lambda: [delivery_of(sessions, j) for j in jobs],
            lambda ds: all(d.status == "delivered" for d in ds),
            "every delivery delivered by the two senders",
        )
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert receiver.overlaps == []
    assert len(receiver.requests) == sum(len(d.attempts) for d in settled) == 12
    assert [[a["status_code"] for a in d.attempts] for d in settled] == [[500, 200]] * 6


# What the URL may be ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://hooks.example:99999/hook", "http://hooks.example:0/hook", "http://[::1/hook", "http://[fe80::zz]/hook",
     "http://hooks exam.ple/hook", "ftp://93.184.216.34/hook", "http:///nohost"],
)  # fmt: skip
def test_malformed_webhook_urls_are_invalid(url: str) -> None:
    with pytest.raises(WebhookUrlInvalid):
        check_target(url, any_address)


@pytest.mark.parametrize(
    "url",
    ["http://[64:ff9b::7f00:1]/hook", "http://[64:ff9b::a00:1]/hook", "http://[2002:7f00:1::1]/hook",
     "http://[2002:c0a8:101::1]/hook", "http://[::127.0.0.1]/hook", "http://[::10.0.0.1]/hook",
     "http://[::ffff:169.254.169.254]/hook", "http://[64:ff9b:1::1]/hook", "http://224.0.0.1/hook"],
)  # fmt: skip
def test_ipv6_forms_that_embed_private_ipv4_addresses_are_refused(url: str) -> None:
    with pytest.raises(WebhookTargetError):
        check_target(url, public_only)


def test_ipv6_forms_that_embed_public_ipv4_addresses_pass() -> None:
    for url in ("http://[64:ff9b::5db8:d822]/hook", "http://[2002:5db8:d822::1]/hook", "https://93.184.216.34/hook"):
        assert check_target(url, public_only).addresses


def test_the_webhook_body_is_json_with_the_job_and_event(
    sessions: sessionmaker[Session], receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers()
    job_id, _ = job_with_webhook(sessions, receiver.url)
    one_pass(sessions)
    ((_, headers, body),) = receiver.requests
    assert headers["content-type"] == "application/json" and headers["accept-encoding"] == "identity"
    data = json.loads(body)
    assert data["type"] == "job.queued" and data["data"]["job_id"] == str(job_id)
