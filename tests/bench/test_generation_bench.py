"""The generation benchmark's quick mode on both tiny presets: every latency and throughput figure, their ratios
consistent with the times, the batching tolerance, and the `--gpu` configuration reported as unmeasured without a
GPU; the JSON line comes last."""

from __future__ import annotations

import pytest
import torch

from tests.bench.conftest import run_bench


@pytest.mark.parametrize("preset", ["tiny-z-image", "tiny-flux2-klein"])
def test_quick_mode_reports_latency_and_throughput_side_by_side(preset: str) -> None:
    (record,) = run_bench("generation.py", "--quick", "--preset", preset, "--threads", "1", timeout_s=300)
    assert record["bench"] == "generation" and record["preset"] == preset and record["measured"] is True
    assert (record["width"], record["height"], record["batch"], record["repeats"]) == (64, 64, 2, 2)
    for key in ("import_s", "base_s", "warm_s", "first_use_s", "cold_s", "cold_load_s", "batched_s", "unbatched_s"):
        assert record[key] > 0, key
    assert record["cold_s"] > record["cold_load_s"]  # the load, then the first request with an adapter
    assert record["first_use_over_warm"] == pytest.approx(record["first_use_s"] / record["warm_s"], rel=0.01)
    assert record["cold_over_warm"] == pytest.approx(record["cold_s"] / record["warm_s"], rel=0.01)
    assert record["batched_speedup"] == pytest.approx(record["unbatched_s"] / record["batched_s"], rel=0.01)
    assert record["batched_images_per_s"] == pytest.approx(2 / record["batched_s"], rel=0.01)
    assert record["batched_max_pixel_diff"] <= 1
    stats = record["cache_stats"]
    # Warm-up and 2 rounds: the warm adapter missed once, then hit twice; each of the 3 first uses missed.
    assert (stats["misses"], stats["hits"], stats["size"]) == (1 + 3, 2, 4) and record["adapter_mb"] > 0
    assert record["command"] == f"python bench/generation.py --quick --preset {preset} --threads 1"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, --gpu measures (and needs real weights)")
def test_gpu_configuration_is_marked_unmeasured_without_a_gpu() -> None:
    (record,) = run_bench("generation.py", "--gpu", timeout_s=120)
    assert record == {
        "bench": "generation", "preset": "z-image-turbo", "measured": False, "device": "cuda",
        "reason": "no CUDA device on this machine", "width": 1024, "height": 1024, "steps": 8,
        "command": "python bench/generation.py --gpu",
    }  # fmt: skip
