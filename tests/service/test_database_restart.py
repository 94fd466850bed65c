"""A database restart while the API serves and a job trains: requests fail fast with 503 and recover without a
restart; the worker's writes wait for the database instead of killing the job.

Runs its own PostgreSQL cluster (initdb on a free port) and its own Redis server, so neither the machine's servers
nor the Redis db of the session's stack are touched.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.commands import migrate
from scripts import stack
from tests.conftest import Stack, example_files, quick_spec
from tests.pace import PACE, eventually, wait_for_status, wait_for_step


BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
pytestmark = pytest.mark.skipif(not BIN or os.geteuid() != 0, reason="needs PostgreSQL's server binaries and root")


class PrivatePostgres:
    """A throwaway PostgreSQL cluster owned by the `postgres` user, on a free loopback port."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.bin = root, stack.free_port(), BIN[-1]
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["chown", "-R", "postgres", str(root)], check=True)
        self._pg(f"{self.bin}/initdb -D {root}/data -A trust -U postgres")

    def _pg(self, command: str) -> None:
        subprocess.run(["su", "postgres", "-c", command], check=True, capture_output=True)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._pg(f'{self.bin}/pg_ctl -D {self.root}/data -o "{options}" -l {self.root}/log -w start')

    def stop(self) -> None:
        self._pg(f"{self.bin}/pg_ctl -D {self.root}/data -m immediate -w stop")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"


@pytest.fixture(scope="module")
def restartable(
    tmp_path_factory: pytest.TempPathFactory, s3: dict[str, str], private_redis: str
) -> Iterator[tuple[Stack, Any]]:
    """API and worker on a private PostgreSQL cluster, a private Redis and the session's SeaweedFS."""
    # Not under pytest's tmp folder: that one is private to root, and the cluster runs as `postgres`.
    pg = PrivatePostgres(Path(tempfile.mkdtemp(prefix="dopsd-pg-")))
    pg.start()
    migrate(pg.url)
    logs = tmp_path_factory.mktemp("restart-logs")
    port = stack.free_port()
    env = stack.stack_env(
        database_url=pg.url, broker_url=private_redis, s3_endpoint=s3["endpoint"],
        access_key=s3["access_key"], secret_key=s3["secret_key"], public_url=f"http://127.0.0.1:{port}",
        bucket=f"dopsd-restart-{os.getpid()}",
    )  # fmt: skip
    env.update(DOPSD_PROGRESS_INTERVAL_S="0.2", DOPSD_LEASE_S="60")
    api = PACE.timed_start(lambda: stack.start_api(env, port, logs / "api.log"))
    running = Stack(f"http://127.0.0.1:{port}", env, pg.url, logs)
    running.restart_worker()
    yield running, pg
    if running.worker is not None:
        stack.stop(running.worker)
    stack.stop(api)
    pg.stop()
    shutil.rmtree(pg.root, ignore_errors=True)


def database_warnings(running: Stack, job_id: str) -> list[str]:
    """The messages of the worker's WARNING log lines about one job (a write that waits for the database)."""
    return [
        line["message"]
        for line in running.worker_log_lines()
        if line.get("job_id") == job_id and line.get("level") == "WARNING"
    ]


def test_requests_fail_fast_then_recover_and_training_survives(restartable: tuple[Stack, Any]) -> None:
    running, pg = restartable
    key = running.create_key("restart")
    with running.client(key) as client:
        job = client.post("/v1/jobs", files=example_files(1), data={"spec": json.dumps(quick_spec(steps=80))}).json()
        wait_for_step(client, job["id"], 10)
        warned_before = len(database_warnings(running, job["id"]))

        pg.stop()
        try:
            start = time.monotonic()
            down = client.get("/v1/jobs")
            assert down.status_code == 503 and down.json()["error"]["code"] == "database_unavailable"
            assert time.monotonic() - start < 5
            assert client.get("/readyz").status_code == 503
            assert httpx.get(f"{running.base_url}/healthz").status_code == 200  # the process itself is up
            eventually(  # the worker keeps training and waits to write its progress
                lambda: database_warnings(running, job["id"]),
                lambda warnings: len(warnings) > warned_before,
                "a worker warning that it waits for the database",
            )
        finally:
            pg.start()

        eventually(lambda: client.get("/v1/jobs").status_code, lambda status: status == 200, "the API recovering")
        done = wait_for_status(client, job["id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded", done["error"]
        assert done["attempt"] == 1
