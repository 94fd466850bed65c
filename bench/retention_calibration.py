"""Continued runs on the tiny presets: where a run that continues an earlier adapter starts (its first loss and
its teacher-student gap against the parent's), and the retention figure in the situations its verdict must tell
apart, to place the `RetentionThresholds` (docs/evaluation.md, "Retention").

    python bench/retention_calibration.py            # bench/results/retention_calibration-cpu.jsonl

Per preset: a parent trained with the preset defaults on the bundled example concept (4 robot photos), then runs
that continue it through the public `train()` (`init_adapter` = the parent's folder): more steps on the same
concept (as many again, and a tenth), the same at a learning rate 100x lower, a second concept on top (synthetic
photos of a red disc, another trigger), a destructive learning rate of 0.5, and the plain continuation and the second
concept again with `init_teacher: base`; and, as a reference, an adapter trained from the base model on the same
concept with another seed (continuing nothing). Each adapter then renders the
parent's validation prompts at its sample seeds (`measure_retention`, pixel figure).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from dopsd import DOPSDConfig, train
from dopsd.data import load_captions_file
from dopsd.evaluation.adapters import attach_adapter_file, detach_adapter
from dopsd.evaluation.retention import load_reference, measure_retention, prepare_retention
from dopsd.lora import init_adapter_settings
from dopsd.models.loading import load_family_for


REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "concept"
RESULTS = REPO / "bench" / "results" / "retention_calibration-cpu.jsonl"


def disc_concept(folder: Path) -> Path:
    """Four synthetic photos of a red disc on differently coloured backdrops, a second concept."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        photo = Image.new("RGB", (96, 96), (40 * i, 120, 200 - 30 * i))
        ImageDraw.Draw(photo).ellipse((20 + 4 * i, 24, 72 + 4 * i, 76), fill=(230, 60, 40))
        photo.save(folder / f"disc-{i}.png")
    return folder


def config(preset: str, out: Path, images: Path, **overrides: Any) -> DOPSDConfig:
    values: dict[str, Any] = {
        "instance_data_dir": str(images),
        "output_dir": str(out),
        "sample_seeds": [0, 1],
        "eval_seeds": 0,  # the retention figure is measured below, on its own
    }
    if images == EXAMPLES:
        values["captions"] = load_captions_file(images / "captions.json")
    values.update(overrides)
    return DOPSDConfig.for_preset(preset, **values)


def retention_of(cfg: DOPSDConfig, adapter: Path, parent: Path) -> dict[str, Any]:
    family = load_family_for(cfg, device=torch.device("cpu"), dtype=torch.float32)
    reference = load_reference(parent)
    inputs = prepare_retention(family, reference, cfg.student_max_sequence_length)
    attach_adapter_file(family, adapter)
    try:
        section = measure_retention(family, inputs)
    finally:
        detach_adapter(family)
    fig = section["figures"]["retention_pixel"]
    return {"retention": fig["mean"], "ci95": fig["ci95"], "per_case": fig["per_seed"], "verdict": section["verdict"],
            "mse_new": fig["adapter"], "mse_base": fig["base"], "seconds": section["cost"]["seconds"]}  # fmt: skip


def calibrate(preset: str, root: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    parent_dir = root / preset / "parent"
    parent = train(config(preset, parent_dir, EXAMPLES))
    p_loss = parent.metrics["loss"]
    parent_steps = parent.metrics["steps"]
    disc = disc_concept(root / "disc")
    second = {"trigger": "zxq", "default_caption": "a photo of [V]"}
    scenarios: list[tuple[str, Path, dict[str, Any]]] = [
        ("same concept, as many steps again", EXAMPLES, {}),
        ("same concept, as many steps again, base teacher", EXAMPLES, {"init_teacher": "base"}),
        ("same concept, a tenth of the steps", EXAMPLES, {"max_train_steps": max(1, parent_steps // 10)}),
        ("same concept, learning rate / 100", EXAMPLES, {"learning_rate_factor": 0.01}),
        ("second concept on top", disc, second),
        ("second concept on top, base teacher", disc, {**second, "init_teacher": "base"}),
        ("destructive learning rate 0.5", EXAMPLES, {"learning_rate": 0.5, "max_train_steps": 20}),
    ]
    for name, images, overrides in scenarios:
        factor = overrides.pop("learning_rate_factor", None)
        out = root / preset / name.replace(" ", "-").replace(",", "").replace("/", "over")
        cfg = config(
            preset, out, images, init_adapter=str(parent_dir), **init_adapter_settings(parent_dir), **overrides
        )
        if factor is not None:
            cfg = cfg.with_changes(learning_rate=cfg.learning_rate * factor)
        start = time.perf_counter()
        child = train(cfg)
        row: dict[str, Any] = {"preset": preset, "scenario": name, "steps": child.metrics["steps"],
                               "learning_rate": cfg.learning_rate, "train_s": round(time.perf_counter() - start, 2)}  # fmt: skip
        gap = child.metrics["teacher_student_gap"]
        row["gap"] = {"parent_before": parent.metrics["teacher_student_gap"]["before"],
                      "parent_after": parent.metrics["teacher_student_gap"]["after"],
                      "child_before": gap["before"], "child_after": gap["after"]}  # fmt: skip
        if images == EXAMPLES:  # the same concept: where it starts
            last = p_loss[-5:]
            row["loss"] = {
                "parent_first": p_loss[0], "parent_last5_mean": statistics.mean(last),
                "parent_last5_stdev": statistics.stdev(last), "child_first": child.metrics["loss"][0],
                "child_first_over_parent_last5": child.metrics["loss"][0] / statistics.mean(last),
                "child_first_over_parent_first": child.metrics["loss"][0] / p_loss[0],
            }  # fmt: skip
        row.update(retention_of(cfg, child.adapter_path, parent_dir))
        rows.append(row)
        print(json.dumps(row), flush=True)
    fresh_cfg = config(preset, root / preset / "fresh", EXAMPLES, seed=1)
    fresh = train(fresh_cfg)
    row = {"preset": preset, "scenario": "a fresh adapter of the same concept (seed 1, continuing nothing)"}
    row.update(retention_of(fresh_cfg, fresh.adapter_path, parent_dir))
    rows.append(row)
    print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny-z-image", "tiny-flux2-klein"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/dopsd-retention-calibration"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    ns = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows = [row for preset in ns.presets for row in calibrate(preset, ns.work)]
    ns.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
