"""A dataset sent as one archive, or named by `spec.images_url`, trains on the real stack: the job succeeds on the
archive's images with the captions of its sidecar files, which its resolved config and its `config.json` show."""

from __future__ import annotations

import io
import json
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.conftest import EXAMPLES, Stack, quick_spec
from tests.pace import wait_for_status


def dataset() -> bytes:
    """A tar.gz of two example images, each with a sidecar caption."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for image in sorted(EXAMPLES.glob("*.png"))[:2]:
            tar.add(image, arcname=f"dataset/{image.name}")
            caption = f"a photo of [V], {image.stem}".encode()
            info = tarfile.TarInfo(f"dataset/{image.stem}.txt")
            info.size = len(caption)
            tar.addfile(info, io.BytesIO(caption))
    return archive.getvalue()


def test_a_tar_gz_dataset_with_sidecar_captions_trains(prod_stack: Stack) -> None:
    with prod_stack.client(prod_stack.create_key("archive")) as client:
        response = client.post(
            "/v1/jobs",
            files=[("images", ("dataset.tar.gz", dataset(), "application/gzip"))],
            data={"spec": json.dumps(quick_spec(steps=2))},
        )
        assert response.status_code == 202, response.text
        trains_with_its_captions(client, response.json()["id"])


@pytest.fixture
def archive_server() -> Iterator[tuple[str, list[str]]]:
    """A plain-http server on loopback (the stack allows private addresses, and http there) serving the dataset
    at /dataset.tar.gz; its URL and the paths it was asked for."""
    body, asked = dataset(), []

    class Handle(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200 if self.path == "/dataset.tar.gz" else 404)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/dataset.tar.gz", asked
    server.shutdown()
    server.server_close()


def test_a_dataset_named_by_images_url_trains(prod_stack: Stack, archive_server: tuple[str, list[str]]) -> None:
    url, asked = archive_server
    with prod_stack.client(prod_stack.create_key("images-url")) as client:
        response = client.post("/v1/jobs", files={"spec": (None, json.dumps(quick_spec(steps=2, images_url=url)))})
        assert response.status_code == 202, response.text
        assert asked == ["/dataset.tar.gz"]
        trains_with_its_captions(client, response.json()["id"])


def trains_with_its_captions(client: httpx.Client, job_id: str) -> None:
    """The job succeeds, and its resolved config and `config.json` carry the sidecar captions."""
    job = wait_for_status(client, job_id, {"succeeded", "failed"})
    assert job["status"] == "succeeded", job["error"]
    assert job["config"]["captions"] == {
        "robot-1.png": ["a photo of [V], robot-1"], "robot-2.png": ["a photo of [V], robot-2"]
    }  # fmt: skip
    artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
    config_url = next(a["url"] for a in artifacts if a["name"] == "config.json")
    used = httpx.get(config_url).json()
    assert set(used["captions"]) == {"robot-1.png", "robot-2.png"}
