"""The jobs API through HTTP on the production-shaped stack: auth, validation, cancel, listing, isolation, delete.

A long job keeps the single worker busy, so later submissions stay queued while they are examined.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import REPO, Stack, example_files, quick_spec, wait_for_status


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


def png_bytes(size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "green").save(buffer, format="PNG")
    return buffer.getvalue()


def test_health_and_readiness(prod_stack: Stack) -> None:
    with prod_stack.client(None) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


def test_every_route_needs_a_valid_key(prod_stack: Stack) -> None:
    key = prod_stack.create_key("soon-revoked")
    routes = [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/presets"),
              ("GET", "/v1/jobs/00000000-0000-0000-0000-000000000000")]  # fmt: skip
    for token in (None, "dopsd_not-a-key"):
        with prod_stack.client(token) as client:
            for method, path in routes:
                response = client.request(method, path)
                assert response.status_code == 401, (method, path)
                assert response.json()["error"]["code"] == "unauthorized"
                assert response.headers["www-authenticate"] == "Bearer"
    with prod_stack.client(key) as client:
        assert client.get("/v1/jobs").status_code == 200
        subprocess.run(
            [sys.executable, "-m", "dopsd", "keys", "revoke", key], env=prod_stack.env, cwd=REPO, check=True,
            capture_output=True,
        )  # fmt: skip
        assert client.get("/v1/jobs").status_code == 401


INVALID: list[tuple[str, dict[str, Any], int, str]] = [
    ("json body", {"json": {"spec": {}}}, 415, "unsupported_media_type"),
    ("no spec", {"files": "one"}, 422, "invalid_spec"),
    ("malformed spec", {"files": "one", "spec": "{not json"}, 422, "invalid_spec"),
    ("spec not an object", {"files": "one", "spec": "[1, 2]"}, 422, "invalid_spec"),
    ("unknown field", {"files": "one", "spec": {"preset": "tiny-z-image", "stpes": 3}}, 422, "invalid_spec"),
    ("steps out of range", {"files": "one", "spec": {"steps": 0}}, 422, "invalid_spec"),
    ("rank out of range", {"files": "one", "spec": {"rank": 100000}}, 422, "invalid_spec"),
    ("unknown preset", {"files": "one", "spec": {"preset": "sdxl"}}, 422, "unknown_preset"),
    ("zero files", {"files": "none", "spec": {}}, 422, "no_images"),
    ("caption for a missing file", {"files": "one", "spec": {"captions": {"x.png": ["[V]"]}}}, 422, "unknown_file"),
    ("text named png", {"files": "text", "spec": {}}, 422, "not_an_image"),
    ("truncated png", {"files": "truncated", "spec": {}}, 422, "unreadable_image"),
    ("too small", {"files": "small", "spec": {}}, 422, "image_too_small"),
    ("too many files", {"files": "many", "spec": {}}, 422, "too_many_files"),
    ("file over the limit", {"files": "huge", "spec": {}}, 413, "file_too_large"),
    ("extra form field", {"files": "one", "spec": {}, "extra": "x"}, 422, "invalid_request"),
]


def _files(kind: str) -> list[tuple[str, tuple[str, bytes, str]]]:
    good = png_bytes()
    return {
        "none": [],
        "one": [("images", ("a.png", good, "image/png"))],
        "text": [
            ("images", ("a.png", good, "image/png")),
            ("images", ("notes.png", b"hello, not a png", "image/png")),
        ],
        "truncated": [("images", ("cut.png", good[: len(good) // 2], "image/png"))],
        "small": [("images", ("tiny.png", png_bytes((16, 16)), "image/png"))],
        "many": [("images", (f"{i}.png", good, "image/png")) for i in range(65)],
        "huge": [("images", ("big.png", good + b"\0" * (3 * 1024 * 1024), "image/png"))],
    }[kind]


@pytest.mark.parametrize(("case", "request_parts", "status", "code"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_submissions_are_refused_and_create_nothing(
    prod_stack: Stack, case: str, request_parts: dict[str, Any], status: int, code: str
) -> None:
    key = prod_stack.create_key(f"invalid-{code}")
    before = prod_stack.s3_keys()
    with prod_stack.client(key) as client:
        if "json" in request_parts:
            response = client.post("/v1/jobs", json=request_parts["json"])
        else:
            data: dict[str, str] = {}
            if "spec" in request_parts:
                spec = request_parts["spec"]
                data["spec"] = spec if isinstance(spec, str) else json.dumps(spec)
            if "extra" in request_parts:
                data["extra"] = request_parts["extra"]
            files = _files(request_parts["files"])
            response = client.post("/v1/jobs", data=data, files=files or {"spec": (None, data.pop("spec", "{}"))})
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code and error["message"]
        assert client.get("/v1/jobs").json()["data"] == []
    assert prod_stack.s3_keys() == before
    if code in ("not_an_image", "unreadable_image", "image_too_small"):
        assert error["details"]["file"] in error["message"]


def test_cancel_a_queued_job(prod_stack: Stack, owner: str, long_job: dict[str, Any]) -> None:
    with prod_stack.client(owner) as client:
        job = client.post("/v1/jobs", files=example_files(1), data={"spec": json.dumps(quick_spec())}).json()
        assert job["status"] == "queued" and job["queue_position"] == 1
        canceled = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
        assert canceled.json()["queue_position"] is None
        assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "canceled"  # idempotent
        assert client.get(f"/v1/jobs/{long_job['id']}").json()["status"] == "running"


def test_listing_is_newest_first_paginated_and_filtered(prod_stack: Stack, long_job: dict[str, Any]) -> None:
    key = prod_stack.create_key("lister")
    with prod_stack.client(key) as client:
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


def test_another_keys_job_is_not_found_on_every_route(prod_stack: Stack, long_job: dict[str, Any]) -> None:
    stranger = prod_stack.create_key("stranger")
    job_id = long_job["id"]
    with prod_stack.client(stranger) as client:
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


def test_cancel_a_running_job_stops_it_within_a_step(prod_stack: Stack, owner: str, long_job: dict[str, Any]) -> None:
    with prod_stack.client(owner) as client:
        job_id = long_job["id"]
        response = client.post(f"/v1/jobs/{job_id}/cancel").json()
        assert response["status"] == "running" and response["cancel_requested"] is True
        done = wait_for_status(client, job_id, {"canceled", "succeeded", "failed"}, timeout_s=60)
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


def test_openapi_documents_the_routes(prod_stack: Stack) -> None:
    spec = httpx.get(f"{prod_stack.base_url}/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/adapter"} <= set(
        spec["paths"]
    )
    assert "multipart/form-data" in spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]


def test_odd_uploads_keep_every_image_under_a_safe_name(prod_stack: Stack) -> None:
    key = prod_stack.create_key("names")
    good = png_bytes()
    files = [
        ("images", ("../../etc/passwd.png", good, "image/png")),
        ("images", ("image-01", good, "image/png")),
        ("images", ("image-01", good, "image/png")),
        ("images", ("captions.json", good, "image/png")),
        ("images", ("caf\xe9 photo.png", good, "image/png")),
    ]
    with prod_stack.client(key) as client:
        job = client.post("/v1/jobs", files=files, data={"spec": json.dumps(quick_spec())}).json()
        names = [i["name"] for i in job["images"]]
        assert len({n.lower() for n in names}) == 5 and "captions.json" not in names
        assert all("/" not in n and ".." not in n for n in names)
        assert all(k.startswith(f"jobs/{job['id']}/inputs/") for k in prod_stack.s3_keys(f"jobs/{job['id']}/"))
        client.post(f"/v1/jobs/{job['id']}/cancel")


def test_malformed_requests_are_client_errors(prod_stack: Stack) -> None:
    key = prod_stack.create_key("malformed")
    with prod_stack.client(key) as client:
        body = b'--XyZ\r\nContent-Disposition: form-data; name="spec"\r\n\r\n{}\r\n--XyZ\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\nabc'
        cut = client.post("/v1/jobs", content=body, headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
        assert cut.status_code == 422 and cut.json()["error"]["code"] == "invalid_multipart"
        assert client.get("/v1/jobs", params={"cursor": "e30"}).json()["error"]["code"] == "invalid_cursor"
        job_id = "00000000-0000-0000-0000-000000000000"
        assert client.get(f"/v1/jobs/{job_id}/events", params={"after": 2**70}).status_code == 422
        spec = json.dumps(quick_spec(sample_seeds=[2**70]))
        assert client.post("/v1/jobs", files=example_files(1), data={"spec": spec}).status_code == 422


def _encoded(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


HOSTILE: list[tuple[str, bytes, int, str]] = [
    (
        "drawing.svg",
        b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect/></svg>',
        422,
        "not_an_image",
    ),
    ("bomb.png", _encoded(Image.new("1", (12000, 12000)), "PNG"), 422, "decompression_bomb"),
    ("anim.gif", _encoded(Image.new("RGB", (64, 64), "red"), "GIF"), 422, "unsupported_format"),
    ("garbage.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 500, 422, "not_an_image"),
]


@pytest.mark.parametrize(("name", "payload", "status", "code"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_images_are_refused_and_leave_nothing(
    prod_stack: Stack, name: str, payload: bytes, status: int, code: str
) -> None:
    key = prod_stack.create_key(f"hostile-{code}")
    before = prod_stack.s3_keys()
    with prod_stack.client(key) as client:
        r = client.post("/v1/jobs", files=[("images", (name, payload, "image/png"))], data={"spec": "{}"})
        assert r.status_code == status and r.json()["error"]["code"] == code, r.text
        assert client.get("/v1/jobs").json()["data"] == []
        assert client.get("/healthz").status_code == 200
    assert prod_stack.s3_keys() == before


def test_sixteen_bit_and_cmyk_images_are_accepted(prod_stack: Stack) -> None:
    key = prod_stack.create_key("modes")
    sixteen = _encoded(Image.new("I;16", (64, 64), 30000), "PNG")
    cmyk = _encoded(Image.new("CMYK", (64, 64), (0, 128, 255, 0)), "JPEG")
    files = [("images", ("deep.png", sixteen, "image/png")), ("images", ("print.jpg", cmyk, "image/jpeg"))]
    with prod_stack.client(key) as client:
        r = client.post("/v1/jobs", files=files, data={"spec": json.dumps(quick_spec())})
        assert r.status_code == 202, r.text
        assert [i["name"] for i in r.json()["images"]] == ["deep.png", "print.jpg"]
        client.post(f"/v1/jobs/{r.json()['id']}/cancel")


def test_oversized_bodies_and_specs_are_refused_while_streaming(prod_stack: Stack) -> None:
    key = prod_stack.create_key("oversized")
    with prod_stack.client(key) as client:
        spec = json.dumps({"validation_prompts": ["x" * 70_000]})
        r = client.post("/v1/jobs", files=[("images", ("a.png", png_bytes(), "image/png"))], data={"spec": spec})
        assert r.status_code == 413 and r.json()["error"]["code"] == "field_too_large"

        def endless() -> Any:  # a chunked body with no Content-Length, larger than the total limit
            yield b'--B\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n'
            for _ in range(64):
                yield b"\0" * (1024 * 1024)

        r = client.post(
            "/v1/jobs", content=endless(), headers={"Content-Type": "multipart/form-data; boundary=B"}, timeout=60
        )
        assert r.status_code == 413 and r.json()["error"]["code"] in ("file_too_large", "request_too_large")
        raw = (
            b'--B\r\nContent-Disposition: form-data; name="spec"\r\n\r\n{}\r\n'
            b'--B\r\nContent-Disposition: form-data; name="images"; filename="\xff\xfe\xe9t\xe9.png"\r\n\r\n'
            + png_bytes() + b"\r\n--B--\r\n"
        )  # fmt: skip
        r = client.post("/v1/jobs", content=raw, headers={"Content-Type": "multipart/form-data; boundary=B"})
        assert r.status_code == 202, r.text  # a name that is not UTF-8 is replaced, never used as a path
        name = r.json()["images"][0]["name"]
        assert name.endswith(".png") and "/" not in name
        client.post(f"/v1/jobs/{r.json()['id']}/cancel")


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
