"""What users of a training service expect, through HTTP against the real stack: typed progress events, samples
during training (real PNGs), zero-shot previews, both LoRA formats, made captions, signed webhooks (verified
with the `standardwebhooks` reference implementation), Prometheus metrics and JSON worker logs. (Dry runs and the
refusal of loopback webhooks, which only the API decides, are checked in process in tests/api.)"""

from __future__ import annotations

import io
import itertools
import json
import threading
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from PIL import Image
from safetensors import safe_open
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from core.webhooks import WebhookTargetError, any_address, check_target, public_only
from tests.conftest import Stack, example_files, quick_spec
from tests.pace import eventually, wait_for_status


class Receiver:
    """A webhook receiver on loopback: records every request and answers with the next of `codes` (then 200)."""

    def __init__(self, codes: list[int] | None = None) -> None:
        self.codes = list(codes or [])
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.codes.pop(0) if receiver.codes else 200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/dopsd"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def keyed(prod_stack: Stack) -> tuple[httpx.Client, str]:
    key, secret = prod_stack.create_key_with_secret("features")
    return prod_stack.client(key), secret


def _submit(client: httpx.Client, files: list[Any] | None = None, path: str = "/v1/jobs", **spec: Any) -> Any:
    response = client.post(path, files=[*(files or example_files(2)), ("spec", (None, json.dumps(spec)))])
    assert response.status_code in (200, 202), response.text
    return response.json()


def _events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    return client.get(f"/v1/jobs/{job_id}/events", params={"limit": 500}).raise_for_status().json()["data"]


def _png(url: str) -> Image.Image:
    response = httpx.get(url, timeout=30).raise_for_status()
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG"
    return image


@pytest.fixture(scope="module")
def sampled_job(keyed: tuple[httpx.Client, str], receiver_module: Receiver) -> dict[str, Any]:
    """One tiny job with samples every 3 steps and a webhook, run to the end."""
    client, _ = keyed
    job = _submit(
        client,
        **quick_spec(
            steps=6,
            sample_every=3,
            validation_prompts=["a photo of [V]", "[V] on a beach"],
            webhook_url=receiver_module.url,
            webhook_events=["started", "sample", "succeeded"],
        ),
    )
    return wait_for_status(client, job["id"], {"succeeded", "failed"})


@pytest.fixture(scope="module")
def receiver_module() -> Iterator[Receiver]:
    r = Receiver(codes=[500])  # the first delivery fails once and is retried
    yield r
    r.close()


def test_events_are_typed_and_end_with_gpu_seconds(
    keyed: tuple[httpx.Client, str], sampled_job: dict[str, Any]
) -> None:
    client, _ = keyed
    assert sampled_job["status"] == "succeeded", sampled_job["error"]
    assert sampled_job["gpu_seconds"] > 0
    events = _events(client, sampled_job["id"])
    types = [e["type"] for e in events]
    assert types[0] == "queued" and events[0]["data"]["position"] >= 1
    assert types[-1] == "succeeded" and events[-1]["data"]["gpu_seconds"] == pytest.approx(
        sampled_job["gpu_seconds"], abs=1e-3
    )
    assert {"started", "model_loaded", "progress", "sample"} <= set(types)
    progress = [e for e in events if e["type"] == "progress"]
    assert progress[-1]["data"]["step"] == 6 == progress[-1]["data"]["total_steps"]
    for e in progress:
        assert set(e["data"]) >= {"step", "total_steps", "loss", "learning_rate", "eta_s", "elapsed_s"}
    # Throttled: progress writes are at least the stack's interval (0.2 s) apart, the last step excepted.
    stamps = [datetime.fromisoformat(e["created_at"]) for e in progress[:-1]]
    assert all((b - a).total_seconds() >= 0.15 for a, b in itertools.pairwise(stamps))


def test_samples_arrive_during_training_as_real_pngs(
    keyed: tuple[httpx.Client, str], sampled_job: dict[str, Any]
) -> None:
    client, _ = keyed
    samples = [e for e in _events(client, sampled_job["id"]) if e["type"] == "sample"]
    assert [(s["data"]["step"], s["data"]["final"]) for s in samples] == [(3, False), (6, True)]
    final = samples[-1]["data"]
    kinds = [(i["kind"], i["prompt"], i["seed"]) for i in final["images"]]
    for prompt in ("a photo of sks", "sks on a beach"):
        assert ("base", prompt, 0) in kinds and ("adapter", prompt, 0) in kinds
    assert any(kind == "teacher" for kind, _, _ in kinds)
    adapter = _png(next(i["url"] for i in final["images"] if i["kind"] == "adapter"))
    assert adapter.size == (64, 64)
    # The contact sheet grows by a row per sampled step: base, step 3, step 6, teacher.
    first, last = _png(samples[0]["data"]["contact_sheet"]), _png(final["contact_sheet"])
    assert last.height > first.height and last.width >= 2 * 64


def test_sse_stream_carries_typed_events(
    prod_stack: Stack, keyed: tuple[httpx.Client, str], sampled_job: dict[str, Any]
) -> None:
    client, _ = keyed
    with client.stream(
        "GET", f"/v1/jobs/{sampled_job['id']}/events", headers={"Accept": "text/event-stream"}
    ) as response:
        text = "".join(response.iter_text())
    blocks = [b for b in text.strip().split("\n\n") if not b.startswith(":")]  # keep-alive comments aside
    types = [line.removeprefix("event: ") for b in blocks for line in b.splitlines() if line.startswith("event: ")]
    assert types[0] == "queued" and types[-1] == "succeeded" and {"progress", "sample"} <= set(types)
    assert all(b.startswith("id: ") for b in blocks)


def test_webhooks_are_signed_retried_and_recorded(
    keyed: tuple[httpx.Client, str], sampled_job: dict[str, Any], receiver_module: Receiver
) -> None:
    client, secret = keyed
    deliveries = eventually(
        lambda: client.get(f"/v1/jobs/{sampled_job['id']}/webhook-deliveries").raise_for_status().json()["data"],
        lambda found: bool(found) and all(d["status"] != "pending" for d in found),
        "every webhook delivery of the job settled",
    )
    assert [d["event_type"] for d in deliveries] == ["started", "sample", "sample", "succeeded"]
    assert all(d["status"] == "delivered" for d in deliveries)
    assert [len(d["attempts"]) for d in deliveries] == [2, 1, 1, 1]
    assert deliveries[0]["attempts"][0]["status_code"] == 500 and deliveries[0]["attempts"][1]["status_code"] == 200
    verifier = Webhook(secret)
    bodies = []
    for headers, body in receiver_module.requests:
        assert {"webhook-id", "webhook-timestamp", "webhook-signature"} <= set(headers)
        bodies.append(verifier.verify(body, headers))  # raises on a bad signature
    assert [b["type"] for b in bodies] == ["job.started", "job.started", "job.sample", "job.sample", "job.succeeded"]
    assert receiver_module.requests[0][0]["webhook-id"] == receiver_module.requests[1][0]["webhook-id"]  # a retry
    assert all(b["data"]["job_id"] == sampled_job["id"] for b in bodies)
    _png(bodies[2]["data"]["contact_sheet"])  # sample URLs in webhooks are signed and work
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 32).verify(receiver_module.requests[-1][1], receiver_module.requests[-1][0])


def test_a_webhook_that_keeps_failing_is_given_up_after_the_retries(
    keyed: tuple[httpx.Client, str], receiver: Receiver
) -> None:
    client, _ = keyed
    receiver.codes = [503] * 10
    job = _submit(client, **quick_spec(steps=2, webhook_url=receiver.url, webhook_events=["succeeded"]))
    wait_for_status(client, job["id"], {"succeeded"})
    (delivery,) = eventually(
        lambda: client.get(f"/v1/jobs/{job['id']}/webhook-deliveries").raise_for_status().json()["data"],
        lambda found: len(found) == 1 and found[0]["status"] != "pending",
        "the one webhook delivery given up",
    )
    assert delivery["status"] == "failed" and delivery["next_attempt_at"] is None
    assert [a["status_code"] for a in delivery["attempts"]] == [503, 503, 503]  # first try + 2 retries


def test_every_job_carries_its_evaluation_report(keyed: tuple[httpx.Client, str], sampled_job: dict[str, Any]) -> None:
    """The report on the job, in report.json and as `evaluated` events: a quick check at the sample step, the full
    report (verdicts on both axes) once at the end, before `succeeded`."""
    client, _ = keyed
    report = sampled_job["report"]
    assert report["schema"] == "dopsd.evaluation/1" and report["step"] == 6
    assert report["verdicts"]["concept"]["verdict"] in ("learned", "not learned", "inconclusive")
    assert report["verdicts"]["few_step_quality"]["verdict"] in ("kept", "degraded", "inconclusive")
    assert report["teacher_check"]["blind"] is False
    for figure in report["figures"].values():  # a figure is measured, or says why not: never a placeholder
        assert (figure["mean"] is not None) != (figure["not_measured"] is not None), figure
    events = _events(client, sampled_job["id"])
    evaluated = [e["data"] for e in events if e["type"] == "evaluated"]
    assert [(e["step"], e["quick"]) for e in evaluated] == [(3, True), (6, False)]
    assert evaluated[-1]["verdicts"]["concept"]["verdict"] == report["verdicts"]["concept"]["verdict"]
    types = [e["type"] for e in events]
    last_progress = max(i for i, t in enumerate(types) if t == "progress")
    final_evaluated = max(i for i, t in enumerate(types) if t == "evaluated")
    assert last_progress < final_evaluated < types.index("succeeded")
    artifacts = client.get(f"/v1/jobs/{sampled_job['id']}/artifacts").raise_for_status().json()["data"]
    stored = next(a for a in artifacts if a["name"] == "report.json")
    assert httpx.get(stored["url"], timeout=30).raise_for_status().json()["verdicts"] == report["verdicts"]


def test_preview_renders_the_concept_zero_shot(keyed: tuple[httpx.Client, str]) -> None:
    client, _ = keyed
    preview = _submit(
        client, path="/v1/previews", preset="tiny-z-image", trigger="sks",
        validation_prompts=["a photo of [V]", "[V] in the snow"],
    )  # fmt: skip
    assert preview["kind"] == "preview" and preview["status"] == "queued"
    wait_for_status(client, preview["id"], {"succeeded", "failed"})
    done = client.get(f"/v1/previews/{preview['id']}").raise_for_status().json()
    assert done["status"] == "succeeded", done["error"]
    images = done["preview_images"]
    assert sorted((i["source"], i["prompt"]) for i in images) == sorted(
        (src, p) for src in ("robot-1.png", "robot-2.png") for p in ("a photo of sks", "sks in the snow")
    )
    assert all(_png(i["url"]).size == (64, 64) for i in images)
    # The teacher gate a training job passes first, answered by the preview too.
    assert done["teacher_check"]["blind"] is False and done["teacher_check"]["visibility"] > 0
    assert done["teacher_check"]["message"] is None
    types = [e["type"] for e in _events(client, preview["id"])]
    assert types[-2:] == ["sample", "succeeded"] and "progress" not in types
    # Previews are not training jobs: they have no adapter and are listed apart.
    assert "adapter" not in done["links"]
    listed = client.get("/v1/jobs", params={"kind": "preview"}).json()["data"]
    assert preview["id"] in [j["id"] for j in listed]
    assert preview["id"] not in [j["id"] for j in client.get("/v1/jobs").json()["data"]]


def test_adapter_comes_in_diffusers_and_comfyui_formats(
    keyed: tuple[httpx.Client, str], sampled_job: dict[str, Any], tmp_path: Any
) -> None:
    client, _ = keyed
    files = {}
    for fmt in ("diffusers", "comfyui"):
        redirect = client.get(f"/v1/jobs/{sampled_job['id']}/adapter", params={"format": fmt})
        assert redirect.status_code == 302
        path = tmp_path / f"{fmt}.safetensors"
        path.write_bytes(httpx.get(redirect.headers["location"], timeout=30).raise_for_status().content)
        with safe_open(str(path), framework="pt") as f:
            files[fmt] = set(f.keys())
    assert all(k.startswith("transformer.") for k in files["diffusers"])
    assert files["comfyui"] and not files["comfyui"] & files["diffusers"]
    only = _submit(client, **quick_spec(steps=1, output_formats=["diffusers"]))
    wait_for_status(client, only["id"], {"succeeded"})
    missing = client.get(f"/v1/jobs/{only['id']}/adapter", params={"format": "comfyui"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "adapter_format_not_written"


def test_captions_are_made_when_none_are_given(keyed: tuple[httpx.Client, str]) -> None:
    client, _ = keyed
    job = _submit(client, **quick_spec(steps=1, default_caption=None, trigger="zwx"))
    done = wait_for_status(client, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done["error"]
    artifacts = {a["name"]: a for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]}
    config = httpx.get(artifacts["config.json"]["url"], timeout=30).json()
    assert config["captions"] == {"robot-1.png": ["a photo of zwx"], "robot-2.png": ["a photo of zwx"]}


def test_metrics_report_jobs_queues_durations_and_latency(prod_stack: Stack, sampled_job: dict[str, Any]) -> None:
    text = httpx.get(f"{prod_stack.base_url}/metrics", timeout=30).raise_for_status().text
    assert 'dopsd_jobs{kind="training",status="succeeded"}' in text
    assert "dopsd_queue_depth" in text
    assert 'dopsd_job_duration_seconds_count{kind="training",status="succeeded"}' in text
    assert 'dopsd_step_seconds{preset="tiny-z-image"}' in text
    assert (
        'dopsd_http_request_duration_seconds_bucket{le="0.005",method="GET",route="/v1/jobs/{job_id}",status="200"}'
        in text
    )


def test_worker_logs_are_json_lines_with_the_job_id(prod_stack: Stack, sampled_job: dict[str, Any]) -> None:
    lines = [
        json.loads(line)
        for log in prod_stack.logs.glob("worker-*.log")
        for line in log.read_text().splitlines()
        if line.startswith("{")
    ]
    mine = [line for line in lines if line.get("job_id") == sampled_job["id"]]
    assert mine, "no worker log line carries the job id"
    assert any("claimed" in line["message"] for line in mine) and any("succeeded" in line["message"] for line in mine)
    assert all({"time", "level", "logger", "message"} <= set(line) for line in mine)


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:9/hook", "http://localhost/hook", "http://10.1.2.3/hook", "http://[::1]/hook",
     "http://169.254.169.254/latest/meta-data", "ftp://93.184.216.34/hook", "http:///nohost"],
)  # fmt: skip
def test_webhook_targets_on_private_addresses_are_refused(url: str) -> None:
    with pytest.raises(WebhookTargetError):
        check_target(url, public_only)


def test_webhook_targets_on_public_addresses_or_allowed_private_ones_pass() -> None:
    check_target("https://93.184.216.34/hook", public_only)  # an address literal: no DNS needed
    check_target("http://127.0.0.1:9/hook", any_address)
