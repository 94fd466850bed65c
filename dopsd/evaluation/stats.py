"""Paired statistics over seeds: bootstrap intervals of a mean, and the noise floor between seeds of the base model.

Every figure is computed per seed, with base and adapter rendered from the same noise; the figure's mean over seeds
gets a percentile-bootstrap 95% interval (seeded, so a report is reproducible). The noise floor is the same metric
between two different seeds of the base model: how large a difference chance alone makes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


BOOTSTRAP_RESAMPLES = 4000
BOOTSTRAP_SEED = 20260513


def bootstrap_mean_ci(
    values: Sequence[float], *, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of the mean of `values` (resampled with replacement); `None` below 2 values,
    where no spread can be estimated."""
    data = np.asarray(list(values), dtype=np.float64)
    if data.size < 2 or not np.all(np.isfinite(data)):
        return None
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def seed_pairs(count: int) -> list[tuple[int, int]]:
    """Pairs of different seeds (each seed with the next, cyclically) for a noise floor; none below 2 seeds."""
    if count < 2:
        return []
    if count == 2:
        return [(0, 1)]
    return [(i, (i + 1) % count) for i in range(count)]


def noise_floor(per_seed: Sequence[float], distance: Callable[[int, int], float] | None = None) -> float | None:
    """Mean difference of a metric between two seeds of the base model: `distance(i, j)` when given (a distance
    between the seeds' renders), else `|per_seed[j] - per_seed[i]|`. `None` below 2 seeds."""
    pairs = seed_pairs(len(per_seed))
    if not pairs:
        return None
    if distance is None:
        diffs = [abs(per_seed[j] - per_seed[i]) for i, j in pairs]
    else:
        diffs = [distance(i, j) for i, j in pairs]
    return float(np.mean(diffs))
