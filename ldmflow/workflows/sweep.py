"""`ldmflow sweep`: an Optuna study over one stage's settings, the study a parent run and each trial a child run.

Everything is checked before a run exists (the stage's fixed settings, the space, the objective, a study of the
same name made for another space). Each trial trains in its own run (its params, metrics, previews and logged
model, the suggested values also as `sweep.*` tags); a median pruner stops trials whose validation falls behind,
and the run of a pruned trial ends KILLED, tagged with its step. When the last worker stops, the best trial's
model is registered with the alias `sweep-<study>`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import warnings
from pathlib import Path

from ldmflow.environment import environment_tags
from ldmflow.errors import LdmflowError, require_modules
from ldmflow.evaluation.metric_names import VALIDATION, is_condition_metric
from ldmflow.models.kinds import VAE
from ldmflow.settings import SweepSettings, param_value
from ldmflow.tags import RUN_NAME_TAG, STAGE_TAG, SWEEP_STUDY_RUN_TAG, SWEEP_STUDY_TAG
from ldmflow.tracking.store import tag_run
from ldmflow.workflows.sweep_plan import (MODEL_ID_ATTR, SweepPlan, plan_sweep, stage_condition_spec,
                                          trial_settings)
from ldmflow.workflows.sweep_space import settings_values

logger = logging.getLogger(__name__)
SWEEP_STAGE = "sweep"  # the stage tag of a study's parent run


def _check_probe(plan: SweepPlan) -> None:
    """A condition objective is validated with the dataset's registered probe: without one, no trial could log it."""
    from ldmflow.tracking.registry import registered_probe_uri
    if not plan.objective.startswith(VALIDATION) or not is_condition_metric(plan.objective):
        return
    spec = None if plan.kind is VAE else stage_condition_spec(plan.base)
    if registered_probe_uri(plan.dataset_digest, spec) is None:
        raise LdmflowError(f"--objective {plan.objective} needs this dataset's registered condition probe, and there "
                           "is none: train one first with `ldmflow probe --manifest_path ...`.")


def run_sweep(settings: SweepSettings, stage_options: dict, given: frozenset[str] = frozenset()) -> dict:
    """Plan, then run trials until the study has --n_trials (or --timeout); returns the summary of `finish`. `given`:
    the stage options the command line gives (see `plan_sweep`)."""
    require_modules(("optuna",), "ldmflow sweep", "pip install 'ldmflow[sweep]' (or optuna>=4.5)")
    import optuna

    from ldmflow.tracking.store import ensure_experiment, use_tracking_store
    from ldmflow.tracking.study import StudyRuns, open_study, optuna_storage
    from ldmflow.tracking.study_report import log_study_params

    plan = plan_sweep(settings, stage_options, given)
    project_run = os.environ.pop("MLFLOW_RUN_ID", None)  # `mlflow run`'s run: trials have runs of their own
    rdb = None if settings.storage == "mlflow" else optuna_storage(settings.storage, "")  # a bad URL: no store yet
    use_tracking_store()
    _check_probe(plan)
    experiment_id = ensure_experiment(settings.experiment_name)
    storage = rdb or optuna_storage(settings.storage, experiment_id)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=settings.pruner_startup_trials) \
        if settings.pruner == "median" else optuna.pruners.NopPruner()
    study = open_study(storage, plan.name, plan.definition(), optuna.samplers.TPESampler(seed=settings.sampler_seed),
                       pruner)
    runs = StudyRuns(study, experiment_id)
    parent = runs.parent_run_id
    tag_run(parent, {STAGE_TAG: SWEEP_STAGE, SWEEP_STUDY_TAG: plan.name, **environment_tags()})
    log_study_params(parent, study_params(plan))
    if project_run:  # named after the study, and pointing to its run
        tag_run(project_run, {SWEEP_STUDY_RUN_TAG: parent, RUN_NAME_TAG: f"{SWEEP_STAGE}-{plan.name}"})
    logger.info("Study %s (run %s): %s %s of %s over %s.", plan.name, parent, plan.direction, plan.objective,
                plan.kind.command, ", ".join(dimension.name for dimension in plan.space.dimensions))
    from ldmflow.workflows.sweep_trial import optimize

    interrupted = optimize(study, plan, runs, settings)
    return finish(study, plan, runs, settings, interrupted)


def study_params(plan: SweepPlan) -> dict[str, str]:
    """The study run's params: what it optimises, its space, and the stage's fixed settings (not those it varies)."""
    varied = {dimension.name for dimension in plan.space.dimensions}
    fixed = {key: value for key, value in plan.base.to_params().items() if key not in varied}
    return {**fixed, "sweep_stage": plan.kind.name, "sweep_objective": plan.objective,
            "sweep_direction": plan.direction, "sweep_space": json.dumps(plan.space.to_dict(), sort_keys=True)}


def command_line(plan: SweepPlan, params: dict) -> str:
    """`ldmflow <stage> ...` that trains the trial with `params` again (into <output_dir>/best)."""
    settings = dataclasses.replace(trial_settings(plan, 0, settings_values(params, plan.base)), run_name=None,
                                   output_dir=str(Path(plan.base.output_dir) / "best"))
    parts = ["ldmflow", plan.kind.command]
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        if value is None or value == item.default:
            continue
        if isinstance(value, bool):
            parts.append(f"--{item.name}" if value else f"--no_{item.name}")
        else:
            parts += [f"--{item.name}", shlex.quote(param_value(value))]
    return " ".join(parts)


def finish(study, plan: SweepPlan, runs, settings: SweepSettings, interrupted: KeyboardInterrupt | None) -> dict:
    """The parent run's report; when no other worker still runs a trial: register the best model and end the
    parent run. Returns {study, run_id, best_trial, best_value, best_params, registered}."""
    from mlflow import MlflowClient
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    from ldmflow.tracking.study_report import log_study_report

    parent = runs.parent_run_id
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = study.best_trial if complete else None
    log_study_report(study, runs, command_line(plan, best.params) if best else None)
    with warnings.catch_warnings():  # "experimental"
        warnings.simplefilter("ignore")
        fail_stale_trials(study)  # a killed worker's trial no longer counts as running
    trials = study.get_trials(deepcopy=False)  # again: another worker may have started one meanwhile
    others = any(trial.state == TrialState.RUNNING for trial in trials)
    registered = None
    if not others:
        registered = _register_best(best, plan, settings) if best else None
        MlflowClient().set_terminated(parent, "KILLED" if interrupted is not None else "FINISHED")
    if interrupted is not None:
        raise interrupted
    if best is None:
        raise LdmflowError(f"No trial of study {plan.name!r} finished ({len(trials)} ran: "
                           f"{', '.join(sorted({trial.state.name for trial in trials}))}); see its runs in MLflow.")
    return {"study": plan.name, "run_id": parent, "best_trial": best.number, "best_value": best.value,
            "best_params": best.params, "registered": registered, "trials": len(trials)}


def _register_best(best, plan: SweepPlan, settings: SweepSettings) -> str | None:
    """Register the best trial's logged model with the alias sweep-<study>, unless it already has it."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from ldmflow.tracking.registry import register_logged_model

    model_id = best.user_attrs.get(MODEL_ID_ATTR)
    if not model_id:
        return None
    name = settings.registered_model_name or plan.kind.registered_name
    alias = f"sweep-{plan.name}"
    try:
        current = MlflowClient().get_model_version_by_alias(name, alias)
        if model_id in (current.model_id, current.source.removeprefix("models:/")):  # model_id may be unset here
            return f"models:/{name}/{current.version}"
    except MlflowException:
        pass  # no such alias yet
    return register_logged_model(model_id, name, alias).model_uri
