"""The `shapes` world: seeded procedural renders of one shape in a colour on a background colour, with captions.

Small on purpose (16x16 pixels, three base shapes, three colours, a few pixels of position jitter) so that a tiny
FLUX.2-klein transformer can learn it on a CPU. Images are rendered without anti-aliasing, so every pixel is exactly
the shape colour or the background colour and the ground truth (shape, colours, position, size) is known.

- Base shapes (`BASE_SHAPES`) appear in pretraining with their words in the captions.
- Random polygons (`OBJECT`) appear only in in-context pretraining samples, captioned with the neutral word: they
  give the model a reason to copy a shape from the reference, because the caption cannot tell it.
- The held-out NEW concept (`NEW_CONCEPT`, a plus-shaped cross) never appears in pretraining data; its captions use
  the trigger word `TRIGGER` ("a red [V] on a blue background"), a word pretraining never shows.

Pure numpy, deterministic from the caller's `numpy.random.Generator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dopsd.shapes.vocabulary import BASE_SHAPE_WORDS, COLOUR_WORDS, OBJECT_WORD, caption_problems
from dopsd.shapes.vocabulary import MAX_TOKENS as MAX_TOKENS
from dopsd.shapes.vocabulary import PAD as PAD
from dopsd.shapes.vocabulary import TRIGGER as TRIGGER
from dopsd.shapes.vocabulary import VOCABULARY as VOCABULARY


SIZE = 16  # pixels per side
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
}
BASE_SHAPES = BASE_SHAPE_WORDS
OBJECT = OBJECT_WORD  # random polygons; also the neutral word that replaces a shape's name in in-context samples
NEW_CONCEPT = "cross"
# Every shape of the world, in the order of the classifier's labels (which add a reject class, metrics.NONE).
CLASSES = (*BASE_SHAPES, NEW_CONCEPT, OBJECT)
# The caption vocabulary (`dopsd.shapes.vocabulary`): the trigger word is in it (so a trigger caption can be encoded)
# but no pretraining caption contains it; the new concept's name is not a word of the world at all.
assert tuple(COLOURS) == COLOUR_WORDS

CENTRE_JITTER = 2.0  # the shape's centre is uniform in SIZE/2 +- this, in pixels
SIZE_RANGE = (4.0, 6.0)  # the shape's radius-like size, uniform, in pixels
POLYGON_VERTICES = (5, 7)  # inclusive range of a random polygon's vertex count
POLYGON_RADII = (0.55, 1.05)  # a random polygon's vertex radii, as fractions of 1.1 * size


@dataclass(frozen=True)
class Scene:
    """One image's ground truth: what is drawn, in which colours, where and how large."""

    shape: str
    colour: str
    background: str
    cx: float  # centre, pixels from the left edge
    cy: float  # centre, pixels from the top edge
    size: float  # radius-like size in pixels
    vertices: tuple[tuple[float, float], ...] = ()  # a random polygon's outline in units of `size`

    def caption(self, word: str | None = None) -> str:
        """ "a <colour> <word> on a <background> background"; `word` defaults to the shape's caption word (the
        trigger for the new concept, the neutral word for a random polygon)."""
        if word is None:
            word = TRIGGER if self.shape == NEW_CONCEPT else self.shape
        return f"a {self.colour} {word} on a {self.background} background"


def random_polygon(rng: np.random.Generator) -> tuple[tuple[float, float], ...]:
    """A random star-shaped polygon (sorted angles, random radii) in units of the scene's size."""
    n = int(rng.integers(POLYGON_VERTICES[0], POLYGON_VERTICES[1] + 1))
    angles = np.sort(rng.uniform(0.0, 2 * np.pi, n))
    radii = rng.uniform(*POLYGON_RADII, n) * 1.1
    return tuple((float(r * np.cos(a)), float(r * np.sin(a))) for a, r in zip(angles, radii, strict=True))


def sample_scene(
    rng: np.random.Generator,
    shape: str | None = None,
    *,
    shapes: Sequence[str] = BASE_SHAPES,
    colour: str | None = None,
    background: str | None = None,
    vertices: tuple[tuple[float, float], ...] | None = None,
) -> Scene:
    """A random scene: `shape` (or one of `shapes`), colours (background always differs from the shape's), centre
    and size uniform in their ranges. A polygon gets fresh random `vertices` unless they are given (a reference of
    the same polygon)."""
    if shape is None:
        shape = str(shapes[int(rng.integers(len(shapes)))])
    if shape not in CLASSES:
        raise ValueError(f"unknown shape {shape!r}")
    names = list(COLOURS)
    if colour is None:
        colour = names[int(rng.integers(len(names)))] if background is None else _other(rng, names, background)
    if background is None:
        background = _other(rng, names, colour)
    if colour == background:
        raise ValueError("the shape and the background must have different colours")
    cx, cy = (float(v) for v in SIZE / 2 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, 2))
    size = float(rng.uniform(*SIZE_RANGE))
    if shape == OBJECT and vertices is None:
        vertices = random_polygon(rng)
    return Scene(shape, colour, background, cx, cy, size, (vertices or ()) if shape == OBJECT else ())


def _other(rng: np.random.Generator, names: list[str], not_this: str) -> str:
    others = [n for n in names if n != not_this]
    return others[int(rng.integers(len(others)))]


def reference_for(rng: np.random.Generator, scene: Scene, shift: float = 0.0) -> Scene:
    """A reference for in-context samples: the same shape (the same polygon outline for an object) at the same place
    and size, in other colours (a different shape colour, any other background). Aligned like an edit pair, so that
    klein's edit branch, which gives the reference the output's 2-D positions, makes copying a local pattern; a
    reference elsewhere made copying a search the 0.9M-parameter model had not learned after 4,500 steps.

    `shift` > 0 moves the reference's centre by up to `shift` px in each axis and changes its size by up to
    `shift / 2` px (kept inside the world's ranges), so that the target's place and size are not the reference's:
    a model trained so learns to draw the reference's shape where its own noise leads, the varying teacher the
    method assumes (docs/replication.md). With 0 the random stream is the aligned world's, draw for draw."""
    names = [n for n in COLOURS if n != scene.colour]
    colour = names[int(rng.integers(len(names)))]
    background = _other(rng, list(COLOURS), colour)
    cx, cy, size = scene.cx, scene.cy, scene.size
    if shift > 0:
        lo, hi = SIZE / 2 - CENTRE_JITTER, SIZE / 2 + CENTRE_JITTER
        dx, dy, ds = rng.uniform(-1.0, 1.0, 3)
        cx = float(np.clip(cx + shift * dx, lo, hi))
        cy = float(np.clip(cy + shift * dy, lo, hi))
        size = float(np.clip(size + shift / 2 * ds, *SIZE_RANGE))
    return Scene(scene.shape, colour, background, cx, cy, size, scene.vertices)


def _inside_polygon(xs: np.ndarray, ys: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon for pixel centres (vectorised ray casting)."""
    inside = np.zeros(xs.shape, dtype=bool)
    x0, y0 = poly[-1]
    for x1, y1 in poly:
        crosses = (y1 > ys) != (y0 > ys)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = (x0 - x1) * (ys - y1) / (y0 - y1) + x1
        inside ^= crosses & (xs < x_at)
        x0, y0 = x1, y1
    return inside


def shape_mask(scene: Scene) -> np.ndarray:
    """Boolean [SIZE, SIZE] mask of the shape's pixels (sampled at pixel centres, no anti-aliasing)."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5
    dx, dy, r = xs - scene.cx, ys - scene.cy, scene.size
    if scene.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if scene.shape == "square":
        half = 0.85 * r
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if scene.shape == "triangle":
        angles = np.deg2rad([-90.0, 30.0, 150.0])
        poly = np.stack([scene.cx + 1.2 * r * np.cos(angles), scene.cy + 0.25 * r + 1.2 * r * np.sin(angles)], 1)
        return _inside_polygon(xs, ys, poly)
    if scene.shape == NEW_CONCEPT:
        arm = 0.36 * r
        return ((np.abs(dx) <= r) & (np.abs(dy) <= arm)) | ((np.abs(dy) <= r) & (np.abs(dx) <= arm))
    poly = np.array([(scene.cx + vx * r, scene.cy + vy * r) for vx, vy in scene.vertices])
    return _inside_polygon(xs, ys, poly)


def render(scene: Scene) -> np.ndarray:
    """The scene as a uint8 RGB array [SIZE, SIZE, 3]."""
    image = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    image[:] = COLOURS[scene.background]
    image[shape_mask(scene)] = COLOURS[scene.colour]
    return image


def tokenize(caption: str) -> list[int]:
    """Word ids of a caption, padded with `PAD` to `MAX_TOKENS`; an unknown word or a long caption is an error."""
    problems = caption_problems(caption)
    if problems:
        raise ValueError(f"{'; '.join(problems)} in {caption!r}")
    ids = [VOCABULARY.index(w) for w in caption.split()]
    return ids + [VOCABULARY.index(PAD)] * (MAX_TOKENS - len(ids))


def palette_colours(image: np.ndarray) -> tuple[str, str]:
    """(shape colour, background colour) of an RGB image [H, W, 3]: each pixel's nearest palette colour, the most
    common being the background and the second the shape (a one-coloured image gives another colour as its shape)."""
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    pixels = image.reshape(-1, 3).astype(np.float64)
    nearest = np.argmin(((pixels[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
    order = np.argsort(-np.bincount(nearest, minlength=len(palette)), kind="stable")
    names = list(COLOURS)
    return names[int(order[1])], names[int(order[0])]


def caption_for(image: np.ndarray, word: str = TRIGGER) -> str:
    """The world's caption of an image of `word` (the trigger by default) from the colours it shows: what the
    `shapes` preset captions a reference image with when the user gave no caption."""
    colour, background = palette_colours(image)
    return f"a {colour} {word} on a {background} background"


def concept_scenes(rng: np.random.Generator, n: int) -> list[Scene]:
    """`n` random scenes of the new concept (reference images of the concept, or renders for the classifier)."""
    return [sample_scene(rng, NEW_CONCEPT) for _ in range(n)]
