"""Ground-truth metrics of the `shapes` world, needing no external weights.

- A small CNN classifier trained on renders (`train_classifier`, committed weights in weights/classifier.safetensors):
  the shape of an image among `LABELS`: `world.CLASSES` (the three base shapes, the new concept, random polygons)
  and `NONE`, a reject class trained on two-coloured speckle and blocky random fields, so that an untrained model's
  noise counts as no shape rather than as whichever shape the classifier happens to prefer. Shape accuracy and the
  concept rate are read from it.
- Colour purity: the fraction of pixels within `PURITY_TOLERANCE` of the captioned shape or background colour
  (renders have no anti-aliasing, so a render's purity is exactly 1).
- A Frechet distance between two image sets in the classifier's penultimate features.
- Diversity: the spread (standard deviation) of the drawn shape's centre and size, so mode collapse is visible.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from dopsd.shapes import world


CLASSIFIER_PATH = Path(__file__).parent / "weights" / "classifier.safetensors"
PURITY_TOLERANCE = 60.0  # RGB distance (0-255 scale); the palette's colours are >= 190 apart
FEATURE_DIM = 64
NONE = "none"
LABELS = (*world.CLASSES, NONE)
_PALETTE = np.array(list(world.COLOURS.values()), dtype=np.float32)


class ShapeClassifier(nn.Module):
    """A three-conv CNN over 16x16 RGB: `features` (FEATURE_DIM) then logits over `labels` classes (`LABELS`; the
    report's embedder, `dopsd.shapes.embedder`, is the same network trained without the new concept)."""

    def __init__(self, labels: int = len(LABELS)) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (world.SIZE // 4) ** 2, FEATURE_DIM), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(FEATURE_DIM, labels)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Penultimate features of pixels in [-1, 1], [B, 3, S, S] -> [B, FEATURE_DIM]."""
        return self.body(pixels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Class logits [B, len(LABELS)]."""
        return self.head(self.features(pixels))


def _pixels(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    arr = np.stack(list(images)).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def garbage_image(rng: np.random.Generator) -> np.ndarray:
    """A `NONE` example: two palette colours laid out as per-pixel speckle or as a blocky random field (a random
    2x2 .. 8x8 grid upsampled), i.e. the right colours but no shape."""
    names = list(world.COLOURS)
    a, b = rng.choice(len(names), size=2, replace=False)
    p = rng.uniform(0.1, 0.6)
    if rng.random() < 0.5:
        mask = rng.random((world.SIZE, world.SIZE)) < p
    else:
        cells = int(rng.choice([2, 4, 8]))
        grid = rng.random((cells, cells)) < p
        mask = np.kron(grid, np.ones((world.SIZE // cells, world.SIZE // cells), dtype=bool))
        mask ^= rng.random(mask.shape) < rng.uniform(0.0, 0.2)
    image = np.empty((world.SIZE, world.SIZE, 3), dtype=np.uint8)
    image[:] = world.COLOURS[names[a]]
    image[mask] = world.COLOURS[names[b]]
    return image


def labelled_renders(
    rng: np.random.Generator, n: int, labels: Sequence[str] = LABELS
) -> tuple[list[np.ndarray], np.ndarray]:
    """`n` images with labels drawn uniformly from `labels` (renders of the shapes, garbage for `NONE`), and their
    label indices."""
    drawn = rng.integers(len(labels), size=n)
    images = [
        garbage_image(rng) if labels[int(k)] == NONE else world.render(world.sample_scene(rng, labels[int(k)]))
        for k in drawn
    ]
    return images, drawn


def train_classifier(
    seed: int = 0, steps: int = 2000, batch: int = 128, noise: float = 0.15, labels: Sequence[str] = LABELS
) -> ShapeClassifier:
    """Trains the classifier over `labels` on fresh renders (with Gaussian pixel noise of std `noise`, so model
    samples that are not quite clean are still read by shape), seeded."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = ShapeClassifier(len(labels))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        images, targets = labelled_renders(rng, batch, labels)
        x = _pixels(images)
        x = x + noise * torch.rand(()) * torch.randn_like(x)
        loss = nn.functional.cross_entropy(model(x), torch.from_numpy(targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def load_classifier(path: Path = CLASSIFIER_PATH) -> ShapeClassifier:
    """The committed classifier (see weights/classifier.json for its command and hash), in eval mode; the number of
    classes is read from the weights."""
    state = load_file(str(path))
    model = ShapeClassifier(int(state["head.weight"].shape[0]))
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def classify(classifier: ShapeClassifier, images: Sequence[np.ndarray] | np.ndarray) -> list[str]:
    """The predicted label (a name in `LABELS`) of each uint8 RGB image."""
    logits = classifier(_pixels(images))
    return [LABELS[int(k)] for k in logits.argmax(1)]


@torch.no_grad()
def features(classifier: ShapeClassifier, images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Classifier features of uint8 RGB images, float64 [N, FEATURE_DIM]."""
    return classifier.features(_pixels(images)).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets `a` [N, D] and `b` [M, D]:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), via symmetric eigendecompositions."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_sqrt = float(np.sqrt(np.clip(inner, 0, None)).sum())
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


def _distances(image: np.ndarray) -> np.ndarray:
    """RGB distance of each pixel to each palette colour: [S, S, len(COLOURS)]."""
    return np.linalg.norm(image.astype(np.float32)[:, :, None, :] - _PALETTE[None, None], axis=-1)


def colour_purity(image: np.ndarray, colour: str, background: str) -> float:
    """Fraction of pixels within `PURITY_TOLERANCE` of the captioned shape colour or background colour."""
    names = list(world.COLOURS)
    d = _distances(image)[:, :, [names.index(colour), names.index(background)]]
    return float((d.min(-1) <= PURITY_TOLERANCE).mean())


def colours_match(image: np.ndarray, colour: str, background: str) -> bool:
    """True when the most common (nearest-palette) colour is the background and the second the shape colour."""
    names = list(world.COLOURS)
    counts = np.bincount(_distances(image).argmin(-1).ravel(), minlength=len(names))
    order = np.argsort(-counts, kind="stable")
    return bool(names[order[0]] == background and names[order[1]] == colour and counts[order[1]] > 0)


def shape_geometry(image: np.ndarray, colour: str) -> tuple[float, float, float] | None:
    """Centre (x, y) and sqrt(area) in pixels of the pixels nearest the shape colour; None when there are none."""
    labels = _distances(image).argmin(-1)
    mask = labels == list(world.COLOURS).index(colour)
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    return float(xs.mean() + 0.5), float(ys.mean() + 0.5), float(np.sqrt(mask.sum()))


def diversity(images: Sequence[np.ndarray], colours: Sequence[str]) -> dict[str, float]:
    """Spread of the drawn shapes: std of the centre's x and y and of sqrt(area), in pixels, and the fraction of
    images in which the shape colour was found at all."""
    geo = [g for g in (shape_geometry(im, c) for im, c in zip(images, colours, strict=True)) if g is not None]
    if len(geo) < 2:
        return {"x_std": 0.0, "y_std": 0.0, "size_std": 0.0, "found": len(geo) / max(1, len(images))}
    arr = np.array(geo)
    return {
        "x_std": float(arr[:, 0].std()),
        "y_std": float(arr[:, 1].std()),
        "size_std": float(arr[:, 2].std()),
        "found": len(geo) / len(images),
    }


@torch.no_grad()
def clean_accuracy(classifier: ShapeClassifier, seed: int, n: int, labels: Sequence[str] = LABELS) -> dict[str, float]:
    """Accuracy per class of `labels` (and overall) on `n` fresh renders drawn from a seed the training never used."""
    rng = np.random.default_rng([seed, 7919])
    images, drawn = labelled_renders(rng, n, labels)
    pred = np.array([int(k) for k in classifier(_pixels(images)).argmax(1)])
    out = {name: float((pred[drawn == k] == k).mean()) for k, name in enumerate(labels)}
    out["all"] = float((pred == drawn).mean())
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m dopsd.shapes.metrics train-classifier`: trains, saves the weights and a JSON record (command,
    seed, clean accuracy on 5,000 fresh renders, SHA-256) beside them. `... classify IMAGE...`: what the world's
    classifier reads in each image (a generation downloaded from the service, a sample sheet's tile), as one JSON
    line with the counts, so a user can check an adapter's drawings against ground truth."""
    p = argparse.ArgumentParser(description="Train the shapes world's ground-truth classifier, or apply it.")
    p.add_argument("command", choices=["train-classifier", "classify"])
    p.add_argument("images", nargs="*", help="classify: 16x16 RGB image files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(CLASSIFIER_PATH))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "classify":
        if not args.images:
            p.error("classify needs at least one image")
        labels = classify(load_classifier(), np.stack([_read_image(Path(f)) for f in args.images]))
        counts = {name: labels.count(name) for name in LABELS if name in labels}
        sys.stdout.write(json.dumps({"counts": counts, "images": dict(zip(args.images, labels, strict=True))}) + "\n")
        return
    model = train_classifier(seed=args.seed, steps=args.steps)
    save_with_record(model, Path(args.out), {
        "command": f"python -m dopsd.shapes.metrics train-classifier --seed {args.seed} --steps {args.steps}",
        "seed": args.seed,
        "steps": args.steps,
        "clean_accuracy_5000": clean_accuracy(model, args.seed, 5000),
    })  # fmt: skip


def _read_image(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    if rgb.shape != (world.SIZE, world.SIZE, 3):
        raise SystemExit(
            f"{path}: {rgb.shape[1]}x{rgb.shape[0]} pixels, the world's images are {world.SIZE}x{world.SIZE}"
        )
    return rgb


def save_with_record(network: ShapeClassifier, out: Path, record: dict[str, object]) -> None:
    """Saves a trained network as safetensors with its JSON record beside it (`record` plus the file's SHA-256 and
    the torch version, which the tests check the committed file against), and prints the record."""
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(out))
    record = {**record, "sha256": hashlib.sha256(out.read_bytes()).hexdigest(), "torch": torch.__version__}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    sys.stdout.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
