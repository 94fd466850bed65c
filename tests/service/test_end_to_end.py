"""A client's whole journey through HTTP: submit images, watch the job, download the adapter, load it in diffusers,
make an image with it through the service and find it equal to diffusers' own.

Runs against the production-shaped stack (PostgreSQL, Redis, SeaweedFS, a real Celery worker process) and against
the embedded mode of `make run` (SQLite, the filesystem broker, local artifacts, a real worker process).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline
from PIL import Image

from tests.conftest import Stack, example_files, quick_spec
from tests.pace import wait_for_status


@pytest.fixture(params=["production", "embedded"])
def any_stack(request: pytest.FixtureRequest) -> tuple[Stack, str]:
    """Each stack with a key valid on it."""
    if request.param == "production":
        s: Stack = request.getfixturevalue("prod_stack")
        return s, s.create_key("e2e")
    s = request.getfixturevalue("embedded_stack")
    return s, "dev-test-key"


def render(pipe: ZImagePipeline) -> np.ndarray:
    image = pipe(
        "a photo of sks", height=64, width=64, num_inference_steps=8, guidance_scale=0.0,
        generator=torch.Generator().manual_seed(0),
    ).images[0]  # fmt: skip
    return np.asarray(image, dtype=np.int16)


def test_submit_train_download_and_load_in_diffusers(
    any_stack: tuple[Stack, str], exported_tiny: Path, tmp_path: Path
) -> None:
    stack, key = any_stack
    with stack.client(key) as client:
        spec = quick_spec(steps=8, captions={"robot-1.png": ["a photo of [V] toy robot", "[V] on cream"]})
        response = client.post("/v1/jobs", files=example_files(2), data={"spec": json.dumps(spec)})
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["status"] == "queued" and job["queue_position"] >= 1
        assert [i["name"] for i in job["images"]] == ["robot-1.png", "robot-2.png"]
        assert job["config"]["max_train_steps"] == 8 and job["config"]["rank"] == 8

        done = wait_for_status(client, job["id"], {"succeeded", "failed", "canceled"})
        assert done["status"] == "succeeded", done["error"]
        assert done["progress"]["step"] == 8 and done["finished_at"] and done["started_at"]

        events = client.get(f"/v1/jobs/{job['id']}/events").json()["data"]
        types = [e["type"] for e in events]
        assert types[0] == "queued" and types[-1] == "succeeded"
        assert {"started", "model_loaded", "progress", "sample"} <= set(types)
        assert [e["id"] for e in events] == sorted(e["id"] for e in events)

        artifacts = {a["name"]: a for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]}
        assert {"pytorch_lora_weights.safetensors", "config.json", "metrics.json"} <= set(artifacts)
        assert any(n.endswith("contact_sheet.png") for n in artifacts)

        redirect = client.get(f"/v1/jobs/{job['id']}/adapter", follow_redirects=False)
        assert redirect.status_code == 302
        url = redirect.headers["location"]

        # Then images with it, through the service's generation workers.
        body = {
            "preset": "tiny-z-image",
            "prompt": "a photo of [V]",
            "seeds": [0],
            "adapters": [{"job_id": job["id"]}],
        }
        response = client.post("/v1/generations", json=body)
        assert response.status_code == 202, response.text
        generation = wait_for_status(client, response.json()["id"], {"succeeded", "failed", "canceled"})
        assert generation["status"] == "succeeded", generation["error"]
        generated = client.get(f"/v1/generations/{generation['id']}").json()
        assert generated["prompts"] == ["a photo of sks"] and generated["steps"] == 8
        image_url = generated["images"][0]["url"]

    # The short-lived URL needs no API key: it is the grant for this one object.
    download = httpx.get(url, timeout=30)
    assert download.status_code == 200
    adapter = tmp_path / "pytorch_lora_weights.safetensors"
    adapter.write_bytes(download.content)
    assert download.content == httpx.get(artifacts["pytorch_lora_weights.safetensors"]["url"]).content

    pipe = ZImagePipeline.from_pretrained(exported_tiny)
    pipe.set_progress_bar_config(disable=True)
    base = render(pipe)
    pipe.load_lora_weights(adapter)
    tuned = render(pipe)
    assert np.abs(tuned - base).max() > 5, "the downloaded adapter must change the output"
    served = np.asarray(Image.open(io.BytesIO(httpx.get(image_url, timeout=30).content)), dtype=np.int16)
    assert np.abs(served - tuned).max() <= 1, "the service's generation is what diffusers makes with the adapter"


def test_event_stream_replays_a_finished_job(any_stack: tuple[Stack, str]) -> None:
    stack, key = any_stack
    with stack.client(key) as client:
        job = client.post("/v1/jobs", files=example_files(1), data={"spec": json.dumps(quick_spec(steps=2))}).json()
        with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers={"Accept": "text/event-stream"}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            names = [line.removeprefix("event: ") for line in r.iter_lines() if line.startswith("event: ")]
    # The stream follows the job live and closes after its last event.
    assert names[0] == "queued" and names[-1] == "succeeded"


def test_a_klein_job_runs_on_its_own_queue(prod_stack: Stack) -> None:
    from sqlalchemy import create_engine, text

    key = prod_stack.create_key("klein")
    with prod_stack.client(key) as client:
        spec = quick_spec(preset="tiny-flux2-klein", steps=3)
        job = client.post("/v1/jobs", files=example_files(2), data={"spec": json.dumps(spec)}).json()
        assert job["config"]["teacher_context"] == "edit" and job["config"]["sample_steps"] == 4
        done = wait_for_status(client, job["id"], {"succeeded", "failed", "canceled"})
        assert done["status"] == "succeeded", done["error"]
        names = {a["name"] for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]}
        assert "pytorch_lora_weights.safetensors" in names
    engine = create_engine(prod_stack.database_url)
    with engine.connect() as conn:
        queue = conn.execute(text("SELECT queue FROM job WHERE id = :id"), {"id": job["id"]}).scalar_one()
    engine.dispose()
    assert queue == "train.flux2_klein"
