"""Outages of the database, object storage and the broker while a job trains: one shorter than the outage
tolerance (`DOPSD_OUTAGE_TOLERANCE_S`) delays the job, which then finishes once; a longer one fails it with a code
that names the dependency.

Its own stack: the API, one worker and `dopsd maintain`, each reaching PostgreSQL, a private Redis and SeaweedFS
through switchable proxies (a real network outage: connections refused and cut), with the tolerance scaled down
to 12 s so the suite sees both sides in seconds (the default is 600 s).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.config import Settings
from scripts import stack
from tests.conftest import Stack, example_files, migrated_database, quick_spec
from tests.pace import PACE, eventually, wait_for_status, wait_for_step
from tests.service.tcpproxy import TcpProxy


TOLERANCE_S = 12.0
SHORT_OUTAGE_S = 5.0  # well within the tolerance, whatever the backoff's last pause


@dataclass
class OutageStack:
    """The stack and the three proxies a test switches off."""

    stack: Stack
    database: TcpProxy
    broker: TcpProxy
    storage: TcpProxy
    maintain_log: Path


def _through(proxy: TcpProxy, url: str, port: int) -> str:
    return url.replace(f"127.0.0.1:{port}", f"127.0.0.1:{proxy.port}", 1)


@pytest.fixture(scope="module")
def outages(
    tmp_path_factory: pytest.TempPathFactory, s3_proxy: TcpProxy, s3: dict[str, str], private_redis: str
) -> Iterator[OutageStack]:
    database_url = next(db := migrated_database("outages"))
    database = TcpProxy(("127.0.0.1", 5432))
    redis_port = int(private_redis.rsplit(":", 1)[1].split("/")[0])
    broker = TcpProxy(("127.0.0.1", redis_port))
    storage = TcpProxy(s3_proxy.target)  # its own path to the session's SeaweedFS
    logs = tmp_path_factory.mktemp("outage-logs")
    port = stack.free_port()
    env = stack.stack_env(
        database_url=_through(database, database_url, 5432), broker_url=_through(broker, private_redis, redis_port),
        s3_endpoint=f"http://127.0.0.1:{storage.port}", access_key=s3["access_key"], secret_key=s3["secret_key"],
        public_url=f"http://127.0.0.1:{port}", bucket=f"dopsd-outages-{os.getpid()}",
    )  # fmt: skip
    env.update(
        DOPSD_OUTAGE_TOLERANCE_S=str(TOLERANCE_S),
        DOPSD_LEASE_S="60",  # longer than any outage here: the worker keeps its job through it
        DOPSD_PROGRESS_INTERVAL_S="0.2",
        DOPSD_REAPER_INTERVAL_S="1",
        DOPSD_MAINTENANCE_IN_API="false",
    )
    api = PACE.timed_start(lambda: stack.start_api(env, port, logs / "api.log"))
    maintain = stack.start_maintain(env, logs / "maintain.log")
    running = Stack(f"http://127.0.0.1:{port}", env, database_url, logs)
    running.restart_worker()
    yield OutageStack(running, database, broker, storage, logs / "maintain.log")
    if running.worker is not None:
        stack.stop(running.worker)
    stack.stop(maintain)
    stack.stop(api)
    for proxy in (database, broker, storage):
        proxy.down()
    next(db, None)  # drops the database


def worker_warnings(running: Stack, job_id: str, about: str) -> list[str]:
    """The worker's WARNING lines about one job that mention `about`."""
    return [
        line["message"]
        for line in running.worker_log_lines()
        if line.get("job_id") == job_id and line.get("level") == "WARNING" and about in line["message"]
    ]


def training(client: httpx.Client, *, steps: int = 16) -> dict[str, Any]:
    """A job that checkpoints every 2 steps (uploads during training), seen past its 4th step."""
    spec = quick_spec(steps=steps, checkpointing_steps=2, eval_seeds=0)  # outages are the point, not the report
    job = client.post("/v1/jobs", files=example_files(1), data={"spec": json.dumps(spec)})
    assert job.status_code == 202, job.text
    wait_for_step(client, job.json()["id"], 4)
    return dict(job.json())


def adapters_of(running: Stack, job_id: str) -> list[str]:
    return [k for k in running.s3_keys(f"jobs/{job_id}/") if k.endswith("pytorch_lora_weights.safetensors")]


def test_the_tolerance_is_ten_minutes_unless_an_operator_says_otherwise() -> None:
    assert Settings(signing_key="a-real-signing-key").outage_tolerance_s == 600  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("dependency", "warning"),
    [("storage", "failed (object storage"), ("database", "database unavailable")],
    ids=["storage", "database"],
)
def test_an_outage_within_the_tolerance_delays_the_job_which_then_finishes_once(
    outages: OutageStack, dependency: str, warning: str
) -> None:
    running = outages.stack
    proxy: TcpProxy = getattr(outages, dependency)
    with running.client(running.create_key(f"{dependency}-blip")) as client:
        job = training(client)
        proxy.down()
        down_at = time.monotonic()
        try:
            # The worker met the outage and waits (through the API meanwhile, a database outage answers 503).
            eventually(
                lambda: worker_warnings(running, job["id"], warning),
                bool,
                f"a worker warning that it waits for the {dependency}",
            )
            time.sleep(max(0.0, SHORT_OUTAGE_S - (time.monotonic() - down_at)))  # the outage lasts this long
        finally:
            proxy.up()
        eventually(lambda: client.get("/v1/jobs").status_code, lambda s: s == 200, "the API answering again")
        done = wait_for_status(client, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done["error"]
    assert done["attempt"] == 1 and done["progress"]["step"] == 16
    assert len(adapters_of(running, job["id"])) == 1


def test_a_storage_outage_longer_than_the_tolerance_fails_the_job_naming_storage(outages: OutageStack) -> None:
    running = outages.stack
    with running.client(running.create_key("storage-gone")) as client:
        job = training(client)
        outages.storage.down()
        try:
            done = wait_for_status(client, job["id"], {"succeeded", "failed"})
        finally:
            outages.storage.up()
    assert done["status"] == "failed"
    assert done["error"]["code"] == "storage_unavailable", done["error"]
    assert "object storage was unreachable for" in done["error"]["message"]


def test_a_database_outage_longer_than_the_tolerance_fails_the_job_naming_the_database(
    outages: OutageStack,
) -> None:
    running = outages.stack
    with running.client(running.create_key("database-gone")) as client:
        job = training(client)
        outages.database.down()
        try:
            eventually(  # the worker gave the job up; its failure waits for the database too, and is written then
                lambda: worker_warnings(running, job["id"], "failed: database_unavailable"),
                bool,
                "the worker giving the job up",
            )
        finally:
            outages.database.up()
        done = wait_for_status(client, job["id"], {"succeeded", "failed"})
    assert done["status"] == "failed"
    assert done["error"]["code"] == "database_unavailable", done["error"]
    assert "the database was unreachable for" in done["error"]["message"]


def test_a_broker_blip_does_not_stop_a_running_job(outages: OutageStack) -> None:
    running = outages.stack
    with running.client(running.create_key("broker-blip")) as client:
        job = training(client)
        outages.broker.down()  # the worker's connection to Redis is cut and refused
        try:
            eventually(
                lambda: running.worker_log_lines(),
                lambda lines: any("onnection" in str(line.get("message")) for line in lines[-50:]),
                "the worker noticing the lost broker connection",
            )
        finally:
            outages.broker.up()
        done = wait_for_status(client, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done["error"]
    assert done["attempt"] == 1  # it kept running: not canceled, not handed to another attempt
    assert len(adapters_of(running, job["id"])) == 1
