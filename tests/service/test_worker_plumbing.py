"""The worker's plumbing on a real PostgreSQL database: a lost lease stops a run with `LeaseLost` (never written
as a cancel), and the retry policies of database writes and storage transfers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from core import api_keys
from core.config import get_settings
from core.db import make_engine, make_sessionmaker
from core.errors import NotFound, ServiceUnavailable
from core.jobs import client_side, worker_side
from core.jobs.models import Job
from core.storage import make_store
from dopsd.callbacks import StepState
from tests.conftest import migrated_database
from worker.dbretry import retry_db
from worker.reporting import JobReporter, LeaseLost
from worker.uploads import with_retries


@pytest.fixture(scope="module")
def sessions(services: None) -> Iterator[sessionmaker[Session]]:
    for url in migrated_database("plumbing"):
        engine = make_engine(url)
        yield make_sessionmaker(engine)
        engine.dispose()


def taken_over_job(sessions: sessionmaker[Session]) -> uuid.UUID:
    """A job whose first worker ("slow") lost its lease to a second one ("new")."""
    with sessions() as s:
        owner, _ = api_keys.create_api_key(session=s, name="plumbing")
        job = client_side.create_job(
            session=s, job_id=uuid.uuid4(), owner_id=owner.id, preset="tiny-z-image", queue="train.z_image",
            spec={}, config={"max_train_steps": 5}, images=[],
        )  # fmt: skip
        s.commit()
    with sessions() as s:
        assert worker_side.claim_job(session=s, job_id=job.id, worker_id="slow", lease_s=0) == 1
    with sessions() as s:
        assert worker_side.claim_job(session=s, job_id=job.id, worker_id="new", lease_s=600) == 2
    return job.id


def reporter(sessions: sessionmaker[Session], job_id: uuid.UUID, worker_id: str, tmp_path: Path) -> JobReporter:
    store = make_store(get_settings().model_copy(update={"storage_dir": tmp_path}))
    return JobReporter(job_id, worker_id=worker_id, sessions=sessions, store=store, interval_s=0.0, lease_s=600)


def test_a_worker_that_lost_its_lease_stops_with_lease_lost_and_leaves_the_job_alone(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    job_id = taken_over_job(sessions)
    slow = reporter(sessions, job_id, "slow", tmp_path)
    with pytest.raises(LeaseLost):
        slow.renew_lease()
    step = StepState(step=3, total_steps=5, loss=0.1, learning_rate=1e-4, elapsed_s=1.0, eta_s=1.0)
    with pytest.raises(LeaseLost):  # raised through the trainer: it stops at once, no checkpoint of its own
        slow.on_step_end(step)
    with sessions() as s:
        job = s.get_one(Job, job_id)
        assert (job.status, job.worker_id, job.step) == ("running", "new", 0)
    reporter(sessions, job_id, "new", tmp_path).renew_lease()  # the holder's lease renews


def test_database_writes_retry_connection_errors_only() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))
        return "written"

    assert retry_db(flaky, what="test write") == "written" and len(calls) == 2

    def bad_query() -> None:
        calls.append(1)
        raise ProgrammingError("SELEC 1", {}, Exception("syntax error"))

    calls.clear()
    with pytest.raises(ProgrammingError):
        retry_db(bad_query, what="test query")
    assert len(calls) == 1


def test_storage_transfers_retry_an_unavailable_store_up_to_their_budget() -> None:
    calls: list[int] = []

    def down() -> None:
        calls.append(1)
        raise ServiceUnavailable("object storage is unavailable")

    with pytest.raises(ServiceUnavailable):
        with_retries(down, what="test upload", max_wait_s=0.2, first_delay_s=0.01)
    assert len(calls) >= 3  # tried again and again until the outage outlasted what it may wait

    def missing() -> None:
        calls.append(1)
        raise NotFound("no such object")

    calls.clear()
    with pytest.raises(NotFound):  # not transient: no retry
        with_retries(missing, what="test download", max_wait_s=0.2, first_delay_s=0.01)
    assert len(calls) == 1


@pytest.mark.parametrize("threads", [None, "1"])
def test_a_worker_process_takes_the_configured_torch_threads(threads: str | None) -> None:
    """`DOPSD_WORKER_TORCH_THREADS` is what a worker's pool process sets while it starts; unset, torch keeps its own
    default."""
    import torch

    from worker.celery_app import _fresh_connections

    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as env:
        env.delenv("DOPSD_WORKER_TORCH_THREADS", raising=False)
        if threads is not None:
            env.setenv("DOPSD_WORKER_TORCH_THREADS", threads)
        get_settings.cache_clear()
        try:
            torch.set_num_threads(2)
            _fresh_connections()
            assert torch.get_num_threads() == (2 if threads is None else int(threads))
        finally:
            get_settings.cache_clear()
            torch.set_num_threads(before)
