"""Faults survived, on the real stack: a worker killed mid-training, a broker that lost its messages, repeated and
concurrent submissions, a storage outage, retention, presigned URLs and permanent errors. (The per-key queue and
rate limits, which only the API decides, are checked in process in tests/api.)"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import psutil
import pytest
import redis

from tests.conftest import REDIS_DB, Stack, assert_one_adapter, example_files, quick_spec
from tests.pace import eventually, wait_for_status, wait_for_step


def events_of(client: Any, job_id: str) -> list[dict[str, Any]]:
    return list(client.get(f"/v1/jobs/{job_id}/events", params={"limit": 500}).json()["data"])


def warnings_of(prod_stack: Stack, job_id: str) -> list[str]:
    """The messages of the worker's WARNING log lines about one job."""
    return [
        line["message"]
        for line in prod_stack.worker_log_lines()
        if line.get("job_id") == job_id and line.get("level") == "WARNING"
    ]


@pytest.mark.parametrize("victim", ["pool child", "whole worker"])
def test_a_killed_worker_resumes_from_its_checkpoint_and_finishes_once(prod_stack: Stack, victim: str) -> None:
    key = prod_stack.create_key(f"kill-{victim}")
    with prod_stack.client(key) as client:
        spec = quick_spec(steps=100, checkpointing_steps=20)
        job = client.post("/v1/jobs", files=example_files(2), data={"spec": json.dumps(spec)}).json()
        wait_for_step(client, job["id"], 45)  # two checkpoints are in object storage by now
        assert prod_stack.worker is not None
        if victim == "pool child":
            children = psutil.Process(prod_stack.worker.pid).children(recursive=True)
            assert children, "prefork worker without a pool child"
            for child in children:
                os.kill(child.pid, signal.SIGKILL)
        else:
            os.killpg(prod_stack.worker.pid, signal.SIGKILL)
            prod_stack.worker.wait()
            prod_stack.restart_worker()
        done = wait_for_status(client, job["id"], {"succeeded", "failed", "canceled"})
        assert done["status"] == "succeeded", done["error"]
        assert done["attempt"] == 2 and done["progress"]["step"] == 100
        events = events_of(client, job["id"])
        # The second start came from the reaper (`requeued`) or from the broker's redelivery taking over the
        # expired lease; either way the job started twice and finished once.
        assert [e["type"] for e in events].count("started") == 2
        loads = [e["data"] for e in events if e["type"] == "model_loaded"]
        assert loads[0]["resumed_from_step"] is None and loads[-1]["resumed_from_step"] >= 40
        assert [e["type"] for e in events].count("succeeded") == 1
    assert_one_adapter(prod_stack, job["id"])


def test_jobs_queued_when_the_broker_lost_its_messages_still_run(prod_stack: Stack) -> None:
    key = prod_stack.create_key("flush")
    with prod_stack.client(key) as client:
        busy = client.post("/v1/jobs", files=example_files(1), data={"spec": json.dumps(quick_spec(steps=5000))})
        busy_id = busy.json()["id"]
        wait_for_status(client, busy_id, {"running"})
        waiting = client.post("/v1/jobs", files=example_files(1), data={"spec": json.dumps(quick_spec(steps=2))})
        waiting_id = waiting.json()["id"]
        redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()  # the broker forgets every message
        client.post(f"/v1/jobs/{busy_id}/cancel")
        wait_for_status(client, busy_id, {"canceled"})
        done = wait_for_status(client, waiting_id, {"succeeded", "failed"})
        assert done["status"] == "succeeded"


def test_idempotency_key_returns_the_same_job(prod_stack: Stack) -> None:
    key = prod_stack.create_key("idem")
    files = example_files(1)
    spec = json.dumps(quick_spec(steps=1))
    with prod_stack.client(key) as client:
        first = client.post("/v1/jobs", files=files, data={"spec": spec}, headers={"Idempotency-Key": "order-1"})
        again = client.post("/v1/jobs", files=files, data={"spec": spec}, headers={"Idempotency-Key": "order-1"})
        assert first.status_code == 202 and again.status_code == 200
        assert again.headers["idempotent-replayed"] == "true" and again.json()["id"] == first.json()["id"]
        other = json.dumps(quick_spec(steps=2))
        conflict = client.post("/v1/jobs", files=files, data={"spec": other}, headers={"Idempotency-Key": "order-1"})
        assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_key_reused"

        results: list[str] = []

        def submit() -> None:
            with prod_stack.client(key) as c:
                r = c.post("/v1/jobs", files=files, data={"spec": spec}, headers={"Idempotency-Key": "order-2"})
                results.append(r.json()["id"])

        threads = [threading.Thread(target=submit) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 4 and len(set(results)) == 1
        ids = {j["id"] for j in client.get("/v1/jobs", params={"limit": 100}).json()["data"]}
        assert len(ids) == 2  # order-1 and order-2, nothing else


def test_retention_deletes_old_jobs_data(prod_stack: Stack) -> None:
    from sqlalchemy import create_engine, text

    key = prod_stack.create_key("retention")
    with prod_stack.client(key) as client:
        job = client.post("/v1/jobs", files=example_files(1), data={"spec": json.dumps(quick_spec(steps=1))}).json()
        wait_for_status(client, job["id"], {"succeeded"})
        assert prod_stack.s3_keys(f"jobs/{job['id']}/")
        engine = create_engine(prod_stack.database_url)
        with engine.begin() as conn:  # as if it had finished 40 days ago (the default retention is 30 days)
            conn.execute(
                text("UPDATE job SET finished_at = now() - interval '40 days' WHERE id = :id"), {"id": job["id"]}
            )
        engine.dispose()
        eventually(
            lambda: client.get(f"/v1/jobs/{job['id']}").status_code,
            lambda status: status == 404,
            "the reaper deleting a job finished 40 days ago",
        )
    assert prod_stack.s3_keys(f"jobs/{job['id']}/") == []


def test_a_storage_outage_during_upload_is_retried(prod_stack: Stack, s3_proxy: Any) -> None:
    key = prod_stack.create_key("outage")
    with prod_stack.client(key) as client:
        job = client.post("/v1/jobs", files=example_files(1), data={"spec": json.dumps(quick_spec(steps=60))}).json()
        wait_for_step(client, job["id"], 55)
        warned_before = len(warnings_of(prod_stack, job["id"]))
        s3_proxy.down()  # storage vanishes while the worker finishes and uploads its artifacts
        try:
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["storage"] != "ok"
            eventually(  # the worker met the outage: it logged a failed transfer that it will retry
                lambda: warnings_of(prod_stack, job["id"]),
                lambda warnings: len(warnings) > warned_before,
                "a worker warning about the storage outage",
            )
        finally:
            s3_proxy.up()
        done = wait_for_status(client, job["id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded", done["error"]
        assert client.get("/readyz").status_code == 200
        redirect = client.get(f"/v1/jobs/{job['id']}/adapter", follow_redirects=False)
        import httpx

        assert httpx.get(redirect.headers["location"]).status_code == 200


def test_a_presigned_url_grants_one_object_for_a_short_time(prod_stack: Stack) -> None:
    import httpx

    key = prod_stack.create_key("presigned")
    with prod_stack.client(key) as client:
        job = client.post("/v1/jobs", files=example_files(1), data={"spec": json.dumps(quick_spec(steps=1))}).json()
        wait_for_status(client, job["id"], {"succeeded"})
        url = client.get(f"/v1/jobs/{job['id']}/adapter", follow_redirects=False).headers["location"]
    # Signed for the address clients use (DOPSD_S3_PUBLIC_ENDPOINT_URL), not the one the services use.
    public, internal = prod_stack.env["DOPSD_S3_PUBLIC_ENDPOINT_URL"], prod_stack.env["DOPSD_S3_ENDPOINT_URL"]
    assert url.startswith(public + "/") and not url.startswith(internal)
    assert httpx.get(url).status_code == 200
    # The signature covers the key: pointing the same URL at another object of the job is refused.
    other = url.replace("pytorch_lora_weights.safetensors", "config.json")
    assert httpx.get(other).status_code == 403
    # And the expiry: a URL signed to live 1 second is refused after it.
    import boto3
    from botocore.config import Config

    s3 = boto3.client(
        "s3", endpoint_url=prod_stack.env["DOPSD_S3_ENDPOINT_URL"], region_name="us-east-1",
        aws_access_key_id=prod_stack.env["DOPSD_S3_ACCESS_KEY_ID"],
        aws_secret_access_key=prod_stack.env["DOPSD_S3_SECRET_ACCESS_KEY"],
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
    )  # fmt: skip
    short = s3.generate_presigned_url(
        "get_object",
        Params={"Bucket": prod_stack.env["DOPSD_S3_BUCKET"], "Key": f"jobs/{job['id']}/outputs/config.json"},
        ExpiresIn=1,
    )
    expired = eventually(lambda: httpx.get(short), lambda r: r.status_code == 403, "the 1-second URL expiring")
    assert "expired" in expired.text.lower(), expired.text


def test_a_worker_runs_one_job_at_a_time() -> None:
    """The delivery settings that keep one GPU to one job, and a job to one GPU."""
    from worker.celery_app import app

    conf = app.conf
    assert conf.worker_concurrency == 1 and conf.worker_prefetch_multiplier == 1
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit


def test_a_permanent_error_fails_at_once_without_retries(prod_stack: Stack) -> None:
    """An input that went bad in storage is the user's data problem: `bad_input` on the first attempt."""
    import boto3

    key = prod_stack.create_key("permanent")
    with prod_stack.client(key) as client:
        busy = client.post("/v1/jobs", files=example_files(1), data={"spec": json.dumps(quick_spec(steps=5000))})
        wait_for_status(client, busy.json()["id"], {"running"})
        job = client.post("/v1/jobs", files=example_files(1), data={"spec": json.dumps(quick_spec(steps=2))}).json()
        s3 = boto3.client(
            "s3", endpoint_url=prod_stack.env["DOPSD_S3_ENDPOINT_URL"], region_name="us-east-1",
            aws_access_key_id=prod_stack.env["DOPSD_S3_ACCESS_KEY_ID"],
            aws_secret_access_key=prod_stack.env["DOPSD_S3_SECRET_ACCESS_KEY"],
        )  # fmt: skip
        (input_key,) = prod_stack.s3_keys(f"jobs/{job['id']}/inputs/")
        s3.put_object(Bucket=prod_stack.env["DOPSD_S3_BUCKET"], Key=input_key, Body=b"\x89PNG\r\n\x1a\ncorrupt")
        client.post(f"/v1/jobs/{busy.json()['id']}/cancel")
        done = wait_for_status(client, job["id"], {"succeeded", "failed"})
        assert done["status"] == "failed" and done["error"]["code"] == "bad_input"
        assert done["attempt"] == 1 and "robot-1.png" in done["error"]["message"]
