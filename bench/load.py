"""Bounded load test of the API on loopback: concurrent clients poll job status and list jobs while jobs are
submitted and trained. Prints one JSON line: requests per second, p50/p99 latency, error count.

`python bench/load.py --url http://127.0.0.1:8000 --key KEY [--clients 50] [--seconds 60] [--jobs 3]` against a
running stack (`make stack`); the test suite runs the short mode (8 clients, 5 s) against its own stack.
Traffic goes to loopback only, is bounded in time, and stops by itself.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "concept" / "robot-1.png"


FINISHED = {"succeeded", "failed", "canceled"}


def submit_jobs(url: str, keys: list[str], jobs: int) -> dict[str, list[str]]:
    """Each key submits `jobs` tiny jobs (a key sees only its own); their ids by key."""
    image = EXAMPLE.read_bytes()
    submitted: dict[str, list[str]] = {}
    for key in keys:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
            for _ in range(jobs):
                spec = {"preset": "tiny-z-image", "steps": 5, "validation_prompts": ["[V]"], "sample_seeds": [0]}
                files = [("images", ("a.png", image, "image/png"))]
                r = client.post("/v1/jobs", files=files, data={"spec": json.dumps(spec)})
                r.raise_for_status()
                submitted.setdefault(key, []).append(r.json()["id"])
    return submitted


def wait_finished(url: str, submitted: dict[str, list[str]], timeout_s: float = 600) -> None:
    """Returns once every submitted job is finished, so that polling measures the API alone, not the API beside a
    training job on the same cores."""
    deadline = time.monotonic() + timeout_s
    for key, ids in submitted.items():
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
            for job_id in ids:
                while client.get(f"/v1/jobs/{job_id}").raise_for_status().json()["status"] not in FINISHED:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"job {job_id} did not finish within {timeout_s:.0f} s")
                    time.sleep(0.2)


def run_load(
    url: str,
    keys: list[str],
    *,
    clients: int,
    seconds: float,
    jobs: int,
    interval_s: float = 0.0,
    settle: bool = False,
    job_ids: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Runs the load and returns the measured figures.

    Client `n` uses `keys[n % len(keys)]` (per-key rate limits apply, as for real users) and waits `interval_s`
    between its requests on average (0: as fast as the API answers; paced clients start at random phases and
    jitter their waits by +-50%, so they do not arrive as one synchronized burst). Each key first submits `jobs` jobs, which train while the
    clients poll; with `settle`, polling starts once they are finished. `job_ids` (ids by key) polls those jobs
    instead and submits none.
    """
    submitted = job_ids if job_ids is not None else submit_jobs(url, keys, jobs)
    if settle:
        wait_finished(url, submitted)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client_loop(index: int) -> None:
        own: list[float] = []
        own_errors: list[str] = []
        key = keys[index % len(keys)]
        own_jobs = submitted[key]
        own_headers = {"Authorization": f"Bearer {key}"}
        pacing = random.Random(index)  # paced clients start at their own phase, as real pollers do
        with httpx.Client(base_url=url, headers=own_headers, timeout=30) as c:
            if interval_s:
                time.sleep(pacing.uniform(0, interval_s))
            i = 0
            while time.monotonic() < deadline:
                path = f"/v1/jobs/{own_jobs[i % len(own_jobs)]}" if i % 2 else "/v1/jobs?limit=20"
                start = time.perf_counter()
                try:
                    r = c.get(path)
                    if r.status_code != 200:
                        own_errors.append(str(r.status_code))
                except httpx.HTTPError as exc:
                    own_errors.append(type(exc).__name__)
                own.append(time.perf_counter() - start)
                i += 1
                if interval_s:
                    time.sleep(pacing.uniform(0.5, 1.5) * interval_s)
        with lock:
            latencies.extend(own)
            errors.extend(own_errors)

    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "bench": "load",
        "clients": clients,
        "seconds": round(elapsed, 2),
        "requests": len(latencies),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "jobs_submitted": 0 if job_ids is not None else sum(len(v) for v in submitted.values()),
        "settled": settle,
        "keys": len(keys),
        "interval_s": interval_s,
    }


def main() -> None:
    """Command line: against a running API, or a stack it starts itself."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", action="append", help="API key; repeat to spread clients over several keys")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds each client waits between requests")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--jobs", type=int, default=1, help="jobs each key submits before the polling starts")
    parser.add_argument("--settle", action="store_true", help="start polling once the submitted jobs are finished")
    args = parser.parse_args()
    if not args.key:
        parser.error("--key is required (dopsd keys create --name load)")
    result = run_load(
        args.url, args.key, clients=args.clients, seconds=args.seconds, jobs=args.jobs, interval_s=args.interval,
        settle=args.settle,
    )  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
