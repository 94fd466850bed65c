"""The jobs API through HTTP on the production-shaped stack, for what needs its real servers and worker: cancel
(queued and running), delete, the model cache, nothing in S3 after refused requests, a body refused while
uvicorn streams it, readiness of real dependencies, secrets kept out of the processes' logs.

Validation, auth, isolation, listing and the error shape are checked in process, in tests/api. A long job keeps
the single worker busy here, so later submissions stay queued while they are examined.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.api.payloads import INVALID, submission
from tests.conftest import Stack, example_files, quick_spec
from tests.pace import wait_for_status


@pytest.fixture(scope="module")
def owner(prod_stack: Stack) -> str:
    return prod_stack.create_key("owner")


@pytest.fixture(scope="module")
def long_job(prod_stack: Stack, owner: str) -> Iterator[dict[str, Any]]:
    """A job of thousands of steps, running on the only worker."""
    with prod_stack.client(owner) as client:
        spec = quick_spec(steps=5000)
        job = client.post("/v1/jobs", files=example_files(1), data={"spec": json.dumps(spec)}).json()
        running = wait_for_status(client, job["id"], {"running"})
        yield running
        client.post(f"/v1/jobs/{job['id']}/cancel")
        wait_for_status(client, job["id"], {"canceled", "succeeded", "failed"})


def test_health_and_readiness(prod_stack: Stack) -> None:
    with prod_stack.client(None) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


# Refused at different points: while the file streams in, when an image is decoded, when the count is checked,
# and when the spec is checked against the files.
REFUSED_IN_S3 = ["file over the limit", "truncated png", "too many files", "caption for a missing file"]


def test_refused_submissions_store_nothing_in_s3(prod_stack: Stack) -> None:
    """The S3 server's own listing shows nothing stored by refused requests (the in-process tier checks every
    case of the table against the local store)."""
    key = prod_stack.create_key("refused")
    before = prod_stack.s3_keys()
    with prod_stack.client(key) as client:
        for case, request_parts, status, code in [row for row in INVALID if row[0] in REFUSED_IN_S3]:
            response = client.post("/v1/jobs", **submission(request_parts))
            assert response.status_code == status, (case, response.text)
            assert response.json()["error"]["code"] == code, case
        assert client.get("/v1/jobs").json()["data"] == []
    assert prod_stack.s3_keys() == before


def test_cancel_a_queued_job(prod_stack: Stack, owner: str, long_job: dict[str, Any]) -> None:
    with prod_stack.client(owner) as client:
        job = client.post("/v1/jobs", files=example_files(1), data={"spec": json.dumps(quick_spec())}).json()
        assert job["status"] == "queued" and job["queue_position"] == 1
        canceled = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
        assert canceled.json()["queue_position"] is None
        assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "canceled"  # idempotent
        assert client.get(f"/v1/jobs/{long_job['id']}").json()["status"] == "running"


def test_cancel_a_running_job_stops_it_within_a_step(prod_stack: Stack, owner: str, long_job: dict[str, Any]) -> None:
    with prod_stack.client(owner) as client:
        job_id = long_job["id"]
        response = client.post(f"/v1/jobs/{job_id}/cancel").json()
        assert response["status"] == "running" and response["cancel_requested"] is True
        done = wait_for_status(client, job_id, {"canceled", "succeeded", "failed"})
        assert done["status"] == "canceled"
        assert 0 < done["progress"]["step"] < 5000
        types = [e["type"] for e in client.get(f"/v1/jobs/{job_id}/events", params={"limit": 500}).json()["data"]]
        assert "cancel_requested" in types and types[-1] == "canceled"
        assert client.get(f"/v1/jobs/{job_id}/adapter").json()["error"]["code"] == "job_not_finished"


def test_delete_removes_the_job_and_its_objects(prod_stack: Stack, owner: str) -> None:
    with prod_stack.client(owner) as client:
        job = client.post("/v1/jobs", files=example_files(2), data={"spec": json.dumps(quick_spec(steps=2))}).json()
        wait_for_status(client, job["id"], {"succeeded"})
        assert prod_stack.s3_keys(f"jobs/{job['id']}/")
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
        assert prod_stack.s3_keys(f"jobs/{job['id']}/") == []


def test_the_worker_keeps_the_model_loaded_between_jobs(prod_stack: Stack, owner: str) -> None:
    with prod_stack.client(owner) as client:
        loads = []
        for _ in range(2):
            job = client.post("/v1/jobs", files=example_files(1), data={"spec": json.dumps(quick_spec(steps=1))})
            job_id = job.json()["id"]
            wait_for_status(client, job_id, {"succeeded"})
            events = client.get(f"/v1/jobs/{job_id}/events").json()["data"]
            loads.append(next(e["data"] for e in events if e["type"] == "model_loaded"))
    assert all(load["cached"] for load in loads)
    assert all(load["load_s"] < 0.05 for load in loads)


def test_a_body_over_the_limits_is_refused_while_uvicorn_streams_it(prod_stack: Stack) -> None:
    """A chunked body with no Content-Length, larger than every limit: the API stops reading it at the file limit
    and answers 413 (the oversized spec and the name that is not UTF-8 are checked in tests/api)."""
    key = prod_stack.create_key("oversized")

    def endless() -> Any:
        yield b'--B\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n'
        for _ in range(64):
            yield b"\0" * (1024 * 1024)

    with prod_stack.client(key) as client:
        r = client.post(
            "/v1/jobs", content=endless(), headers={"Content-Type": "multipart/form-data; boundary=B"}, timeout=60
        )
        assert r.status_code == 413 and r.json()["error"]["code"] in ("file_too_large", "request_too_large")
        assert client.get("/v1/jobs").json()["data"] == []


def test_no_secret_reaches_the_logs(prod_stack: Stack) -> None:
    key = prod_stack.create_key("secret-check")
    with prod_stack.client(key) as client:
        client.get("/v1/jobs")
        client.get("/v1/jobs", headers={"Authorization": "Bearer dopsd_wrong-key-value"})
    secrets_ = [key, "dopsd_wrong-key-value", prod_stack.env["DOPSD_S3_SECRET_ACCESS_KEY"]]
    for log in prod_stack.logs.glob("*.log"):
        text = log.read_text(errors="replace")
        for secret in secrets_:
            assert secret not in text, f"{secret[:8]}... found in {log.name}"
