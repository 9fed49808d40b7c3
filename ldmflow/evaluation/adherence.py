"""How far images show the conditions they were asked for, in physical units and as % of the training range.

Scalar conditions: mean absolute error. Vector conditions (dim > 1): the angle between the requested and the
read direction, taken as axes (0-90 degrees: a probe cannot always tell a direction from its opposite, e.g.
stripes along the wind), for vectors longer than a quarter of the training range, and the error of their
length. `shuffled_baseline` scores the same readings against permuted requests: what a model that ignores
its conditions would get. `condition_error_pct` sums it up in one number a checkpoint can be chosen by.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ldmflow.data.conditions import ConditionSpec
from ldmflow.data.manifest import Manifest
from ldmflow.errors import LdmflowError

ANGLE_MIN_FRACTION = 0.25  # directions of vectors shorter than this fraction of the length range are not scored
MEAN_ERROR = "condition_error_pct"  # the mean of the headline % errors (angles as % of 90 degrees)


def headline_metrics(spec: ConditionSpec) -> dict[str, tuple[str, ...]]:
    """Per condition, the errors that say how well it is shown: the % error of a scalar; the angle and the
    length % error of a vector."""
    return {name: (f"{name}_mae_pct",) if dim == 1 else (f"{name}_angle_error_deg", f"{name}_length_mae_pct")
            for name, dim in spec.items}


def adherence_metric_names(spec: ConditionSpec) -> tuple[str, ...]:
    """Every name `condition_errors` can return for `spec`, the mean first."""
    names = [MEAN_ERROR]
    for name, dim in spec.items:
        names += [f"{name}_mae", f"{name}_mae_pct"] if dim == 1 else \
            [f"{name}_length_mae", f"{name}_length_mae_pct", f"{name}_angle_error_deg"]
    return tuple(names)


@dataclass
class Requests:
    """What images were asked for (or were recorded with): condition dicts for a sampler, (N, D) values and
    (N, K) presence flags for scoring."""

    conditions: list[dict]
    values: np.ndarray
    present: np.ndarray


def manifest_requests(manifest: Manifest, count: int) -> Requests:
    """`count` requests cycling through the entries whose conditions are all known, so samples are asked for
    conditions that real images have."""
    complete = [r for r in manifest.records if np.asarray(r.present).all()]
    if not complete:
        raise LdmflowError(f"No entry of split {manifest.report.split!r} has every condition of {manifest.spec}: "
                           "nothing to ask the model for.")
    chosen = [complete[i % len(complete)] for i in range(count)]
    slices = manifest.spec.slices()
    conditions = [{name: np.asarray(r.conditions)[part].tolist() for name, part in slices.items()} for r in chosen]
    return Requests(conditions, np.stack([r.conditions for r in chosen]).astype(np.float32),
                    np.stack([r.present for r in chosen]).astype(bool))


def only_prefix(name: str) -> str:
    """The metric prefix of requests that give `name` alone (the evaluation table's "<name> only" column)."""
    return f"only_{name}/"


def requests_of_only(requests: Requests, spec: ConditionSpec, name: str) -> Requests:
    """The same requests giving only `name`, every other condition left out (a partial request): scored on
    `name` alone, since `condition_errors` skips what a request lacks."""
    present = np.zeros_like(requests.present)
    index = spec.names.index(name)
    present[:, index] = requests.present[:, index]
    return Requests([{name: condition[name]} for condition in requests.conditions], requests.values, present)


def spread_ratios(spec: ConditionSpec, samples: np.ndarray, data: np.ndarray,
                  names: tuple[str, ...]) -> dict[str, float]:
    """`<name>_spread_ratio` of each of `names` (conditions a request left out): their spread across the samples
    over their spread across the data's images, both (N, D) as the probe reads them; the spread is the total
    standard deviation (the root of the components' summed variances). About 1: the model varies what it was not
    told like the data does; near 0: it settled on one value."""
    ratios = {}
    for name, where in spec.slices().items():
        data_spread = float(np.sqrt(np.var(np.asarray(data)[:, where], axis=0).sum()))
        if name in names and data_spread > 0:
            ratios[f"{name}_spread_ratio"] = float(np.sqrt(np.var(np.asarray(samples)[:, where], axis=0).sum())
                                                   / data_spread)
    return ratios


def recorded_conditions(manifest: Manifest, count: int) -> Requests:
    """The conditions of the split's first `count` images (no dicts: nothing is generated from them), what a
    probe should read back from those images."""
    records = manifest.records[:count]
    return Requests([], np.stack([r.conditions for r in records]), np.stack([r.present for r in records]).astype(bool))


def condition_ranges(spec: ConditionSpec, values: np.ndarray, present: np.ndarray) -> dict[str, tuple[float, float]]:
    """name -> (low, high) over the entries where it is present: values (scalars), lengths (vectors)."""
    ranges = {}
    for index, ((name, dim), part) in enumerate(zip(spec.items, spec.slices().values())):
        known = np.asarray(values)[np.asarray(present)[:, index].astype(bool), part]
        amounts = known[:, 0] if dim == 1 else np.linalg.norm(known, axis=1)
        ranges[name] = (float(amounts.min()), float(amounts.max())) if len(amounts) else (0.0, 1.0)
    return ranges


def manifest_ranges(manifest: Manifest) -> dict[str, tuple[float, float]]:
    """`condition_ranges` of a loaded split (the training range the % errors refer to)."""
    return condition_ranges(manifest.spec, np.stack([r.conditions for r in manifest.records]),
                            np.stack([r.present for r in manifest.records]).astype(bool))


def condition_errors(spec: ConditionSpec, requested: np.ndarray, present: np.ndarray, read: np.ndarray,
                     ranges: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Per condition: `<name>_mae` and `<name>_mae_pct` (scalars), `<name>_angle_error_deg`,
    `<name>_length_mae` and `<name>_length_mae_pct` (vectors), and their mean `condition_error_pct`; conditions
    absent from a request are skipped."""
    errors = {}
    for index, ((name, dim), part) in enumerate(zip(spec.items, spec.slices().values())):
        rows = np.asarray(present)[:, index].astype(bool)
        wanted, got = np.asarray(requested)[rows, part], np.asarray(read)[rows, part]
        low, high = ranges[name]
        span = max(high - low, 1e-12)
        if not rows.any():
            continue
        if dim == 1:
            mae = float(np.abs(wanted[:, 0] - got[:, 0]).mean())
            errors.update({f"{name}_mae": mae, f"{name}_mae_pct": 100.0 * mae / span})
            continue
        wanted_length, got_length = np.linalg.norm(wanted, axis=1), np.linalg.norm(got, axis=1)
        length_mae = float(np.abs(wanted_length - got_length).mean())
        errors.update({f"{name}_length_mae": length_mae, f"{name}_length_mae_pct": 100.0 * length_mae / span})
        scored = wanted_length > low + ANGLE_MIN_FRACTION * span
        if scored.any():
            cosine = np.abs((wanted[scored] * got[scored]).sum(axis=1)) / np.maximum(
                wanted_length[scored] * got_length[scored], 1e-12)
            errors[f"{name}_angle_error_deg"] = float(np.degrees(np.arccos(np.clip(cosine, 0.0, 1.0))).mean())
    headlines = [errors[key] * (100.0 / 90.0 if key.endswith("_deg") else 1.0)
                 for keys in headline_metrics(spec).values() for key in keys if key in errors]
    if headlines:
        errors[MEAN_ERROR] = float(np.mean(headlines))
    return errors


def shuffled_baseline(spec: ConditionSpec, requested: np.ndarray, present: np.ndarray, read: np.ndarray,
                      ranges: dict[str, tuple[float, float]], seed: int = 0) -> dict[str, float]:
    """`condition_errors` of the readings against the requests in a fixed random order (the chance level)."""
    order = np.random.default_rng(seed).permutation(len(requested))
    both = np.asarray(present).astype(bool) & np.asarray(present)[order].astype(bool)
    return condition_errors(spec, np.asarray(requested)[order], both, read, ranges)


def mean_pairwise_distance(features: np.ndarray) -> float:
    """Mean Euclidean distance between distinct rows of (N, C) features (NaN for fewer than 2 rows)."""
    features = np.asarray(features, dtype=np.float64)
    if len(features) < 2:
        return float("nan")
    squares = (features**2).sum(axis=1)
    distances = np.sqrt(np.maximum(squares[:, None] + squares[None, :] - 2 * features @ features.T, 0.0))
    return float(distances[np.triu_indices(len(features), k=1)].mean())


def diversity(features: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """Feature distance between samples of the same request (`diversity_within`) and of different requests
    (`diversity_across`): a model that collapses to one image per condition has a small `within`."""
    groups = np.asarray(groups)
    within = [mean_pairwise_distance(features[groups == g]) for g in np.unique(groups)]
    pairs = []
    for g in np.unique(groups):
        inside, outside = features[groups == g], features[groups != g]
        if len(outside):
            pairs.append(np.linalg.norm(inside[:, None, :] - outside[None, :, :], axis=2).mean())
    return {"diversity_within": float(np.nanmean(within)), "diversity_across": float(np.mean(pairs)) if pairs
            else float("nan")}


@dataclass
class SplitConditions:
    """A split's known conditions, the training range and the probe that reads them back: how well images of
    that split (a VAE's reconstructions, say) still show their conditions."""

    reader: object  # ProbeReader
    values: np.ndarray  # (N, D), in the split's record order
    present: np.ndarray  # (N, K)
    ranges: dict[str, tuple[float, float]]

    @classmethod
    def of(cls, reader, split: Manifest, train: Manifest, image_paths: list | None = None) -> "SplitConditions":
        """The conditions of `split`'s records, in the order of `image_paths` (default: the split's own)."""
        by_path = {r.image_path: r for r in split.records}
        records = [by_path[p] for p in image_paths if p in by_path] if image_paths else split.records
        return cls(reader, np.stack([r.conditions for r in records]).astype(np.float32),
                   np.stack([r.present for r in records]).astype(bool), manifest_ranges(train))

    def errors(self, images: np.ndarray) -> dict[str, float]:
        """`condition_errors` of the first len(images) records, as the probe reads (N, H, W, 3) images."""
        count = len(images)
        return condition_errors(self.reader.encoder.spec, self.values[:count], self.present[:count],
                                self.reader.read(images), self.ranges)
