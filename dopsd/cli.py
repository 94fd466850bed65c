"""`dopsd` command line: `train`, `models list`, `models export`.

Every `DOPSDConfig` setting is a flag (`--learning-rate 1e-4`), plus the short forms it declares (`--lr`).
Precedence: field defaults < preset defaults < `--config FILE` < flags. Bad input ends with one `error:` line and exit 2.
`train --num-processes N` runs the same command as N ranks of one torchrun group (`dopsd.distributed`) and ends
with the group's exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import typing
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from dopsd.config import DOPSDConfig, Setting, settings
from dopsd.presets import PRESETS, get_preset


_SKIP = {"captions"}  # given as a file with --captions


def _flag_kwargs(s: Setting) -> dict[str, Any]:
    """argparse options of a setting's flag: its type (or choices, `nargs` for lists, on/off for booleans)."""
    kwargs: dict[str, Any] = {"dest": s.name, "default": argparse.SUPPRESS, "help": s.help}
    base = s.value_type
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(base) in (list, tuple):  # `--sample-seeds 0 1`, `--output-formats diffusers comfyui`
        kwargs["nargs"] = "+"
        item = typing.get_args(base)[0]
        kwargs.update({"choices": s.choices} if s.choices is not None else {"type": item})
    elif s.choices is not None:
        kwargs["choices"] = s.choices
    else:
        kwargs["type"] = base
    return kwargs


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per `DOPSDConfig` setting (`--learning-rate`), plus its declared short forms (`--lr`)."""
    for s in settings():
        if s.name not in _SKIP:
            parser.add_argument(f"--{s.name.replace('_', '-')}", *s.declaration.aliases, **_flag_kwargs(s))


def build_parser() -> argparse.ArgumentParser:
    """The full `dopsd` argument parser."""
    parser = argparse.ArgumentParser(prog="dopsd", description="D-OPSD LoRA training for step-distilled models")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a LoRA adapter on a few images of a concept")
    train.add_argument("--config", type=Path, help="JSON file of DOPSDConfig fields (flags override it)")
    train.add_argument("--captions", type=Path, dest="captions_file", help="JSON: file name -> caption or list")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="with --num-processes > 1: start the group again up to N times after a rank fails; a restarted group "
        "resumes from the newest checkpoint in --out (torchrun's elastic restarts)",
    )
    _add_config_flags(train)

    models = sub.add_parser("models", help="list presets or export a tiny base pipeline")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("list", help="list the model presets")
    export = models_sub.add_parser("export", help="write a tiny preset's base pipeline with save_pretrained")
    export.add_argument("preset", choices=sorted(PRESETS))
    export.add_argument("directory", type=Path)
    export.add_argument("--teacher-encoder", type=Path, help="also write the tiny teacher VLM, as a Qwen3-VL folder")
    export.add_argument("--max-shard-size", help="split the weights into shards with an index (e.g. 200KB)")

    # Other installed packages (the service: `keys`, `serve`) add their commands through this entry point
    # group, so the library never imports them.
    for entry in entry_points(group="dopsd.commands"):
        entry.load()(sub)
    return parser


def _config_from_args(ns: argparse.Namespace) -> DOPSDConfig:
    from dopsd.data import load_captions_file

    values: dict[str, Any] = {}
    if ns.config is not None:
        values.update(json.loads(ns.config.read_text()))
    field_names = {s.name for s in settings()}
    values.update({k: v for k, v in vars(ns).items() if k in field_names})
    if "num_processes" not in values and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a rank torchrun started
        values["num_processes"] = int(os.environ["WORLD_SIZE"])
    if ns.captions_file is not None:
        values["captions"] = load_captions_file(ns.captions_file)
    if values.get("init_adapter"):  # a continued run keeps the adapter's rank and alpha unless told otherwise
        from dopsd.lora import init_adapter_settings

        for name, value in init_adapter_settings(values["init_adapter"]).items():
            values.setdefault(name, value)
    return DOPSDConfig.for_preset(**values)


def _launch(config: DOPSDConfig, argv: Sequence[str], max_restarts: int) -> int:
    """`dopsd train --num-processes N`: the same command as N ranks of one group through torchrun; the group's
    exit code. Rank 0 says what ended a run itself (done, bad input, stopped); a rank that died or crashed is said
    here, with the checkpoint to resume from."""
    from dopsd.checkpoint import list_checkpoints
    from dopsd.distributed import EXIT_CODES, launch

    outcome = launch(config.num_processes, argv, max_restarts=max_restarts)
    if outcome.exit_code not in EXIT_CODES and outcome.message:
        print(f"error: {outcome.message}", file=sys.stderr)
        if list_checkpoints(Path(config.output_dir) / "checkpoints"):
            print(f"resume with --resume {config.output_dir}", file=sys.stderr)
    return outcome.exit_code


def _train(ns: argparse.Namespace, argv: Sequence[str]) -> int:
    config = _config_from_args(ns)
    if config.num_processes > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _launch(config, argv, ns.max_restarts)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # only rank 0 of a group reports; every rank trains
    from dopsd.callbacks import StepState, TrainerCallback, TrainerControl
    from dopsd.errors import TeacherBlind, TrainingCancelled
    from dopsd.evaluation.report import Report
    from dopsd.trainer import train

    class CliCallback(TrainerCallback):
        """Progress bar, and Ctrl-C as a clean stop: checkpoint, then exit."""

        def __init__(self) -> None:
            self.bar: Any = None
            self.stop = False
            self.report: Report | None = None
            signal.signal(signal.SIGINT, self._interrupt)

        def _interrupt(self, *_: object) -> None:
            if self.stop:  # a second Ctrl-C stops at once
                raise KeyboardInterrupt
            self.stop = True

        def on_train_begin(self, total_steps: int, start_step: int) -> None:
            if not ns.quiet:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, desc="D-OPSD", unit="step")

        def on_step_end(self, state: StepState) -> TrainerControl:
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix(loss=f"{state.loss:.4g}")
            return TrainerControl(should_stop=self.stop)

        def on_evaluation(self, report: Report) -> None:
            if not report.quick:
                self.report = report
            elif self.bar is not None:
                self.bar.write(
                    f"step {report.step}: concept {report.concept.verdict}, "
                    f"few-step quality {report.few_step_quality.verdict}"
                )

        def on_train_end(self, output_dir: Path) -> None:
            if self.bar is not None:
                self.bar.close()

    callback = CliCallback() if main_rank else None
    try:
        result = train(config, [callback] if callback is not None else [])
    except TrainingCancelled as exc:
        if main_rank:
            print(f"stopped after step {exc.step}; resume with --resume {exc.checkpoint_dir}", file=sys.stderr)
        return 130
    except TeacherBlind as exc:
        if main_rank:
            print(f"error: teacher_blind: {exc.message} (--force trains anyway)", file=sys.stderr)
        return 3
    if callback is None:
        return 0
    gap = result.metrics["teacher_student_gap"]
    for warning in result.warnings:  # a stage after training failed; the adapter is written all the same
        print(f"warning: {warning.stage}: {warning.message}", file=sys.stderr)
    print(f"adapter: {result.adapter_path}")
    if gap["relative_change"] is not None:
        print(f"teacher-student gap: {gap['before']:.4g} -> {gap['after']:.4g} ({gap['relative_change']:+.0%})")
    if result.metrics.get("init_adapter"):
        started = result.metrics["init_adapter"]
        print(f"continued: {started['source']} ({started['steps'] or '?'} steps) + {result.metrics['steps']} steps")
    print(f"samples: {result.output_dir / 'samples'}")
    if callback.report is not None:
        print(callback.report.render_text())
        print(f"report: {result.output_dir / 'report.json'}")
    return 0


def _models(ns: argparse.Namespace) -> int:
    if ns.models_command == "list":
        for preset in PRESETS.values():
            print(f"{preset.name:16} {preset.description}")
        return 0
    from dopsd.models.loading import export_base_pipeline

    path = export_base_pipeline(
        get_preset(ns.preset), ns.directory, teacher_directory=ns.teacher_encoder, max_shard_size=ns.max_shard_size
    )
    print(f"exported {ns.preset} to {path} (load it with its diffusers pipeline's from_pretrained)")
    if ns.teacher_encoder is not None:
        print(f"exported its teacher encoder to {ns.teacher_encoder} (a Qwen3-VL model folder)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dopsd` command."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never hang on a hub the machine cannot reach
    args = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(args)
    from dopsd.errors import CheckpointError, ModelLoadError

    try:
        if ns.command == "train":
            return _train(ns, args)
        if ns.command == "models":
            return _models(ns)
        return int(ns.func(ns))
    except (ValueError, CheckpointError, ModelLoadError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
