"""`ldmflow compare A B`: is A better than B beyond noise, on the same requests and seeds?

A side is one model (a folder, runs:/..., models:/name/version or @alias) or a replicate group (the parent run
of `--replicates N`, as runs:/<run_id>): then each of its models is scored and the side's value is their mean,
and the interval of a difference includes the training noise the replicates show. Every model is scored by the
evaluation of `ldmflow evaluate` with one set of options, so sample i of every model has the same request and
seed; the scores with a value per sample (condition errors, a VAE's PSNR and SSIM) get a paired interval.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ldmflow.data.conditions import ConditionSpec
from ldmflow.errors import LdmflowError
from ldmflow.evaluation.adherence import adherence_metric_names, condition_errors, manifest_ranges
from ldmflow.evaluation.comparison import (WORSE, MetricComparison, compare_metrics, format_comparison,
                                           paired_half_widths)
from ldmflow.evaluation.intervals import CI_SUFFIX
from ldmflow.evaluation.metric_names import higher_is_better
from ldmflow.models.kinds import LATENT_DDPM, VAE
from ldmflow.settings import CompareSettings, EvaluateSettings, EvaluationOptions
from ldmflow.tags import (COMPARE_A_RUNS_TAG, COMPARE_A_TAG, COMPARE_B_RUNS_TAG, COMPARE_B_TAG, REPLICATE_MODEL_TAG,
                          REPLICATE_OF_TAG, REPLICATES_TAG)
from ldmflow.workflows.evaluate import (Evaluation, EvaluatedModel, check_conditions_known, evaluate,
                                        load_evaluated_model, load_split, resolve_probe)

logger = logging.getLogger(__name__)
COMPARE_STAGE = "compare"
UNPAIRED = ("fid", "kid")  # scores of a whole sample set: their two intervals combine as if independent


@dataclass
class Side:
    label: str  # as the user gave it
    uris: list[str]  # its models: one, or a replicate group's
    models: list[EvaluatedModel]
    run_ids: list[str]  # the runs that trained them (where known)

    @property
    def is_group(self) -> bool:
        return len(self.uris) > 1


@dataclass
class ComparisonResult:
    rows: list[MetricComparison]
    text: str
    run_id: str | None

    def worse_on(self, metric: str) -> bool:
        return any(row.metric == metric and row.verdict == WORSE for row in self.rows)


def replicate_models(run_id: str) -> list[str] | None:
    """The models of a replicate group's parent run, in seed order; None when `run_id` is not such a run."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from ldmflow.tracking.store import filter_value

    client = MlflowClient()
    try:
        parent = client.get_run(run_id)
    except MlflowException:
        return None
    if REPLICATES_TAG not in parent.data.tags:
        return None
    children = client.search_runs([parent.info.experiment_id], f"tags.`{REPLICATE_OF_TAG}` = {filter_value(run_id)}",
                                  max_results=1000, order_by=["attributes.start_time ASC"])
    failed = [run.info.run_id for run in children if run.info.status != "FINISHED"]
    if failed or len(children) < int(parent.data.tags[REPLICATES_TAG]):
        raise LdmflowError(f"Replicate group {run_id} is incomplete: {len(children)} of "
                           f"{parent.data.tags[REPLICATES_TAG]} replicates ran"
                           + (f", run(s) {', '.join(failed)} did not finish" if failed else "")
                           + ". Compare finished groups only (or its replicates one by one).")
    return [run.data.tags[REPLICATE_MODEL_TAG] for run in children]


def resolve_side(label: str) -> Side:
    """A model or a replicate group (runs:/<parent run id>), loaded."""
    from ldmflow.tracking.model_uri import resolve_model_source

    text = label.strip()
    run_id = text[len("runs:/"):].strip("/") if text.startswith("runs:/") and "/" not in text[6:].strip("/") \
        else None
    uris = (replicate_models(run_id) if run_id else None) or [text]
    models, run_ids = [], []
    for uri in uris:
        source = resolve_model_source(uri)
        models.append(load_evaluated_model(Path(source.local_dir)))
        run_ids.append(source.run_id or "")
    return Side(label, uris, models, run_ids)


def check_comparable(a: Side, b: Side) -> None:
    """Both sides' models are of one kind, size and condition spec: else their scores mean different things."""
    first = a.models[0]
    for side in (a, b):
        for uri, model in zip(side.uris, side.models):
            what = f"Cannot compare {a.label} with {b.label}: {uri}"
            if model.stage != first.stage:
                raise LdmflowError(f"{what} is a {model.stage} model, {a.uris[0]} a {first.stage} model; compare "
                                   "models of one kind.")
            if model.resolution != first.resolution:
                raise LdmflowError(f"{what} makes {model.resolution} px images, {a.uris[0]} {first.resolution} px; "
                                   "compare models of one image size.")
            if str(model.spec) != str(first.spec):
                raise LdmflowError(f"{what} takes the conditions {model.spec}, {a.uris[0]} {first.spec}; compare "
                                   "models of one condition spec.")


def _evaluation_settings(settings: CompareSettings, uri: str) -> EvaluateSettings:
    shared = {item.name: getattr(settings, item.name) for item in fields(EvaluationOptions)}
    return EvaluateSettings(**shared, model_uri=uri, output_dir=settings.output_dir)


def _per_sample_score(evaluation: Evaluation, spec: ConditionSpec, ranges):
    """rows -> the scores with a value per sample, over those samples (None: the model has none)."""
    import torch

    from ldmflow.evaluation.image_metrics import psnr, ssim

    if evaluation.requests is not None and evaluation.readings is not None:
        requests, readings = evaluation.requests, evaluation.readings
        return lambda rows: condition_errors(spec, requests.values[rows], requests.present[rows], readings[rows],
                                             ranges)
    if evaluation.real_images is not None and evaluation.params.get("eval_stage") == VAE.name:
        reference, test = (torch.from_numpy(images).permute(0, 3, 1, 2)
                           for images in (evaluation.real_images, evaluation.samples))
        per_image = {"psnr": psnr(reference, test).numpy(), "ssim": ssim(reference, test).numpy()}
        return lambda rows: {key: float(values[rows].mean()) for key, values in per_image.items()}
    return None


def comparable_metrics(model: EvaluatedModel) -> set[str]:
    """The metrics a comparison of such models can report (what --fail_if_worse may name)."""
    if model.stage == VAE.name:
        return {"psnr", "ssim", *UNPAIRED}
    conditions = {name for name in adherence_metric_names(model.spec) if _shown(name, {name})}
    return {*UNPAIRED, *conditions}


def _shown(metric: str, paired: set[str]) -> bool:
    if metric in UNPAIRED:
        return True
    return metric in paired and (metric in ("psnr", "ssim") or metric.endswith(("_pct", "_deg")))


def compare(settings: CompareSettings, a: Side, b: Side) -> tuple[list[MetricComparison], str]:
    """Score every model of both sides on the same samples; the rows and the line saying what noise they hold."""
    first = a.models[0]
    spec = first.spec if not first.spec.is_empty else ConditionSpec.parse(settings.condition_spec)
    some = _evaluation_settings(settings, a.uris[0])
    real = load_split(some, settings.split, str(spec))
    train = load_split(some, settings.train_split, str(spec))
    if first.stage == LATENT_DDPM.name and not first.spec.is_empty:
        check_conditions_known(real)
    probe = None if spec.is_empty else resolve_probe(some, spec, real.digest)
    ranges = manifest_ranges(train) if not spec.is_empty else {}
    evaluations = {}
    for side in (a, b):
        evaluations[side.label] = []
        for uri, model in zip(side.uris, side.models):
            logger.info("compare: scoring %s", uri)
            evaluations[side.label].append(evaluate(_evaluation_settings(settings, uri), model, real, train, probe))
    scores = {label: [_per_sample_score(e, spec, ranges) for e in found] for label, found in evaluations.items()}
    count = len(evaluations[a.label][0].samples)
    halves = {}
    if all(score is not None for found in scores.values() for score in found):
        halves = paired_half_widths(scores[a.label], scores[b.label], count, seed=settings.seed)
    paired = set(halves)
    for metric in UNPAIRED:  # independent: the two sides' own (mean) intervals in quadrature
        sides = [[e.metrics.get(metric + CI_SUFFIX) for e in evaluations[s.label]] for s in (a, b)]
        if all(value is not None for found in sides for value in found):
            halves[metric] = float(np.hypot(np.mean(sides[0]), np.mean(sides[1])))
    values = {label: {key: [e.metrics[key] for e in found] for key in found[0].metrics
                      if all(key in e.metrics for e in found)} for label, found in evaluations.items()}
    rows = compare_metrics(values[a.label], values[b.label], halves, higher_is_better)
    rows = [row for row in rows if _shown(row.metric, paired)]
    if a.is_group and b.is_group:
        noise = (f"evaluation noise (paired on {count} samples) and training noise ({len(a.uris)} and "
                 f"{len(b.uris)} replicates)")
    else:
        noise = (f"evaluation noise only (paired on {count} samples); training noise is not included: compare "
                 "replicate groups (--replicates) to include it")
    return rows, noise


def run_compare(model_a: str, model_b: str, settings: CompareSettings) -> ComparisonResult:
    """Resolve and check both sides, score them, print and log a compare run linking both."""
    from ldmflow.tracking.run_tracker import open_run

    a, b = resolve_side(model_a), resolve_side(model_b)
    if a.label == b.label:
        raise LdmflowError(f"A and B are both {a.label}: compare two different models.")
    check_comparable(a, b)
    possible = comparable_metrics(a.models[0])
    if settings.fail_if_worse and settings.fail_if_worse not in possible:
        raise LdmflowError(f"--fail_if_worse {settings.fail_if_worse}: not a metric these models are compared on "
                           f"(they are: {', '.join(sorted(possible))}).")
    Path(settings.output_dir).mkdir(parents=True, exist_ok=True)
    with open_run(settings, COMPARE_STAGE, enabled=not settings.no_mlflow) as tracker:
        tracker.set_tags({COMPARE_A_TAG: a.label, COMPARE_B_TAG: b.label,
                          COMPARE_A_RUNS_TAG: ",".join(filter(None, a.run_ids)),
                          COMPARE_B_RUNS_TAG: ",".join(filter(None, b.run_ids))})
        rows, noise = compare(settings, a, b)
        tracker.log_metrics({f"compare/{row.metric}/{part}": value for row in rows for part, value in
                             (("a", row.a), ("b", row.b), ("difference", row.difference),
                              ("ci95", row.half_width))}, step=0)
        tracker.log_dict({"a": a.label, "b": b.label, "a_models": a.uris, "b_models": b.uris, "noise": noise,
                          "rows": [{"metric": row.metric, "a": row.a, "b": row.b, "difference": row.difference,
                                    "ci95": row.half_width, "verdict": row.verdict} for row in rows]},
                         "comparison.json")
    return ComparisonResult(rows, format_comparison(rows, a.label, b.label, noise), getattr(tracker, "run_id", None))

