"""What one key's uploads cost the others, through HTTP on real processes: a second API replica of the stack (same
PostgreSQL and S3, its own upload limits) decodes a heavy upload in its validation processes, so its own memory
stays flat and `/healthz` stays fast; a key's uploads beyond `max_uploads_per_key` are refused before their body
is read while another key's go through; and what a job's worker stores is what `GET /v1/usage` reports, until the
job is deleted."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
from PIL import Image, ImageDraw

from scripts import stack
from tests.conftest import Stack, example_files, quick_spec
from tests.pace import PACE, eventually, wait_for_status


HEAVY_SIDE = 6000  # 36 megapixels per PNG: about 430 MB of the API's memory when it decoded them itself


@pytest.fixture(scope="module")
def replica(prod_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, psutil.Process]]:
    """A second API process on the stack's database and S3, with one upload at a time per key (one more waits
    half a second for it)."""
    port = stack.free_port()
    env = {**prod_stack.env, "DOPSD_MAX_UPLOADS_PER_KEY": "1", "DOPSD_UPLOAD_SLOT_WAIT_S": "0.5",
           "DOPSD_PUBLIC_URL": f"http://127.0.0.1:{port}"}  # fmt: skip
    api = PACE.timed_start(lambda: stack.start_api(env, port, tmp_path_factory.mktemp("replica") / "api.log"))
    yield f"http://127.0.0.1:{port}", psutil.Process(api.pid)
    stack.stop(api)


def heavy_png() -> bytes:
    """A 6000x6000 RGB PNG of a few hundred KB (flat colour and lines): cheap to send, costly to decode."""
    image = Image.new("RGB", (HEAVY_SIDE, HEAVY_SIDE), (200, 120, 40))
    draw = ImageDraw.Draw(image)
    for x in range(0, HEAVY_SIDE, 400):
        draw.line([(x, 0), (HEAVY_SIDE - x, HEAVY_SIDE)], fill=(10, 20, 30), width=3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def test_a_heavy_upload_is_decoded_outside_the_api_process(
    prod_stack: Stack, replica: tuple[str, psutil.Process]
) -> None:
    url, api = replica
    key = prod_stack.create_key("heavy")
    png = heavy_png()
    files = [("images", (f"big-{i}.png", png, "image/png")) for i in range(3)]
    baseline = api.memory_info().rss
    peak, latencies, done = [baseline], [], threading.Event()

    def watch() -> None:
        with httpx.Client(base_url=url, timeout=60) as probe:
            while not done.is_set():
                peak[0] = max(peak[0], api.memory_info().rss)
                start = time.perf_counter()
                assert probe.get("/healthz").status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as client:
        answer = client.post("/v1/jobs", params={"dry_run": "true"}, files=files,
                             data={"spec": json.dumps(quick_spec())})  # fmt: skip
    done.set()
    watcher.join()
    assert answer.status_code == 200, answer.text  # decoded and accepted: 3 x 36 MP is within the default limits
    growth_mb = (peak[0] - baseline) / 1e6
    assert growth_mb < 150, f"the API process grew by {growth_mb:.0f} MB while the images were checked"
    assert len(latencies) >= 3
    assert max(latencies) < 2.0, f"/healthz took up to {max(latencies):.2f} s while the images were checked"


def stalled_upload(url: str, key: str) -> socket.socket:
    """Opens a submission whose body stops after its first bytes (the rest never comes): the API holds the key's
    upload slot while it waits for more."""
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)))
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: multipart/form-data; boundary=XyZ\r\nContent-Length: 100000\r\n\r\n"
    )
    conn.sendall(head.encode() + b'--XyZ\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n')
    return conn


def dry_run(url: str, key: str) -> httpx.Response:
    """A dry run of one small example image."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        return client.post(
            "/v1/jobs", params={"dry_run": "true"}, files=example_files(1), data={"spec": json.dumps(quick_spec())}
        )


def test_a_keys_uploads_beyond_its_limit_are_refused_and_others_go_through(
    prod_stack: Stack, replica: tuple[str, psutil.Process]
) -> None:
    url, _ = replica
    hog, other = prod_stack.create_keys(["hog", "other"])
    held = stalled_upload(url, hog)
    try:
        refused = eventually(
            lambda: dry_run(url, hog),
            lambda r: r.status_code == 429,
            "the hog's second upload refused while its first one stalls",
        )
        assert refused.json()["error"]["code"] == "too_many_uploads"
        assert refused.headers["retry-after"] == "1"
        answer = dry_run(url, other)
        assert answer.status_code == 200, answer.text
    finally:
        held.close()
    eventually(  # the hung-up upload gave its slot back
        lambda: dry_run(url, hog).status_code,
        lambda status: status == 200,
        "the hog's upload accepted once its stalled one is gone",
    )


def test_usage_counts_what_the_worker_stored_until_the_job_is_deleted(prod_stack: Stack) -> None:
    key = prod_stack.create_key("usage")
    with prod_stack.client(key) as client:
        job = client.post("/v1/jobs", files=example_files(2), data={"spec": json.dumps(quick_spec())}).json()
        inputs = sum(i["size"] for i in job["images"])
        assert client.get("/v1/usage").json()["stored_bytes"] == inputs
        done = wait_for_status(client, job["id"], {"succeeded", "failed", "canceled"})
        assert done["status"] == "succeeded", done
        in_s3 = sum(prod_stack.s3_objects(f"jobs/{job['id']}/").values())  # as the S3 server lists them
        assert in_s3 > inputs  # the adapter, samples, reports went up too
        usage = eventually(lambda: client.get("/v1/usage").json(), lambda u: u["stored_bytes"] == in_s3,
                           "usage counting what the worker stored")  # fmt: skip
        assert usage["jobs"] == {"succeeded": 1} and usage["gpu_seconds"] == pytest.approx(
            done["gpu_seconds"], abs=1e-3
        )
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
        after = client.get("/v1/usage").json()
        assert after["stored_bytes"] == 0 and after["jobs"] == {}
        assert after["gpu_seconds"] == usage["gpu_seconds"]  # used is used
