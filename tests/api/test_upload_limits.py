"""What an upload may cost, in process, with small limits: pixels per image and per request (refused from the
headers, before decoding), the per-key pixel budget that jobs, dry runs and previews all spend, the storage quota
(submissions and dry runs refused past it, freed by a delete) and `GET /v1/usage`; and a JPEG cut short is refused
although validation decodes JPEGs at 1/8 scale."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.commands import migrate
from api.main import create_app
from tests.api.local_api import LocalApi, tier_settings
from tests.api.payloads import png_bytes
from tests.conftest import EXAMPLES, example_files, quick_spec


EXAMPLE_PIXELS = 128 * 160  # each bundled example image
EXAMPLE_BYTES = sum(p.stat().st_size for p in sorted(EXAMPLES.glob("*.png"))[:3])  # the first three


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, broker_dir: Path) -> Iterator[LocalApi]:
    """The app with limits a few example images reach: 100,000 pixels per image, 3 examples' pixels per request,
    6 examples' pixels per key and minute, a quota of the first three examples' bytes plus a few."""
    settings = tier_settings(tmp_path_factory.mktemp("limited-api"), broker_dir).model_copy(
        update={
            "max_image_pixels": 100_000,
            "max_request_pixels": 3 * EXAMPLE_PIXELS,
            "upload_pixels_per_minute": 6 * EXAMPLE_PIXELS,
            "max_stored_bytes_per_key": EXAMPLE_BYTES + 10,
        }
    )
    migrate(settings.database_url)
    with TestClient(create_app(settings), base_url=settings.public_url) as started:
        yield LocalApi(settings, started)


def spec_part(**overrides: object) -> tuple[str, tuple[None, str]]:
    return ("spec", (None, json.dumps(quick_spec(**overrides))))


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(limited: LocalApi) -> None:
    big = png_bytes((400, 400))  # 160,000 pixels; a few hundred bytes
    with limited.client(limited.create_key("big-image")) as client:
        for params in ({}, {"dry_run": "true"}):
            answer = client.post("/v1/jobs", params=params, files=[("images", ("big.png", big, "image/png")),
                                                                   spec_part()])  # fmt: skip
            assert answer.status_code == 413, answer.text
            error = answer.json()["error"]
            assert error["code"] == "image_too_large"
            assert error["details"] == {"file": "big.png", "pixels": 160_000, "limit": 100_000}
    assert limited.stored() == []


def test_a_request_over_the_pixel_limit_is_refused(limited: LocalApi) -> None:
    with limited.client(limited.create_key("many-pixels")) as client:
        answer = client.post("/v1/jobs", params={"dry_run": "true"}, files=[*example_files(4), spec_part()])
        assert answer.status_code == 413, answer.text
        assert answer.json()["error"]["code"] == "too_many_pixels"
        assert answer.json()["error"]["details"] == {"pixels": 4 * EXAMPLE_PIXELS, "limit": 3 * EXAMPLE_PIXELS}
        fits = client.post("/v1/jobs", params={"dry_run": "true"}, files=[*example_files(3), spec_part()])
        assert fits.status_code == 200, fits.text


def test_dry_runs_and_previews_spend_the_keys_pixel_budget(limited: LocalApi) -> None:
    """6 example images a minute: dry runs of 3 and 2 and a preview of 1 spend it; the next dry run waits (429
    with Retry-After), and another key is not affected."""
    with limited.client(limited.create_key("budget")) as client:
        for count in (3, 2):
            dry = client.post("/v1/jobs", params={"dry_run": "true"}, files=[*example_files(count), spec_part()])
            assert dry.status_code == 200, dry.text
        preview = client.post("/v1/previews", files=[*example_files(1), spec_part()])
        assert preview.status_code == 202, preview.text
        refused = client.post("/v1/jobs", params={"dry_run": "true"}, files=[*example_files(1), spec_part()])
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "upload_budget_exceeded"
        assert int(refused.headers["retry-after"]) >= 1
        client.post(f"/v1/jobs/{preview.json()['id']}/cancel")
    with limited.client(limited.create_key("other-tenant")) as other:
        assert (
            other.post("/v1/jobs", params={"dry_run": "true"}, files=[*example_files(2), spec_part()]).status_code
            == 200
        )


def test_the_storage_quota_refuses_submissions_and_a_delete_frees_it(limited: LocalApi) -> None:
    with limited.client(limited.create_key("quota")) as client:
        empty = client.get("/v1/usage").json()
        assert empty["stored_bytes"] == 0 and empty["quota_bytes"] == EXAMPLE_BYTES + 10 and empty["jobs"] == {}
        job = client.post("/v1/jobs", files=[*example_files(3), spec_part()])
        assert job.status_code == 202, job.text
        used = client.get("/v1/usage").json()
        assert used["stored_bytes"] == EXAMPLE_BYTES == sum(i["size"] for i in job.json()["images"])
        assert used["jobs"] == {"queued": 1} and used["available_bytes"] == 10
        for params in ({}, {"dry_run": "true"}):
            refused = client.post("/v1/jobs", params=params, files=[*example_files(1), spec_part()])
            assert refused.status_code == 403, refused.text
            error = refused.json()["error"]
            assert error["code"] == "storage_quota_exceeded"
            assert (
                error["details"]["stored_bytes"] == EXAMPLE_BYTES
                and error["details"]["quota_bytes"] == EXAMPLE_BYTES + 10
            )
        assert len(client.get("/v1/jobs").json()["data"]) == 1
        assert client.delete(f"/v1/jobs/{job.json()['id']}").status_code == 204
        freed = client.get("/v1/usage").json()
        assert freed["stored_bytes"] == 0 and freed["jobs"] == {}
        again = client.post("/v1/jobs", files=[*example_files(1), spec_part()])
        assert again.status_code == 202, again.text
        client.post(f"/v1/jobs/{again.json()['id']}/cancel")
        assert client.get("/v1/usage").json()["jobs"] == {"canceled": 1}


def test_a_truncated_jpeg_is_refused_though_decoded_at_reduced_scale(local_api: LocalApi) -> None:
    buffer = io.BytesIO()
    Image.effect_noise((1024, 768), 60).convert("RGB").save(buffer, format="JPEG", quality=90)
    whole = buffer.getvalue()
    with local_api.client(local_api.create_key("jpeg")) as client:
        ok = client.post("/v1/jobs", params={"dry_run": "true"},
                         files=[("images", ("whole.jpg", whole, "image/jpeg")), spec_part()])  # fmt: skip
        assert ok.status_code == 200, ok.text
        cut = client.post("/v1/jobs", params={"dry_run": "true"},
                          files=[("images", ("cut.jpg", whole[: len(whole) * 2 // 3], "image/jpeg")), spec_part()])  # fmt: skip
        assert cut.status_code == 422, cut.text
        assert (
            cut.json()["error"]["code"] == "unreadable_image" and cut.json()["error"]["details"]["file"] == "cut.jpg"
        )


def test_usage_is_in_the_openapi_document_with_what_stored_counts(local_api: LocalApi) -> None:
    with local_api.client(None) as client:
        document = client.get("/openapi.json").json()
    operation = document["paths"]["/v1/usage"]["get"]
    assert (
        'What "stored" counts' in operation["description"] and "deleted job stops counting" in operation["description"]
    )
