"""`dopsd client ...` as people run it: a subprocess of the installed command against the real stack."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import pytest

from dopsd_client import DOPSDClient
from tests.conftest import EXAMPLES, REPO, Stack, quick_spec, wait_for_status


DOPSD = Path(sys.executable).with_name("dopsd")
CONCEPT_LINE = re.compile(r"^concept: (learned|not learned|inconclusive) - \S", re.M)
QUALITY_LINE = re.compile(r"^few-step quality: (kept|degraded|inconclusive) - \S", re.M)


def dopsd_client(stack: Stack, key: str, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """`dopsd client ARGS` with the API's URL and key in the environment, as a user sets them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOPSD_")}
    env.update(DOPSD_API_URL=stack.base_url, DOPSD_API_KEY=key)
    return subprocess.run(
        [str(DOPSD), "client", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s
    )


def assert_one_readable_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_submit_wait_and_out_trains_shows_progress_and_writes_the_adapter(
    prod_stack: Stack, api_key: str, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"  # a folder, as people have them: two images and a captions file
    photos.mkdir()
    for name in ("robot-1.png", "robot-2.png"):
        shutil.copy(EXAMPLES / name, photos / name)
    captions = json.loads((EXAMPLES / "captions.json").read_text())
    (photos / "captions.json").write_text(json.dumps({k: captions[k] for k in ("robot-1.png", "robot-2.png")}))
    out = tmp_path / "sks"
    result = dopsd_client(
        prod_stack, api_key,
        "submit", "--images", str(photos), "--captions", str(photos / "captions.json"), "--trigger", "sks",
        "--preset", "tiny-z-image", "--steps", "6", "--prompt", "a photo of [V]", "--sample-seed", "0",
        "--format", "diffusers", "--format", "comfyui", "--wait", "--out", str(out), "--samples",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    adapter = out / "pytorch_lora_weights.safetensors"
    assert adapter.is_file() and adapter.stat().st_size > 1000
    assert list((out / "samples").rglob("*.png")), "--samples downloads the sample images"
    # The progress bar (stderr): step/total and the loss; the job's lines and the result (stdout).
    assert "6/6" in result.stderr and "loss=" in result.stderr, result.stderr
    assert "queued" in result.stderr and "samples at step 6 (final):" in result.stderr, result.stderr
    assert "contact sheet  http" in result.stderr and "adapter seed 0" in result.stderr, result.stderr
    job_id = result.stdout.split()[1]
    assert f"job {job_id} succeeded" in result.stdout and f"adapter (diffusers): {adapter}" in result.stdout
    comfy = out / "pytorch_lora_weights_comfyui.safetensors"
    assert f"adapter (comfyui): {comfy}" in result.stdout and comfy.stat().st_size > 1000
    # After success: the two verdicts in words with their summaries, then a line per figure of the report.
    assert CONCEPT_LINE.search(result.stdout) and QUALITY_LINE.search(result.stdout), result.stdout
    assert "evaluation at step 6: concept " in result.stderr, result.stderr  # the `evaluated` event, watched

    with DOPSDClient(prod_stack.base_url, api_key) as client:
        job = client.get(job_id)
        assert [i["name"] for i in job["images"]] == ["robot-1.png", "robot-2.png"]
        assert job["config"]["captions"]["robot-2.png"] == ["a photo of [V] toy robot on a blue background"]
        artifact = next(a for a in client.artifacts(job_id) if a["kind"] == "adapter")
        assert adapter.stat().st_size == artifact["size"]
        report = client.report(job_id)
    assert report is not None
    concept = report["verdicts"]["concept"]
    assert f"concept: {concept['verdict']} - {concept['summary']}" in result.stdout
    for figure in report["figures"].values():
        assert f"\n  {figure['title']}: " in result.stdout, (figure["title"], result.stdout)

    status = dopsd_client(prod_stack, api_key, "status", job_id)
    assert status.returncode == 0 and "succeeded" in status.stdout and "step 6/6" in status.stdout, status.stdout
    assert CONCEPT_LINE.search(status.stdout) and QUALITY_LINE.search(status.stdout), status.stdout
    listing = dopsd_client(prod_stack, api_key, "list")
    assert listing.returncode == 0 and job_id in listing.stdout
    events = dopsd_client(prod_stack, api_key, "events", job_id)
    assert events.returncode == 0
    assert "queued" in events.stdout.splitlines()[0] and "succeeded" in events.stdout.splitlines()[-1]
    assert "  evaluated  evaluation at step 6: concept " in events.stdout, events.stdout
    download = dopsd_client(prod_stack, api_key, "download", job_id, "--out", str(tmp_path / "again.safetensors"))
    assert download.returncode == 0, download.stderr
    assert (tmp_path / "again.safetensors").read_bytes() == adapter.read_bytes()
    download = dopsd_client(
        prod_stack, api_key, "download", job_id, "--format", "comfyui", "--out", f"{tmp_path}/new/"
    )
    assert download.returncode == 0, download.stderr
    assert (tmp_path / "new" / comfy.name).read_bytes() == comfy.read_bytes()


def test_dry_run_prints_the_plan(prod_stack: Stack, api_key: str) -> None:
    result = dopsd_client(
        prod_stack, api_key, "submit", "--images", str(EXAMPLES / "robot-1.png"), "--trigger", "sks", "--steps", "40",
        "--dry-run",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "created nothing" in result.stdout and "max_train_steps      40" in result.stdout, result.stdout
    assert "robot-1.png (" in result.stdout and "estimated GPU time" in result.stdout, result.stdout


def test_preview_prints_and_downloads_the_images(prod_stack: Stack, api_key: str, tmp_path: Path) -> None:
    result = dopsd_client(
        prod_stack, api_key, "preview", "--images", str(EXAMPLES / "robot-1.png"), "--trigger", "sks",
        "--prompt", "a photo of [V]", "--sample-seed", "0", "--out", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    preview_id = result.stdout.split()[1]
    assert "robot-1.png seed 0 'a photo of sks': http" in result.stdout, result.stdout
    (image,) = tmp_path.glob("*.png")
    assert image.read_bytes().startswith(b"\x89PNG")
    with DOPSDClient(prod_stack.base_url, api_key) as client:
        done = client.get_preview(preview_id)
    assert done["kind"] == "preview" and [i["prompt"] for i in done["preview_images"]] == ["a photo of sks"]


def test_a_bad_key_exits_non_zero_with_one_readable_line(prod_stack: Stack) -> None:
    result = dopsd_client(prod_stack, "not-a-key", "list")
    assert result.returncode == 2
    assert_one_readable_error(result, "[unauthorized]")


def test_a_refused_image_names_the_file(prod_stack: Stack, api_key: str, tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("shopping list, not a picture")
    result = dopsd_client(prod_stack, api_key, "submit", "--images", str(tmp_path), "--trigger", "sks")
    assert result.returncode == 2
    assert_one_readable_error(result, "notes.png", "[not_an_image]")


def test_an_unknown_job_and_no_server_are_one_line(prod_stack: Stack, api_key: str) -> None:
    result = dopsd_client(prod_stack, api_key, "status", "00000000-0000-0000-0000-000000000000")
    assert result.returncode == 2
    assert_one_readable_error(result, "[job_not_found]")
    from scripts import stack

    nowhere = Stack(f"http://127.0.0.1:{stack.free_port()}", {}, "", Path())
    result = dopsd_client(nowhere, api_key, "list")
    assert result.returncode == 2
    assert_one_readable_error(result, "cannot reach the API", "[connection_error]")


def test_a_failing_job_under_wait_exits_non_zero_with_the_apis_message(prod_stack: Stack, api_key: str) -> None:
    """The job's input goes bad in storage while it waits in the queue: the worker fails it with `bad_input`, and
    `--wait` ends with the API's message and exit code 1."""
    with prod_stack.client(api_key) as http, DOPSDClient(prod_stack.base_url, api_key) as client:
        busy = client.submit([EXAMPLES / "robot-1.png"], quick_spec(steps=5000))
        wait_for_status(http, busy["id"], {"running"})
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOPSD_")}
        env.update(DOPSD_API_URL=prod_stack.base_url, DOPSD_API_KEY=api_key)
        command = [str(DOPSD), "client", "submit", "--images", str(EXAMPLES / "robot-2.png"), "--trigger", "sks",
                   "--steps", "2", "--wait"]  # fmt: skip
        process = subprocess.Popen(
            command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            job = _newest_queued_job(client, other_than=busy["id"])
            (key,) = prod_stack.s3_keys(f"jobs/{job['id']}/inputs/")
            _s3(prod_stack).put_object(Bucket=prod_stack.env["DOPSD_S3_BUCKET"], Key=key, Body=b"\x89PNG\r\n\x1a\n!")
            client.cancel(busy["id"])
            stdout, stderr = process.communicate(timeout=120)
        finally:
            process.kill()
    assert process.returncode == 1, stdout + stderr
    assert "Traceback" not in stderr
    assert f"job {job['id']} failed: " in stderr and "robot-2.png" in stderr and "[bad_input]" in stderr, stderr


def _newest_queued_job(client: DOPSDClient, *, other_than: str, timeout_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        queued = [j for j in client.list(status="queued")["data"] if j["id"] != other_than]
        if queued:
            return queued[0]
        time.sleep(0.1)
    pytest.fail("the CLI's job never appeared")


def _s3(stack: Stack) -> Any:
    return boto3.client(
        "s3", endpoint_url=stack.env["DOPSD_S3_ENDPOINT_URL"], region_name="us-east-1",
        aws_access_key_id=stack.env["DOPSD_S3_ACCESS_KEY_ID"],
        aws_secret_access_key=stack.env["DOPSD_S3_SECRET_ACCESS_KEY"],
    )  # fmt: skip


def test_a_warning_event_is_shown_as_a_line_under_wait() -> None:
    import io

    from dopsd_client.cli import Watcher

    out = io.StringIO()
    Watcher(stream=out)(
        {
            "type": "warning",
            "data": {"stage": "report", "message": "the evaluation report failed; the adapter is kept"},
        }
    )
    assert out.getvalue().strip() == "warning: report: the evaluation report failed; the adapter is kept"
