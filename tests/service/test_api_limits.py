"""Per-key limits that must hold over several API replicas: two more API processes (uvicorn) against the stack's
PostgreSQL and Redis share one rate-limit bucket and one count of open event streams per key; a stream ends after
its lifetime (the client resumes with Last-Event-ID and loses nothing) and when its key is revoked."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from scripts import stack
from tests.conftest import REPO, Stack, example_files, quick_spec
from tests.pace import FINISHED, PACE, eventually, wait_for_status


RATE_PER_MINUTE = 20  # a bucket of 20, refilled at one token every 3 s
STREAMS_PER_KEY = 2
STREAM_MAX_S = 3.0
SSE = {"Accept": "text/event-stream"}


@dataclass
class Replicas:
    """Two API processes of the same stack, with low per-key limits."""

    urls: list[str]

    def client(self, index: int, key: str) -> httpx.Client:
        """An HTTP client for replica `index`, authenticated with `key`."""
        return httpx.Client(base_url=self.urls[index], headers={"Authorization": f"Bearer {key}"}, timeout=30)


@pytest.fixture(scope="module")
def replicas(prod_stack: Stack) -> Iterator[Replicas]:
    """Starts two more APIs on the stack's database and Redis (its broker URL) with low limits; stops them after."""
    env = dict(prod_stack.env)
    env.update(
        DOPSD_RATE_LIMIT_PER_MINUTE=str(RATE_PER_MINUTE),
        DOPSD_MAX_STREAMS_PER_KEY=str(STREAMS_PER_KEY),
        DOPSD_STREAM_MAX_S=str(STREAM_MAX_S),
    )
    processes, urls = [], []
    try:
        for n in range(2):
            port, log = stack.free_port(), prod_stack.logs / f"replica-{n}.log"
            processes.append(PACE.timed_start(lambda: stack.start_api(env, port, log)))  # noqa: B023 (called here)
            urls.append(f"http://127.0.0.1:{port}")
        yield Replicas(urls)
    finally:
        for process in processes:
            stack.stop(process)


def sse_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The events of an open server-sent stream as they arrive (the `data` of each, parsed). Fails if the stream
    is still open after the run's patience (a stream sends a line at least every 15 s)."""
    deadline = time.monotonic() + PACE.patience_s
    for line in response.iter_lines():
        if time.monotonic() > deadline:
            raise AssertionError(f"the stream is still open after {PACE.patience_s:.0f} s")
        if line.startswith("data: "):
            yield json.loads(line[len("data: ") :])


def long_job(prod_stack: Stack, key: str) -> str:
    """A job of `key` that stays unfinished for minutes (3000 steps), submitted through the stack's own API."""
    with prod_stack.client(key) as client:
        spec = quick_spec(steps=3000, sample_every=0, checkpointing_steps=0)
        response = client.post("/v1/jobs", files=example_files(1), data={"spec": json.dumps(spec)})
        assert response.status_code == 202, response.text
        job_id: str = response.json()["id"]
        return job_id


def test_the_rate_limit_is_one_bucket_over_all_replicas(prod_stack: Stack, replicas: Replicas) -> None:
    key = prod_stack.create_key("rate-replicas")
    answers: list[tuple[int, int]] = []
    started = time.monotonic()
    with replicas.client(0, key) as first, replicas.client(1, key) as second:
        for n in range(3 * RATE_PER_MINUTE):  # alternately; each process alone would let 2 x 20 through
            answers.append((n % 2, (first if n % 2 == 0 else second).get("/v1/presets").status_code))
    elapsed = time.monotonic() - started
    allowed = sum(1 for _, status in answers if status == 200)
    refilled = int(elapsed * RATE_PER_MINUTE / 60) + 1
    assert RATE_PER_MINUTE <= allowed <= RATE_PER_MINUTE + refilled, (allowed, elapsed, answers)
    assert {replica for replica, status in answers if status == 429} == {0, 1}  # both replicas refuse
    assert {status for _, status in answers} == {200, 429}


def test_open_streams_are_counted_over_replicas_and_end_with_their_lifetime(
    prod_stack: Stack, replicas: Replicas
) -> None:
    key = prod_stack.create_key("streams-replicas")
    job_id = long_job(prod_stack, key)
    path = f"/v1/jobs/{job_id}/events"
    try:
        with replicas.client(0, key) as first, replicas.client(1, key) as second:
            with first.stream("GET", path, headers=SSE) as one, second.stream("GET", path, headers=SSE) as two:
                assert one.status_code == two.status_code == 200
                for replica in (first, second):  # the third stream of the key, on either replica
                    with replica.stream("GET", path, headers=SSE) as refused:
                        assert refused.status_code == 429  # (a stream let through would be read for minutes)
                        assert json.loads(refused.read())["error"]["code"] == "too_many_streams"
                        assert int(refused.headers["retry-after"]) >= 1
                # Each stream ends by itself after its lifetime, while the job still runs.
                seen = [e["id"] for e in sse_events(one)]
                assert seen and list(sse_events(two))
            assert prod_stack.client(key).get(f"/v1/jobs/{job_id}").json()["status"] not in FINISHED

            # Their slots are free again; a reconnection resumes after the last event it saw, without a gap.
            def resumed() -> list[int]:
                headers = {**SSE, "Last-Event-ID": str(seen[-1])}
                with first.stream("GET", path, headers=headers) as again:
                    if again.status_code != 200:
                        return []
                    return [e["id"] for e in sse_events(again)]

            more = eventually(resumed, bool, "a stream after the first two ended")
            log = prod_stack.client(key).get(path, params={"limit": 500}).json()["data"]
            ids = [e["id"] for e in log]
            assert seen + more == ids[: len(seen) + len(more)]  # every event once, in order
    finally:
        prod_stack.client(key).post(f"/v1/jobs/{job_id}/cancel")


def test_revoking_a_key_ends_its_open_streams(prod_stack: Stack, replicas: Replicas) -> None:
    name = f"streams-revoked-{time.monotonic_ns()}"
    key = prod_stack.create_key(name)
    job_id = long_job(prod_stack, key)
    with httpx.Client(base_url=prod_stack.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        with c.stream("GET", f"/v1/jobs/{job_id}/events", headers=SSE) as stream:
            assert stream.status_code == 200
            events = sse_events(stream)
            assert next(events)["type"] == "queued"  # the stream is open and has sent the log so far
            subprocess.run(
                [sys.executable, "-m", "dopsd", "keys", "revoke", name],
                env=prod_stack.env, cwd=REPO, check=True, capture_output=True,
            )  # fmt: skip
            # Revocation cancels the key's jobs; the stream ends before it would tell of that: nothing written
            # after the key was revoked reaches its holder.
            after = [e["type"] for e in events]
        assert "cancel_requested" not in after and "canceled" not in after, after
        assert c.get(f"/v1/jobs/{job_id}").status_code == 401


def test_the_client_waits_on_a_quiet_job_across_stream_lifetimes_without_counting_them_as_failures(
    prod_stack: Stack, replicas: Replicas
) -> None:
    import threading

    from dopsd_client import DOPSDClient

    busy_key, key = prod_stack.create_key("streams-busy"), prod_stack.create_key("streams-quiet")
    busy = long_job(prod_stack, busy_key)  # holds the stack's one worker
    with prod_stack.client(busy_key) as client:
        wait_for_status(client, busy, {"running"})
    with prod_stack.client(key) as client:
        response = client.post("/v1/jobs", files=example_files(1), data={"spec": json.dumps(quick_spec())})
        assert response.status_code == 202, response.text
        quiet = response.json()["id"]  # queued behind it: no event for many stream lifetimes
    seen: list[dict[str, Any]] = []
    failure: list[BaseException] = []

    def follow() -> None:
        try:  # one reconnect allowed after a failure: the end of a lifetime must not count as one
            seen.extend(DOPSDClient(replicas.urls[0], key).stream_events(quiet, max_reconnects=1))
        except BaseException as exc:
            failure.append(exc)

    follower = threading.Thread(target=follow, daemon=True)
    try:
        follower.start()
        follower.join(timeout=4 * STREAM_MAX_S)  # four lifetimes of silence
        assert not failure, failure
        assert follower.is_alive()  # still following the queued job
    finally:
        prod_stack.client(key).post(f"/v1/jobs/{quiet}/cancel")
        prod_stack.client(busy_key).post(f"/v1/jobs/{busy}/cancel")
    follower.join(timeout=PACE.patience_s)
    assert not failure, failure
    assert [e["type"] for e in seen][-1] == "canceled"  # it saw the job end, then stopped
