"""An API process whose database pool is far smaller than its thread pool still answers a burst of requests:
no request holds a connection while it waits for a thread, so the threads waiting for connections always get one.
(Before, 40 threads blocked on a 1-connection pool while the one session holding it waited for a thread: every
request stalled for the pool's 30 s timeout, then failed.)"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from scripts import stack
from tests.conftest import Stack
from tests.pace import PACE


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
