"""The service benchmark's quick mode against its own production-shaped stack on loopback (PostgreSQL, Redis,
SeaweedFS, uvicorn, a Celery worker): every figure is reported, no request fails, uploads stream."""

from __future__ import annotations

from pathlib import Path

from tests.bench.conftest import run_bench


REPO = Path(__file__).resolve().parents[2]


def test_quick_mode_reports_dispatch_startup_polling_and_upload() -> None:
    (record,) = run_bench("service.py", "--quick")
    assert record["bench"] == "service" and record["quick"] is True
    dispatch = record["dispatch"]
    assert dispatch["jobs"] == 2 and len(dispatch["dispatch_server_ms"]) == 2
    assert 0 < dispatch["dispatch_server_p50_ms"] < 60_000
    assert dispatch["startup_cold"]["model_cached"] is False
    assert dispatch["startup_warm_cached"] is True  # the second job found the model in the worker's cache
    assert dispatch["startup_warm_p50"]["to_training_ms"] > 0
    polling = record["polling"]
    assert polling["errors"] == 0 and polling["requests"] > 10 and polling["p99_ms"] >= polling["p50_ms"] > 0
    # The API's own histogram saw the same polls (the client's count, give or take the requests in flight at a scrape).
    assert abs(polling["server"]["requests"] - polling["requests"]) <= 8, polling
    assert record["server"] == "auto" and 0 <= polling["server"]["share_over_50ms"] <= 1
    upload = record["upload"]
    assert upload["big"]["files"] == 8 and upload["big"]["bytes"] > 39_000_000
    # Streamed to disk: the API's peak memory does not follow the upload's size (held in memory it would be ~1).
    assert upload["rss_growth_per_upload_mb"] < 0.25, upload
