"""`dopsd serve` stopped as a process manager stops it (SIGTERM to the service's process alone: `docker stop`,
systemd, `kill`) takes its worker processes with it, instead of leaving them running without their service."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts import stack


REPO = Path(__file__).resolve().parents[2]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(300)
def test_sigterm_to_the_service_stops_its_workers(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOPSD_")}
    env.update(
        DOPSD_ENVIRONMENT="development", DOPSD_DEV_API_KEY="dev-test-key", DOPSD_WORKER_TORCH_THREADS="1",
        HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO),
    )  # fmt: skip
    port = stack.free_port()
    log = tmp_path / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "dopsd", "serve", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        stack.wait_until(lambda: stack.http_ok(f"http://127.0.0.1:{port}/readyz"), "the service", timeout_s=120)
        stack.wait_until(lambda: log.read_bytes().count(b" ready.") >= 2, "both workers", timeout_s=180)
        process.send_signal(signal.SIGTERM)  # the service's process only, not its group
        assert process.wait(timeout=90) == 0
        deadline = time.monotonic() + 30
        while _group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_alive(process.pid), "a worker outlived the service:\n" + log.read_text()[-2000:]
    finally:
        if _group_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
