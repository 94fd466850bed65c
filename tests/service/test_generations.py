"""Generations through HTTP on the production-shaped stack: images made with trained adapters, checked against
diffusers' own pipeline with the downloaded adapter, no adapter leaking into the next request, another key's
adapter a 404, the same seed the same image, and generations that neither wait behind a training job nor run
alone when others can share their pipeline calls.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline
from PIL import Image

from scripts import stack
from tests.conftest import Stack, example_files, quick_spec
from tests.pace import PACE, eventually, wait_for_status


FINISHED = {"succeeded", "failed", "canceled"}
PROMPT = "a photo of [V] on a table"


@pytest.fixture(scope="module")
def owner(prod_stack: Stack) -> str:
    return prod_stack.create_key("generations")


@pytest.fixture(scope="module")
def adapters(prod_stack: Stack, owner: str) -> list[dict[str, Any]]:
    """Two succeeded training jobs of the owner (two adapters of the tiny preset, different triggers)."""
    with prod_stack.client(owner) as client:
        submitted = [
            client.post(
                "/v1/jobs", files=example_files(2), data={"spec": json.dumps(quick_spec(trigger=trigger, seed=seed))}
            ).json()
            for trigger, seed in (("sks", 0), ("zwx", 1))
        ]
        jobs = [wait_for_status(client, job["id"], FINISHED) for job in submitted]
    assert [job["status"] for job in jobs] == ["succeeded", "succeeded"], jobs
    return jobs


def generate(client: httpx.Client, **body: Any) -> dict[str, Any]:
    """POSTs a generation and waits for it to end; returns its final resource."""
    response = client.post("/v1/generations", json={"preset": "tiny-z-image", **body})
    assert response.status_code == 202, response.text
    return wait_generation(client, response.json()["id"])


def wait_generation(client: httpx.Client, generation_id: str) -> dict[str, Any]:
    """Polls a generation until it has ended."""
    return eventually(
        lambda: client.get(f"/v1/generations/{generation_id}").json(),
        lambda g: g["status"] in FINISHED,
        f"generation {generation_id} to end",
    )


def pixels(url: str) -> np.ndarray:
    """The image behind a download URL, as 0-255 values."""
    return np.asarray(Image.open(io.BytesIO(httpx.get(url).content)).convert("RGB"), dtype=np.float64)


def test_a_generation_with_an_adapter_matches_diffusers_with_the_downloaded_adapter_and_leaks_nothing(
    prod_stack: Stack, owner: str, adapters: list[dict[str, Any]], exported_tiny: Path, tmp_path: Path
) -> None:
    adapter = adapters[0]
    with prod_stack.client(owner) as client:
        base = generate(client, prompt="a photo of sks on a table", seeds=[7])
        tuned = generate(client, prompt=PROMPT, seeds=[7], adapters=[{"job_id": adapter["id"], "scale": 1.0}])
        after = generate(client, prompt="a photo of sks on a table", seeds=[7])
        adapter_file = tmp_path / "pytorch_lora_weights.safetensors"
        adapter_file.write_bytes(
            httpx.get(str(client.get(f"/v1/jobs/{adapter['id']}/adapter").headers["location"])).content
        )
    assert [g["status"] for g in (base, tuned, after)] == ["succeeded"] * 3, (base, tuned, after)
    assert tuned["prompts"] == ["a photo of sks on a table"]  # `[V]` became the adapter job's trigger
    assert (tuned["width"], tuned["height"], tuned["steps"]) == (base["width"], base["height"], base["steps"])
    base_px, tuned_px, after_px = (pixels(g["images"][0]["url"]) for g in (base, tuned, after))

    # No leak: the request after one with an adapter is the base model's image, exactly.
    assert np.array_equal(after_px, base_px)
    assert np.abs(tuned_px - base_px).max() > 2, "the adapter must change the image"

    # Fidelity: diffusers' pipeline on the exported base model, with `load_lora_weights` of the downloaded file.
    pipe = ZImagePipeline.from_pretrained(exported_tiny)
    pipe.set_progress_bar_config(disable=True)

    def reference() -> np.ndarray:
        image = pipe(
            prompt="a photo of sks on a table", width=tuned["width"], height=tuned["height"],
            num_inference_steps=tuned["steps"], guidance_scale=tuned["guidance_scale"],
            max_sequence_length=tuned["max_sequence_length"], generator=torch.Generator().manual_seed(7),
        ).images[0]  # fmt: skip
        return np.asarray(image.convert("RGB"), dtype=np.float64)

    assert np.abs(reference() - base_px).max() <= 1
    pipe.load_lora_weights(str(adapter_file))
    assert np.abs(reference() - tuned_px).max() <= 1


def test_two_adapters_combine_and_the_same_request_gives_the_same_images(
    prod_stack: Stack, owner: str, adapters: list[dict[str, Any]]
) -> None:
    first, second = ({"job_id": a["id"], "scale": 1.0} for a in adapters)
    with prod_stack.client(owner) as client:
        one = generate(client, prompt="a photo of zwx", seeds=[3, 4], adapters=[first])
        both = generate(client, prompt="a photo of zwx", seeds=[3, 4], adapters=[first, second])
        again = generate(client, prompt="a photo of zwx", seeds=[3, 4], adapters=[first, second])
    assert [g["status"] for g in (one, both, again)] == ["succeeded"] * 3
    assert [i["seed"] for i in both["images"]] == [3, 4]
    one_px, both_px, again_px = ([pixels(i["url"]) for i in g["images"]] for g in (one, both, again))
    assert all(np.array_equal(a, b) for a, b in zip(both_px, again_px, strict=True))
    assert np.abs(both_px[0] - one_px[0]).max() > 1, "the second adapter must change the image"
    assert np.abs(both_px[0] - both_px[1]).max() > 1, "two seeds, two images"


def test_what_a_generation_may_not_use_is_refused(
    prod_stack: Stack, owner: str, adapters: list[dict[str, Any]]
) -> None:
    stranger = prod_stack.create_key("stranger")
    adapter = {"job_id": adapters[0]["id"], "scale": 1.0}
    with prod_stack.client(stranger) as client:
        response = client.post(
            "/v1/generations", json={"preset": "tiny-z-image", "prompt": "x", "adapters": [adapter]}
        )
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "job_not_found"
    with prod_stack.client(owner) as client:  # nor may it read the owner's generations
        made = generate(client, prompt="a blue cube", seeds=[5])
        mine = client.get("/v1/generations").json()["data"]
    assert made["id"] in [g["id"] for g in mine], "the owner's generations are listed"
    with prod_stack.client(stranger) as client:
        assert client.get(f"/v1/generations/{mine[0]['id']}").status_code == 404
        assert client.get("/v1/generations").json()["data"] == []
    with prod_stack.client(owner) as client:
        cases = [
            ({"prompt": "x", "width": 24, "height": 24}, 422, "unsupported_size"),
            ({"prompt": "a photo of [V]"}, 422, "no_trigger"),
            ({"prompt": "x", "seeds": list(range(40))}, 422, "too_many_images"),
            ({"prompt": "x", "preset": "no-such-preset"}, 422, "unknown_preset"),
            ({"prompt": "x", "adapters": [{"job_id": mine[0]["id"], "scale": 1.0}]}, 422, "not_an_adapter"),
            ({"prompt": "x", "colour": "red"}, 422, "invalid_request"),
            ({"prompt": "a photo of a cube", "preset": "shapes"}, 422, "prompt_outside_vocabulary"),
        ]
        for body, status, code in cases:
            response = client.post("/v1/generations", json={"preset": "tiny-z-image", **body})
            assert (response.status_code, response.json()["error"]["code"]) == (status, code), (body, response.text)


def test_idempotency_events_and_delete(prod_stack: Stack, owner: str) -> None:
    body = {"preset": "tiny-z-image", "prompt": "a red cube", "seeds": [1]}
    with prod_stack.client(owner) as client:
        first = client.post("/v1/generations", json=body, headers={"Idempotency-Key": "gen-1"})
        replay = client.post("/v1/generations", json=body, headers={"Idempotency-Key": "gen-1"})
        other = client.post("/v1/generations", json={**body, "seeds": [2]}, headers={"Idempotency-Key": "gen-1"})
        assert (first.status_code, replay.status_code, other.status_code) == (202, 200, 409)
        assert replay.json()["id"] == first.json()["id"]
        done = wait_generation(client, first.json()["id"])
        assert done["status"] == "succeeded"
        events = client.get(f"/v1/generations/{done['id']}/events").json()["data"]
        types = [e["type"] for e in events]
        assert types[:2] == ["queued", "started"] and types[-1] == "succeeded", types
        sample = next(e for e in events if e["type"] == "sample")
        assert [i["kind"] for i in sample["data"]["images"]] == ["generation"]
        usage = client.get("/v1/usage").json()
        assert usage["generations"].get("succeeded", 0) >= 1 and usage["limits"]["max_images_per_generation"] == 16
        assert client.delete(f"/v1/generations/{done['id']}").status_code == 204
        assert client.get(f"/v1/generations/{done['id']}").status_code == 404
    assert prod_stack.s3_keys(f"jobs/{done['id']}/") == []


def test_a_generations_webhooks_are_signed_and_carry_its_images(prod_stack: Stack) -> None:
    from standardwebhooks.webhooks import Webhook

    from tests.service.test_user_features import Receiver

    key, secret = prod_stack.create_key_with_secret("generation-hooks")
    receiver = Receiver()
    try:
        with prod_stack.client(key) as client:
            done = generate(client, prompt="a green cube", seeds=[9], webhook_url=receiver.url)
            assert done["status"] == "succeeded"
            eventually(
                lambda: client.get(f"/v1/generations/{done['id']}/webhook-deliveries").json()["data"],
                lambda found: len(found) == 3 and all(d["status"] == "delivered" for d in found),
                "the generation's webhooks delivered",
            )
        bodies = [Webhook(secret).verify(body, headers) for headers, body in receiver.requests]
    finally:
        receiver.close()
    assert [b["type"] for b in bodies] == ["generation.started", "generation.sample", "generation.succeeded"]
    assert all(b["data"]["job_id"] == done["id"] and b["data"]["job_kind"] == "generation" for b in bodies)
    image = bodies[1]["data"]["images"][0]
    assert (image["kind"], image["seed"]) == ("generation", 9)
    assert pixels(image["url"]).shape == (64, 64, 3)  # the URL in the webhook works


@pytest.fixture
def generation_worker(prod_stack: Stack) -> Iterator[Callable[[], None]]:
    """A second worker that takes generations only, started by the test (as a deployment runs its pools)."""
    from api.commands import generation_queues

    holder: list[Any] = []

    def start() -> None:
        log = prod_stack.logs / f"worker-generate-{time.monotonic_ns()}.log"
        holder.append(stack.start_worker(prod_stack.env, log, name="generate", queues=generation_queues()))

    yield start
    for process in holder:
        stack.stop(process, timeout_s=5)


def test_generations_do_not_wait_behind_training_and_share_pipeline_calls(
    prod_stack: Stack, owner: str, generation_worker: Callable[[], None]
) -> None:
    """While the stack's only worker trains a long job, three compatible generations wait; a generation worker
    then takes them in one batch and they finish while the training still runs."""
    with prod_stack.client(owner) as client:
        training = client.post(
            "/v1/jobs", files=example_files(1), data={"spec": json.dumps(quick_spec(steps=5000))}
        ).json()
        try:
            wait_for_status(client, training["id"], {"running"})
            queued = [
                client.post("/v1/generations", json={"preset": "tiny-z-image", "prompt": f"a cube {i}", "seeds": [i]})
                for i in range(3)
            ]
            ids = [r.json()["id"] for r in queued]
            assert all(client.get(f"/v1/generations/{i}").json()["status"] == "queued" for i in ids)
            PACE.timed_start(generation_worker)
            done = [wait_generation(client, i) for i in ids]
            assert [g["status"] for g in done] == ["succeeded"] * 3
            assert client.get(f"/v1/jobs/{training['id']}").json()["status"] == "running"
            succeeded = [
                next(e for e in client.get(f"/v1/generations/{i}/events").json()["data"] if e["type"] == "succeeded")
                for i in ids
            ]
            assert [e["data"]["batch_images"] for e in succeeded] == [3, 3, 3], succeeded
        finally:
            client.post(f"/v1/jobs/{training['id']}/cancel")
            wait_for_status(client, training["id"], FINISHED)
