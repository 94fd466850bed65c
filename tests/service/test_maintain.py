"""`dopsd maintain` as its own process (the production shape): it requeues the job of a worker that died, sends
its message again, delivers a due webhook, deletes an old job's data, and exits 0 on SIGTERM. And which process
runs maintenance by default."""

from __future__ import annotations

import os
import signal
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Literal

import pytest
from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks.webhooks import Webhook

from core import api_keys
from core.config import Settings
from core.db import make_engine, make_sessionmaker
from core.jobs import client_side, worker_side
from core.jobs.models import Job, JobEvent
from core.storage import job_prefix
from scripts import stack
from tests.conftest import REPO, migrated_database


@pytest.fixture(scope="module")
def own_database(services: None) -> Iterator[str]:
    """A database of this module's own, so no other maintenance process acts on its jobs."""
    yield from migrated_database("maintain")


@pytest.fixture
def sessions(own_database: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(own_database)
    yield make_sessionmaker(engine)
    engine.dispose()


class Receiver:
    """A webhook receiver on loopback that keeps every request it gets."""

    def __init__(self) -> None:
        received: list[tuple[dict[str, str], bytes]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.received = received
        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_dopsd_maintain_requeues_a_dead_workers_job_delivers_its_webhook_purges_old_jobs_and_stops_on_sigterm(
    own_database: str, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    receiver = Receiver()
    with sessions() as s:
        owner, _ = api_keys.create_api_key(session=s, name="maintain")
        secret = str(owner.webhook_secret)
        job = client_side.create_job(
            session=s, job_id=uuid.uuid4(), owner_id=owner.id, preset="tiny-z-image", queue="train.z_image",
            spec={}, config={"max_train_steps": 5}, images=[], webhook_url=receiver.url, webhook_events=["started"],
        )  # fmt: skip
        s.commit()
        job_id = job.id
    with sessions() as s:  # a worker takes the job and dies at once: its lease has already run out
        assert worker_side.claim_job(session=s, job_id=job_id, worker_id="dead", lease_s=0) == 1
    with sessions() as s:  # and a job that finished 40 days ago, its adapter still stored
        old = client_side.create_job(
            session=s, job_id=uuid.uuid4(), owner_id=owner.id, preset="tiny-z-image", queue="train.z_image",
            spec={}, config={}, images=[],
        )  # fmt: skip
        old.status, old.finished_at = "succeeded", datetime.now(UTC) - timedelta(days=40)
        s.commit()
        old_id = old.id
    artifacts = tmp_path / "artifacts"
    adapter = artifacts / job_prefix(old_id) / "outputs" / "adapter.safetensors"
    adapter.parent.mkdir(parents=True)
    adapter.write_bytes(b"weights")

    broker = tmp_path / "broker"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOPSD_")}
    env.update(
        DOPSD_ENVIRONMENT="production",
        DOPSD_SIGNING_KEY="a-signing-key-for-this-test-only",
        DOPSD_DATABASE_URL=own_database,
        DOPSD_BROKER_URL="filesystem://",
        DOPSD_BROKER_DIR=str(broker),
        DOPSD_STORAGE_BACKEND="local",
        DOPSD_STORAGE_DIR=str(artifacts),
        DOPSD_RETENTION_DAYS="30",
        DOPSD_REAPER_INTERVAL_S="0.2",
        DOPSD_WEBHOOK_POLL_INTERVAL_S="0.2",
        DOPSD_WEBHOOK_ALLOW_PRIVATE="true",
        DOPSD_LOG_FORMAT="text",
        PYTHONPATH=str(REPO),
    )
    log = tmp_path / "maintain.log"
    process = stack.start_maintain(env, log)
    try:

        def requeued() -> bool:
            with sessions() as s:
                status = s.scalar(select(Job.status).where(Job.id == job_id))
                types = list(s.scalars(select(JobEvent.type).where(JobEvent.job_id == job_id)))
            return status == "queued" and "requeued" in types

        stack.wait_until(requeued, "the requeue of the dead worker's job", timeout_s=30)
        messages = lambda: [p for p in (broker / "out").iterdir() if str(job_id) in p.read_text()]  # noqa: E731
        stack.wait_until(messages, "the job's new message on the broker", timeout_s=30)
        stack.wait_until(lambda: receiver.received, "the `started` webhook", timeout_s=30)
        stack.wait_until(lambda: not adapter.exists(), "retention deleting the old job's objects", timeout_s=30)

        def hidden() -> bool:  # retention deletes the objects first, then marks the job: it answers 404 from then on
            with sessions() as s:
                return s.get_one(Job, old_id).deleted

        stack.wait_until(hidden, "retention marking the old job deleted", timeout_s=30)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    output = log.read_text()
    assert code == 0, output
    assert "maintenance stopped" in output

    headers, body = receiver.received[0]
    payload = Webhook(secret).verify(body, headers)  # raises on a bad signature
    assert payload["type"] == "job.started" and payload["data"]["job_id"] == str(job_id)


def test_the_api_runs_maintenance_itself_only_in_embedded_mode_unless_told() -> None:
    def settings(environment: Literal["development", "production"], in_api: bool | None = None) -> Settings:
        key = SecretStr("a-real-signing-key")
        return Settings(environment=environment, signing_key=key, maintenance_in_api=in_api)

    assert settings("development").api_runs_maintenance  # embedded mode: `dopsd serve` runs it inside the API
    assert not settings("production").api_runs_maintenance  # the production shape: `dopsd maintain` runs it
    assert settings("production", in_api=True).api_runs_maintenance
    assert not settings("development", in_api=False).api_runs_maintenance
