"""Submission checks, in process: every invalid or hostile upload gets its status, error code and the one error
shape, and creates nothing (no job, no stored file, no broker message); odd but valid uploads are accepted
under safe names; dry runs answer without creating anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.api.local_api import LocalApi
from tests.api.payloads import HOSTILE, INVALID, encoded, png_bytes, submission
from tests.conftest import example_files, quick_spec


def assert_error_shape(body: dict[str, Any]) -> dict[str, Any]:
    """The one error shape: `{"error": {"code", "message", "details"}}`, with a code and a message."""
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert error["code"] and error["message"]
    return error


@pytest.mark.parametrize(("case", "request_parts", "status", "code"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_submissions_are_refused_and_create_nothing(
    local_api: LocalApi, case: str, request_parts: dict[str, Any], status: int, code: str
) -> None:
    key = local_api.create_key(f"invalid-{code}")
    before, messages = local_api.stored(), local_api.messages()
    with local_api.client(key) as client:
        response = client.post("/v1/jobs", **submission(request_parts))
        assert response.status_code == status, response.text
        error = assert_error_shape(response.json())
        assert error["code"] == code and error["message"]
        assert client.get("/v1/jobs").json()["data"] == []
    assert local_api.stored() == before
    assert local_api.messages() == messages
    if code in ("not_an_image", "unreadable_image", "image_too_small"):
        assert error["details"]["file"] in error["message"]


@pytest.mark.parametrize(("name", "payload", "status", "code"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_images_are_refused_and_leave_nothing(
    local_api: LocalApi, name: str, payload: bytes, status: int, code: str
) -> None:
    key = local_api.create_key(f"hostile-{code}")
    before = local_api.stored()
    with local_api.client(key) as client:
        r = client.post("/v1/jobs", files=[("images", (name, payload, "image/png"))], data={"spec": "{}"})
        assert r.status_code == status and assert_error_shape(r.json())["code"] == code, r.text
        assert client.get("/v1/jobs").json()["data"] == []
        assert client.get("/healthz").status_code == 200
    assert local_api.stored() == before


def test_sixteen_bit_and_cmyk_images_are_accepted(local_api: LocalApi) -> None:
    key = local_api.create_key("modes")
    sixteen = encoded(Image.new("I;16", (64, 64), 30000), "PNG")
    cmyk = encoded(Image.new("CMYK", (64, 64), (0, 128, 255, 0)), "JPEG")
    files = [("images", ("deep.png", sixteen, "image/png")), ("images", ("print.jpg", cmyk, "image/jpeg"))]
    with local_api.client(key) as client:
        r = client.post("/v1/jobs", files=files, data={"spec": json.dumps(quick_spec())})
        assert r.status_code == 202, r.text
        assert [i["name"] for i in r.json()["images"]] == ["deep.png", "print.jpg"]
        client.post(f"/v1/jobs/{r.json()['id']}/cancel")


def test_odd_uploads_keep_every_image_under_a_safe_name(local_api: LocalApi) -> None:
    key = local_api.create_key("names")
    good = png_bytes()
    files = [
        ("images", ("../../etc/passwd.png", good, "image/png")),
        ("images", ("image-01", good, "image/png")),
        ("images", ("image-01", good, "image/png")),
        ("images", ("captions.json", good, "image/png")),
        ("images", ("caf\xe9 photo.png", good, "image/png")),
    ]
    with local_api.client(key) as client:
        job = client.post("/v1/jobs", files=files, data={"spec": json.dumps(quick_spec())}).json()
        names = [i["name"] for i in job["images"]]
        assert len({n.lower() for n in names}) == 5 and "captions.json" not in names
        assert all("/" not in n and ".." not in n for n in names)
        mine = [k for k in local_api.stored() if k.startswith(f"jobs/{job['id']}/")]
        assert len(mine) == 5 and all(k.startswith(f"jobs/{job['id']}/inputs/") for k in mine)
        client.post(f"/v1/jobs/{job['id']}/cancel")


def test_malformed_requests_are_client_errors(local_api: LocalApi) -> None:
    key = local_api.create_key("malformed")
    with local_api.client(key) as client:
        body = b'--XyZ\r\nContent-Disposition: form-data; name="spec"\r\n\r\n{}\r\n--XyZ\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\nabc'
        cut = client.post("/v1/jobs", content=body, headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
        assert cut.status_code == 422 and cut.json()["error"]["code"] == "invalid_multipart"
        assert client.get("/v1/jobs", params={"cursor": "e30"}).json()["error"]["code"] == "invalid_cursor"
        job_id = "00000000-0000-0000-0000-000000000000"
        assert client.get(f"/v1/jobs/{job_id}/events", params={"after": 2**70}).status_code == 422
        spec = json.dumps(quick_spec(sample_seeds=[2**70]))
        assert client.post("/v1/jobs", files=example_files(1), data={"spec": spec}).status_code == 422


def test_an_oversized_spec_and_a_name_that_is_not_utf8(local_api: LocalApi) -> None:
    """The body that never ends is refused while streaming on the real server (tests/service/test_jobs_api.py)."""
    key = local_api.create_key("oversized")
    with local_api.client(key) as client:
        spec = json.dumps({"validation_prompts": ["x" * 70_000]})
        r = client.post("/v1/jobs", files=[("images", ("a.png", png_bytes(), "image/png"))], data={"spec": spec})
        assert r.status_code == 413 and r.json()["error"]["code"] == "field_too_large"
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


def test_the_api_refuses_a_loopback_webhook_unless_the_operator_allows_it(local_api: LocalApi) -> None:
    assert local_api.settings.webhook_allow_private is False  # the default, as in `make run`
    with local_api.client(local_api.create_key("webhook")) as client:
        answer = client.post(
            "/v1/jobs",
            files=[
                *example_files(1),
                ("spec", (None, json.dumps(quick_spec(webhook_url="http://127.0.0.1:9/hook")))),
            ],
        )
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["code"] == "webhook_url_refused" and "loopback" in error["message"]


def test_dry_run_validates_and_estimates_without_creating(local_api: LocalApi) -> None:
    with local_api.client(local_api.create_key("dry-run")) as client:
        client.post("/v1/jobs", files=example_files(1), data={"spec": json.dumps(quick_spec())})  # one real job
        before = client.get("/v1/jobs", params={"limit": 100}).json()["data"]
        objects, messages = local_api.stored(), local_api.messages()
        assert objects and messages  # the real job's images and its message: these listings see what is made
        answer = client.post(
            "/v1/jobs", params={"dry_run": "true"},
            files=[*example_files(2), ("spec", (None, json.dumps(quick_spec(steps=40, sample_every=10))))],
        )  # fmt: skip
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["dry_run"] is True and body["config"]["max_train_steps"] == 40
        assert body["estimated_gpu_seconds"] > 0 and body["queue_position"] >= 1
        assert [i["name"] for i in body["images"]] == ["robot-1.png", "robot-2.png"]
        longer = client.post(
            "/v1/jobs", params={"dry_run": "true"},
            files=[*example_files(2), ("spec", (None, json.dumps(quick_spec(steps=400, sample_every=10))))],
        ).json()  # fmt: skip
        assert longer["estimated_gpu_seconds"] > body["estimated_gpu_seconds"]
        assert client.get("/v1/jobs", params={"limit": 100}).json()["data"] == before
        assert local_api.stored() == objects and local_api.messages() == messages
        broken = client.post(
            "/v1/jobs", params={"dry_run": "true"},
            files=[("images", ("bad.png", b"not an image", "image/png")), ("spec", (None, json.dumps(quick_spec())))],
        )  # fmt: skip
        assert broken.status_code == 422 and broken.json()["error"]["details"]["file"] == "bad.png"
        for job in before:
            client.post(f"/v1/jobs/{job['id']}/cancel")


def test_a_shapes_job_takes_its_presets_trigger_and_no_default_caption(local_api: LocalApi) -> None:
    """`{"preset": "shapes"}` alone is a valid job (what `make run` prints): the spec's generic trigger "sks" and
    default caption "a photo of [V]" are outside the world's vocabulary, so the preset's `[V]` and no default caption
    apply; a trigger the client does give is still checked against the vocabulary."""
    crosses = [
        ("images", (f"cross-{i}.png", Path(f"examples/shapes/cross-{i}.png").read_bytes(), "image/png"))
        for i in (1, 2)
    ]
    with local_api.client(local_api.create_key("shapes-dry-run")) as client:
        answer = client.post(
            "/v1/jobs",
            params={"dry_run": "true"},
            files=[*crosses, ("spec", (None, json.dumps({"preset": "shapes"})))],
        )
        assert answer.status_code == 200, answer.text
        config = answer.json()["config"]
        assert config["trigger"] == "[V]" and config["default_caption"] is None
        assert config["validation_prompts"][0] == "a red [V] on a blue background"
        refused = client.post(
            "/v1/jobs", params={"dry_run": "true"},
            files=[*crosses, ("spec", (None, json.dumps({"preset": "shapes", "trigger": "sks"})))],
        )  # fmt: skip
        error = assert_error_shape(refused.json())
        assert refused.status_code == 422 and error["code"] == "invalid_spec" and "sks" in error["message"]


def test_the_shapes_preset_offers_its_bundled_example_images(local_api: LocalApi) -> None:
    """`GET /v1/presets` names the `shapes` model's example crosses, served by the API as the PNGs in `examples/`;
    the photo presets offer none (they take the user's own images)."""
    with local_api.client(local_api.create_key("presets")) as client:
        presets = {p["name"]: p for p in client.get("/v1/presets").json()}
        urls = presets["shapes"]["example_images"]
        assert [u.rsplit("/", 1)[-1] for u in urls] == sorted(p.name for p in Path("examples/shapes").glob("*.png"))
        for url in urls:
            answer = client.get(url)
            assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
            assert answer.content == Path("examples/shapes", url.rsplit("/", 1)[-1]).read_bytes()
        assert presets["tiny-z-image"]["example_images"] == []
