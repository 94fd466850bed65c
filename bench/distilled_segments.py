"""Where a distilled `shapes` model loses prior accuracy (docs/replication.md, "Step distillation"): 4-step sampling
that takes its first K Euler steps from the base and the rest from the distilled model, K = 0, 1, 2 (K = 0 is the
distilled model alone), on the gates' prior probe (`dopsd.shapes.gates.prior_metrics`). If the accuracy comes back
with K, the shape is decided wrongly early; if it does not, the student's late segments misdraw outlines.

    python bench/distilled_segments.py --seeds 1 2 --n 576

One JSON line per (seed, K).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from dopsd.models.shapes import weights_path
from dopsd.shapes import gates, world
from dopsd.shapes.metrics import load_classifier
from dopsd.shapes.model import PIXEL_CHANNELS, ShapesModel, load_model, sigma_schedule


class FirstStepsFromBase:
    """A sampler with `ShapesModel.sample`'s interface: its first `k` Euler steps are the base's, the rest the
    distilled model's, on one noise draw."""

    def __init__(self, base: ShapesModel, distilled: ShapesModel, k: int) -> None:
        self.base, self.distilled, self.k = base, distilled, k

    @torch.no_grad()
    def sample(
        self,
        captions: Sequence[str],
        *,
        steps: int,
        generator: torch.Generator,
        references: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pixels in [-1, 1], [B, 3, S, S], as `ShapesModel.sample` draws them from the same generator."""
        texts = self.base.text.encode(list(captions)), self.distilled.text.encode(list(captions))
        x = torch.randn(len(captions), PIXEL_CHANNELS, world.SIZE, world.SIZE, generator=generator)
        sigmas = sigma_schedule(steps)
        x = self.base.euler(x, sigmas[: self.k + 1], texts[0], references)
        return self.distilled.euler(x, sigmas[self.k :], texts[1], references).clamp(-1, 1)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: one JSON line per (seed, K) with the prior's accuracy, its misses drawn as a polygon, the Frechet
    distance and the spread of x."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="shapes://base")
    p.add_argument("--distilled", default="shapes://distilled")
    p.add_argument("--first", type=int, nargs="+", default=[0, 1, 2], help="K: base steps before the distilled's")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--n", type=int, default=576)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if any(not 0 <= k <= 4 for k in args.first):
        p.error("--first takes 0 to 4 (the schedule has 4 steps)")
    torch.set_num_threads(args.threads)
    base, distilled = load_model(Path(weights_path(args.base))), load_model(Path(weights_path(args.distilled)))
    classifier = load_classifier()
    for seed in args.seeds:
        for k in args.first:
            sampler = FirstStepsFromBase(base, distilled, k)
            m = gates.prior_metrics(sampler, classifier, steps=4, n=args.n, seed=seed)  # type: ignore[arg-type]
            line = {
                "bench": "distilled_segments", "base": args.base, "distilled": args.distilled, "seed": seed,
                "n": args.n, "base_steps_first": k, "accuracy": m["accuracy"], "object_rate": m["object_rate"],
                "frechet": m["frechet"], "spread_x_std": m["spread_x_std"],
            }  # fmt: skip
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
