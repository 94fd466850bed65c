"""The upload-cost benchmark runs in quick mode: one JSON line, the dry run accepted, the image decoded outside the
API process (its own memory stays where it was)."""

from __future__ import annotations

from tests.bench.conftest import run_bench


def test_quick_mode_prints_one_json_line_with_the_costs() -> None:
    (record,) = run_bench("upload_cost.py", "--quick")
    assert record["bench"] == "upload_cost" and record["images"] == 1 and record["side"] == 2000
    assert len(record["runs"]) == 2
    for run in record["runs"]:
        assert run["status"] == 200 and run["code"] is None, run
        assert run["seconds"] > 0 and run["healthz_n"] >= 1
        assert run["api_process_rss_peak_growth_mb"] < 10, run  # 12 MB if the API decoded the 2000x2000 RGB itself
