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
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.commands import migrate
from scripts import stack
from tests.pace import FINISHED, PACE
from tests.pace import wait_for_status as wait_for_status  # tests/client imports it from here
from tests.service.tcpproxy import TcpProxy


os.environ["HF_HUB_OFFLINE"] = "1"
# Code imported into the test process itself (the worker's Celery app, its retry helpers) reads the settings of
# a local trial; every production-shaped process a fixture starts says `production` (scripts/stack.stack_env).
os.environ.setdefault("DOPSD_ENVIRONMENT", "development")
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
        KEYS_MADE.extend((self, key) for key in keys)
        return keys

    def create_key_with_secret(self, name: str) -> tuple[str, str]:
        """`dopsd keys create --name NAME`; returns the printed key and webhook signing secret."""
        out = subprocess.run(
            [sys.executable, "-m", "dopsd", "keys", "create", "--name", name],
            env=self.env, cwd=REPO, capture_output=True, text=True, check=True,
        )  # fmt: skip
        key, secret = out.stdout.strip().splitlines()[-2:]
        KEYS_MADE.append((self, key))
        return key, secret

    def s3_objects(self, prefix: str = "jobs/") -> dict[str, int]:
        """Every object under `prefix` in the stack's bucket with its size in bytes, by key, in key order, read
        straight from the S3 server."""
        import boto3

        client = boto3.client(
            "s3", endpoint_url=self.env["DOPSD_S3_ENDPOINT_URL"], region_name="us-east-1",
            aws_access_key_id=self.env["DOPSD_S3_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["DOPSD_S3_SECRET_ACCESS_KEY"],
        )  # fmt: skip
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.env["DOPSD_S3_BUCKET"], Prefix=prefix)
        return dict(sorted((o["Key"], int(o["Size"])) for page in pages for o in page.get("Contents", [])))

    def s3_keys(self, prefix: str = "jobs/") -> list[str]:
        """Every object key under `prefix` in the stack's bucket, in order (`s3_objects` without the sizes)."""
        return list(self.s3_objects(prefix))

    def client(self, key: str | None) -> httpx.Client:
        """An HTTP client for the API, authenticated with `key`."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)


KEYS_MADE: list[tuple[Stack, str]] = []  # every key a stack made, in order, for the clean-up after a failure
STACK_FIXTURES = {"prod_stack", "embedded_stack", "restartable"}
CALL_REPORT = pytest.StashKey[pytest.TestReport]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    """Scales pytest-timeout's per-test limit for tests on a real stack with the run's measured pace (see
    `Pace.test_timeout_s`), so a slow but progressing test is not cut off by a wall-clock constant. Runs before
    pytest-timeout reads the limit; a limit of 0 (no timeout) or a test's own `timeout` mark is kept."""
    configured = item.config.getoption("timeout", None) or item.config.getini("timeout") or 0
    uses_stack = STACK_FIXTURES & set(getattr(item, "fixturenames", ()))
    if uses_stack and float(configured) > 0 and item.get_closest_marker("timeout") is None:
        item.add_marker(pytest.mark.timeout(PACE.test_timeout_s(float(configured))))
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keeps the report of each test's call, for `cancel_jobs_left_by_a_failed_test`."""
    report = yield
    if report.when == "call":
        item.stash[CALL_REPORT] = report
    return report


@pytest.fixture(autouse=True)
def cancel_jobs_left_by_a_failed_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a failed test, cancels the unfinished jobs of the keys it made, so a job it left training on the
    single worker does not hold up every test after it (one failure reads as one failure)."""
    first = len(KEYS_MADE)
    yield
    report = request.node.stash.get(CALL_REPORT, None)
    if report is None or not report.failed:
        return
    for running, key in KEYS_MADE[first:]:
        with running.client(key) as client:
            jobs = client.get("/v1/jobs", params={"limit": 100})
            for job in jobs.json().get("data", []) if jobs.status_code == 200 else []:
                if job["status"] not in FINISHED:
                    client.post(f"/v1/jobs/{job['id']}/cancel")


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


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis server of this module's own on a free loopback port, nothing persisted; yields its broker URL."""
    port = stack.free_port()
    log = tmp_path_factory.mktemp("redis") / "redis.log"
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    stack.wait_until(lambda: stack.port_open(port), "the private Redis server")
    yield f"redis://127.0.0.1:{port}/0"
    stack.stop(process)


@pytest.fixture(scope="session")
def s3_public(s3_proxy: TcpProxy) -> Iterator[str]:
    """The address clients reach the same S3 server by (another proxy, as a deployment's public endpoint is)."""
    public = TcpProxy(s3_proxy.target)
    yield f"http://127.0.0.1:{public.port}"
    public.down()


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
def prod_stack(
    database: str, s3: dict[str, str], s3_public: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
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
    env["DOPSD_S3_PUBLIC_ENDPOINT_URL"] = s3_public  # presigned URLs name it, not the services' address
    # Short recovery clocks, so the fault tests see a dead worker's job come back within seconds.
    env.update(
        DOPSD_LEASE_S="5",
        DOPSD_REAPER_INTERVAL_S="1",
        DOPSD_DISPATCH_GRACE_S="8",
        DOPSD_MAX_QUEUED_PER_KEY="6",
        DOPSD_RATE_LIMIT_PER_MINUTE="1000",
        DOPSD_WEBHOOK_ALLOW_PRIVATE="true",  # the tests' receivers listen on loopback
        DOPSD_IMAGES_URL_ALLOW_PRIVATE="true",  # and so do their `spec.images_url` servers
        DOPSD_WEBHOOK_RETRY_DELAYS_S="[0.3, 0.6]",
        DOPSD_WEBHOOK_POLL_INTERVAL_S="0.2",
        DOPSD_MAINTENANCE_IN_API="false",  # the production shape: `dopsd maintain` is a process of its own
        DOPSD_WORKER_TORCH_THREADS="1",  # the suite, the API, the browser and SeaweedFS share this machine's cores
        # The worker owns two CPU "GPUs": it runs jobs of 1 and of 2 processes (tests/service/test_multi_process_jobs.py).
        DOPSD_WORKER_GPUS="2",
        DOPSD_MAX_PROCESSES_PER_JOB="2",
    )
    api = PACE.timed_start(lambda: stack.start_api(env, port, logs / "api.log"))
    maintain = stack.start_maintain(env, logs / "maintain.log")
    running = Stack(f"http://127.0.0.1:{port}", env, database, logs)
    running.restart_worker()
    yield running
    if running.worker is not None:
        stack.stop(running.worker)
    stack.stop(maintain)
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
        DOPSD_ENVIRONMENT="development",
        DOPSD_DEV_API_KEY="dev-test-key",
        DOPSD_PROGRESS_INTERVAL_S="0.2",
        DOPSD_WORKER_TORCH_THREADS="1",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(REPO),
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


def assert_one_adapter(prod_stack: Stack, job_id: str) -> None:
    """Asserts that the job's outputs in storage hold exactly one adapter, in each of the default formats."""
    outputs = prod_stack.s3_keys(f"jobs/{job_id}/outputs/")
    assert [k for k in outputs if k.endswith(".safetensors")] == [
        f"jobs/{job_id}/outputs/pytorch_lora_weights.safetensors",
        f"jobs/{job_id}/outputs/pytorch_lora_weights_comfyui.safetensors",
    ]


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
        "eval_seeds": 1,  # the report on one seed: every job still carries one, at a quarter of the cost
    }
    spec.update(overrides)
    return spec
