"""How the benchmark tests run a benchmark: as a user does, a subprocess from the repository root."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


REPO = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str, timeout_s: float = 240) -> list[dict[str, Any]]:
    """Runs `bench/<script>` with `args`; asserts it succeeded and returns the JSON lines it printed."""
    proc = subprocess.run(
        [sys.executable, f"bench/{script}", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout_s
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
