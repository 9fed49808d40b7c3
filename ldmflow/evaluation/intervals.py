"""Bootstrap 95% intervals: how far a score would move with another draw of as many samples.

Two versions of a model are only different where their scores differ by more than this noise. The samples
are resampled with replacement (each population on its own: generated and real images for FID/KID) and the
score recomputed; the interval is the central 95% of those scores, reported as its half-width (`± x`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

ROUNDS = 200  # resamples of a cheap score (condition errors)
CI_SUFFIX = "_ci95"


def bootstrap_ci95(score: Callable[..., dict[str, float]], sizes: tuple[int, ...], rounds: int = ROUNDS,
                   seed: int = 0) -> dict[str, float]:
    """`<key>_ci95` (half-width of the central 95%) of each key `score(*indices)` returns, over `rounds` draws of
    one index array per population size in `sizes`. A key scored in fewer than half the draws (too few
    samples of its kind) gets no interval."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(rounds):
        for key, value in score(*(rng.integers(0, size, size) for size in sizes)).items():
            draws.setdefault(key, []).append(value)
    intervals = {}
    for key, values in draws.items():
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if len(values) >= rounds / 2:
            low, high = np.percentile(values, [2.5, 97.5])
            intervals[f"{key}{CI_SUFFIX}"] = float(high - low) / 2
    return intervals
