"""An API process whose database pool is far smaller than its thread pool still answers a burst of requests:
no request holds a connection while it waits for a thread, so the threads waiting for connections always get one.
(Before, 40 threads blocked on a 1-connection pool while the one session holding it waited for a thread: every
request stalled for the pool's 30 s timeout, then failed.) That holds for every session the API opens: a request's,
an event stream's polls and the readiness probe's each take one of the database slots (`api.database`)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from scripts import stack
from tests.conftest import Stack, example_files, quick_spec
from tests.pace import PACE, wait_for_status


BURST = 80  # concurrent requests: twice the API's 40 handler threads


@pytest.fixture(scope="module")
def starved_api(prod_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second API process on the stack's database with one database connection in all."""
    port = stack.free_port()
    env = {**prod_stack.env, "DOPSD_DATABASE_POOL_SIZE": "1", "DOPSD_DATABASE_MAX_OVERFLOW": "0",
           "DOPSD_PUBLIC_URL": f"http://127.0.0.1:{port}"}  # fmt: skip
    api = PACE.timed_start(lambda: stack.start_api(env, port, tmp_path_factory.mktemp("starved") / "api.log"))
    yield f"http://127.0.0.1:{port}"
    stack.stop(api)


def test_a_burst_larger_than_the_pools_is_answered_without_stalling(prod_stack: Stack, starved_api: str) -> None:
    key = prod_stack.create_key("burst")
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=starved_api, headers=headers, timeout=60) as client:
        assert client.get("/v1/jobs").status_code == 200  # warm: one connection open

        def one(_: int) -> tuple[int, float]:
            started = time.monotonic()
            status = client.get("/v1/jobs").status_code
            return status, time.monotonic() - started

        began = time.monotonic()
        with ThreadPoolExecutor(BURST) as pool:
            results = list(pool.map(one, range(BURST)))
        took = time.monotonic() - began
    statuses = sorted({status for status, _ in results})
    assert statuses == [200], statuses
    assert took < 25, f"{BURST} requests took {took:.1f} s: some waited out the pool's 30 s timeout"


LOAD_S = 6.0  # how long the mixed load below runs
SLOW_S = 10.0  # no answer may take this long: a stall on the pool waits out its 30 s timeout


def test_streams_and_readiness_probes_do_not_starve_requests_of_connections(
    prod_stack: Stack, starved_api: str
) -> None:
    """Readiness probes, event streams and status polls at once on one connection: every answer is a success,
    and none waits out the pool's timeout. (Before, probes and stream polls opened sessions outside the slots:
    their threads waited for the one connection while a request holding it waited for a thread, until the pool's
    30 s timeout failed them, and the probes answered 503.)"""
    key = prod_stack.create_key("probes")
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=starved_api, headers=headers, timeout=60) as client:
        job = client.post("/v1/jobs", files=example_files(1), data={"spec": json.dumps(quick_spec())})
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        client.post(f"/v1/jobs/{job_id}/cancel")  # a finished job: each stream sends its events, then ends
        wait_for_status(client, job_id, {"canceled", "succeeded", "failed"})
    kinds = ["probe"] * 50 + ["stream"] * 10 + ["poll"] * 20
    clients = [httpx.Client(base_url=starved_api, headers=headers, timeout=60) for _ in kinds]
    start = threading.Barrier(len(kinds) + 1)  # every client under way at once, for LOAD_S
    deadline = [0.0]

    def loop(kind: str, c: httpx.Client) -> list[tuple[str, str, float]]:
        seen = []
        start.wait()
        while time.monotonic() < deadline[0]:
            began = time.monotonic()
            if kind == "probe":
                r = c.get("/readyz")
                outcome = f"{r.status_code} {r.json()['checks']['database']}"
            elif kind == "stream":
                with c.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}) as r:
                    body = r.read().decode()
                outcome = f"{r.status_code} {'events' if 'event: canceled' in body else body[:80]}"
            else:
                outcome = str(c.get(f"/v1/jobs/{job_id}").status_code)
            seen.append((kind, outcome, time.monotonic() - began))
        return seen

    with ThreadPoolExecutor(len(kinds)) as pool:
        running = [pool.submit(loop, kind, c) for kind, c in zip(kinds, clients, strict=True)]
        deadline[0] = time.monotonic() + LOAD_S
        start.wait()
        results = [r for future in running for r in future.result()]
    for c in clients:
        c.close()
    outcomes = {(kind, outcome) for kind, outcome, _ in results}
    assert outcomes == {("probe", "200 ok"), ("stream", "200 events"), ("poll", "200")}, outcomes
    slowest = max(results, key=lambda r: r[2])
    assert slowest[2] < SLOW_S, f"a {slowest[0]} took {slowest[2]:.1f} s: it waited out the pool's timeout"
