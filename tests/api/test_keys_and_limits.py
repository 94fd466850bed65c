"""Keys, isolation and per-key limits, in process: every route needs a valid key, a key sees only its own jobs,
listing pages and filters, the queued-jobs limit and the rate limit answer 429, and the OpenAPI document."""

from __future__ import annotations

import json
from typing import Any

from tests.api.local_api import LocalApi
from tests.conftest import example_files, quick_spec


def test_every_route_needs_a_valid_key(local_api: LocalApi) -> None:
    key = local_api.create_key("soon-revoked")
    routes = [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/presets"),
              ("GET", "/v1/jobs/00000000-0000-0000-0000-000000000000")]  # fmt: skip
    for token in (None, "dopsd_not-a-key"):
        with local_api.client(token) as client:
            for method, path in routes:
                response = client.request(method, path)
                assert response.status_code == 401, (method, path)
                assert response.json()["error"]["code"] == "unauthorized"
                assert response.headers["www-authenticate"] == "Bearer"
    with local_api.client(key) as client:
        assert client.get("/v1/jobs").status_code == 200
        local_api.revoke_key(key)
        assert client.get("/v1/jobs").status_code == 401


def test_another_keys_job_is_not_found_on_every_route(local_api: LocalApi) -> None:
    owner_key = local_api.create_key("owner")
    with local_api.client(owner_key) as owner:
        job = owner.post("/v1/jobs", files=example_files(1), data={"spec": json.dumps(quick_spec())})
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
    with local_api.client(local_api.create_key("stranger")) as client:
        for method, path in [
            ("GET", f"/v1/jobs/{job_id}"),
            ("POST", f"/v1/jobs/{job_id}/cancel"),
            ("DELETE", f"/v1/jobs/{job_id}"),
            ("GET", f"/v1/jobs/{job_id}/events"),
            ("GET", f"/v1/jobs/{job_id}/adapter"),
            ("GET", f"/v1/jobs/{job_id}/artifacts"),
        ]:
            response = client.request(method, path, follow_redirects=False)
            assert response.status_code == 404, (method, path, response.text)
            assert response.json()["error"]["code"] == "job_not_found"
        assert client.get("/v1/jobs").json()["data"] == []
    with local_api.client(owner_key) as owner:  # the stranger's cancel and delete left the job alone
        still = owner.get(f"/v1/jobs/{job_id}")
        assert still.status_code == 200 and still.json()["status"] == "queued"
        owner.post(f"/v1/jobs/{job_id}/cancel")


def test_listing_is_newest_first_paginated_and_filtered(local_api: LocalApi) -> None:
    key = local_api.create_key("lister")
    with local_api.client(key) as client:
        created = [
            client.post("/v1/jobs", files=example_files(1), data={"spec": json.dumps(quick_spec())}).json()["id"]
            for _ in range(5)
        ]
        pages, cursor = [], None
        while True:
            params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            body = client.get("/v1/jobs", params=params).json()
            pages.append([j["id"] for j in body["data"]])
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert [len(p) for p in pages] == [2, 2, 1]
        assert [i for p in pages for i in p] == list(reversed(created))
        positions = [client.get(f"/v1/jobs/{i}").json()["queue_position"] for i in created]
        assert positions == sorted(positions) and len(set(positions)) == 5
        assert len(client.get("/v1/jobs", params={"status": "queued"}).json()["data"]) == 5
        assert client.get("/v1/jobs", params={"status": "succeeded"}).json()["data"] == []
        assert client.get("/v1/jobs", params={"limit": 101}).status_code == 422
        assert client.get("/v1/jobs", params={"status": "sleeping"}).status_code == 422
        for job_id in created:
            client.post(f"/v1/jobs/{job_id}/cancel")
        assert len(client.get("/v1/jobs", params={"status": "canceled"}).json()["data"]) == 5


def test_a_key_may_queue_only_so_many_jobs(local_api: LocalApi) -> None:
    assert local_api.settings.max_queued_per_key == 6
    key = local_api.create_key("queue-limit")
    with local_api.client(key) as client:
        spec = json.dumps(quick_spec(steps=1))
        queued = [client.post("/v1/jobs", files=example_files(1), data={"spec": spec}) for _ in range(6)]
        assert all(r.status_code == 202 for r in queued)
        refused = client.post("/v1/jobs", files=example_files(1), data={"spec": spec})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_queued_jobs"
        assert int(refused.headers["retry-after"]) > 0
        for r in queued:
            client.post(f"/v1/jobs/{r.json()['id']}/cancel")
        again = client.post("/v1/jobs", files=example_files(1), data={"spec": spec})
        assert again.status_code == 202, again.text  # canceled jobs no longer count
        client.post(f"/v1/jobs/{again.json()['id']}/cancel")


def test_requests_over_the_rate_limit_get_429_with_retry_after(local_api: LocalApi) -> None:
    with local_api.client(local_api.create_key("rate")) as client:
        # 1000 a minute with bursts of 1000: the bucket empties after about 1000 quick requests (a bounded loop).
        limited, sent = None, 0
        while limited is None and sent < 3000:
            response = client.get("/v1/presets")
            sent += 1
            if response.status_code == 429:
                limited = response
        assert limited is not None, "no request was limited"
        assert sent >= 1000
        assert limited.json()["error"]["code"] == "rate_limited"
        assert int(limited.headers["retry-after"]) >= 1
    with local_api.client(local_api.create_key("other")) as other:
        assert other.get("/v1/presets").status_code == 200  # limits are per key


def test_openapi_documents_the_routes(local_api: LocalApi) -> None:
    with local_api.client(None) as client:
        spec = client.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/adapter"} <= set(
        spec["paths"]
    )
    assert "multipart/form-data" in spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]


def test_health_and_readiness_in_embedded_mode(local_api: LocalApi) -> None:
    with local_api.client(None) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
