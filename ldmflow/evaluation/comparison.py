"""Is A better than B beyond noise? Per metric: both values, their difference and its 95% interval, a verdict.

Two kinds of noise make a difference meaningless:
- evaluation noise: another draw of requests and seeds would score differently. Both sides are scored on the
  same samples (paired), so the interval is a bootstrap over those samples of the difference itself, which is
  much tighter than two separate intervals. Metrics without per-sample values (FID, KID) combine the two
  sides' own intervals as if independent.
- training noise: another seed would train another model. Only replicates show it: with several models per
  side, the between-replicate spread adds a Welch t interval of the difference of the means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ldmflow.evaluation.intervals import CI_SUFFIX, bootstrap_ci95

BETTER, WORSE, WITHIN_NOISE = "better", "worse", "within noise"
PerSampleScore = Callable[[np.ndarray], dict[str, float]]  # sample indices -> metric values over them


@dataclass(frozen=True)
class MetricComparison:
    metric: str
    a: float  # A's value (the mean over its replicates)
    b: float
    half_width: float  # 95% interval of a - b: (a - b) ± half_width
    higher_is_better: bool

    @property
    def difference(self) -> float:
        return self.a - self.b

    @property
    def verdict(self) -> str:
        """A's verdict against B: better or worse only when the whole interval lies on one side of zero."""
        if not np.isfinite(self.half_width) or abs(self.difference) <= self.half_width:
            return WITHIN_NOISE
        return BETTER if (self.difference > 0) == self.higher_is_better else WORSE


def paired_half_widths(scores_a: list[PerSampleScore], scores_b: list[PerSampleScore], count: int,
                       seed: int = 0) -> dict[str, float]:
    """The evaluation noise of (mean of A's scores) - (mean of B's), all computed on the same resampled
    samples (`count` of them): metric -> half-width of the difference's 95% interval."""
    def difference(rows: np.ndarray) -> dict[str, float]:
        a, b = _mean_scores(scores_a, rows), _mean_scores(scores_b, rows)
        return {key: a[key] - b[key] for key in a.keys() & b.keys()}

    return {key.removesuffix(CI_SUFFIX): value
            for key, value in bootstrap_ci95(difference, (count,), seed=seed).items()}


def _mean_scores(scores: list[PerSampleScore], rows: np.ndarray) -> dict[str, float]:
    each = [score(rows) for score in scores]
    keys = set.intersection(*(set(values) for values in each))
    return {key: float(np.mean([values[key] for values in each])) for key in keys}


def training_half_width(values_a: list[float], values_b: list[float]) -> float:
    """Welch's 95% t interval of mean(A) - mean(B) from the replicates' spread; 0 when a side has one model
    (its training noise is then unknown, which the report says)."""
    from scipy import stats

    if len(values_a) < 2 or len(values_b) < 2:
        return 0.0
    var_a, var_b = np.var(values_a, ddof=1) / len(values_a), np.var(values_b, ddof=1) / len(values_b)
    spread = var_a + var_b
    if spread == 0:
        return 0.0
    freedom = spread ** 2 / (var_a ** 2 / (len(values_a) - 1) + var_b ** 2 / (len(values_b) - 1))
    return float(stats.t.ppf(0.975, freedom) * np.sqrt(spread))


def compare_metrics(values_a: dict[str, list[float]], values_b: dict[str, list[float]],
                    evaluation_half_widths: dict[str, float], higher_is_better: Callable[[str], bool]
                    ) -> list[MetricComparison]:
    """One MetricComparison per metric both sides have (values: one per replicate), its interval combining
    the evaluation's and the training's noise in quadrature."""
    rows = []
    for metric in sorted(values_a.keys() & values_b.keys()):
        if metric not in evaluation_half_widths:
            continue
        a, b = values_a[metric], values_b[metric]
        half = float(np.hypot(evaluation_half_widths[metric], training_half_width(a, b)))
        rows.append(MetricComparison(metric, float(np.mean(a)), float(np.mean(b)), half, higher_is_better(metric)))
    return rows


def format_comparison(rows: list[MetricComparison], label_a: str, label_b: str, noise: str) -> str:
    """The table `ldmflow compare` prints, and the line saying which noise its intervals include."""
    header = ("metric", "A", "B", "A - B", "95% interval", "verdict (A)")
    lines = [header] + [(row.metric, f"{row.a:.4g}", f"{row.b:.4g}", f"{row.difference:+.4g}",
                         f"± {row.half_width:.3g}", row.verdict) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)
    return f"A: {label_a}\nB: {label_b}\n{text}\nIntervals: {noise}."
