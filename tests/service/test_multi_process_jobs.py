"""One job on two processes through the service: a job asking for `num_processes: 2` waits in its family's queue of
2-GPU jobs, the worker (DOPSD_WORKER_GPUS=2 in the test stack; CPU ranks on gloo) starts its ranks as one torchrun
group, rank 0 reports as a single-process job does, and the job ends exactly once, whatever happens to the group:
a finished run, a cancel, a rank killed (the group restarts and resumes; killed again, the job goes back to the
queue and resumes on its next attempt), a lost lease, a killed worker. No rank outlives its attempt. A full
fine-tune on two processes leaves the transformer in diffusers' format beside its extracted adapter."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from sqlalchemy import create_engine, text

from tests.conftest import Stack, assert_one_adapter, example_files, quick_spec
from tests.pace import eventually, wait_for_status, wait_for_step


def ranks_of(job_id: str) -> list[psutil.Process]:
    """The rank processes of a job on this machine, found by the job's folder in their command line (so an orphan
    left by a dead worker is found too)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "worker.rank" in cmdline and f"dopsd-job-{job_id}-" in cmdline and "torch.distributed.run" not in cmdline:
            found.append(process)
    return found


def rank(job_id: str, number: int) -> psutil.Process:
    """The running process of rank `number` of a job (its RANK in the launcher's environment)."""

    def find() -> psutil.Process | None:
        for process in ranks_of(job_id):
            try:
                if process.environ().get("RANK") == str(number):
                    return process
            except psutil.NoSuchProcess:
                continue
        return None

    found = eventually(find, lambda p: p is not None, f"rank {number} of job {job_id}")
    assert found is not None
    return found


def no_ranks_left(job_id: str, within_s: float) -> None:
    """Asserts that every rank process of the job is gone within `within_s`."""
    deadline = time.monotonic() + within_s
    while ranks_of(job_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [(p.pid, " ".join(p.cmdline())) for p in ranks_of(job_id)]
    assert not left, f"ranks left running: {left}"


def events_of(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    return list(client.get(f"/v1/jobs/{job_id}/events", params={"limit": 500}).json()["data"])


def submit(client: httpx.Client, **spec: Any) -> dict[str, Any]:
    response = client.post(
        "/v1/jobs", files=example_files(2), data={"spec": json.dumps(quick_spec(num_processes=2, **spec))}
    )
    assert response.status_code == 202, response.text
    return dict(response.json())


def training_on_both_ranks(client: httpx.Client, name: str) -> tuple[dict[str, Any], list[psutil.Process]]:
    """A 30-step 2-process job with checkpoints every 4 steps, once it has trained 9 steps (two checkpoints stored),
    and its two rank processes."""
    job = submit(client, steps=30, checkpointing_steps=4)
    wait_for_step(client, job["id"], 9)
    ranks = ranks_of(job["id"])
    assert len(ranks) == 2, f"{name}: {len(ranks)} ranks"
    return job, ranks


def succeeded_on_attempt(client: httpx.Client, job_id: str, attempt: int, steps: int) -> None:
    """Waits for the job to end and asserts it succeeded on `attempt`, having trained all its `steps`."""
    done = wait_for_status(client, job_id, {"succeeded", "failed", "canceled"})
    assert done["status"] == "succeeded", done["error"]
    assert done["attempt"] == attempt and done["progress"]["step"] == steps


def metrics_of(client: httpx.Client, job_id: str) -> dict[str, Any]:
    """The job's metrics.json, downloaded as a client downloads it."""
    artifacts = client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    url = next(a["url"] for a in artifacts if a["name"] == "metrics.json")
    return dict(httpx.get(url, timeout=30).json())


def test_a_two_process_job_trains_once_and_says_so(prod_stack: Stack) -> None:
    key = prod_stack.create_key("two-processes")
    with prod_stack.client(key) as client:
        job = submit(client, steps=8, checkpointing_steps=4)
        done = wait_for_status(client, job["id"], {"succeeded", "failed", "canceled"})
        assert done["status"] == "succeeded", done["error"]
        assert done["attempt"] == 1 and done["progress"]["step"] == 8
        distributed = metrics_of(client, job["id"])["distributed"]
        assert distributed["num_processes"] == 2 and distributed["global_batch_size"] == 2
        assert distributed["backend"] == "gloo" and distributed["replicas_identical"] is True
        types = [e["type"] for e in events_of(client, job["id"])]
        # Rank 0 alone reports: one load, one start of training, one sample set per sampling point, one end.
        assert types.count("model_loaded") == 1 and types.count("training") == 1
        assert types.count("succeeded") == 1 and types.count("checkpoint") == 1  # step 4; the end writes the adapter
        # The job held two GPUs for its wall time.
        wall = datetime.fromisoformat(done["finished_at"]) - datetime.fromisoformat(done["started_at"])
        assert done["gpu_seconds"] >= 1.8 * wall.total_seconds()
    no_ranks_left(job["id"], within_s=5)
    assert_one_adapter(prod_stack, job["id"])


def test_a_canceled_two_process_job_stops_every_rank(prod_stack: Stack) -> None:
    key = prod_stack.create_key("two-processes-cancel")
    with prod_stack.client(key) as client:
        job = submit(client, steps=400, checkpointing_steps=2)
        wait_for_step(client, job["id"], 3)
        assert len(ranks_of(job["id"])) == 2
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
        done = wait_for_status(client, job["id"], {"succeeded", "failed", "canceled"})
        assert done["status"] == "canceled", done["error"]
        no_ranks_left(job["id"], within_s=10)
    assert prod_stack.s3_keys(f"jobs/{job['id']}/checkpoints/") == []  # a canceled job never resumes


def test_a_killed_rank_restarts_the_group_and_a_second_kill_sends_the_job_back_to_the_queue(
    prod_stack: Stack,
) -> None:
    key = prod_stack.create_key("two-processes-kill")
    with prod_stack.client(key) as client:
        job = submit(client, steps=40, checkpointing_steps=4)
        wait_for_step(client, job["id"], 9)
        first = rank(job["id"], 1)
        os.kill(first.pid, signal.SIGKILL)  # torchrun restarts the group once (DOPSD_WORKER_GROUP_RESTARTS=1)
        eventually(
            lambda: [e for e in events_of(client, job["id"]) if e["type"] == "model_loaded"],
            lambda loads: len(loads) == 2,
            "the restarted group's model load",
        )
        wait_for_step(client, job["id"], 22)
        os.kill(rank(job["id"], 1).pid, signal.SIGKILL)  # past the restarts: the attempt ends, the job is requeued
        succeeded_on_attempt(client, job["id"], 2, steps=40)
        events = events_of(client, job["id"])
        types = [e["type"] for e in events]
        assert types.count("started") == 2 and types.count("requeued") == 1 and types.count("succeeded") == 1
        resumed = [e["data"]["resumed_from_step"] for e in events if e["type"] == "model_loaded"]
        # A fresh start; the in-place restart from the local checkpoint; the next attempt from the stored one.
        assert resumed[0] is None and resumed[1] >= 8 and resumed[2] >= 20
    no_ranks_left(job["id"], within_s=5)


def test_a_lost_lease_stops_the_group_and_the_job_resumes_on_its_next_attempt(prod_stack: Stack) -> None:
    key = prod_stack.create_key("two-processes-lease")
    with prod_stack.client(key) as client:
        job, ranks = training_on_both_ranks(client, "lease")
        # Another worker takes the job over, as the reaper hands on a job whose heartbeats stopped.
        engine = create_engine(prod_stack.database_url)
        with engine.begin() as connection:
            connection.execute(text("UPDATE job SET worker_id = 'someone-else' WHERE id = :id"), {"id": job["id"]})
        engine.dispose()
        took = time.monotonic()
        for process in ranks:
            process.wait(timeout=30)
        assert time.monotonic() - took < 15  # the worker stops the group within seconds of its next heartbeat
        succeeded_on_attempt(client, job["id"], 2, steps=30)
        loads = [e["data"] for e in events_of(client, job["id"]) if e["type"] == "model_loaded"]
        assert loads[-1]["resumed_from_step"] >= 8


def test_a_killed_worker_takes_its_ranks_with_it(prod_stack: Stack) -> None:
    key = prod_stack.create_key("two-processes-worker-kill")
    with prod_stack.client(key) as client:
        job, _ = training_on_both_ranks(client, "worker kill")
        assert prod_stack.worker is not None
        os.killpg(prod_stack.worker.pid, signal.SIGKILL)
        prod_stack.worker.wait()
        no_ranks_left(job["id"], within_s=10)
        prod_stack.restart_worker()
        succeeded_on_attempt(client, job["id"], 2, steps=30)


def test_a_full_fine_tune_on_two_processes_leaves_a_transformer_that_loads(prod_stack: Stack, tmp_path: Path) -> None:
    key = prod_stack.create_key("two-processes-full")
    with prod_stack.client(key) as client:
        job = submit(client, steps=4, finetune="full", extract_lora_rank=4, learning_rate=1e-4)
        succeeded_on_attempt(client, job["id"], 1, steps=4)
        artifacts = {a["name"]: a for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]}
        model = {name: a for name, a in artifacts.items() if a["kind"] == "model"}
        assert set(model) == {"transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"}
        folder = tmp_path / "transformer"
        folder.mkdir()
        for name, artifact in model.items():
            (tmp_path / name).write_bytes(httpx.get(artifact["url"], timeout=30).content)
        assert artifacts["pytorch_lora_weights.safetensors"]["kind"] == "adapter"
        metrics = metrics_of(client, job["id"])
        assert metrics["finetune"] == "full" and metrics["distributed"]["sharded"] is True
        assert metrics["lora_extraction"]["rank"] == 4
    from diffusers import ZImageTransformer2DModel

    loaded = ZImageTransformer2DModel.from_pretrained(folder)
    assert sum(p.numel() for p in loaded.parameters()) > 0
