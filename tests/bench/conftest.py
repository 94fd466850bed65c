"""How the benchmark tests run a benchmark: as a user does, a subprocess from the repository root."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


REPO = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str, timeout_s: float = 240) -> list[dict[str, Any]]:
    """Runs `bench/<script>` with `args`; asserts it succeeded and returns the JSON lines it printed. Past
    `timeout_s` the benchmark gets SIGTERM, so it stops the servers it started (`stack.stop_on_sigterm`), and only
    then, if it must, SIGKILL."""
    proc = subprocess.Popen(
        [sys.executable, f"bench/{script}", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(f"bench/{script} ran past {timeout_s:.0f} s; its last output:\n{err[-4000:]}") from None
    assert proc.returncode == 0, err[-4000:]
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]
