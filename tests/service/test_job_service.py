"""Service functions on a real PostgreSQL database: claims, leases, the cancel race, pagination cursors, the
state machine (every status change is a named transition of the table) and typed event payloads."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event, select, update
from sqlalchemy.orm import Session, sessionmaker

from core import api_keys
from core.db import make_engine, make_sessionmaker
from core.errors import Conflict, InvalidRequest
from core.events import parse_payload
from core.jobs import client_side, recovery, worker_side
from core.jobs.models import Job, JobEvent
from core.jobs.states import JobStatus, Transition
from core.jobs.transitions import TRANSITION_OPTION, move
from tests.conftest import migrated_database


@pytest.fixture(scope="module")
def own_database(services: None) -> Iterator[str]:
    """A database of this module's own: the stack's API runs a reaper on the shared test database."""
    yield from migrated_database("svc")


@pytest.fixture
def engine(own_database: str) -> Iterator[Engine]:
    engine = make_engine(own_database)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(engine)


def new_job(sessions: sessionmaker[Session]) -> uuid.UUID:
    with sessions() as session:
        owner, _ = api_keys.create_api_key(session=session, name="svc")
        job = client_side.create_job(
            session=session, job_id=uuid.uuid4(), owner_id=owner.id, preset="tiny-z-image", queue="train.z_image",
            spec={}, config={"max_train_steps": 5}, images=[],
        )  # fmt: skip
        session.commit()
        return job.id


def test_a_duplicate_delivery_does_nothing(sessions: sessionmaker[Session]) -> None:
    job_id = new_job(sessions)
    with sessions() as s:
        assert worker_side.claim_job(session=s, job_id=job_id, worker_id="a", lease_s=600) == 1
    with sessions() as s:
        assert worker_side.claim_job(session=s, job_id=job_id, worker_id="b", lease_s=600) is None


def test_a_job_whose_lease_ran_out_is_taken_over(sessions: sessionmaker[Session]) -> None:
    job_id = new_job(sessions)
    with sessions() as s:
        assert worker_side.claim_job(session=s, job_id=job_id, worker_id="dead", lease_s=1) == 1
    time.sleep(1.2)
    with sessions() as s:
        assert worker_side.claim_job(session=s, job_id=job_id, worker_id="alive", lease_s=600) == 2
    with sessions() as s:
        # The first worker, if it was only slow, learns it lost the job and leaves it alone.
        assert not worker_side.renew_lease(session=s, job_id=job_id, worker_id="dead", lease_s=600)
        assert worker_side.renew_lease(session=s, job_id=job_id, worker_id="alive", lease_s=600)
        s.commit()
        job = s.get_one(Job, job_id)
        assert (job.status, job.worker_id, job.attempt) == ("running", "alive", 2)


def test_cancel_racing_a_claim_asks_the_worker_to_stop(sessions: sessionmaker[Session]) -> None:
    job_id = new_job(sessions)
    with sessions() as api_session:
        job = api_session.get_one(Job, job_id)
        assert job.status == "queued"  # the API read it as queued...
        with sessions() as worker_session:  # ...then a worker claimed it
            worker_side.claim_job(session=worker_session, job_id=job_id, worker_id="w", lease_s=600)
        client_side.request_cancel(session=api_session, job=job)
        api_session.commit()
    with sessions() as s:
        job = s.get_one(Job, job_id)
        assert job.status == "running" and job.cancel_requested
        assert worker_side.cancel_requested(session=s, job_id=job_id)


def test_a_forged_cursor_is_a_client_error(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        owner, _ = api_keys.create_api_key(session=s, name="cursor")
        for cursor in ("not-base64!", "WyIyMDI0LTAxLTAxIiwgMTIzXQ", "e30"):
            with pytest.raises(InvalidRequest):
                client_side.list_jobs(session=s, owner_id=owner.id, status=None, limit=10, cursor=cursor)


def test_a_key_at_its_running_limit_waits_in_the_queue(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        owner, _ = api_keys.create_api_key(session=s, name="limits")
        ids = []
        for _ in range(3):
            job = client_side.create_job(
                session=s, job_id=uuid.uuid4(), owner_id=owner.id, preset="tiny-z-image", queue="train.z_image",
                spec={}, config={}, images=[],
            )  # fmt: skip
            ids.append(job.id)
        s.commit()
    with sessions() as s:
        claims = [
            worker_side.claim_job(session=s, job_id=i, worker_id=f"gpu-{n}", lease_s=600, max_running_per_key=2)
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
            assert worker_side.claim_job(session=s, job_id=job_id, worker_id=f"w{attempt}", lease_s=1) == attempt
        time.sleep(1.2)
        with sessions() as s:
            sent = recovery.reap(session=s, max_attempts=2, dispatch_grace_s=3600, idempotency_ttl_s=3600)
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
        owner, _ = api_keys.create_api_key(session=s, name="race")
        ids = [
            client_side.create_job(
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
                worker_side.claim_job(session=s, job_id=job_id, worker_id=f"w{n}", lease_s=600, max_running_per_key=2)
            )

    threads = [threading.Thread(target=claim, args=(job_id, n)) for n, job_id in enumerate(ids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=lambda r: r is None)[:2] == [1, 1] and results.count(None) == 6


# The state machine -------------------------------------------------------------------------------------------------


def _force_status(sessions: sessionmaker[Session], job_id: uuid.UUID, status: JobStatus) -> None:
    """Puts a job in any state, bypassing the table (only tests do this)."""
    with sessions() as s:
        s.execute(update(Job).where(Job.id == job_id).values(status=status))
        s.commit()


@pytest.mark.parametrize("transition", list(Transition), ids=lambda t: t.name)
def test_a_transition_moves_exactly_the_states_the_table_says(
    sessions: sessionmaker[Session], transition: Transition
) -> None:
    """The UPDATE of each transition changes a job in one of its source states, to its target, and no other."""
    for status in JobStatus:
        job_id = new_job(sessions)
        _force_status(sessions, job_id, status)
        with sessions() as s:
            moved = s.execute(move(transition, Job.id == job_id)).rowcount  # type: ignore[attr-defined]
            s.commit()
            after = s.get_one(Job, job_id)
        assert moved == (1 if transition.allows(status) else 0), (transition, status)
        assert after.job_status == (transition.target if moved else status)
        assert (after.finished_at is not None) == (bool(moved) and transition.target.is_terminal)


def test_every_status_change_is_a_transition_of_the_table(engine: Engine, sessions: sessionmaker[Session]) -> None:
    """Each job's whole life through the service functions: every UPDATE that sets `status` names its transition,
    and the lives below use every transition the table has."""
    made: list[str] = []

    def check(_c: Any, _cursor: Any, statement: str, _p: Any, context: Any, _many: bool) -> None:
        found = re.match(r"UPDATE job SET (.*?) WHERE", statement, re.S)
        if found and re.search(r"\bstatus=", found.group(1)):
            name = context.execution_options.get(TRANSITION_OPTION)
            assert name in Transition.__members__, f"a status change outside the table: {statement}"
            made.append(name)

    event.listen(engine, "before_cursor_execute", check)
    try:
        with sessions() as s:  # claim, then succeed
            job_id = new_job(sessions)
            worker_side.claim_job(session=s, job_id=job_id, worker_id="w", lease_s=600)
            assert worker_side.finish_job(session=s, job_id=job_id, worker_id="w", artifacts=[], metrics=_TRAINED)
            s.commit()
        with sessions() as s:  # canceled while queued
            client_side.request_cancel(session=s, job=s.get_one(Job, new_job(sessions)))
            s.commit()
        with sessions() as s:  # asked to stop while running, stops; a second job fails
            job_id = new_job(sessions)
            worker_side.claim_job(session=s, job_id=job_id, worker_id="w", lease_s=600)
            client_side.request_cancel(session=s, job=s.get_one(Job, job_id))
            worker_side.mark_canceled(session=s, job_id=job_id, step=1, worker_id="w")
            job_id = new_job(sessions)
            worker_side.claim_job(session=s, job_id=job_id, worker_id="w", lease_s=600)
            assert worker_side.fail_job(session=s, job_id=job_id, code="boom", message="it broke", worker_id="w")
            s.commit()
        # Dead workers (their leases already ran out): requeued, then given up on; one whose stop was asked.
        lost, stopped = new_job(sessions), new_job(sessions)
        for attempt in (1, 2):
            with sessions() as s:
                assert worker_side.claim_job(session=s, job_id=lost, worker_id="dead", lease_s=-1) == attempt
                recovery.reap(session=s, max_attempts=2, dispatch_grace_s=3600, idempotency_ttl_s=3600)
                s.commit()
        with sessions() as s:
            worker_side.claim_job(session=s, job_id=stopped, worker_id="dead", lease_s=-1)
            client_side.request_cancel(session=s, job=s.get_one(Job, stopped))
            recovery.reap(session=s, max_attempts=2, dispatch_grace_s=3600, idempotency_ttl_s=3600)
            s.commit()
            assert (s.get_one(Job, lost).job_status, s.get_one(Job, stopped).job_status) == (
                JobStatus.FAILED,
                JobStatus.CANCELED,
            )
    finally:
        event.remove(engine, "before_cursor_execute", check)
    assert set(made) == set(Transition.__members__)


def test_illegal_moves_are_refused(sessions: sessionmaker[Session]) -> None:
    """A move the table does not allow from the job's state changes nothing: no claim of a finished job, no finish
    of a queued one, no cancel of a succeeded one, no outcome written by a worker that does not hold the job."""
    queued = new_job(sessions)
    with sessions() as s:
        assert not worker_side.finish_job(session=s, job_id=queued, worker_id="w", artifacts=[], metrics=_TRAINED)
        assert not worker_side.fail_job(session=s, job_id=queued, code="x", message="y", worker_id="w")
        s.commit()
        assert worker_side.claim_job(session=s, job_id=queued, worker_id="w", lease_s=600) == 1
        assert not worker_side.fail_job(session=s, job_id=queued, code="x", message="y", worker_id="other")
        assert worker_side.finish_job(session=s, job_id=queued, worker_id="w", artifacts=[], metrics=_TRAINED)
        s.commit()
        assert worker_side.claim_job(session=s, job_id=queued, worker_id="late", lease_s=600) is None
        assert not worker_side.mark_canceled(session=s, job_id=queued, step=1, worker_id="w")
        with pytest.raises(Conflict):
            client_side.request_cancel(session=s, job=s.get_one(Job, queued))
        s.rollback()
        job = s.get_one(Job, queued)
        assert (job.job_status, job.worker_id) == (JobStatus.SUCCEEDED, "w")
        types = list(s.scalars(select(JobEvent.type).where(JobEvent.job_id == queued).order_by(JobEvent.id)))
        assert types == ["queued", "started", "succeeded"]


_TRAINED = {"steps": 5, "final_loss": 0.1, "gap_before": None, "gap_after": None, "train_s": 1.5, "images": 2}


def test_stored_event_data_is_its_payload_model(sessions: sessionmaker[Session]) -> None:
    """Every event the service functions wrote parses into its type's model and dumps back to the same JSON
    (nullable fields kept as null, absent optional ones left out)."""
    job_id = new_job(sessions)
    with sessions() as s:
        worker_side.claim_job(session=s, job_id=job_id, worker_id="w", lease_s=600)
        worker_side.record_progress(session=s, job_id=job_id, step=1, total_steps=5, loss=0.5, eta_s=3.0)
        assert worker_side.finish_job(session=s, job_id=job_id, worker_id="w", artifacts=[], metrics=_TRAINED)
        s.commit()
        rows = list(s.scalars(select(JobEvent)))
    assert {"queued", "started", "progress", "succeeded"} <= {r.type for r in rows}
    for row in rows:
        assert parse_payload(row.type, row.data).model_dump(mode="json") == row.data
    with pytest.raises(ValueError):
        worker_side.finish_job(
            session=Session(), job_id=uuid.uuid4(), worker_id="w", artifacts=[], metrics={"steps": 1, "oops": 2}
        )
