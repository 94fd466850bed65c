"""The load bench's short mode against the production-shaped stack: no errors under concurrent polling."""

from __future__ import annotations

import json

from bench.load import run_load
from tests.conftest import Stack


def test_short_load_run_has_no_errors(prod_stack: Stack) -> None:
    keys = prod_stack.create_keys([f"load-{i}" for i in range(8)])  # as an operator makes them
    result = run_load(prod_stack.base_url, keys, clients=8, seconds=5, jobs=1, interval_s=0.05)
    for key in keys:  # the bench's jobs would keep the single worker busy for the tests after this one
        with prod_stack.client(key) as client:
            for job in client.get("/v1/jobs").raise_for_status().json()["data"]:
                client.post(f"/v1/jobs/{job['id']}/cancel")
    assert result["errors"] == 0, json.dumps(result)
    assert result["requests"] > 100 and result["p99_ms"] > 0
    print(json.dumps(result))
