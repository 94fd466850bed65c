"""`DOPSDClient` end to end against the real stack: submit, follow, download, errors, cancel, reconnects."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dopsd_client import DOPSDAPIError, DOPSDClient
from dopsd_client.api import parse_sse
from scripts import stack
from tests.conftest import EXAMPLES, REPO, Stack, quick_spec
from tests.service.tcpproxy import TcpProxy


IMAGES = sorted(EXAMPLES.glob("*.png"))[:2]


@pytest.fixture
def client(prod_stack: Stack, api_key: str) -> Iterator[DOPSDClient]:
    with DOPSDClient(prod_stack.base_url, api_key) as c:
        yield c


def test_submit_follow_and_download_the_adapter(prod_stack: Stack, api_key: str, tmp_path: Path) -> None:
    """The whole journey through the class. The client reaches the API through a proxy that cuts the event stream's
    connection once, after the job started: `wait()` resumes it with Last-Event-ID, losing and repeating nothing."""
    proxy = TcpProxy(("127.0.0.1", int(prod_stack.base_url.rsplit(":", 1)[1])))
    try:
        with DOPSDClient(f"http://127.0.0.1:{proxy.port}", api_key) as client:
            job = client.submit(IMAGES, quick_spec(steps=5), idempotency_key="client-e2e")
            assert job["status"] == "queued" and [i["name"] for i in job["images"]] == ["robot-1.png", "robot-2.png"]
            assert client.submit(IMAGES, quick_spec(steps=5), idempotency_key="client-e2e")["id"] == job["id"]

            seen: list[dict[str, Any]] = []

            def on_event(event: dict[str, Any]) -> None:
                seen.append(event)
                if event["type"] == "started":
                    proxy.down()  # resets the stream's connection; refused until up again
                    threading.Timer(1.0, proxy.up).start()

            done = client.wait(job["id"], on_event=on_event)
            assert done["status"] == "succeeded", done["error"]
            assert done["progress"]["step"] == 5 and done["gpu_seconds"] > 0
            types = [e["type"] for e in seen]
            assert types[0] == "queued" and "started" in types[:3] and types[-1] == "succeeded"
            assert "progress" in types and "sample" in types
            log = [e["id"] for e in client.events(job["id"], limit=500)["data"]]
            assert [e["id"] for e in seen] == log, "each event once, in order, across the reconnect"
            # The evaluation report: both verdicts in words, the final step, the figures; the last `evaluated` event
            # (the full evaluation, after the quick ones) says the same verdicts, before `succeeded`.
            report = client.report(job["id"])
            assert report is not None and report == done["report"] and report["step"] == 5
            assert report["verdicts"]["concept"]["verdict"] in {"learned", "not learned", "inconclusive"}
            assert report["verdicts"]["few_step_quality"]["verdict"] in {"kept", "degraded", "inconclusive"}
            assert all(report["verdicts"][axis]["summary"] for axis in ("concept", "few_step_quality"))
            assert report["figures"] and all(f["title"] for f in report["figures"].values())
            evaluated = [i for i, e in enumerate(seen) if e["type"] == "evaluated"]
            assert evaluated, types
            last = seen[evaluated[-1]]["data"]
            assert last["quick"] is False and last["step"] == 5 and last["verdicts"] == report["verdicts"]
            assert evaluated[-1] > max(i for i, t in enumerate(types) if t == "progress")
            # A finished job's stream replays its log and ends.
            assert [e["id"] for e in client.stream_events(job["id"])] == log
            assert job["id"] in {j["id"] for j in client.list(status="succeeded")["data"]}
            # Sample events carry short-lived URLs of real images, signed when the event is read.
            final = next(e["data"] for e in reversed(seen) if e["type"] == "sample")
            assert final["final"] is True and {i["kind"] for i in final["images"]} >= {"base", "adapter"}
            assert httpx.get(final["images"][0]["url"]).content.startswith(b"\x89PNG")
            assert httpx.get(final["contact_sheet"]).content.startswith(b"\x89PNG")

            artifacts = {a["name"]: a for a in client.artifacts(job["id"])}
            adapter = artifacts["pytorch_lora_weights.safetensors"]
            path = client.download_adapter(job["id"], tmp_path)  # a folder: the server's file name inside it
            assert path == tmp_path / "pytorch_lora_weights.safetensors"
            assert path.read_bytes() == httpx.get(adapter["url"]).content and path.stat().st_size == adapter["size"]
            assert not list(tmp_path.glob(".*.part")), "no temporary file left behind"
            comfy = client.download_adapter(job["id"], tmp_path / "sks_comfyui.safetensors", format="comfyui")
            assert (
                comfy.read_bytes() == httpx.get(artifacts["pytorch_lora_weights_comfyui.safetensors"]["url"]).content
            )
            assert comfy.read_bytes() != path.read_bytes()

            samples = client.download_samples(job["id"], tmp_path / "out")
            assert samples and all(p.is_file() and p.is_relative_to(tmp_path / "out" / "samples") for p in samples)
    finally:
        proxy.down()


def test_a_dry_run_resolves_and_estimates_without_creating_a_job(client: DOPSDClient) -> None:
    before = client.list(limit=100)["data"]
    plan = client.submit(IMAGES, quick_spec(steps=40, rank=4), dry_run=True)
    assert plan["dry_run"] is True and plan["estimated_gpu_seconds"] > 0 and plan["queue_position"] >= 1
    assert plan["config"]["max_train_steps"] == 40 and plan["config"]["rank"] == 4
    assert [i["name"] for i in plan["images"]] == ["robot-1.png", "robot-2.png"]
    assert client.list(limit=100)["data"] == before


def test_a_refused_image_raises_with_the_code_and_the_file(client: DOPSDClient, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(DOPSDAPIError) as caught:
        client.submit([IMAGES[0], broken], quick_spec())
    error = caught.value
    assert error.status == 422 and error.code == "not_an_image" and error.file == "broken.png"
    assert str(error).startswith("broken.png") and "[not_an_image]" in str(error)


def test_spec_errors_and_unknown_jobs_raise(client: DOPSDClient) -> None:
    with pytest.raises(DOPSDAPIError) as caught:
        client.submit(IMAGES, quick_spec(steps=0, colour="red"))
    assert caught.value.code == "invalid_spec" and "steps" in str(caught.value) and "colour" in str(caught.value)
    with pytest.raises(DOPSDAPIError) as caught:
        client.get("00000000-0000-0000-0000-000000000000")
    assert caught.value.status == 404 and caught.value.code == "job_not_found"


def test_a_bad_key_and_no_server_raise_readable_errors(prod_stack: Stack) -> None:
    with DOPSDClient(prod_stack.base_url, "not-a-key") as bad, pytest.raises(DOPSDAPIError) as caught:
        bad.list()
    assert caught.value.status == 401 and caught.value.code == "unauthorized"
    with DOPSDClient(f"http://127.0.0.1:{stack.free_port()}", "k") as nowhere:
        with pytest.raises(DOPSDAPIError) as caught:
            nowhere.presets()
    assert caught.value.status == 0 and caught.value.code == "connection_error"


def test_cancel_and_delete(client: DOPSDClient) -> None:
    job = client.submit(IMAGES[:1], quick_spec(steps=3000))
    canceled = client.cancel(job["id"])
    assert canceled["status"] == "canceled" or canceled["cancel_requested"]
    done = client.wait(job["id"])
    assert done["status"] == "canceled"
    assert client.report(job["id"]) is None  # a canceled job has no evaluation report
    with pytest.raises(DOPSDAPIError) as caught:
        client.download_adapter(job["id"], "unused.safetensors")
    assert caught.value.code == "job_not_finished"
    client.delete(job["id"])
    with pytest.raises(DOPSDAPIError) as caught:
        client.get(job["id"])
    assert caught.value.code == "job_not_found"


def test_the_client_loads_no_service_code_and_no_torch() -> None:
    """What import-linter checks statically, at run time: the client and its CLI plug-in import only httpx, tqdm
    and the standard library."""
    code = (
        "import sys\n"
        "import dopsd_client, dopsd_client.cli\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in {'torch', 'api', 'core', 'worker', 'dopsd'}]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_parse_sse_follows_the_format() -> None:
    lines = ["id: 3", "event: progress", 'data: {"a":', "data: 1}", "", ": keep-alive", "", "data:x", ""]
    assert list(parse_sse(iter(lines))) == [("3", "progress", '{"a":\n1}'), ("3", "message", "x")]
