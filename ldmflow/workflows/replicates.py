"""`--replicates N`: one recipe trained with the seeds seed, seed + 1, ..., seed + N - 1, as N child runs of one
parent run.

A training's score is one draw of its training noise. The parent run carries each final metric's mean over the
replicates with `_sd`, `_min` and `_max` beside it, so the MLflow compare view sets recipes side by side beyond
one lucky seed, and `ldmflow compare runs:/<parent> ...` includes that noise in its intervals. Every replicate
logs its model; the one nearest the group's mean on the metric that picked its weights is registered (the
recipe's typical model, not its luckiest seed), and the parent run says which and why.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldmflow.errors import LdmflowError
from ldmflow.evaluation.adherence import MEAN_ERROR
from ldmflow.settings import TrainSettings, resumable_changes
from ldmflow.tracking.run_tracker import outside_the_project_run
from ldmflow.tags import (PARENT_RUN_TAG, REGISTERED_URI_TAG, REPLICATE_GROUP_TAG, REPLICATE_INDEX_TAG,
                          REPLICATE_MODEL_TAG, REPLICATE_OF_TAG, REPLICATE_REGISTERED_TAG, REPLICATES_TAG, STAGE_TAG)
from ldmflow.workflows.train import kind_trained_by, run_training

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Replicate:
    seed: int
    run_id: str
    model_uri: str  # models:/<logged model id>
    metrics: dict[str, float]
    selection: tuple[str, float] | None  # the metric that picked its weights, and its value there


def group_metrics(replicates: list[Replicate]) -> dict[str, float]:
    """Each metric every replicate has: its mean, and `_sd` (sample sd), `_min` and `_max` over replicates."""
    common = set.intersection(*(set(r.metrics) for r in replicates))
    summary = {}
    for key in sorted(common):
        values = np.array([r.metrics[key] for r in replicates], dtype=np.float64)
        if not np.all(np.isfinite(values)):
            continue
        summary.update({key: float(values.mean()), f"{key}_sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                        f"{key}_min": float(values.min()), f"{key}_max": float(values.max())})
    return summary


def nearest_the_mean(replicates: list[Replicate]) -> tuple[Replicate, str]:
    """The replicate to register, and why: nearest the group's mean of the metric that picked each one's
    weights (its best validation score), else the first."""
    picked = [r.selection for r in replicates]
    if all(p is not None and p[0] == picked[0][0] and np.isfinite(p[1]) for p in picked):
        metric, mean = picked[0][0], float(np.mean([p[1] for p in picked]))
        chosen = min(replicates, key=lambda r: abs(r.selection[1] - mean))
        return chosen, (f"seed {chosen.seed} (run {chosen.run_id}): its {metric} {chosen.selection[1]:.4g} is the "
                        f"nearest to the group's mean {mean:.4g}, the recipe's typical model")
    return replicates[0], f"seed {replicates[0].seed} (run {replicates[0].run_id}): no shared selection metric"


def _replicate(settings: TrainSettings, index: int, parent_run_id: str, run_id: str | None = None,
               on_validation=None) -> Replicate:
    """Train seed settings.seed + index as a child of the group (in `run_id` when one was started for it, told
    of each validation by `on_validation`: a sweep's pruner)."""
    from mlflow import MlflowClient

    from ldmflow.workflows.train import TrialRun

    seed = settings.seed + index
    child = dataclasses.replace(settings, seed=seed, replicates=1, replicate_group=None,
                                output_dir=str(Path(settings.output_dir) / f"replicate-{index}"),
                                run_name=f"{settings.run_name or kind_trained_by(settings).name}-seed{seed}")
    logger.info("Replicate %d of %d: seed %d.", index + 1, settings.replicates, seed)
    try:
        with outside_the_project_run():
            outcome, model_uri = run_training(child, parent_run_id=parent_run_id, register=False,
                                              trial=TrialRun(run_id, on_validation) if run_id else None)
    except LdmflowError as error:
        raise LdmflowError(f"Replicate {index + 1} of {settings.replicates} (seed {seed}) failed: {error}") from None
    client = MlflowClient()
    run_id = client.get_logged_model(model_uri.removeprefix("models:/")).source_run_id
    client.set_tag(run_id, REPLICATE_OF_TAG, parent_run_id)
    client.set_tag(run_id, REPLICATE_MODEL_TAG, model_uri)
    selection = (outcome.metric, outcome.metric_value) if outcome.metric is not None else None
    metrics = {key: value for key, value in client.get_run(run_id).data.metrics.items()
               if not key.startswith("system/")}  # each metric's last value; not the machine's load
    return Replicate(seed, run_id, model_uri, metrics, selection)


def run_replicates(settings: TrainSettings) -> list[Replicate]:
    """Train `settings.replicates` seeds of one recipe under one parent run, and register the typical one."""
    from mlflow import MlflowClient

    from ldmflow.tracking.run_tracker import open_run

    kind = kind_trained_by(settings)
    if settings.no_mlflow:
        raise LdmflowError("--replicates needs MLflow (the group is a parent run of the replicates' runs): drop "
                           "--no_mlflow, or train the seeds one by one with --seed.")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LdmflowError("--replicates runs its seeds one after another in one process: start it without "
                           "accelerate launch; for several devices, start it once per device with --replicate_group.")
    if settings.replicate_group:
        return run_replicate_worker(settings)
    with open_run(settings, kind.name) as parent:
        parent.set_tags({REPLICATES_TAG: str(settings.replicates)})
        replicates = [_replicate(settings, i, parent.run_id) for i in range(settings.replicates)]
        _summarize(MlflowClient(), parent.run_id, replicates, settings)
    return replicates


def log_group_metrics(client, run_id: str, replicates: list[Replicate]) -> dict[str, float]:
    """group_metrics logged on the group's run at step 0, and returned."""
    from mlflow.entities import Metric

    summary, now = group_metrics(replicates), int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, value, now, 0) for key, value in summary.items()])
    return summary


def _summarize(client, parent_run_id: str, replicates: list[Replicate], settings: TrainSettings) -> None:
    """The group's metrics on its parent run, and the replicate nearest the mean registered."""
    from ldmflow.tracking.registry import register_logged_model
    from ldmflow.tracking.store import tag_run

    log_group_metrics(client, parent_run_id, replicates)
    chosen, why = nearest_the_mean(replicates)
    registered = register_logged_model(chosen.model_uri.removeprefix("models:/"), settings.registered_model_name,
                                       settings.register_alias)
    tag_run(parent_run_id, {REPLICATE_REGISTERED_TAG: f"{registered.model_uri}: {why}",
                            REGISTERED_URI_TAG: registered.model_uri}, client)
    logger.info("Replicate group %s: registered %s, %s.", parent_run_id, registered.model_uri, why)


# A replicate group in several processes (--replicate_group). MLflow has no transactions, so each worker claims by
# writing first and reading back: of the runs that claim one thing (the group's parent, or a seed), the earliest
# (by start time, then id) holds it and the others delete theirs. A claim whose run failed or was killed is free
# again, so running the same command again continues a group.

def _earliest(runs):
    return min(runs, key=lambda run: (run.info.start_time, run.info.run_id))


def _group_parents(client, experiment_id: str, name: str):
    from ldmflow.tracking.store import equals

    return [run for run in client.search_runs([experiment_id], f"{equals('tags.' + REPLICATE_GROUP_TAG, name)}")
            if run.data.tags.get(REPLICATE_GROUP_TAG) == name and run.info.status in ("RUNNING", "FINISHED")]


def _join_group(client, settings: TrainSettings, stage: str) -> str:
    """The run id of group `settings.replicate_group`'s parent: the one there, or one this worker starts."""
    from mlflow.entities import Param

    from ldmflow.environment import environment_tags
    from ldmflow.tracking.store import ensure_experiment

    experiment_id = ensure_experiment(settings.experiment_name)
    name, params = settings.replicate_group, settings.to_params()
    parents = _group_parents(client, experiment_id, name)
    if not parents:
        mine = client.create_run(experiment_id, run_name=settings.run_name or f"{stage}-{name}", tags={
            STAGE_TAG: stage, REPLICATES_TAG: str(settings.replicates), REPLICATE_GROUP_TAG: name,
            **environment_tags()})
        client.log_batch(mine.info.run_id, params=[Param(key, value) for key, value in params.items()])
        parents = _group_parents(client, experiment_id, name)
        if _earliest(parents).info.run_id != mine.info.run_id:
            client.delete_run(mine.info.run_id)  # another worker started the group at the same moment
    parent = _earliest(parents)  # a losing worker's own parent is deleted, but never the earliest
    ignored = {"seed", "run_name", "output_dir", "register_alias"} | resumable_changes(type(settings))
    changed = sorted(key for key, value in params.items()
                     if key not in ignored and parent.data.params.get(key, value) != value)
    if changed:
        raise LdmflowError(f"Replicate group {name!r} (run {parent.info.run_id}) trains another recipe: "
                           + ", ".join(f"--{key} {parent.data.params[key]!r} there, {params[key]!r} here"
                                       for key in changed) + ". Give the same settings, or another group name.")
    return parent.info.run_id


def _children(client, parent_run_id: str):
    from ldmflow.tracking.store import equals

    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return [run for run in client.search_runs([experiment_id], equals(f"tags.{REPLICATE_OF_TAG}", parent_run_id))
            if run.info.status in ("RUNNING", "FINISHED") and REPLICATE_INDEX_TAG in run.data.tags]


def _holders(children) -> dict[int, object]:
    """Seed index -> the run that holds it (the earliest claim of that index)."""
    claims: dict[int, list] = {}
    for run in children:
        claims.setdefault(int(run.data.tags[REPLICATE_INDEX_TAG]), []).append(run)
    return {index: _earliest(runs) for index, runs in claims.items()}


def _claim_next(client, settings: TrainSettings, parent_run_id: str, stage: str) -> tuple[int, str] | None:
    """(seed index, run id) of the next replicate nobody holds, claimed by this worker; None when none is left."""
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    while True:
        held = _holders(_children(client, parent_run_id))
        free = [index for index in range(settings.replicates) if index not in held]
        if not free:
            return None
        index = free[0]
        run_id = start_replicate_run(client, settings, parent_run_id, index, stage, experiment_id)
        if _holders(_children(client, parent_run_id))[index].info.run_id == run_id:
            return index, run_id
        client.delete_run(run_id)  # another worker claimed it first: try the next one


def start_replicate_run(client, settings: TrainSettings, parent_run_id: str, index: int, stage: str,
                        experiment_id: str) -> str:
    """A RUNNING child run of `parent_run_id` for seed settings.seed + index, which the replicate then trains in."""
    from ldmflow.environment import environment_tags

    run = client.create_run(experiment_id, run_name=f"{settings.run_name or stage}-seed{settings.seed + index}",
                            tags={STAGE_TAG: stage, PARENT_RUN_TAG: parent_run_id, REPLICATE_OF_TAG: parent_run_id,
                                  REPLICATE_INDEX_TAG: str(index), **environment_tags()})
    return run.info.run_id


def train_in_runs(settings: TrainSettings, parent_run_id: str, on_first_validation=None) -> list[Replicate]:
    """Every seed of a group as a child run of `parent_run_id`, one after another (a sweep trial's replicates:
    the first one's validations go to the pruner, which may stop the trial there)."""
    from mlflow import MlflowClient

    from ldmflow.errors import Stopped

    client, stage = MlflowClient(), kind_trained_by(settings).name
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    replicates = []
    for index in range(settings.replicates):
        run_id = start_replicate_run(client, settings, parent_run_id, index, stage, experiment_id)
        status = "FAILED"
        try:
            replicates.append(_replicate(settings, index, parent_run_id, run_id,
                                         on_first_validation if index == 0 else None))
            status = "FINISHED"
        except (KeyboardInterrupt, Stopped):
            status = "KILLED"
            raise
        finally:
            client.set_terminated(run_id, status)
    return replicates


def _as_replicate(run, first_seed: int) -> Replicate:
    """A finished replicate's run read back (another worker may have trained it)."""
    from ldmflow.tags import BEST_CHECKPOINT_METRIC_TAG

    metrics = {key: value for key, value in run.data.metrics.items() if not key.startswith("system/")}
    metric, _, value = run.data.tags.get(BEST_CHECKPOINT_METRIC_TAG, "").partition("=")
    selection = (metric, float(value)) if metric and value else None
    return Replicate(first_seed + int(run.data.tags[REPLICATE_INDEX_TAG]), run.info.run_id,
                     run.data.tags.get(REPLICATE_MODEL_TAG, ""), metrics, selection)


def run_replicate_worker(settings: TrainSettings) -> list[Replicate]:
    """One process of a replicate group: trains seeds nobody has taken until none is left; the worker that
    finishes the group's last seed writes its metrics, registers the typical model and ends its parent run."""
    from mlflow import MlflowClient

    from ldmflow.tracking.store import use_tracking_store

    use_tracking_store()
    client, stage = MlflowClient(), kind_trained_by(settings).name
    with outside_the_project_run():
        parent_run_id = _join_group(client, settings, stage)
    logger.info("Replicate group %r: run %s, %d seeds from %d.", settings.replicate_group, parent_run_id,
                settings.replicates, settings.seed)
    mine = []
    while (claim := _claim_next(client, settings, parent_run_id, stage)) is not None:
        index, run_id = claim
        status = "FAILED"
        try:
            mine.append(_replicate(settings, index, parent_run_id, run_id))
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            client.set_terminated(run_id, status)
    held = _holders(_children(client, parent_run_id))
    finished = [held[i] for i in range(settings.replicates) if i in held and held[i].info.status == "FINISHED"]
    if len(finished) < settings.replicates:
        logger.info("Replicate group %s: %d of %d seeds finished; the worker that finishes the last one summarises "
                    "the group.", parent_run_id, len(finished), settings.replicates)
        return mine
    last = max(finished, key=lambda run: (run.info.end_time or 0, run.info.run_id))
    if mine and last.info.run_id == mine[-1].run_id and client.get_run(parent_run_id).info.status == "RUNNING":
        _summarize(client, parent_run_id, [_as_replicate(run, settings.seed) for run in finished], settings)
        client.set_terminated(parent_run_id, "FINISHED")
    return mine


def train(settings: TrainSettings):
    """A trainer command: one training, or a replicate group when --replicates is above 1."""
    if settings.replicates > 1:
        return run_replicates(settings)
    return run_training(settings)


def run_pipeline_replicates(settings) -> tuple[str, list[Replicate], str]:
    """`ldmflow pipeline --replicates N`: N pipelines (seeds seed, seed + 1, ...) as child runs of one parent run
    whose metrics are each evaluation score's (and the VAE's val PSNR/SSIM's) mean, sd, min and max. Each
    pipeline registers its own models, as a single one does; the group run names the one nearest the mean."""
    from mlflow import MlflowClient

    from ldmflow.tracking.lineage import version_metrics
    from ldmflow.tracking.run_tracker import open_run
    from ldmflow.workflows.pipeline import PIPELINE_STAGE, evaluation_metrics, run_pipeline

    replicates = []
    with open_run(settings, PIPELINE_STAGE) as parent:
        parent.set_tags({REPLICATES_TAG: str(settings.replicates)})
        for index in range(settings.replicates):
            seed = settings.seed + index
            child = dataclasses.replace(settings, seed=seed, replicates=1,
                                        output_root=str(Path(settings.output_root) / f"replicate-{index}"))
            logger.info("Replicate %d of %d: the pipeline with seed %d.", index + 1, settings.replicates, seed)
            with outside_the_project_run():
                result = run_pipeline(child, parent_run_id=parent.run_id)
            run_id = MlflowClient().get_run(result.evaluate_run_id).data.tags.get(PARENT_RUN_TAG, "")
            for key, value in ((REPLICATE_OF_TAG, parent.run_id), (REPLICATE_MODEL_TAG, result.latent_ddpm_uri)):
                MlflowClient().set_tag(run_id, key, value)
            metrics = {**evaluation_metrics(result.evaluate_run_id),
                       **{f"vae_{key}": value for key, value in version_metrics(result.vae_uri).items()
                          if key in ("val/psnr", "val/ssim")}}
            mean_error = f"eval/{MEAN_ERROR}"
            selection = (mean_error, metrics[mean_error]) if mean_error in metrics else None
            replicates.append(Replicate(seed, run_id, result.latent_ddpm_uri, metrics, selection))
        parent.log_metrics(group_metrics(replicates), step=0)
        chosen, why = nearest_the_mean(replicates)
        parent.set_tags({REPLICATE_REGISTERED_TAG: f"{chosen.model_uri}: {why}"})
    return parent.run_id, replicates, f"{chosen.model_uri}, {why}"


HEADLINES = ("eval/temperature_mae_pct", "eval/wind_angle_error_deg", "eval/wind_mag_mae_pct",
             f"eval/{MEAN_ERROR}", "eval/fid", "vae_val/psnr")


def format_group(group: tuple[str, list[Replicate], str]) -> str:
    """What `ldmflow pipeline --replicates N` prints: each replicate's model, the headline scores' mean ± sd
    (min to max), and the typical model."""
    run_id, replicates, typical = group
    summary = group_metrics(replicates)
    lines = [f"Replicate group {run_id}: {len(replicates)} pipelines (seeds {replicates[0].seed} to "
             f"{replicates[-1].seed}): " + ", ".join(r.model_uri for r in replicates) + "."]
    lines += [f"  {key}: {summary[key]:.4g} ± {summary[key + '_sd']:.2g} ({summary[key + '_min']:.4g} to "
              f"{summary[key + '_max']:.4g})" for key in HEADLINES if key in summary]
    return "\n".join(lines + [f"Nearest the mean: {typical}."])

