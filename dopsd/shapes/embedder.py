"""The `shapes` world's image embedder for the evaluation report: its stand-in for DINOv2.

The report's concept figure (the teacher-student gap) compares pixels on the same noise, so an adapter that draws the
concept somewhere else in the frame than the teacher does can look as if it learned nothing. Its similarity figure
compares image embeddings instead, which do not care where the shape sits. Real presets name a CLIP or DINOv2
folder for it; this world has no such model, so it ships one of its own: the ground-truth classifier's network
(`dopsd.shapes.metrics.ShapeClassifier`) trained on the pretraining world only, without the new concept. Like
DINOv2 with a user's concept, it has never seen a cross; the report reads its features, never the classifier that
defines the ground truth, so the report-against-truth comparison in docs/replication.md is not circular.

    python -m dopsd.shapes.embedder          # trains it (seed 0, 2,000 steps, a few minutes on one core)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from dopsd.evaluation.embedding import EmbedderError
from dopsd.shapes import SCHEME, world
from dopsd.shapes.metrics import (
    LABELS,
    ShapeClassifier,
    clean_accuracy,
    load_classifier,
    save_with_record,
    train_classifier,
)


EMBEDDER_ID = f"{SCHEME}embedder"  # what the preset's `embedding_model` names
EMBEDDER_PATH = Path(__file__).parent / "weights" / "embedder.safetensors"
PRETRAINING_LABELS = tuple(label for label in LABELS if label != world.NEW_CONCEPT)


class ShapesEmbedder:
    """Unit-norm penultimate features of the concept-free classifier, with `ImageEmbedder`'s interface."""

    has_text = False

    def __init__(self, network: ShapeClassifier, *, name: str, device: torch.device) -> None:
        self.network = network.eval().requires_grad_(False).to(device)
        self.name = name
        self.device = device

    @torch.no_grad()
    def embed_images(self, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """[N, D] unit vectors for images [N, 3, H, W] in [0, 1] (resized to the world's size where they differ)."""
        out = []
        for start in range(0, pixels.shape[0], batch_size):
            x = pixels[start : start + batch_size].float().to(self.device)
            if x.shape[-2:] != (world.SIZE, world.SIZE):
                x = F.interpolate(x, size=(world.SIZE, world.SIZE), mode="area")
            feats = self.network.features(x * 2 - 1)
            out.append(F.normalize(feats, dim=-1).cpu())
        return torch.cat(out)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Refused: a shape classifier has no text tower (`has_text` is False, so the report never asks)."""
        raise EmbedderError(f"{self.name} has no text tower")


def load_embedder(path: Path = EMBEDDER_PATH, *, device: torch.device | None = None) -> ShapesEmbedder:
    """The committed embedder (see weights/embedder.json for its command, accuracy and hash)."""
    return ShapesEmbedder(load_classifier(path), name=f"{EMBEDDER_ID} (concept-free shapes CNN)",
                          device=device or torch.device("cpu"))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    """Trains the embedder on the pretraining world's labels, saves it and a JSON record (command, seed, clean
    accuracy on 5,000 fresh renders, SHA-256) beside it."""
    p = argparse.ArgumentParser(description="Train the shapes world's concept-free embedder for the report.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(EMBEDDER_PATH))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    network = train_classifier(seed=args.seed, steps=args.steps, labels=PRETRAINING_LABELS)
    save_with_record(network, Path(args.out), {
        "command": f"python -m dopsd.shapes.embedder --seed {args.seed} --steps {args.steps}",
        "seed": args.seed,
        "steps": args.steps,
        "labels": list(PRETRAINING_LABELS),
        "clean_accuracy_5000": clean_accuracy(network, args.seed, 5000, PRETRAINING_LABELS),
    })  # fmt: skip


if __name__ == "__main__":
    main()
