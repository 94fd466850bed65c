"""Cost of the evaluation report and of the fail-fast gate against training steps, and the measurements its
verdict thresholds are chosen from.

Cost (default): per tiny preset, one run in one process on the same model: `dopsd.trainer.train()` for the preset's
default steps (timed per step through a callback), then on the trained adapter the gate (`teacher_visibility`), the
base renders (`measure_base`, once per job), the full report (`measure`) and the in-training subset
(`measure(quick=True)`); each as seconds, forward passes and a ratio to the training time. Then an arithmetic
estimate (forward passes, not a measurement) for the real presets' default settings against the issue's ~5% goal.
`--calibrate`: per tiny preset, reports of adapters trained normally (two seeds) and with a destructive learning
rate, and the gate on the normal teacher against blind ones; the figures docs/evaluation.md chooses thresholds from.

    python bench/evaluation_cost.py [--presets tiny-z-image,tiny-flux2-klein] [--quick] [--calibrate]

One JSON line per measurement, the summary line last (as `bench/step_cost.py` does).
"""

from __future__ import annotations

import os


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python bench/evaluation_cost.py`

from dopsd.callbacks import StepState, TrainerCallback, TrainerControl
from dopsd.config import DOPSDConfig
from dopsd.data import image_files, load_image, resolve_caption
from dopsd.evaluation import (
    EvaluationInputs,
    attach_adapter_file,
    detach_adapter,
    measure,
    measure_base,
    prepare_evaluation,
    prior_prompts_with,
    teacher_visibility,
)
from dopsd.evaluation.inputs import DEFAULT_CONSISTENCY_FACTOR, DEFAULT_CONSISTENCY_PROMPTS
from dopsd.evaluation.prompts import EVAL_SEEDS, PRIOR_PROMPTS
from dopsd.models.base import ModelFamily
from dopsd.models.flux2_klein import Flux2KleinFamily, KleinCond
from dopsd.models.loading import load_family_for
from dopsd.presets import DEFAULT_VALIDATION_PROMPTS, get_preset
from dopsd.trainer import train


warnings.filterwarnings("ignore", message="Already found a `peft_config`")
REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "concept"
DESTRUCTIVE_LR = 0.5


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, from one `on_step_end` to the next (the first from `on_train_begin`)."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_train_begin(self, total_steps: int, start_step: int) -> None:
        self.marks = [time.perf_counter()]

    def on_step_end(self, state: StepState) -> TrainerControl | None:
        self.marks.append(time.perf_counter())
        return None

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


def run_config(preset: str, out: Path, **overrides: Any) -> DOPSDConfig:
    """A run of `preset` on the bundled example concept (sampling off, so the loop times training steps only)."""
    values: dict[str, Any] = {
        "instance_data_dir": str(EXAMPLES),
        "captions": json.loads((EXAMPLES / "captions.json").read_text()),
        "output_dir": str(out),
        "trigger": "sks",
        "sample_every": 0,
    }
    values.update(overrides)
    return DOPSDConfig.for_preset(preset, **values)


def evaluation_inputs(
    family: ModelFamily, cfg: DOPSDConfig, *, seeds: list[int], resolution: int | None = None
) -> EvaluationInputs:
    """The evaluation set a job of `cfg` would prepare: its validation prompts, the built-in prior prompts, the
    example images as references, the preset's native steps."""
    side = resolution or cfg.resolution
    references = [(p.name, load_image(p, min_side=32, name=p.name)) for p in image_files(EXAMPLES)]
    return prepare_evaluation(
        family,
        references=references,
        concept_prompts=[resolve_caption(p, cfg.trigger) for p in cfg.validation_prompts],
        prior_prompts=prior_prompts_with(None),
        seeds=seeds,
        width=side,
        height=side,
        num_steps=cfg.sample_steps,
        text_max_length=cfg.student_max_sequence_length,
        context_max_length=cfg.teacher_max_sequence_length,
    )


def trained(preset: str, out: Path, **overrides: Any) -> tuple[DOPSDConfig, Path, list[float]]:
    """Trains through the public `train()`; returns the config, the adapter file and the per-step seconds."""
    cfg = run_config(preset, out, **overrides)
    timer = StepTimer()
    result = train(cfg, [timer])
    return cfg, result.adapter_path, timer.step_seconds()


def fresh_family(cfg: DOPSDConfig) -> ModelFamily:
    """The preset's model on the CPU in fp32 (the tiny presets' own setting)."""
    return load_family_for(cfg, device=torch.device("cpu"), dtype=torch.float32)


def summary(report_dict: dict[str, Any]) -> dict[str, Any]:
    """A report's verdicts and each figure's mean, interval, noise floor and verdict."""
    figures = {
        name: {k: fig[k] for k in ("mean", "ci95", "noise_floor", "base", "adapter", "verdict", "not_measured")}
        for name, fig in report_dict["figures"].items()
    }
    verdicts = {axis: v["verdict"] for axis, v in report_dict["verdicts"].items()}
    return {"verdicts": verdicts, "figures": figures}


def bench_cost(preset: str, *, quick: bool) -> dict[str, Any]:
    """Trains `preset` with its defaults, then times the gate and the evaluation on the result in the same process."""
    seeds = list(EVAL_SEEDS[:2] if quick else EVAL_SEEDS)
    steps = 8 if quick else None
    with tempfile.TemporaryDirectory() as tmp:
        cfg, adapter, step_s = trained(preset, Path(tmp) / "run", **({"max_train_steps": steps} if steps else {}))
        family = fresh_family(cfg)
        t0 = time.perf_counter()
        inputs = evaluation_inputs(family, cfg, seeds=seeds)
        prepare_s = time.perf_counter() - t0
        gate = teacher_visibility(family, inputs)
        base = measure_base(family, inputs)
        attach_adapter_file(family, adapter)
        full = measure(family, inputs)
        quick_report = measure(family, inputs, quick=True)
        detach_adapter(family)
    per_step = statistics.median(step_s)
    train_s = per_step * cfg.max_train_steps
    eval_s = base.seconds + full.cost["seconds"]
    return {
        "bench": "evaluation_cost",
        "preset": preset,
        "quick": quick,
        "train_steps": cfg.max_train_steps,
        "train_step_s": round(per_step, 5),
        "resolution": cfg.resolution,
        "native_steps": cfg.sample_steps,
        "seeds": len(seeds),
        "prepare_s": round(prepare_s, 4),
        "gate_s": round(gate.seconds, 4),
        "gate_forwards": gate.forward_passes,
        "base_renders_s": round(base.seconds, 4),
        "base_forwards": base.forwards,
        "report_s": round(full.cost["seconds"], 4),
        "report_forwards": full.cost["forward_passes"],
        "quick_s": round(quick_report.cost["seconds"], 4),
        "quick_forwards": quick_report.cost["forward_passes"],
        "gate_over_training": round(gate.seconds / train_s, 4),
        "evaluation_over_training": round(eval_s / train_s, 4),
        "quick_over_training_step": round(quick_report.cost["seconds"] / per_step, 2),
        "verdicts": {"concept": full.concept.verdict, "few_step_quality": full.few_step_quality.verdict},
        "blind": gate.blind,
        "command": "python bench/evaluation_cost.py" + (" --quick" if quick else ""),
    }


def forward_estimate(preset: str, seeds: int = len(EVAL_SEEDS)) -> dict[str, Any]:
    """Arithmetic (an estimate, not a measurement): forward passes of the transformer at the preset's default
    resolution, a student forward+backward counted as 3 forwards (4 with gradient checkpointing, the CUDA default),
    the VAE decode of an image counted as one forward; batch 1."""
    p = get_preset(preset)
    steps, native = int(p.defaults["max_train_steps"]), p.native_sample_steps
    rollout_states = native if p.defaults.get("rollout_schedule") == "native" else 4
    train_forwards = steps * rollout_states * (1 + 4)  # teacher forward + checkpointed student forward/backward
    concept, prior = len(DEFAULT_VALIDATION_PROMPTS), len(PRIOR_PROMPTS)
    renders = (prior + concept) * seeds * native  # per model
    teacher = concept * seeds * native  # the frozen teacher read along the concept renders
    fine = DEFAULT_CONSISTENCY_PROMPTS * seeds * native * DEFAULT_CONSISTENCY_FACTOR
    decodes = (prior + concept) * seeds
    per_model = renders + teacher + fine + decodes
    gate = 4 * 2 * native + 4
    quick = 2 * native * 2 + 2 * native + 4  # 1 seed: 2 prior + 2 concept renders, the teacher, 4 decodes
    samples = steps // int(p.defaults["sample_every"]) if p.defaults.get("sample_every") else 0
    report = 2 * per_model  # base once + adapter
    return {
        "bench": "evaluation_cost_estimate",
        "preset": preset,
        "estimate": True,
        "train_steps": steps,
        "native_steps": native,
        "seeds": seeds,
        "train_forwards": train_forwards,
        "report_forwards": report,
        "gate_forwards": gate,
        "quick_forwards_each": quick,
        "sample_steps_in_run": samples,
        "report_over_training": round(report / train_forwards, 4),
        "gate_over_training": round(gate / train_forwards, 4),
        "quick_total_over_training": round(quick * samples / train_forwards, 4),
        "goal": 0.05,
    }


def imageless_name(family: ModelFamily) -> str:
    """What `imageless_teacher` builds for this family."""
    return "edit context without its reference tokens" if family.name == "flux2_klein" else "VLM given no image"


def imageless_teacher(family: ModelFamily, inputs: EvaluationInputs, cfg: DOPSDConfig) -> list[Any]:
    """The teacher context with the image left out: klein's edit prompt (caption + instruction) without reference
    tokens; Z-Image's VLM features of the caption alone (equal to the student's up to float rounding)."""
    if isinstance(family, Flux2KleinFamily):
        return [KleinCond(c.embeds) for c in inputs.teacher_conds]
    assert family.teacher_encoder is not None
    family.teacher_encoder.vlm.to(family.device)
    return [
        family.teacher_encoder.encode(None, p, max_length=cfg.teacher_max_sequence_length)
        for p in inputs.concept_prompts
    ]


def calibrate(preset: str) -> list[dict[str, Any]]:
    """Reports of a normal run (two seeds), a destructive-lr run, and the gate on the normal and blind teachers."""
    records: list[dict[str, Any]] = []
    runs: dict[str, dict[str, Any]] = {
        "normal-seed0": {"seed": 0},
        "normal-seed1": {"seed": 1},
        "destructive-lr": {"learning_rate": DESTRUCTIVE_LR},
    }
    with tempfile.TemporaryDirectory() as tmp:
        family: ModelFamily | None = None
        inputs: EvaluationInputs | None = None
        for name, overrides in runs.items():
            cfg, adapter, _ = trained(preset, Path(tmp) / name, **overrides)
            if family is None:
                family = fresh_family(cfg)
                inputs = evaluation_inputs(family, cfg, seeds=list(EVAL_SEEDS))
            assert inputs is not None
            attach_adapter_file(family, adapter)
            report = measure(family, inputs).to_dict()
            detach_adapter(family)
            records.append(
                {
                    "bench": "evaluation_calibration",
                    "preset": preset,
                    "run": name,
                    "learning_rate": cfg.learning_rate,
                    "steps": cfg.max_train_steps,
                    **summary(report),
                }
            )
        assert family is not None and inputs is not None
        teachers = {"normal": inputs.teacher_conds, "blind (student's own context)": inputs.concept_conds}
        teachers[imageless_name(family)] = imageless_teacher(family, inputs, cfg)
        for name, conds in teachers.items():
            gate = teacher_visibility(family, dataclasses.replace(inputs, teacher_conds=list(conds), baseline=None))
            records.append(
                {
                    "bench": "gate_calibration",
                    "preset": preset,
                    "teacher": name,
                    "blind": gate.blind,
                    "visibility": gate.visibility,
                    "visibility_per_case": gate.visibility_per_case,
                    "normalised_gap": gate.normalised_gap,
                    "reference_gain": gate.reference_gain,
                    "teacher_closer_fraction": gate.teacher_closer_fraction,
                    "seconds": gate.seconds,
                }
            )
    return records


def main(argv: list[str] | None = None) -> int:
    """Parses the command line, prints one JSON line per measurement and the summary line last."""
    parser = argparse.ArgumentParser(description="evaluation and gate cost against training; threshold data")
    parser.add_argument("--presets", default="tiny-z-image,tiny-flux2-klein")
    parser.add_argument("--quick", action="store_true", help="tiny-z-image only, 8 training steps, 2 seeds")
    parser.add_argument("--calibrate", action="store_true", help="the threshold measurements instead of the cost")
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    presets = ["tiny-z-image"] if args.quick else [p.strip() for p in args.presets.split(",") if p.strip()]
    records: list[dict[str, Any]] = []
    for preset in presets:
        for record in calibrate(preset) if args.calibrate else [bench_cost(preset, quick=args.quick)]:
            print(json.dumps(record), flush=True)
            records.append(record)
    estimates = [] if args.calibrate else [forward_estimate(p) for p in ("z-image-turbo", "flux2-klein-4b")]
    for record in estimates:
        print(json.dumps(record), flush=True)
    final = {
        "bench": "evaluation_calibration_summary" if args.calibrate else "evaluation_cost_summary",
        "presets": presets,
        "measured": [
            {k: r[k] for k in ("preset", "evaluation_over_training", "gate_over_training") if k in r}
            for r in records
            if r["bench"] == "evaluation_cost"
        ],
        "estimates": [
            {k: r[k] for k in ("preset", "report_over_training", "gate_over_training", "quick_total_over_training")}
            for r in estimates
        ],
        "command": "python bench/evaluation_cost.py"
        + (" --calibrate" if args.calibrate else "")
        + (" --quick" if args.quick else ""),
    }
    print(json.dumps(final), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
