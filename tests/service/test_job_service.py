"""Service functions on a real PostgreSQL database: claims, leases, the cancel race, pagination cursors."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from core.db import make_engine, make_sessionmaker
from core.errors import InvalidRequest
from core.jobs import service
from core.jobs.models import Job
from core.webhooks import deliver_due, list_deliveries
from tests.conftest import migrated_database


@pytest.fixture(scope="module")
def own_database(services: None) -> Iterator[str]:
    """A database of this module's own: the stack's API runs a reaper on the shared test database."""
    yield from migrated_database("svc")


@pytest.fixture
def sessions(own_database: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(own_database)
    yield make_sessionmaker(engine)
    engine.dispose()


def new_job(sessions: sessionmaker[Session]) -> uuid.UUID:
    with sessions() as session:
        owner, _ = service.create_api_key(session=session, name="svc")
        job = service.create_job(
            session=session, job_id=uuid.uuid4(), owner_id=owner.id, preset="tiny-z-image", queue="train.z_image",
            spec={}, config={"max_train_steps": 5}, images=[],
        )  # fmt: skip
        session.commit()
        return job.id


def test_a_duplicate_delivery_does_nothing(sessions: sessionmaker[Session]) -> None:
    job_id = new_job(sessions)
    with sessions() as s:
        assert service.claim_job(session=s, job_id=job_id, worker_id="a", lease_s=600) == 1
    with sessions() as s:
        assert service.claim_job(session=s, job_id=job_id, worker_id="b", lease_s=600) is None


def test_a_job_whose_lease_ran_out_is_taken_over(sessions: sessionmaker[Session]) -> None:
    job_id = new_job(sessions)
    with sessions() as s:
        assert service.claim_job(session=s, job_id=job_id, worker_id="dead", lease_s=1) == 1
    time.sleep(1.2)
    with sessions() as s:
        assert service.claim_job(session=s, job_id=job_id, worker_id="alive", lease_s=600) == 2
    with sessions() as s:
        # The first worker, if it was only slow, learns it lost the job and leaves it alone.
        assert not service.renew_lease(session=s, job_id=job_id, worker_id="dead", lease_s=600)
        assert service.renew_lease(session=s, job_id=job_id, worker_id="alive", lease_s=600)
        s.commit()
        job = s.get_one(Job, job_id)
        assert (job.status, job.worker_id, job.attempt) == ("running", "alive", 2)


def test_cancel_racing_a_claim_asks_the_worker_to_stop(sessions: sessionmaker[Session]) -> None:
    job_id = new_job(sessions)
    with sessions() as api_session:
        job = api_session.get_one(Job, job_id)
        assert job.status == "queued"  # the API read it as queued...
        with sessions() as worker_session:  # ...then a worker claimed it
            service.claim_job(session=worker_session, job_id=job_id, worker_id="w", lease_s=600)
        service.request_cancel(session=api_session, job=job)
        api_session.commit()
    with sessions() as s:
        job = s.get_one(Job, job_id)
        assert job.status == "running" and job.cancel_requested
        assert service.cancel_requested(session=s, job_id=job_id)


def test_a_forged_cursor_is_a_client_error(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        owner, _ = service.create_api_key(session=s, name="cursor")
        for cursor in ("not-base64!", "WyIyMDI0LTAxLTAxIiwgMTIzXQ", "e30"):
            with pytest.raises(InvalidRequest):
                service.list_jobs(session=s, owner_id=owner.id, status=None, limit=10, cursor=cursor)


def test_a_key_at_its_running_limit_waits_in_the_queue(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        owner, _ = service.create_api_key(session=s, name="limits")
        ids = []
        for _ in range(3):
            job = service.create_job(
                session=s, job_id=uuid.uuid4(), owner_id=owner.id, preset="tiny-z-image", queue="train.z_image",
                spec={}, config={}, images=[],
            )  # fmt: skip
            ids.append(job.id)
        s.commit()
    with sessions() as s:
        claims = [
            service.claim_job(session=s, job_id=i, worker_id=f"gpu-{n}", lease_s=600, max_running_per_key=2)
            for n, i in enumerate(ids)
        ]
    assert claims == [1, 1, None]
    with sessions() as s:
        assert s.get_one(Job, ids[2]).status == "queued"  # not rejected: it runs when a slot frees


def test_the_reaper_requeues_dead_workers_jobs_and_fails_them_after_max_attempts(
    sessions: sessionmaker[Session],
) -> None:
    job_id = new_job(sessions)
    for attempt in (1, 2):
        with sessions() as s:
            assert service.claim_job(session=s, job_id=job_id, worker_id=f"w{attempt}", lease_s=1) == attempt
        time.sleep(1.2)
        with sessions() as s:
            sent = service.reap(session=s, max_attempts=2, dispatch_grace_s=3600, idempotency_ttl_s=3600)
            s.commit()
            job = s.get_one(Job, job_id)
        if attempt == 1:
            assert (job_id, "train.z_image") in sent and job.status == "queued" and job.worker_id is None
        else:
            assert job_id not in [j for j, _ in sent]
            assert job.status == "failed" and job.error_code == "too_many_attempts"


def test_concurrent_claims_respect_the_running_limit(sessions: sessionmaker[Session]) -> None:
    """Eight workers claiming eight jobs of one key at the same moment: exactly the limit get one."""
    import threading

    with sessions() as s:
        owner, _ = service.create_api_key(session=s, name="race")
        ids = [
            service.create_job(
                session=s, job_id=uuid.uuid4(), owner_id=owner.id, preset="tiny-z-image", queue="train.z_image",
                spec={}, config={}, images=[],
            ).id
            for _ in range(8)
        ]  # fmt: skip
        s.commit()
    results: list[int | None] = []
    barrier = threading.Barrier(8)

    def claim(job_id: uuid.UUID, n: int) -> None:
        with sessions() as s:
            barrier.wait()
            results.append(
                service.claim_job(session=s, job_id=job_id, worker_id=f"w{n}", lease_s=600, max_running_per_key=2)
            )

    threads = [threading.Thread(target=claim, args=(job_id, n)) for n, job_id in enumerate(ids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=lambda r: r is None)[:2] == [1, 1] and results.count(None) == 6


def test_a_webhook_target_is_checked_again_at_delivery(sessions: sessionmaker[Session]) -> None:
    """A host that moved to a private address after submission gets nothing: the delivery fails, no request."""
    with sessions() as session:
        owner, _ = service.create_api_key(session=session, name="hooks")
        job = service.create_job(
            session=session, job_id=uuid.uuid4(), owner_id=owner.id, preset="tiny-z-image", queue="train.z_image",
            spec={}, config={"max_train_steps": 5}, images=[], webhook_url="http://127.0.0.1:9/hook",
            webhook_events=["queued"],
        )  # fmt: skip
        session.commit()
        job_id = job.id
    sent: list[httpx.Request] = []
    client = httpx.Client(transport=httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(200)))
    attempted = deliver_due(sessions, public_data=lambda _t, d: d, retry_delays_s=[0.1], client=client)
    assert attempted >= 1 and sent == []
    with sessions() as session:
        (delivery,) = list_deliveries(session=session, job_id=job_id)
        assert delivery.status == "failed" and "loopback" in delivery.attempts[0]["error"]
