"""The service's own costs on the production-shaped stack on loopback: dispatch latency, job start-up on a cold and a
warm worker, status-poll throughput under concurrent clients, and upload throughput with the API's peak memory.

`python bench/service.py [--quick] [--jobs N] [--clients N] [--seconds S] [--images N] [--only PHASE]
[--api-workers N] [--profile PREFIX]` starts a private stack with `scripts/stack.py`'s helpers (a fresh PostgreSQL
database migrated to head, a Redis db of its own, a SeaweedFS S3 server, the API under uvicorn in `--api-workers`
processes and one Celery worker), measures, stops it all, and prints one JSON line with the machine's load average
before and after (the machine may be shared). Upload limits are raised for the 5 MB images and the per-key rate limit
for the polling clients; everything else is the default. Traffic stays on loopback and every phase is bounded in
time. The test suite runs `--quick`. `--profile PREFIX` runs one API process under `bench/profile_api.py`'s sampler
and writes where its CPU went during each polling run (PREFIX-1: no job training, PREFIX-2: one training).

- dispatch: N tiny jobs one after another, each submitted to an idle worker. Server side: `started_at - created_at`
  (both written by the database); client side: from sending the POST until a poll (every 10 ms) sees `running`.
  The first job after the worker starts is reported apart: it also waits for the pool process's imports.
- start-up: from the job's `started` event to `model_loaded` and to `training` (inputs fetched, features cached,
  adapters made, the gap measured); job 1 meets a worker that has loaded no model (cold), jobs 2.. find the model in
  its cache (warm). Each job is canceled once training has begun, so the next one meets an idle worker.
- polling: `bench/load.py`'s loop, `--clients` clients polling status and listing jobs as fast as answered, first
  with no job training (every job finished), then while one job trains on the same cores (`while_training`).
- upload: `--images` PNGs of 5 MB in one POST, against 2 of them and one small image; the API process's RSS sampled
  every 5 ms: its peak growth per uploaded MB tells streaming (0) from buffering (1).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/service.py` from anywhere

from bench.load import EXAMPLE, run_load
from scripts import stack


REDIS_DB = 11  # the tests use 13; a db of its own, flushed before and after
BIG_IMAGE_BYTES = 5 * 1000 * 1000
TINY_SPEC: dict[str, Any] = {
    "preset": "tiny-z-image", "trigger": "sks", "steps": 2, "validation_prompts": ["[V]"], "sample_seeds": [0],
    "output_formats": ["diffusers"],
}  # fmt: skip


@dataclass
class BenchStack:
    """A private stack: its URL, key, the API process (for its memory) and what to stop."""

    url: str
    key: str
    api: psutil.Process
    env: dict[str, str]
    api_processes: int = 1  # with several, each /metrics scrape sees one of them


@contextmanager
def private_stack(
    workdir: Path, *, api_workers: int = 1, profile: str | None = None, server: str = "auto"
) -> Iterator[BenchStack]:
    """Starts SeaweedFS, a fresh database, the API (raised upload and rate limits; `api_workers` processes under
    uvicorn's `server` choice, or one under `bench/profile_api.py`'s sampler with `profile`) and one worker; stops
    them after."""
    from api.commands import migrate

    stack.ensure_postgres_and_redis()
    _flush_redis()
    access, secret = "dopsd-bench", secrets.token_urlsafe(16)
    weed, endpoint = stack.start_seaweedfs(
        workdir / "s3", access_key=access, secret_key=secret, log=workdir / "s3.log"
    )
    db_name = f"dopsd_bench_{os.getpid()}"
    processes = [weed]
    try:
        database_url = stack.create_database(db_name, recreate=True)
        migrate(database_url)
        port = stack.free_port()
        env = stack.stack_env(
            database_url=database_url, broker_url=f"redis://127.0.0.1:6379/{REDIS_DB}", s3_endpoint=endpoint,
            access_key=access, secret_key=secret, public_url=f"http://127.0.0.1:{port}", bucket="dopsd-bench",
        )  # fmt: skip
        key = f"dopsd_bench_{secrets.token_urlsafe(16)}"
        env.update(
            DOPSD_ENVIRONMENT="development",  # for the development key; everything else is the production shape
            DOPSD_DEV_API_KEY=key,
            DOPSD_MAX_FILE_BYTES=str(8 * 1024 * 1024),
            DOPSD_MAX_TOTAL_BYTES=str(512 * 1024 * 1024),
            DOPSD_RATE_LIMIT_PER_MINUTE=str(10**7),  # throughput, not the limiter, is under test
            DOPSD_MAX_QUEUED_PER_KEY="64",
            DOPSD_LOG_FORMAT="text",
        )
        api = (
            start_profiled_api(env, port, workdir / "api.log", profile)
            if profile
            else stack.start_api(env, port, workdir / "api.log", workers=api_workers, server=server)
        )
        processes.append(api)
        processes.append(stack.start_worker(env, workdir / "worker.log", name="bench"))
        yield BenchStack(f"http://127.0.0.1:{port}", key, psutil.Process(api.pid), env, 1 if profile else api_workers)
    finally:
        for process in reversed(processes):
            stack.stop(process, timeout_s=10)
        stack.drop_database(db_name)
        _flush_redis()


def start_profiled_api(env: dict[str, str], port: int, log: Path, prefix: str) -> subprocess.Popen[bytes]:
    """One API process under `bench/profile_api.py` (its windows open on SIGUSR1 and are written on SIGUSR2)."""
    command = [sys.executable, str(Path(__file__).with_name("profile_api.py")), "--port", str(port), "--out", prefix]
    process = subprocess.Popen(
        command, cwd=stack.ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
    )
    stack.wait_until(lambda: stack.http_ok(f"http://127.0.0.1:{port}/healthz"), "the profiled API")
    return process


def _flush_redis() -> None:
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def submit(client: httpx.Client, files: list[tuple[str, tuple[str, bytes, str]]], spec: dict[str, Any]) -> str:
    """POST /v1/jobs; the job id."""
    response = client.post("/v1/jobs", files=files, data={"spec": json.dumps(spec)})
    if response.status_code != 202:
        raise RuntimeError(f"submission answered {response.status_code}: {response.text[:500]}")
    return str(response.json()["id"])


def wait_job(
    client: httpx.Client, job_id: str, statuses: set[str], timeout_s: float, every_s: float
) -> dict[str, Any]:
    """Polls the job until its status is in `statuses`."""
    deadline = time.monotonic() + timeout_s
    while True:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} stayed {job['status']}")
        time.sleep(every_s)


def wait_events(client: httpx.Client, job_id: str, kind: str, timeout_s: float) -> list[dict[str, Any]]:
    """The job's events once one of type `kind` is among them."""
    deadline = time.monotonic() + timeout_s
    while True:
        events: list[dict[str, Any]] = client.get(f"/v1/jobs/{job_id}/events").raise_for_status().json()["data"]
        if any(e["type"] == kind for e in events):
            return events
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} has no {kind} event")
        time.sleep(0.05)


def bench_dispatch(client: httpx.Client, jobs: int) -> dict[str, Any]:
    """N tiny jobs one at a time on an idle worker: dispatch latency, and start-up of the cold and warm worker."""
    image = [("images", ("robot.png", EXAMPLE.read_bytes(), "image/png"))]
    server_ms, client_ms, startups = [], [], []
    for _ in range(jobs):
        sent = time.perf_counter()
        job_id = submit(client, image, TINY_SPEC)
        wait_job(client, job_id, {"running", "succeeded", "failed"}, timeout_s=60, every_s=0.01)
        client_ms.append((time.perf_counter() - sent) * 1000)
        events = wait_events(client, job_id, "training", timeout_s=120)
        client.post(f"/v1/jobs/{job_id}/cancel")  # what follows `training` is not under test: free the worker
        job = wait_job(client, job_id, {"succeeded", "failed", "canceled"}, timeout_s=120, every_s=0.05)
        if job["status"] == "failed":
            raise RuntimeError(f"bench job {job_id} failed: {job.get('error')}")
        server_ms.append((_ts(job["started_at"]) - _ts(job["created_at"])) * 1000)
        at = {e["type"]: _ts(e["created_at"]) for e in reversed(events)}  # first of each type
        startups.append({
            "to_model_loaded_ms": round((at["model_loaded"] - at["started"]) * 1000, 1),
            "to_training_ms": round((at["training"] - at["started"]) * 1000, 1),
            "model_cached": next(e["data"].get("cached") for e in events if e["type"] == "model_loaded"),
        })  # fmt: skip
    warm = startups[1:]
    # The first job after a worker start also waits for the pool process to finish its imports (it is forked
    # before `worker_process_init` imports the runner): reported alone, not as the idle worker's dispatch.
    idle_server, idle_client = (server_ms[1:], client_ms[1:]) if jobs > 1 else (server_ms, client_ms)
    result: dict[str, Any] = {
        "jobs": jobs,
        "dispatch_server_p50_ms": round(statistics.median(idle_server), 1),
        "dispatch_server_max_ms": round(max(idle_server), 1),
        "dispatch_client_p50_ms": round(statistics.median(idle_client), 1),
        "dispatch_client_max_ms": round(max(idle_client), 1),
        "dispatch_first_job_server_ms": round(server_ms[0], 1),
        "dispatch_first_job_client_ms": round(client_ms[0], 1),
        "dispatch_server_ms": [round(v, 1) for v in server_ms],
        "startup_cold": startups[0],
    }
    if warm:
        result["startup_warm_p50"] = {
            k: round(statistics.median(float(s[k]) for s in warm), 1) for k in ("to_model_loaded_ms", "to_training_ms")
        }
        result["startup_warm_cached"] = all(bool(s["model_cached"]) for s in warm)
        result["startup_cold_over_warm"] = round(
            float(startups[0]["to_training_ms"]) / result["startup_warm_p50"]["to_training_ms"], 2
        )
    return result


def big_png(nbytes: int) -> bytes:
    """An uncompressible RGB PNG of about `nbytes` (noise, stored without compression: quick to make)."""
    side = int((nbytes / 3) ** 0.5)
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def upload_peak(
    bench: BenchStack, client: httpx.Client, files: list[tuple[str, tuple[str, bytes, str]]]
) -> dict[str, Any]:
    """One submission of `files` while a thread samples the API's RSS every 5 ms; the job is deleted afterwards."""
    baseline = bench.api.memory_info().rss
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                peak[0] = max(peak[0], bench.api.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    total = sum(len(f[1][1]) for f in files)
    start = time.perf_counter()
    try:
        job_id = submit(client, files, {**TINY_SPEC, "steps": 1})
    finally:
        elapsed = time.perf_counter() - start
        done.set()
        sampler.join()
    client.delete(f"/v1/jobs/{job_id}")  # cancels it and deletes its objects: the worker stays free
    return {
        "files": len(files), "bytes": total, "seconds": round(elapsed, 3), "mb_per_s": round(total / elapsed / 1e6, 1),
        "rss_before_mb": round(baseline / 1e6, 1), "rss_peak_growth_mb": round((peak[0] - baseline) / 1e6, 1),
    }  # fmt: skip


def bench_upload(bench: BenchStack, client: httpx.Client, images: int) -> dict[str, Any]:
    """Uploads of one small image, of 2 x 5 MB and of `images` x 5 MB, on the same warm API process.

    `rss_growth_per_upload_mb`: the slope of the API's peak RSS growth against the bytes uploaded, between the 2-image
    and the big upload; about 1 if uploads were held in memory, about 0 if they stream to disk.
    """
    small = [("images", ("robot.png", EXAMPLE.read_bytes(), "image/png"))]
    data = big_png(BIG_IMAGE_BYTES)

    def noise(n: int) -> list[tuple[str, tuple[str, bytes, str]]]:
        return [("images", (f"noise-{i:02d}.png", data, "image/png")) for i in range(n)]

    upload_peak(bench, client, noise(1))  # warm-up: first-request and first-decode allocations are not the upload's
    result_small = upload_peak(bench, client, small)
    result_two = upload_peak(bench, client, noise(2))
    result_big = upload_peak(bench, client, noise(images))
    slope = (result_big["rss_peak_growth_mb"] - result_two["rss_peak_growth_mb"]) / (
        (result_big["bytes"] - result_two["bytes"]) / 1e6
    )
    return {
        "small": result_small, "two": result_two, "big": result_big, "image_mb": round(len(data) / 1e6, 2),
        "rss_growth_per_upload_mb": round(slope, 4),
    }  # fmt: skip


def _cpu_s(process: psutil.Process) -> float:
    """User + system CPU seconds of the API: its process and, under `--workers`, the worker processes it forked."""
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            times = p.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


POLLED_ROUTES = {"/v1/jobs/{job_id}", "/v1/jobs"}


def server_latency(bench: BenchStack) -> dict[float, float]:
    """The API's own latency histogram (`/metrics`, request received to response started) of the polled routes'
    GETs: cumulative counts by bucket bound in seconds. A single API process answers every scrape."""
    text = httpx.get(f"{bench.url}/metrics", timeout=30).raise_for_status().text
    counts: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "dopsd_http_request_duration_seconds":
            continue
        for sample in family.samples:
            labels = sample.labels
            if sample.name.endswith("_bucket") and labels["route"] in POLLED_ROUTES and labels["method"] == "GET":
                bound = float(labels["le"])
                counts[bound] = counts.get(bound, 0.0) + sample.value
    return counts


def server_side(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """What the API itself measured during one load: requests, the bucket bound its p99 falls under, and the share
    over 50 ms. Beside the client's p99 it tells the server's time from the client's and the machine's."""
    delta = {b: after.get(b, 0.0) - before.get(b, 0.0) for b in sorted(after)}
    total = delta.get(float("inf"), 0.0)
    if not total:
        return {"requests": 0}
    p99_bound = next(b for b, c in delta.items() if c >= 0.99 * total)
    return {
        "requests": int(total),
        "p99_ms_at_most": None if p99_bound == float("inf") else round(1000 * p99_bound, 1),
        "share_over_50ms": round(1 - delta.get(0.05, 0.0) / total, 4),
    }


def api_cpu(bench: BenchStack, load: Callable[[], dict[str, Any]], profile: bool = False) -> dict[str, Any]:
    """Runs `load()` and adds the API's CPU time per request: what a request costs the API, which a busy machine
    changes much less than it changes latency; and the API's own latency histogram of the load (`server`). With
    `profile`, the profiler's window spans the load."""
    histogram = server_latency(bench)
    before = _cpu_s(bench.api)
    if profile:
        os.kill(bench.api.pid, signal.SIGUSR1)
    result = load()
    if profile:
        os.kill(bench.api.pid, signal.SIGUSR2)
    spent = _cpu_s(bench.api) - before
    server = server_side(histogram, server_latency(bench)) if bench.api_processes == 1 else None
    return {**result, "api_cpu_ms_per_request": round(1000 * spent / max(1, result["requests"]), 2), "server": server}


def bench_polling(
    bench: BenchStack,
    client: httpx.Client,
    clients: int,
    seconds: float,
    interval_s: float = 0.0,
    profile: bool = False,
) -> dict[str, Any]:
    """Status polling by `clients` clients (each waiting `interval_s` between its requests; 0: as fast as answered),
    first with no job training (the API alone on the machine), then while one job trains on the same cores (as
    production's API and worker share nothing, this is the worse case)."""
    image = [("images", ("robot.png", EXAMPLE.read_bytes(), "image/png"))]
    done = submit(client, image, TINY_SPEC)
    wait_job(client, done, {"succeeded", "failed", "canceled"}, timeout_s=300, every_s=0.2)

    def load(job_ids: list[str]) -> dict[str, Any]:
        return run_load(bench.url, [bench.key], clients=clients, seconds=seconds, jobs=0,
                        job_ids={bench.key: job_ids}, interval_s=interval_s)  # fmt: skip

    idle = api_cpu(bench, lambda: load([done]), profile)
    training = submit(client, image, {**TINY_SPEC, "steps": 10_000, "sample_every": 0, "checkpointing_steps": 0})
    wait_events(client, training, "progress", timeout_s=300)  # past model loading and the gate: training steps
    busy = api_cpu(bench, lambda: load([done, training]), profile)
    still = client.get(f"/v1/jobs/{training}").raise_for_status().json()["status"]
    client.post(f"/v1/jobs/{training}/cancel")
    wait_job(client, training, {"succeeded", "failed", "canceled"}, timeout_s=120, every_s=0.1)
    return {"clients": clients, **idle, "while_training": {**busy, "job_status_after": still}}


PHASES = ("dispatch", "upload", "polling")


def main(argv: list[str] | None = None) -> int:
    """Starts the private stack, runs the measurements (every phase, or those named with `--only`), prints one JSON
    line."""
    stack.stop_on_sigterm()
    parser = argparse.ArgumentParser(description="Service costs on a private production-shaped stack (one JSON line)")
    parser.add_argument("--quick", action="store_true", help="2 jobs, 4 clients x 2 s, 8 images (the test suite)")
    parser.add_argument(
        "--jobs", type=int, default=11, help="tiny jobs, one at a time (the first meets a cold worker)"
    )
    parser.add_argument("--clients", type=int, default=50, help="concurrent polling clients")
    parser.add_argument("--seconds", type=float, default=20.0, help="polling duration (each of the two runs)")
    parser.add_argument("--images", type=int, default=64, help="5 MB images in the big upload")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds each polling client waits (0: none)")
    parser.add_argument("--only", action="append", choices=PHASES, help="run only this phase (repeatable)")
    parser.add_argument("--api-workers", type=int, default=1, help="API processes (uvicorn --workers)")
    parser.add_argument("--server", choices=sorted(stack.SERVERS), default="auto",
                        help="uvicorn's loop and parser: auto (uvloop, httptools) or asyncio (asyncio, h11)")  # fmt: skip
    parser.add_argument("--profile", metavar="PREFIX", help="one API process under bench/profile_api.py: "
                        "PREFIX-1.txt/.folded for the polling with no job training, PREFIX-2 with one")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs, args.clients, args.seconds, args.images = 2, 4, 2.0, 8
    phases = set(args.only or PHASES)
    t0 = time.perf_counter()
    record: dict[str, Any] = {
        "bench": "service", "quick": args.quick, "cpus": os.cpu_count(),
        "api_workers": 1 if args.profile else args.api_workers, "server": args.server,
        "load_before": os.getloadavg()[0],  # the 1-minute load average: how busy the shared machine was
    }  # fmt: skip
    profile = str(Path(args.profile).resolve()) if args.profile else None
    with (
        tempfile.TemporaryDirectory(prefix="dopsd-bench-") as tmp,
        private_stack(Path(tmp), api_workers=args.api_workers, profile=profile, server=args.server) as bench,
    ):
        record["stack_start_s"] = round(time.perf_counter() - t0, 1)
        headers = {"Authorization": f"Bearer {bench.key}"}
        with httpx.Client(base_url=bench.url, headers=headers, timeout=120) as client:
            if "dispatch" in phases:
                record["dispatch"] = bench_dispatch(client, args.jobs)
            if "upload" in phases:
                record["upload"] = bench_upload(bench, client, args.images)
            if "polling" in phases:
                record["polling"] = bench_polling(
                    bench, client, args.clients, args.seconds, args.interval, profile=profile is not None
                )
    record["total_s"] = round(time.perf_counter() - t0, 1)
    record["load_after"] = os.getloadavg()[0]
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
