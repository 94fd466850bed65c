"""Schemathesis fuzzes the whole API from its own OpenAPI schema: whatever it sends, no 5xx."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import REPO, Stack


def test_no_server_errors_for_generated_requests(prod_stack: Stack) -> None:
    key = prod_stack.create_key("fuzz")
    st = Path(sys.executable).with_name("st")
    result = subprocess.run(
        [
            str(st), "run", f"{prod_stack.base_url}/openapi.json",
            "--header", f"Authorization: Bearer {key}",
            "--checks", "not_a_server_error",
            "--max-examples", "25",
            "--generation-deterministic",
            "--phases", "examples,coverage,fuzzing",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    schema = httpx.get(f"{prod_stack.base_url}/openapi.json", timeout=30).json()
    operations = sum(len(methods) for methods in schema["paths"].values())
    assert f"Tested: {operations}" in result.stdout, result.stdout[-3000:]
