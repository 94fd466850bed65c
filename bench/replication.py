"""The method's claim in miniature, on the `shapes` world (issue 16, docs/replication.md): all arms in one run, on
the same reference images and seeds, measured with the world's ground truth.

Arms (each a LoRA of the preset's rank, alpha and target modules, `--steps` steps at `--lr`):
- `base`: the few-step model unchanged;
- `sft`: DreamBooth-style flow-matching LoRA on the few-step model, on the reference images and their captions;
- `sft_base_to_few_step`: the same SFT on the many-step base model, the adapter then applied to the few-step model
  (the community's workaround; only when `--few-step` names another model than `--base`);
- `dopsd_ema`, `dopsd_frozen`, `dopsd_live`: D-OPSD through `dopsd.trainer.train` itself, with each teacher mode.

Per arm and training seed, at 4 sampling steps (the few-step setting) and at `--control-steps` (a many-step
control): the concept rate (the trigger caption in every colour pair, classified as the cross), the prior's shape
accuracy, colour purity, Frechet distance to renders and spread (`dopsd.shapes.gates.prior_metrics`), and for the
D-OPSD arms the evaluation report's verdicts beside those figures (part 6: does "learned" coincide with a concept
rate above the base's, "degraded" with a fall of prior accuracy?). Means over seeds come with 95% t-intervals.

    python bench/replication.py                 # the full run: 3 seeds, 200 steps, 96 samples per probe
    python bench/replication.py --quick         # the shipped weights, 1 seed, 10 steps, 12 samples (make test)

One JSON line per (arm, seed), then the summary line last, like the other benchmarks.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig
from PIL import Image


REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dopsd.config import DOPSDConfig  # noqa: E402
from dopsd.lora import make_lora_config  # noqa: E402
from dopsd.models.shapes import ShapesPipeline, pixels_from_image, weights_path  # noqa: E402
from dopsd.presets import get_preset  # noqa: E402
from dopsd.shapes import gates, world  # noqa: E402
from dopsd.shapes.metrics import (  # noqa: E402
    NONE,
    ShapeClassifier,
    classify,
    colour_purity,
    diversity,
    load_classifier,
)
from dopsd.shapes.model import ShapesModel, load_model, patchify, to_uint8  # noqa: E402
from dopsd.trainer import train  # noqa: E402


DOPSD_ARMS = {"dopsd_ema": "ema", "dopsd_frozen": "frozen", "dopsd_live": "live"}
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # two-sided 95% t quantiles by degrees of freedom


def reference_set(seed: int, n: int, folder: Path) -> dict[str, list[str]]:
    """`n` renders of the new concept for training seed `seed`, written to `folder`; returns their captions."""
    rng = np.random.default_rng([seed, 16])
    captions = {}
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(world.concept_scenes(rng, n)):
        name = f"cross-{i}.png"
        Image.fromarray(world.render(scene)).save(folder / name)
        captions[name] = [scene.caption()]
    return captions


def concept_rate(
    model: ShapesModel, classifier: ShapeClassifier, *, steps: int, n: int, seed: int
) -> dict[str, float]:
    """The trigger caption over every (colour, background) pair, `n` samples: the fraction drawn as the cross, and
    the spread of what was drawn (position and size, as for the prior; the references' own spread is about 1.2 px),
    so an adapter that draws one averaged cross wherever the noise says otherwise shows as a spread near 0."""
    pairs = [(c, b) for c in world.COLOURS for b in world.COLOURS if c != b]
    chosen = [pairs[i % len(pairs)] for i in range(n)]
    captions = [f"a {c} {world.TRIGGER} on a {b} background" for c, b in chosen]
    images = to_uint8(model.sample(captions, steps=steps, generator=torch.Generator().manual_seed(seed)))
    predicted = classify(classifier, images)
    spread = diversity(list(images), [c for c, _ in chosen])
    return {
        "concept_rate": float(np.mean([p == world.NEW_CONCEPT for p in predicted])),
        "concept_no_shape_rate": float(np.mean([p == NONE for p in predicted])),
        "concept_purity": float(np.mean([colour_purity(im, c, b) for im, (c, b) in zip(images, chosen, strict=True)])),
        **{f"concept_spread_{k}": v for k, v in spread.items() if k != "found"},
    }


def measure(model: ShapesModel, classifier: ShapeClassifier, *, steps: int, n: int, seed: int) -> dict[str, float]:
    """Ground-truth figures of a model (adapters active) at `steps` sampling steps."""
    prior = gates.prior_metrics(model, classifier, steps=steps, n=n, seed=seed)
    out = {f"prior_{k}": v for k, v in prior.items() if not k.startswith("render_")}
    out.update(concept_rate(model, classifier, steps=steps, n=n, seed=seed))
    return out


def sample_sheet(model: ShapesModel, path: Path, *, seed: int, per_row: int = 12, scale: int = 6) -> None:
    """A PNG of what an arm draws at 4 steps: one row of prior prompts (the base shapes in turn), one of trigger
    captions in two colour pairs; the same captions and noise for every arm, so sheets compare side by side."""
    rng = np.random.default_rng([seed, 7])
    prior = [world.sample_scene(rng, world.BASE_SHAPES[i % len(world.BASE_SHAPES)]).caption() for i in range(per_row)]
    half = per_row // 2
    trigger = [f"a red {world.TRIGGER} on a blue background"] * half
    trigger += [f"a green {world.TRIGGER} on a red background"] * (per_row - half)
    rows = []
    for captions in (prior, trigger):
        images = to_uint8(model.sample(captions, steps=4, generator=torch.Generator().manual_seed(seed)))
        rows.append(np.concatenate([np.pad(im, ((1, 1), (1, 1), (0, 0)), constant_values=128) for im in images], 1))
    sheet = np.concatenate(rows, axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).resize((sheet.shape[1] * scale, sheet.shape[0] * scale), Image.Resampling.NEAREST).save(
        path
    )


def sft_adapter(
    weights: Path, captions: dict[str, list[str]], folder: Path, *, steps: int, lr: float, seed: int
) -> dict[str, torch.Tensor]:
    """A flow-matching (DreamBooth-style) LoRA trained on `weights`: klein's loss v = noise - x0 at logit-normal
    sigma on the reference images with their captions, batch = all references, AdamW, clip 1. Returns the adapter's
    state (peft keys) to load into any model of the same shape."""
    from peft import get_peft_model_state_dict

    model = load_model(weights)
    model.transformer.add_adapter(shapes_lora_config())
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    names = sorted(captions)
    x0 = torch.stack([pixels_from_image(Image.open(folder / n)) for n in names])
    text = model.text.encode([captions[n][0] for n in names]).detach()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=gen))
        s = sigma.view(-1, 1, 1, 1)
        v = model.velocity((1 - s) * x0 + s * noise, sigma, text)
        loss = torch.mean((patchify(v) - patchify(noise - x0)) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model.transformer).items()}


def shapes_lora_config() -> LoraConfig:
    """The `shapes` preset's LoRA (its rank and alpha, on the family's target modules), as every arm uses it."""
    from dopsd.models.shapes import ShapesFamily

    preset = get_preset("shapes")
    return make_lora_config(
        int(preset.defaults["rank"]), float(preset.defaults["lora_alpha"]), 0.0, ShapesFamily.lora_target_modules
    )


def with_adapter(weights: Path, state: dict[str, torch.Tensor] | None) -> ShapesModel:
    """The model of `weights` with an adapter state loaded and active (none: the model as it is)."""
    from peft import set_peft_model_state_dict

    model = load_model(weights)
    if state is not None:
        model.transformer.add_adapter(shapes_lora_config())
        result = set_peft_model_state_dict(model.transformer, state)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"adapter keys that do not fit: {result.unexpected_keys[:3]}")
    return model.eval()


def dopsd_arm(
    weights: Path, captions: dict[str, list[str]], folder: Path, out: Path, *, mode: str, steps: int, lr: float,
    seed: int, eval_seeds: int, options: dict[str, Any] | None = None,
) -> tuple[ShapesModel, dict[str, Any]]:  # fmt: skip
    """D-OPSD through the trainer itself, teacher mode `mode` and any other `DOPSDConfig` `options` (an ablation);
    returns the tuned model and the report's verdicts."""
    cfg = DOPSDConfig.for_preset(
        preset="shapes", pretrained_model_name_or_path=str(weights), instance_data_dir=str(folder),
        captions=captions, max_train_steps=steps, learning_rate=lr, teacher_mode=mode, seed=seed,
        output_dir=str(out), eval_seeds=eval_seeds, sample_every=0, force=True, **(options or {}),
    )  # fmt: skip
    train(cfg)
    pipe = ShapesPipeline.from_weights(str(weights))
    pipe.load_lora_weights(str(out / "pytorch_lora_weights.safetensors"))
    model = load_model(weights)
    model.transformer, model.text = pipe.transformer, pipe.text_encoder
    report_path = out / "report.json"
    verdicts: dict[str, Any] = {}
    if report_path.exists():
        report = json.loads(report_path.read_text())
        verdicts = {k: v["verdict"] for k, v in report["verdicts"].items()}
        for name in ("concept_gap", "reference_similarity"):  # the two figures behind the concept verdict
            figure = report["figures"].get(name) or {}
            verdicts[name] = {"mean": figure.get("mean"), "ci95": figure.get("ci95"), "verdict": figure.get("verdict")}
        check = report.get("teacher_check") or {}
        verdicts["teacher_blind"] = check.get("blind")
        verdicts["teacher_visibility"] = check.get("visibility")
    return model.eval(), verdicts


def interval(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and 95% t-interval half-width over seeds (`None` with one seed)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return {"mean": mean, "ci95": None}
    sd = float(np.std(values, ddof=1))
    return {"mean": mean, "ci95": T95.get(len(values) - 1, 2.0) * sd / math.sqrt(len(values))}


def gate_figures(args: argparse.Namespace) -> dict[str, Any]:
    """The world's gates on the few-step model at 4 steps, beside the base at `--control-steps` (the distilled
    model's margin): prior accuracy, teacher concept rate with a reference, trigger rate without."""
    classifier = load_classifier()
    few = gates.measure(load_model(weights_path(args.few_step)), classifier, steps=4, n=args.n)
    base = gates.prior_metrics(
        load_model(weights_path(args.base)), classifier, steps=args.control_steps, n=args.n, seed=0
    )
    return {
        "prior_accuracy@4": few["prior"]["accuracy"],  # type: ignore[index]
        "base_prior_accuracy@control": base["accuracy"],
        "teacher_concept_rate@4": few["teacher_concept_rate"],
        "trigger_text_concept_rate@4": few["trigger_text_concept_rate"],
        "copy_known_shapes_accuracy@4": few["copy_known_shapes_accuracy"],
        "passed": few["gates"],
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every arm on every seed; one record each (printed as it completes)."""
    torch.set_num_threads(args.threads)
    base, few_step = weights_path(args.base), weights_path(args.few_step)
    classifier = load_classifier()
    arms = [a for a in args.arms if a != "sft_base_to_few_step" or base != few_step]
    records = []
    with tempfile.TemporaryDirectory(prefix="dopsd-replication-") as tmp:
        for seed in args.seeds:
            folder = Path(tmp) / f"refs-{seed}"
            captions = reference_set(seed, args.references, folder)
            for arm in arms:
                t0 = time.perf_counter()
                verdicts: dict[str, Any] = {}
                if arm == "base":
                    model = with_adapter(few_step, None)
                elif arm == "sft":
                    model = with_adapter(
                        few_step, sft_adapter(few_step, captions, folder, steps=args.steps, lr=args.lr, seed=seed)
                    )
                elif arm == "sft_base_to_few_step":
                    model = with_adapter(
                        few_step, sft_adapter(base, captions, folder, steps=args.steps, lr=args.lr, seed=seed)
                    )
                else:
                    model, verdicts = dopsd_arm(
                        few_step, captions, folder, Path(tmp) / f"{arm}-{seed}", mode=DOPSD_ARMS[arm],
                        steps=args.steps, lr=args.lr, seed=seed, eval_seeds=args.eval_seeds,
                        options=args.dopsd_option,
                    )  # fmt: skip
                train_s = time.perf_counter() - t0
                record: dict[str, Any] = {
                    "bench": "replication",
                    "arm": arm,
                    "seed": seed,
                    "train_s": round(train_s, 2),
                }
                with torch.no_grad():
                    for steps in (4, args.control_steps):
                        figures = measure(model, classifier, steps=steps, n=args.n, seed=1000 + seed)
                        record.update({f"{k}@{steps}": round(v, 4) for k, v in figures.items()})
                    if args.sheets and seed == args.seeds[0]:
                        sample_sheet(model, Path(args.sheets) / f"{arm}.png", seed=seed)
                if verdicts:
                    record["report"] = verdicts
                record["seconds"] = round(time.perf_counter() - t0, 2)
                sys.stdout.write(json.dumps(record) + "\n")
                sys.stdout.flush()
                records.append(record)
    return records


def summarise(records: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Per arm: mean and interval of each figure over seeds; how the report's verdicts line up with ground truth."""
    arms: dict[str, Any] = {}
    keys = [k for k in records[0] if "@" in k]
    for arm in dict.fromkeys(r["arm"] for r in records):
        rows = [r for r in records if r["arm"] == arm]
        arms[arm] = {k: interval([r[k] for r in rows]) for k in keys}
    base_rows = {r["seed"]: r for r in records if r["arm"] == "base"}
    agreement = []
    for r in records:
        if "report" in r and r["seed"] in base_rows:
            b = base_rows[r["seed"]]
            agreement.append({
                "arm": r["arm"], "seed": r["seed"], "concept": r["report"].get("concept"),
                "concept_rate_above_base": r["concept_rate@4"] > b["concept_rate@4"],
                "few_step_quality": r["report"].get("few_step_quality"),
                "prior_accuracy_fell": r["prior_accuracy@4"] < b["prior_accuracy@4"],
            })  # fmt: skip
    return {
        "bench": "replication_summary",
        "command": "python bench/replication.py" + (" --quick" if args.quick else ""),
        "seeds": list(args.seeds), "steps": args.steps, "lr": args.lr, "n": args.n, "references": args.references,
        "dopsd_options": args.dopsd_option,
        "few_step": args.few_step, "base": args.base, "arms": arms, "report_vs_ground_truth": agreement,
    }  # fmt: skip


def _option(parser: argparse.ArgumentParser, text: str) -> tuple[str, Any]:
    """`KEY=VALUE`, the value read as JSON where it parses (numbers, booleans) and as a string otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        parser.error(f"--dopsd-option needs KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Options; `--quick` sets the small run `make test` uses."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, 10 steps, 12 samples per probe")
    p.add_argument("--base", default="shapes://base", help="the many-step base model")
    p.add_argument("--few-step", default=get_preset("shapes").base_model, help="the few-step model users tune")
    p.add_argument("--arms", nargs="+", default=["base", "sft", "sft_base_to_few_step", *DOPSD_ARMS])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=float(get_preset("shapes").defaults["learning_rate"]))
    p.add_argument("--n", type=int, default=96, help="samples per probe")
    p.add_argument("--references", type=int, default=6)
    p.add_argument("--control-steps", type=int, default=20)
    p.add_argument("--eval-seeds", type=int, default=4, help="the D-OPSD arms' report seeds (0: no report)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sheets", metavar="DIR", help="write each arm's sample sheet (first seed) to DIR/<arm>.png")
    p.add_argument("--dopsd-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a DOPSDConfig field for the D-OPSD arms (an ablation, e.g. loss_space=velocity); repeatable")  # fmt: skip
    args = p.parse_args(argv)
    args.dopsd_option = dict(_option(p, o) for o in args.dopsd_option)
    if args.quick:
        args.seeds, args.steps, args.n, args.eval_seeds = [0], 10, 12, 1
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the arms and prints the summary line last."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    gate = gate_figures(args)
    sys.stdout.write(json.dumps({"bench": "replication_gates", **gate}) + "\n")
    records = run(args)
    summary = summarise(records, args)
    summary["gates"] = gate
    sys.stdout.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
