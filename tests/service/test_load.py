"""The load bench's short mode against the production-shaped stack: no errors under concurrent polling."""

from __future__ import annotations

import json

from bench.load import run_load
from tests.conftest import Stack


def test_short_load_run_has_no_errors(prod_stack: Stack) -> None:
    keys = prod_stack.create_keys([f"load-{i}" for i in range(8)])  # as an operator makes them
    result = run_load(prod_stack.base_url, keys, clients=8, seconds=5, jobs=1, interval_s=0.05)
    assert result["errors"] == 0, json.dumps(result)
    assert result["requests"] > 100 and result["p99_ms"] > 0
    print(json.dumps(result))
