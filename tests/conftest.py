"""Shared test setup: offline, fp32, two CPU threads, tiny models built in code (never downloaded), and the one
real production-shaped stack every HTTP test talks to: PostgreSQL (a fresh database, migrated with `alembic upgrade
head`), Redis (a dedicated db, flushed), SeaweedFS S3, the API under uvicorn and a real Celery worker process.
Session-scoped here, so the service, client and web-page tests share one stack."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from api.commands import migrate
from scripts import stack
from tests.service.tcpproxy import TcpProxy


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "concept"


@pytest.fixture(scope="session")
def example_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the bundled example concept (4 images + captions.json)."""
    target = tmp_path_factory.mktemp("concept")
    for f in EXAMPLES.iterdir():
        shutil.copy(f, target / f.name)
    return target


@pytest.fixture(scope="session")
def exported_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base pipeline written by `dopsd models export tiny-z-image DIR`."""
    target = tmp_path_factory.mktemp("tiny-z-image")
    from dopsd.cli import main as cli_main

    assert cli_main(["models", "export", "tiny-z-image", str(target)]) == 0
    return target


REDIS_DB = int(os.environ.get("DOPSD_TEST_REDIS_DB", "13"))  # one db per concurrent test run
T = TypeVar("T")
FINISHED = frozenset({"succeeded", "failed", "canceled"})


@dataclass
class Pace:
    """How fast this run goes, measured while it runs, so that waits scale with the machine instead of being
    wall-clock constants: every start-up of a stack process (API, worker) is timed, and a wait may see nothing
    change for a multiple of the slowest start-up seen before it gives up."""

    starts_s: list[float] = field(default_factory=list)

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


PACE = Pace()


@dataclass
class Stack:
    """A running stack: where the API is, the environment its processes share, and how to make keys."""

    base_url: str
    env: dict[str, str]
    database_url: str
    logs: Path
    worker: subprocess.Popen[bytes] | None = None

    def restart_worker(self) -> None:
        """Starts a fresh worker process (after a test killed the old one); returns once it is ready."""
        if self.worker is not None:
            stack.stop(self.worker, timeout_s=5)
        log = self.logs / f"worker-{time.monotonic_ns()}.log"
        self.worker = PACE.timed_start(lambda: stack.start_worker(self.env, log))

    def worker_log_lines(self) -> list[dict[str, Any]]:
        """Every JSON line the stack's worker processes have logged so far."""
        return [
            json.loads(line)
            for log in sorted(self.logs.glob("worker-*.log"))
            for line in log.read_text(errors="replace").splitlines()
            if line.startswith("{")
        ]

    def create_key(self, name: str) -> str:
        """`dopsd keys create --name NAME`, as an operator runs it; returns the printed key."""
        return self.create_key_with_secret(name)[0]

    def create_keys(self, names: list[str]) -> list[str]:
        """`dopsd keys create --name NAME` for each name, the commands run side by side; returns the keys."""
        command = [sys.executable, "-m", "dopsd", "keys", "create", "--name"]
        runs = [
            subprocess.Popen(
                [*command, name], env=self.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for name in names
        ]
        keys = []
        for run in runs:
            out, err = run.communicate()
            assert run.returncode == 0, err
            keys.append(out.strip().splitlines()[-2])
        return keys

    def create_key_with_secret(self, name: str) -> tuple[str, str]:
        """`dopsd keys create --name NAME`; returns the printed key and webhook signing secret."""
        out = subprocess.run(
            [sys.executable, "-m", "dopsd", "keys", "create", "--name", name],
            env=self.env, cwd=REPO, capture_output=True, text=True, check=True,
        )  # fmt: skip
        key, secret = out.stdout.strip().splitlines()[-2:]
        return key, secret

    def s3_keys(self, prefix: str = "jobs/") -> list[str]:
        """Every object key under `prefix` in the stack's bucket, read straight from the S3 server."""
        import boto3

        client = boto3.client(
            "s3", endpoint_url=self.env["DOPSD_S3_ENDPOINT_URL"], region_name="us-east-1",
            aws_access_key_id=self.env["DOPSD_S3_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["DOPSD_S3_SECRET_ACCESS_KEY"],
        )  # fmt: skip
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.env["DOPSD_S3_BUCKET"], Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def client(self, key: str | None) -> httpx.Client:
        """An HTTP client for the API, authenticated with `key`."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)


@pytest.fixture(scope="session")
def services() -> None:
    """PostgreSQL and Redis answer on loopback (started with the machine's commands if they were down)."""
    stack.ensure_postgres_and_redis()


@pytest.fixture(scope="session")
def s3_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TcpProxy]:
    """A SeaweedFS S3 server behind a proxy that a test can switch off (an outage) and on again."""
    folder = tmp_path_factory.mktemp("seaweedfs")
    access, secret = "dopsd-test", secrets.token_urlsafe(16)
    process, endpoint = stack.start_seaweedfs(
        folder / "data", access_key=access, secret_key=secret, log=folder / "log"
    )
    proxy = TcpProxy(("127.0.0.1", int(endpoint.rsplit(":", 1)[1])))
    proxy.credentials = (access, secret)  # type: ignore[attr-defined]
    yield proxy
    proxy.down()
    stack.stop(process)


@pytest.fixture(scope="session")
def s3(s3_proxy: TcpProxy) -> dict[str, str]:
    """Where the S3 server is (through the proxy) and how to sign in."""
    access, secret = s3_proxy.credentials  # type: ignore[attr-defined]
    return {"endpoint": f"http://127.0.0.1:{s3_proxy.port}", "access_key": access, "secret_key": secret}


@pytest.fixture(scope="session")
def database(services: None) -> Iterator[str]:
    """A fresh PostgreSQL database at the migrations' head, shared by the stack's API and worker."""
    yield from migrated_database("test")


def migrated_database(purpose: str) -> Iterator[str]:
    """Creates `dopsd_<purpose>_<pid>`, applies `alembic upgrade head`, yields its URL, drops it afterwards."""
    name = f"dopsd_{purpose}_{os.getpid()}"
    url = stack.create_database(name, recreate=True)
    migrate(url)
    yield url
    stack.drop_database(name)


def _flush_redis() -> None:
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()


@pytest.fixture(scope="session")
def prod_stack(database: str, s3: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API + one worker against PostgreSQL, Redis and SeaweedFS."""
    _flush_redis()
    logs = tmp_path_factory.mktemp("stack-logs")
    port = stack.free_port()
    env = stack.stack_env(
        database_url=database, broker_url=f"redis://127.0.0.1:6379/{REDIS_DB}", s3_endpoint=s3["endpoint"],
        access_key=s3["access_key"], secret_key=s3["secret_key"], public_url=f"http://127.0.0.1:{port}",
        bucket=f"dopsd-test-{os.getpid()}",
    )  # fmt: skip
    env["DOPSD_PROGRESS_INTERVAL_S"] = "0.2"
    env["DOPSD_MAX_FILE_BYTES"] = str(2 * 1024 * 1024)
    # Short recovery clocks, so the fault tests see a dead worker's job come back within seconds.
    env.update(
        DOPSD_LEASE_S="5",
        DOPSD_REAPER_INTERVAL_S="1",
        DOPSD_DISPATCH_GRACE_S="8",
        DOPSD_MAX_QUEUED_PER_KEY="6",
        DOPSD_RATE_LIMIT_PER_MINUTE="1000",
        DOPSD_WEBHOOK_ALLOW_PRIVATE="true",  # the tests' receivers listen on loopback
        DOPSD_WEBHOOK_RETRY_DELAYS_S="[0.3, 0.6]",
        DOPSD_WEBHOOK_POLL_INTERVAL_S="0.2",
    )
    api = PACE.timed_start(lambda: stack.start_api(env, port, logs / "api.log"))
    running = Stack(f"http://127.0.0.1:{port}", env, database, logs)
    running.restart_worker()
    yield running
    if running.worker is not None:
        stack.stop(running.worker)
    stack.stop(api)


@pytest.fixture(scope="session")
def embedded_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`dopsd serve` in embedded mode: SQLite, the filesystem broker, local artifacts, one worker process."""
    home = tmp_path_factory.mktemp("embedded")
    port = stack.free_port()
    env = dict(os.environ)
    for k in [k for k in env if k.startswith("DOPSD_")]:
        del env[k]
    env.update(
        DOPSD_DEV_API_KEY="dev-test-key", DOPSD_PROGRESS_INTERVAL_S="0.2", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO)
    )
    log = home / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "dopsd", "serve", "--port", str(port)],
        cwd=home, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip

    def ready() -> None:
        stack.wait_until(lambda: stack.http_ok(f"http://127.0.0.1:{port}/readyz"), "embedded service", timeout_s=90)
        stack.wait_until(lambda: b" ready." in log.read_bytes(), "embedded worker", timeout_s=90)

    PACE.timed_start(ready)
    yield Stack(f"http://127.0.0.1:{port}", env, f"sqlite:///{home}/var/dopsd.db", home)
    stack.stop(process)
    shutil.rmtree(home / "var", ignore_errors=True)


def example_files(count: int = 2) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart `images` entries for the first `count` bundled example images."""
    paths = sorted(EXAMPLES.glob("*.png"))[:count]
    return [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]


def quick_spec(**overrides: Any) -> dict[str, Any]:
    """A tiny-preset spec that trains in a few seconds."""
    spec: dict[str, Any] = {
        "preset": "tiny-z-image",
        "trigger": "sks",
        "steps": 6,
        "validation_prompts": ["a photo of [V]"],
        "sample_seeds": [0],
    }
    spec.update(overrides)
    return spec


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
    clock. The job may stand still for the run's patience or 30 measured step times, whichever is longer; the
    step time is measured on this job, from the steps it advances while watched."""

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
            self.signature, self.moved_at = signature, now
        self._time_steps(self.job["attempt"], step, now)
        self.polls += 1
        if self.polls % self.EVENTS_EVERY == 0:
            after = {"after": self.last_event["id"]} if self.last_event else {}
            events = self.client.get(f"/v1/jobs/{self.job_id}/events", params={**after, "limit": 500})
            data = events.raise_for_status().json()["data"]
            if data:
                self.last_event, self.moved_at = data[-1], now
        return self.job

    def _time_steps(self, attempt: int, step: int, now: float) -> None:
        if step == 0:
            return
        if self.step_clock is None or self.step_clock[0] != attempt or step < self.step_clock[2]:
            self.step_clock = (attempt, now, step)
        elif step > self.step_clock[2]:
            self.step_s = (now - self.step_clock[1]) / (step - self.step_clock[2])

    @property
    def allowed_stall_s(self) -> float:
        """How long the job may show no change."""
        return max(PACE.patience_s, 30 * (self.step_s or 0.0))

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
