"""Waiting in the stack tests, scaled to the measured speed of the run instead of wall-clock constants.

`PACE` records how long stack processes took to start and how long training steps take; `eventually` waits for
a condition for the run's patience; `wait_for_job` (and `wait_for_status`, `wait_for_step`) follow a job for as
long as it keeps moving, and a failure says what was awaited and what was last seen.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import httpx


T = TypeVar("T")
FINISHED = frozenset({"succeeded", "failed", "canceled"})


@dataclass
class Pace:
    """How fast this run goes, measured while it runs: every start-up of a stack process (API, worker) is timed,
    and every job followed by `wait_for_job` reports its step time."""

    starts_s: list[float] = field(default_factory=list)
    slowest_step_s: float = 0.0
    slowest_job_s: float = 0.0

    def timed_start(self, start: Callable[[], T]) -> T:
        """Runs `start()` (which returns once the process is ready) and records how long it took."""
        began = time.monotonic()
        result = start()
        self.starts_s.append(time.monotonic() - began)
        return result

    @property
    def patience_s(self) -> float:
        """How long a wait may see no change: 4 times the slowest start-up seen (15 s until one is), at least
        30 s. On an idle machine that is 30 s; on a machine busy enough to start a worker in 40 s, 160 s."""
        return max(30.0, 4 * max(self.starts_s, default=15.0))

    def note_step_s(self, step_s: float) -> None:
        """Records a training step time measured on a job."""
        self.slowest_step_s = max(self.slowest_step_s, step_s)

    def note_job(self, job: dict[str, Any]) -> None:
        """Records how long a finished job ran (from its `started_at` to its `finished_at`)."""
        if job.get("started_at") and job.get("finished_at"):
            ran = datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])
            self.slowest_job_s = max(self.slowest_job_s, ran.total_seconds())

    def limit_s(self, seconds: float) -> float:
        """A limit for waiting on the stack's work: `seconds` on an idle machine, or 10 times the patience on one
        whose stack processes started slowly, whichever is longer."""
        return max(seconds, 10 * self.patience_s)

    def test_timeout_s(self, configured_s: float) -> float:
        """The per-test limit for a test on a real stack: `limit_s` of the configured one (pytest-timeout's), or
        200 of the slowest steps seen, whichever is longer."""
        return max(self.limit_s(configured_s), 200 * self.slowest_step_s)


PACE = Pace()


def keep_test_alive(for_s: float) -> None:
    """Moves pytest-timeout's alarm (its `signal` method arms SIGALRM on ITIMER_REAL) so that at least `for_s`
    seconds remain: a test whose job keeps moving is not cut off by the per-test limit while it waits."""
    if threading.current_thread() is not threading.main_thread():
        return
    remaining, interval = signal.getitimer(signal.ITIMER_REAL)
    if 0 < remaining < for_s:
        signal.setitimer(signal.ITIMER_REAL, for_s, interval)


def eventually(probe: Callable[[], T], done: Callable[[T], bool], what: str, *, interval_s: float = 0.25) -> T:
    """Calls `probe()` until `done(value)` and returns that value. Gives up after the run's patience
    (`PACE.patience_s`), saying what was awaited and the last value seen."""
    deadline = time.monotonic() + PACE.patience_s
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {PACE.patience_s:.0f} s; last seen: {value!r:.2000}")
        time.sleep(interval_s)


class JobWatch:
    """Follows one job through the API and says whether it is still moving.

    Anything that changes (status, attempt, step, queue position, cancel request, a new event) restarts the
    clock, and the per-test limit too (`keep_test_alive`). The job may stand still for the run's patience or 30
    measured step times, whichever is longer (plus the longest job seen while it is queued); the step time is
    measured on this job, from the steps it advances while watched."""

    POLL_S = 0.25
    EVENTS_EVERY = 4  # polls; the event log is read once a second

    def __init__(self, client: httpx.Client, job_id: str) -> None:
        self.client, self.job_id = client, job_id
        self.job: dict[str, Any] = {}
        self.last_event: dict[str, Any] | None = None
        self.polls = 0
        self.moved_at = time.monotonic()
        self.signature: tuple[Any, ...] | None = None
        self.step_clock: tuple[int, float, int] | None = None  # (attempt, when, step) of the first step seen
        self.step_s: float | None = None

    def poll(self) -> dict[str, Any]:
        """Reads the job (and, every few polls, its new events); notes whether anything moved."""
        self.job = self.client.get(f"/v1/jobs/{self.job_id}").raise_for_status().json()
        progress = self.job.get("progress") or {}
        step = int(progress.get("step") or 0)
        signature = (self.job["status"], self.job["attempt"], step, self.job["queue_position"],
                     self.job["cancel_requested"])  # fmt: skip
        now = time.monotonic()
        if signature != self.signature:
            self.signature = signature
            self._moved(now)
        self._time_steps(self.job["attempt"], step, now)
        if self.job["status"] in FINISHED:
            PACE.note_job(self.job)
        self.polls += 1
        if self.polls % self.EVENTS_EVERY == 0:
            after = {"after": self.last_event["id"]} if self.last_event else {}
            events = self.client.get(f"/v1/jobs/{self.job_id}/events", params={**after, "limit": 500})
            data = events.raise_for_status().json()["data"]
            if data:
                self.last_event = data[-1]
                self._moved(now)
        return self.job

    def _moved(self, now: float) -> None:
        self.moved_at = now
        keep_test_alive(2 * self.allowed_stall_s)  # this wait's own stall check fails first, and says more

    def _time_steps(self, attempt: int, step: int, now: float) -> None:
        if step == 0:
            return
        if self.step_clock is None or self.step_clock[0] != attempt or step < self.step_clock[2]:
            self.step_clock = (attempt, now, step)
        elif step > self.step_clock[2]:
            self.step_s = (now - self.step_clock[1]) / (step - self.step_clock[2])
            PACE.note_step_s(self.step_s)

    @property
    def allowed_stall_s(self) -> float:
        """How long the job may show no change. A queued job's position moves only when a job ahead of it has
        run, so while queued it may also wait as long as the longest job seen so far."""
        allowed = max(PACE.patience_s, 30 * (self.step_s or 0.0))
        if self.job.get("status") == "queued":
            allowed += PACE.slowest_job_s
        return allowed

    def check(self, what: str) -> None:
        """Raises `TimeoutError` naming `what` and the last state seen once the job stood still too long."""
        stalled = time.monotonic() - self.moved_at
        if stalled > self.allowed_stall_s:
            raise TimeoutError(f"job {self.job_id} never {what}: nothing changed for {stalled:.0f} s "
                               f"(allowed {self.allowed_stall_s:.0f} s); last seen: {self.describe()}")  # fmt: skip

    def describe(self) -> str:
        """The job's last seen state, in one line."""
        job, progress = self.job, self.job.get("progress") or {}
        parts = [f"status {job.get('status')}", f"attempt {job.get('attempt')}",
                 f"step {progress.get('step')}/{progress.get('total_steps')}",
                 f"queue position {job.get('queue_position')}"]  # fmt: skip
        if self.step_s is not None:
            parts.append(f"{self.step_s:.2f} s a step")
        if self.last_event is not None:
            parts.append(f"last event {self.last_event['type']} at {self.last_event['created_at']}")
        if job.get("error"):
            parts.append(f"error {job['error']}")
        return ", ".join(parts)


def wait_for_job(
    client: httpx.Client, job_id: str, done: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """Polls a job until `done(job)`, for as long as it keeps moving (see `JobWatch`); returns the job. Fails at
    once if the job finishes without `done(job)`."""
    watch = JobWatch(client, job_id)
    while True:
        job = watch.poll()
        if done(job):
            return job
        if job["status"] in FINISHED:
            raise AssertionError(f"job {job_id} ended before it {what}; last seen: {watch.describe()}")
        watch.check(what)
        time.sleep(JobWatch.POLL_S)


def wait_for_status(client: httpx.Client, job_id: str, statuses: set[str]) -> dict[str, Any]:
    """Polls a job until its status is one of `statuses`, for as long as it keeps moving."""
    return wait_for_job(client, job_id, lambda job: job["status"] in statuses, f"reached {sorted(statuses)}")


def wait_for_step(client: httpx.Client, job_id: str, step: int) -> dict[str, Any]:
    """Polls a job until it has trained `step` steps, for as long as it keeps moving."""
    return wait_for_job(
        client, job_id, lambda job: (job["progress"] or {}).get("step", 0) >= step, f"reached step {step}"
    )
