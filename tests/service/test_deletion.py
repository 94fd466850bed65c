"""Deletion that deletes, on the real stack (HTTP, PostgreSQL, SeaweedFS, a real worker process, `dopsd maintain`):
after `DELETE` no object of the job stays once its worker has stopped, however it stopped (on request, or lost
and abandoned by the reaper, with an upload landing late); a canceled job keeps no checkpoint; and the job's
personal data leaves the database after the deletion grace period."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil
from sqlalchemy import create_engine, text

from tests.conftest import Stack, example_files, quick_spec
from tests.pace import eventually, wait_for_status


CHECKPOINT_EVERY_STEP = quick_spec(steps=5000, checkpointing_steps=1)


def job_row(prod_stack: Stack, job_id: str) -> dict[str, Any]:
    """The job's row as PostgreSQL holds it (the API answers 404 for a deleted job)."""
    engine = create_engine(prod_stack.database_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT * FROM job WHERE id = :id"), {"id": job_id}).mappings().one()
            return dict(row)
    finally:
        engine.dispose()


def sql(prod_stack: Stack, statement: str, **params: Any) -> Any:
    """Runs one statement on the stack's database and returns its first column of the first row, if any."""
    engine = create_engine(prod_stack.database_url)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(statement), params)
            return result.scalar() if result.returns_rows else None
    finally:
        engine.dispose()


def put_object(prod_stack: Stack, key: str) -> None:
    """Stores one object straight on the S3 server, as a worker's upload does."""
    import boto3

    client = boto3.client(
        "s3", endpoint_url=prod_stack.env["DOPSD_S3_ENDPOINT_URL"], region_name="us-east-1",
        aws_access_key_id=prod_stack.env["DOPSD_S3_ACCESS_KEY_ID"],
        aws_secret_access_key=prod_stack.env["DOPSD_S3_SECRET_ACCESS_KEY"],
    )  # fmt: skip
    client.put_object(Bucket=prod_stack.env["DOPSD_S3_BUCKET"], Key=key, Body=b"late upload")


def start_checkpointing_job(prod_stack: Stack, client: Any) -> str:
    """A long job that checkpoints every step, once its first checkpoints are in object storage."""
    job = client.post("/v1/jobs", files=example_files(1), data={"spec": json.dumps(CHECKPOINT_EVERY_STEP)}).json()
    wait_for_status(client, job["id"], {"running"})
    eventually(
        lambda: prod_stack.s3_keys(f"jobs/{job['id']}/checkpoints/"), bool, "the job's first checkpoint in storage"
    )
    return str(job["id"])


def wait_until_stopped(prod_stack: Stack, job_id: str) -> dict[str, Any]:
    """Waits for the job to reach a final state in the database (its worker stopped, or the reaper closed it)."""
    return eventually(
        lambda: job_row(prod_stack, job_id),
        lambda row: row["status"] in ("canceled", "failed", "succeeded"),
        f"job {job_id} stopping",
    )


def test_delete_of_a_running_job_that_checkpoints_every_step_leaves_nothing(prod_stack: Stack) -> None:
    key = prod_stack.create_key("delete-running")
    with prod_stack.client(key) as client:
        job_id = start_checkpointing_job(prod_stack, client)
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404
    stopped = wait_until_stopped(prod_stack, job_id)
    assert stopped["status"] == "canceled" and stopped["deleted"] and stopped["deleted_at"] is not None
    eventually(lambda: prod_stack.s3_keys(f"jobs/{job_id}/"), lambda keys: keys == [], "the job's prefix empty")
    # The sweep confirms it once the worker has stopped, and finds nothing more.
    eventually(lambda: job_row(prod_stack, job_id)["objects_deleted_at"], bool, "the sweep's confirmation")
    assert prod_stack.s3_keys(f"jobs/{job_id}/") == []


def test_a_canceled_job_keeps_no_checkpoint(prod_stack: Stack) -> None:
    """A canceled job never resumes: neither the checkpoint written as it stops nor the earlier ones stay."""
    key = prod_stack.create_key("cancel-checkpoints")
    with prod_stack.client(key) as client:
        job_id = start_checkpointing_job(prod_stack, client)
        client.post(f"/v1/jobs/{job_id}/cancel")
        done = wait_for_status(client, job_id, {"canceled", "succeeded", "failed"})
        assert done["status"] == "canceled"
        eventually(
            lambda: prod_stack.s3_keys(f"jobs/{job_id}/checkpoints/"), lambda keys: keys == [], "no checkpoint left"
        )
        assert prod_stack.s3_keys(f"jobs/{job_id}/inputs/")  # the job is still there, with its images
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "canceled"


@contextmanager
def frozen(process: psutil.Process, prod_stack: Stack) -> Iterator[None]:
    """Stops `process` (SIGSTOP: a worker that hangs, its heartbeat too) at a moment it holds no transaction open
    (a frozen transaction's row lock would hold up everyone else), and lets it go on (SIGCONT) afterwards."""
    idle_in_transaction = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
    )
    for _ in range(50):
        os.kill(process.pid, signal.SIGSTOP)
        if not sql(prod_stack, idle_in_transaction):
            break
        os.kill(process.pid, signal.SIGCONT)
        time.sleep(0.05)
    else:
        raise AssertionError("the worker never stood outside a transaction")
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


def test_a_deleted_job_whose_worker_was_lost_leaves_nothing_even_with_late_uploads(prod_stack: Stack) -> None:
    """The worker hangs mid-training; the job is deleted; the reaper abandons it when the lease runs out. An upload
    the hung worker had in flight lands after the delete: the sweep removes it once the job is closed. When the
    worker wakes, it finds its lease gone, and removes what landed meanwhile before it moves on."""
    assert prod_stack.worker is not None
    key = prod_stack.create_key("delete-lost")
    with prod_stack.client(key) as client:
        job_id = start_checkpointing_job(prod_stack, client)
        (child,) = psutil.Process(prod_stack.worker.pid).children(recursive=True)
        with frozen(child, prod_stack):
            assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
            put_object(prod_stack, f"jobs/{job_id}/checkpoints/step-00009999/adapter.safetensors")
            eventually(
                lambda: job_row(prod_stack, job_id),
                lambda row: row["status"] == "canceled" and row["objects_deleted_at"] is not None,
                "the reaper abandoning the deleted job and the sweep emptying its prefix",
            )
            assert prod_stack.s3_keys(f"jobs/{job_id}/") == []
            put_object(prod_stack, f"jobs/{job_id}/outputs/samples/step-00009999/contact_sheet.png")
        eventually(
            lambda: prod_stack.s3_keys(f"jobs/{job_id}/"), lambda keys: keys == [], "the woken worker's clean-up"
        )
        removed = [
            line["message"]
            for line in prod_stack.worker_log_lines()
            if line.get("job_id") == job_id and "deleted while running" in line["message"]
        ]
        assert removed and re.search(r"removed its [1-9]\d* stored object", removed[-1])
        # The worker goes on to the next job.
        job = client.post(
            "/v1/jobs", files=example_files(1), data={"spec": json.dumps(quick_spec(steps=1, eval_seeds=0))}
        ).json()
        assert wait_for_status(client, job["id"], {"succeeded", "failed", "canceled"})["status"] == "succeeded"


def test_a_deleted_jobs_personal_data_leaves_the_database_after_the_grace_period(prod_stack: Stack) -> None:
    key = prod_stack.create_key("erase")
    spec = quick_spec(
        steps=1,
        eval_seeds=0,  # no report: this test is about what stays in the database, not about the report
        trigger="zorblax",
        captions={"robot-1.png": ["a photo of [V] in grandmother's kitchen"]},
        validation_prompts=["[V] at 12 Rue des Lilas"],
        webhook_url="http://127.0.0.1:9/private-hook-path",
    )
    with prod_stack.client(key) as client:
        job = client.post(
            "/v1/jobs",
            files=example_files(1),
            data={"spec": json.dumps(spec)},
            headers={"Idempotency-Key": "erase-me"},
        ).json()
        job_id = job["id"]
        assert wait_for_status(client, job_id, {"succeeded", "failed", "canceled"})["status"] == "succeeded"
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
    personal = ["zorblax", "grandmother", "Rue des Lilas", "robot-1.png", "private-hook-path"]
    row_text = f"SELECT row_to_json(job)::text FROM job WHERE id = '{job_id}'"
    counts = {
        table: f"SELECT count(*) FROM {table} WHERE job_id = '{job_id}'"
        for table in ("job_event", "job_artifact", "webhook_delivery", "idempotency_record")
    }
    # Within the grace period (a day by default) the rows are still there (the job's last webhooks still go out).
    assert all(word in sql(prod_stack, row_text) for word in personal)
    assert all(sql(prod_stack, count) > 0 for count in counts.values())
    sql(prod_stack, "UPDATE job SET deleted_at = now() - interval '2 days' WHERE id = :id", id=job_id)
    eventually(lambda: job_row(prod_stack, job_id)["data_erased_at"], bool, "the sweep erasing the job's data")
    stored = sql(prod_stack, row_text)
    assert not [word for word in personal if word in stored], stored
    assert {table: sql(prod_stack, count) for table, count in counts.items()} == dict.fromkeys(counts, 0)
    row = job_row(prod_stack, job_id)  # what stays is the accounting
    assert row["status"] == "succeeded" and row["gpu_seconds"] > 0 and row["preset"] == "tiny-z-image"
    assert prod_stack.s3_keys(f"jobs/{job_id}/") == []
