"""What one heavy upload costs the API: a dry run of `--images` small PNGs of `--side`x`--side` pixels (about 258 KB
each at 8000x8000, the size of the issue's example), sent to a private API in embedded mode (SQLite, the local
store, the filesystem broker; no worker: a dry run needs none).

`python bench/upload_cost.py [--quick] [--images N] [--side S] [--repeat R] [--format PNG|JPEG]` starts the API under uvicorn, sends the request
`--repeat` times while a thread polls `/healthz` every 20 ms, and prints one JSON line: the request's wall time and
answer, the CPU seconds the API and its child processes (the validation pool) spent, their peak RSS growth
together and the API process's own (sampled every 5 ms), and the `/healthz` latencies seen meanwhile (p50, p99, max). Limits that would refuse the
request before decoding are raised with `--raise-limits`, so the decode itself is what is measured.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from PIL import Image, ImageDraw


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/upload_cost.py` from anywhere

from scripts import stack


SPEC = {"preset": "tiny-z-image", "trigger": "sks", "steps": 2, "validation_prompts": ["[V]"]}


def flat_image(side: int, fmt: str = "PNG") -> bytes:
    """A PNG (or JPEG) of `side`x`side` RGB pixels that compresses to a few hundred KB: flat colour, a few lines."""
    image = Image.new("RGB", (side, side), (200, 120, 40))
    draw = ImageDraw.Draw(image)
    for i in range(0, side, max(1, side // 16)):
        draw.line([(i, 0), (side - i, side)], fill=(10, 20, 30), width=3)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"optimize": True} if fmt == "PNG" else {"quality": 85}))
    return buf.getvalue()


def tree(process: psutil.Process) -> list[psutil.Process]:
    """The process and its descendants (the validation pool's processes, if any)."""
    try:
        return [process, *process.children(recursive=True)]
    except psutil.Error:
        return [process]


def cpu_s(processes: list[psutil.Process]) -> float:
    """User + system CPU seconds of the processes (and their reaped children)."""
    total = 0.0
    for p in processes:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def rss(processes: list[psutil.Process]) -> int:
    """The processes' resident memory together."""
    total = 0
    for p in processes:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(
    url: str, key: str, api: psutil.Process, files: list[tuple[str, tuple[str, bytes, str]]]
) -> dict[str, Any]:
    """One dry run of `files` with the API's CPU, peak RSS and `/healthz` latency sampled meanwhile."""
    done = threading.Event()
    before_procs = tree(api)
    baseline_rss, baseline_cpu = rss(before_procs), cpu_s(before_procs)
    peak = [baseline_rss]
    health: list[float] = []
    seen: dict[int, psutil.Process] = {p.pid: p for p in before_procs}
    api_baseline = api.memory_info().rss
    api_peak = [api_baseline]

    def sample_memory() -> None:
        while not done.is_set():
            procs = tree(api)
            for p in procs:
                seen.setdefault(p.pid, p)
            peak[0] = max(peak[0], rss(procs))
            api_peak[0] = max(api_peak[0], rss([api]))
            time.sleep(0.005)

    def poll_health() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not done.is_set():
                start = time.perf_counter()
                client.get("/healthz")
                health.append(time.perf_counter() - start)
                time.sleep(0.02)

    threads = [threading.Thread(target=sample_memory, daemon=True), threading.Thread(target=poll_health, daemon=True)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as client:
        start = time.perf_counter()
        response = client.post("/v1/jobs", params={"dry_run": "true"}, files=files, data={"spec": json.dumps(SPEC)})
        elapsed = time.perf_counter() - start
    done.set()
    for t in threads:
        t.join()
    after_cpu = cpu_s(list(seen.values()))
    body = response.json()
    quantiles = statistics.quantiles(health, n=100, method="inclusive") if len(health) >= 2 else [0.0] * 99
    return {
        "status": response.status_code,
        "code": body.get("error", {}).get("code") if response.status_code >= 400 else None,
        "seconds": round(elapsed, 3),
        "api_cpu_s": round(after_cpu - baseline_cpu, 3),
        "rss_peak_growth_mb": round((peak[0] - baseline_rss) / 1e6, 1),
        "api_process_rss_peak_growth_mb": round((api_peak[0] - api_baseline) / 1e6, 1),
        "healthz_n": len(health),
        "healthz_p50_ms": round(quantiles[49] * 1000, 1),
        "healthz_p99_ms": round(quantiles[98] * 1000, 1),
        "healthz_max_ms": round(max(health, default=0.0) * 1000, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Starts a private embedded-mode API, measures the heavy dry run, prints one JSON line."""
    stack.stop_on_sigterm()
    parser = argparse.ArgumentParser(description="The API's cost of one upload of large-pixel PNGs (one JSON line)")
    parser.add_argument("--images", type=int, default=1, help="PNGs in the request")
    parser.add_argument("--side", type=int, default=8000, help="width and height of each PNG")
    parser.add_argument("--repeat", type=int, default=1, help="requests, one after another")
    parser.add_argument("--format", choices=["PNG", "JPEG"], default="PNG", help="image format")
    parser.add_argument("--raise-limits", action="store_true", help="raise the pixel limits so the decode runs")
    parser.add_argument("--quick", action="store_true", help="one 2000x2000 PNG, twice (the test suite)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.side, args.repeat = 1, 2000, 2
    png = flat_image(args.side, args.format)
    ext, content_type = (".png", "image/png") if args.format == "PNG" else (".jpg", "image/jpeg")
    files = [("images", (f"big-{i}{ext}", png, content_type)) for i in range(args.images)]
    with tempfile.TemporaryDirectory(prefix="dopsd-bench-upload-") as tmp:
        home = Path(tmp)
        from api.commands import migrate

        database_url = f"sqlite:///{home / 'dopsd.db'}"
        migrate(database_url)
        port = stack.free_port()
        key = f"dopsd_bench_{secrets.token_urlsafe(16)}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOPSD_")}
        env.update(
            DOPSD_DATABASE_URL=database_url, DOPSD_BROKER_URL="filesystem://", DOPSD_BROKER_DIR=str(home / "broker"),
            DOPSD_STORAGE_BACKEND="local", DOPSD_STORAGE_DIR=str(home / "artifacts"), DOPSD_DEV_API_KEY=key,
            DOPSD_ENVIRONMENT="development", DOPSD_MAINTENANCE_IN_API="false", DOPSD_PUBLIC_URL=f"http://127.0.0.1:{port}",
            PYTHONPATH=str(Path(__file__).resolve().parents[1]),
        )  # fmt: skip
        if args.raise_limits:
            env.update(
                DOPSD_MAX_IMAGE_PIXELS=str(64_000_000),
                DOPSD_MAX_REQUEST_PIXELS=str(64_000_000 * 64),
                DOPSD_UPLOAD_PIXELS_PER_MINUTE=str(10**13),
            )
        try:
            api = stack.start_api(env, port, home / "api.log")
        except TimeoutError:
            print((home / "api.log").read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        try:
            runs = [
                measure(f"http://127.0.0.1:{port}", key, psutil.Process(api.pid), files) for _ in range(args.repeat)
            ]
        finally:
            stack.stop(api, timeout_s=10)
    print(json.dumps({"bench": "upload_cost", "images": args.images, "side": args.side, "format": args.format,
                      "image_bytes": len(png), "runs": runs}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
