"""Gate measurements of a `shapes` base model, before any tuning (issue 16's gates):

- prior: text-only prompts of the base shapes -> shape accuracy, colour purity and match, Frechet distance to fresh
  renders of the same captions, diversity (gate: accuracy at 4 steps >= 0.9 once a distilled model exists);
- teacher: the trigger caption ("a red [V] on a blue background") with a render of the NEW concept as the edit-branch
  reference (other colours, same place) -> concept rate (gate: >= 0.5);
- trigger: the same trigger caption without a reference -> concept rate (gate: near 0);
- copy control: base shapes with the neutral word and a reference -> shape accuracy (in-context copying of known
  shapes, which pretraining does train);
- teacher variation: one reference, many noises -> the spread of the teacher's cross (no gate; near 0 means the
  teacher copies rather than varies, which the method does not assume).
Each probe also reports its `no_shape_rate` (samples the classifier puts in its reject class `NONE`), so a rate is
never read off noise.

    python -m dopsd.shapes.gates --weights dopsd/shapes/weights/base.safetensors --steps 20 --n 96

prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dopsd.shapes import world
from dopsd.shapes.metrics import (
    NONE,
    ShapeClassifier,
    classify,
    colour_purity,
    colours_match,
    diversity,
    features,
    frechet_distance,
    load_classifier,
)
from dopsd.shapes.model import ShapesModel, load_model, to_pixels, to_uint8


GATE_PRIOR_ACCURACY = 0.9
GATE_TEACHER_CONCEPT_RATE = 0.5
GATE_TRIGGER_TEXT_RATE = 0.1  # "near 0"


def _sample(
    model: ShapesModel, captions: list[str], steps: int, seed: int, references: list[np.ndarray] | None = None
) -> np.ndarray:
    refs = None if references is None else to_pixels(references)
    x = model.sample(captions, steps=steps, generator=torch.Generator().manual_seed(seed), references=refs)
    return to_uint8(x)


def prior_metrics(
    model: ShapesModel, classifier: ShapeClassifier, *, steps: int, n: int, seed: int
) -> dict[str, float]:
    """Text-only base-shape prompts: accuracy, purity, colour match, Frechet distance to renders, diversity; and how
    the misses divide (they sum to 1 - accuracy): drawn as the new concept (`cross_rate`: a concept leaking into
    the prior), as a random polygon (`object_rate`: a misshapen blob), as another base shape
    (`wrong_shape_rate`), or as no shape (`no_shape_rate`)."""
    rng = np.random.default_rng([seed, 1])
    scenes = [world.sample_scene(rng, world.BASE_SHAPES[i % len(world.BASE_SHAPES)]) for i in range(n)]
    images = _sample(model, [s.caption() for s in scenes], steps, seed)
    predicted = classify(classifier, images)
    renders = [
        world.render(world.sample_scene(rng, s.shape, colour=s.colour, background=s.background)) for s in scenes
    ]
    out = {
        "accuracy": float(np.mean([p == s.shape for p, s in zip(predicted, scenes, strict=True)])),
        "no_shape_rate": float(np.mean([p == NONE for p in predicted])),
        "cross_rate": float(np.mean([p == world.NEW_CONCEPT for p in predicted])),
        "object_rate": float(np.mean([p == world.OBJECT for p in predicted])),
        "wrong_shape_rate": float(np.mean([p in world.BASE_SHAPES and p != s.shape for p, s in zip(predicted, scenes, strict=True)])),
        "purity": float(np.mean([colour_purity(im, s.colour, s.background) for im, s in zip(images, scenes, strict=True)])),
        "colours_match": float(np.mean([colours_match(im, s.colour, s.background) for im, s in zip(images, scenes, strict=True)])),
        "frechet": frechet_distance(features(classifier, images), features(classifier, renders)),
    }  # fmt: skip
    spread = diversity(list(images), [s.colour for s in scenes])
    render_spread = diversity(renders, [s.colour for s in scenes])
    out.update({f"spread_{k}": v for k, v in spread.items()})
    out.update({f"render_spread_{k}": v for k, v in render_spread.items() if k != "found"})
    return out


def in_context_rate(
    model: ShapesModel,
    classifier: ShapeClassifier,
    *,
    shape: str,
    word: str,
    with_reference: bool,
    steps: int,
    n: int,
    seed: int,
) -> dict[str, float]:
    """Captions "a <c> <word> on a <b> background", with (or without) a reference render of `shape` in other
    colours at the same place; returns the fraction classified as `shape` and the colour match."""
    rng = np.random.default_rng([seed, 2, world.CLASSES.index(shape)])
    scenes = [world.sample_scene(rng, shape) for _ in range(n)]
    refs = [world.render(world.reference_for(rng, s)) for s in scenes] if with_reference else None
    images = _sample(model, [s.caption(word) for s in scenes], steps, seed, refs)
    predicted = classify(classifier, images)
    return {
        "rate": float(np.mean([p == shape for p in predicted])),
        "no_shape_rate": float(np.mean([p == NONE for p in predicted])),
        "colours_match": float(np.mean([colours_match(im, s.colour, s.background) for im, s in zip(images, scenes, strict=True)])),
    }  # fmt: skip


def teacher_variation(model: ShapesModel, *, steps: int, n: int, seed: int, references: int = 3) -> dict[str, float]:
    """How much the teacher's sample depends on the noise: `references` renders of the new concept, each given with
    its own caption to `n // references` noises; the drawn cross's spread (centre x, y, sqrt(area), pixels) per
    reference, averaged. The method assumes a teacher that draws variations of the concept; a spread near 0 is a
    teacher that copies its reference whatever the noise, whose targets a student without the reference can only
    average (docs/replication.md, "Why D-OPSD moves the prior further than SFT")."""
    rng = np.random.default_rng([seed, 3])
    per = max(2, n // references)
    spreads = []
    for i, scene in enumerate(world.concept_scenes(rng, references)):
        images = _sample(model, [scene.caption()] * per, steps, seed + i, [world.render(scene)] * per)
        spreads.append(diversity(list(images), [scene.colour] * per))
    return {k: float(np.mean([sp[k] for sp in spreads])) for k in ("x_std", "y_std", "size_std")}


def measure(
    model: ShapesModel, classifier: ShapeClassifier, *, steps: int, n: int, seed: int = 0
) -> dict[str, object]:
    """All gate figures of `model` at `steps` sampling steps on `n` samples per probe, with pass/fail flags."""
    prior = prior_metrics(model, classifier, steps=steps, n=n, seed=seed)
    common = {"steps": steps, "n": n, "seed": seed}
    teacher = in_context_rate(
        model, classifier, shape=world.NEW_CONCEPT, word=world.TRIGGER, with_reference=True, **common
    )
    teacher_neutral = in_context_rate(
        model, classifier, shape=world.NEW_CONCEPT, word=world.OBJECT, with_reference=True, **common
    )
    trigger = in_context_rate(
        model, classifier, shape=world.NEW_CONCEPT, word=world.TRIGGER, with_reference=False, **common
    )
    copies = [
        in_context_rate(model, classifier, shape=s, word=world.OBJECT, with_reference=True, **common)["rate"]
        for s in world.BASE_SHAPES
    ]  # fmt: skip
    return {
        "steps": steps,
        "n": n,
        "seed": seed,
        "prior": prior,
        "teacher_concept_rate": teacher["rate"],
        "teacher_colours_match": teacher["colours_match"],
        "teacher_no_shape_rate": teacher["no_shape_rate"],
        "teacher_neutral_word_concept_rate": teacher_neutral["rate"],
        "trigger_text_concept_rate": trigger["rate"],
        "trigger_text_no_shape_rate": trigger["no_shape_rate"],
        "copy_known_shapes_accuracy": float(np.mean(copies)),
        "teacher_noise_spread": teacher_variation(model, steps=steps, n=n, seed=seed),
        "gates": {
            "prior_accuracy": prior["accuracy"] >= GATE_PRIOR_ACCURACY,
            "teacher_concept_rate": teacher["rate"] >= GATE_TEACHER_CONCEPT_RATE,
            "trigger_text_near_zero": trigger["rate"] <= GATE_TRIGGER_TEXT_RATE,
        },
    }


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: measure the gates of a checkpoint and print one JSON line (with the checkpoint's step and the time)."""
    p = argparse.ArgumentParser(description="Measure the shapes world's gates on a base checkpoint.")
    p.add_argument("--weights", default=str(Path(__file__).parent / "weights" / "base.safetensors"))
    p.add_argument("--steps", type=int, nargs="+", default=[20, 4])
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from safetensors import safe_open

    with safe_open(args.weights, framework="pt") as f:
        header = f.metadata() or {}
    model, classifier = load_model(Path(args.weights)), load_classifier()
    for steps in args.steps:
        t0 = time.perf_counter()
        result = measure(model, classifier, steps=steps, n=args.n, seed=args.seed)
        result["checkpoint_step"] = int(header.get("step", -1))
        result["seconds"] = round(time.perf_counter() - t0, 1)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
