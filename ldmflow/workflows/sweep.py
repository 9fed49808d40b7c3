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
from dataclasses import dataclass
from pathlib import Path

from ldmflow.data.conditions import ConditionSpec
from ldmflow.data.manifest import NothingUsableError, load_manifest
from ldmflow.environment import environment_tags
from ldmflow.errors import LdmflowError, require_modules
from ldmflow.evaluation.adherence import adherence_metric_names
from ldmflow.models.kinds import LATENT_DDPM, LEGACY_DDPM, VAE, Kind
from ldmflow.settings import EvaluateSettings, SweepSettings, TrainSettings, param_value
from ldmflow.tags import (RUN_NAME_TAG, STAGE_TAG, SWEEP_PARAM_TAG_PREFIX, SWEEP_PRUNED_TAG, SWEEP_STUDY_RUN_TAG,
                          SWEEP_STUDY_TAG, SWEEP_TRIAL_TAG)
from ldmflow.training.loop import higher_is_better
from ldmflow.workflows.sweep_space import SearchSpace, load_space, settings_values

logger = logging.getLogger(__name__)
SWEEP_STAGE = "sweep"  # the stage tag of a study's parent run
STAGE_KINDS = {kind.command: kind for kind in (VAE, LATENT_DDPM, LEGACY_DDPM)}
MODEL_ID_ATTR = "model_id"  # a finished trial's user attribute: its logged model
_EVAL_SCORES = {VAE.name: ("psnr", "ssim", "lpips", "rfid", "rkid"), LATENT_DDPM.name: ("fid", "kid", "diversity"),
                LEGACY_DDPM.name: ("fid", "kid", "diversity")}


@dataclass(frozen=True)
class SweepPlan:
    """A checked sweep: the stage, its fixed settings, the space, what is optimised and the study's name."""

    kind: Kind
    base: TrainSettings
    space: SearchSpace
    objective: str
    direction: str  # minimize or maximize
    name: str
    dataset_digest: str  # of the training split

    def definition(self) -> dict:
        """What a study records, so that the same name with another space is refused."""
        return {"stage": self.kind.name, "space": self.space.to_dict(), "objective": self.objective,
                "direction": self.direction}


def plan_sweep(settings: SweepSettings, stage_options: dict, given: frozenset[str] = frozenset()) -> SweepPlan:
    """Check everything a sweep needs before any run: bad input fails in one line, with nothing tracked. `given`: the
    stage options the command line gives, which the space may not search as well."""
    kind = STAGE_KINDS[settings.stage]
    base = kind.settings(**{**stage_options, "experiment_name": settings.experiment_name})
    if base.no_mlflow:
        raise LdmflowError("A sweep tracks every trial in MLflow: leave out --no_mlflow.")
    spec = _condition_spec(base)
    manifest = load_manifest(base.manifest_path, base.split, spec, base.data_root, base.allow_outside_root)
    space = load_space(settings.space, base)
    both = [dimension.name for dimension in space.dimensions if dimension.name in given]
    if both:
        raise LdmflowError(f"--{both[0]} is given on the command line and searched by the space {settings.space}: "
                           "leave it out of one of them (every trial would use the space's value).")
    objective = settings.objective or base.checkpoint_metric or _default_objective(kind, base)
    _check_objective(kind, base, objective, spec)
    direction = settings.direction if settings.direction != "auto" else \
        "maximize" if higher_is_better(objective) else "minimize"
    return SweepPlan(kind, base, space, objective, direction, settings.study_name or _default_name(kind, settings),
                     manifest.digest)


def _default_name(kind: Kind, settings: SweepSettings) -> str:
    """<stage>-<space file name>, in the letters a study name (and the alias sweep-<study>) may use."""
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(settings.space).stem)
    return f"{kind.command}-{stem}"


def _condition_spec(base: TrainSettings) -> str:
    return getattr(base, "condition_spec", "none")


def _default_objective(kind: Kind, base: TrainSettings) -> str:
    """The stage's own checkpoint metric without a probe (a latent DDPM with one defaults to condition error)."""
    if kind is VAE:
        return "val/psnr"
    return "val/denoise_loss_ema" if base.use_ema else "val/denoise_loss"


def stage_metrics(kind: Kind, spec: str) -> tuple[str, ...]:
    """The validation and evaluate metrics a stage can log (condition ones need the dataset's probe)."""
    conditions = adherence_metric_names(ConditionSpec.parse(spec)) if spec.strip().lower() != "none" else ()
    if kind is VAE:
        validation = ("val/psnr", "val/ssim", "val/lpips")
    else:
        validation = ("val/denoise_loss", "val/denoise_loss_ema") + tuple(f"val/{name}" for name in
                                                                       (conditions if kind is LATENT_DDPM else ()))
    scores = _EVAL_SCORES[kind.name] + (conditions if kind is LATENT_DDPM else ())
    return validation + tuple(f"eval/{name}" for name in scores)


def _check_objective(kind: Kind, base: TrainSettings, objective: str, spec: str) -> None:
    known = stage_metrics(kind, spec)
    if objective not in known and not (kind is VAE and objective.startswith("val/recon/")):
        raise LdmflowError(f"--objective {objective}: {kind.command} never logs it; it logs "
                           f"{', '.join(known)}.")
    if not objective.startswith("val/"):
        return
    if base.eval_epochs == 0 or not base.val_split:
        raise LdmflowError(f"--objective {objective} is a validation metric: leave out --eval_epochs 0 and give "
                           "the stage a --val_split.")
    try:
        load_manifest(base.manifest_path, base.val_split, spec, base.data_root, base.allow_outside_root)
    except NothingUsableError:
        raise LdmflowError(f"--objective {objective} needs validation, but the manifest has no usable "
                           f"'{base.val_split}' entries (--val_split).") from None


def _check_probe(plan: SweepPlan) -> None:
    """A condition objective is validated with the dataset's registered probe: without one, no trial could log it."""
    from ldmflow.tracking.registry import registered_probe_uri
    from ldmflow.training.prepare import CONDITION_METRIC_MARKS

    if not plan.objective.startswith("val/") or not any(mark in plan.objective for mark in CONDITION_METRIC_MARKS):
        return
    spec = None if plan.kind is VAE else _condition_spec(plan.base)
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
    _tag_run(parent, {STAGE_TAG: SWEEP_STAGE, SWEEP_STUDY_TAG: plan.name, **environment_tags()})
    log_study_params(parent, study_params(plan))
    if project_run:  # named after the study, and pointing to its run
        _tag_run(project_run, {SWEEP_STUDY_RUN_TAG: parent, RUN_NAME_TAG: f"{SWEEP_STAGE}-{plan.name}"})
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


def _tag_run(run_id: str, tags: dict[str, str]) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    MlflowClient().log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])


def trial_tags(plan: SweepPlan, number: int, values: dict) -> dict[str, str]:
    """A trial run's name, study, number and suggested values (`sweep.<setting>`)."""
    return {RUN_NAME_TAG: trial_name(plan, number), SWEEP_STUDY_TAG: plan.name, SWEEP_TRIAL_TAG: str(number),
            **{f"{SWEEP_PARAM_TAG_PREFIX}{key}": param_value(value) for key, value in values.items()}}


def trial_name(plan: SweepPlan, number: int) -> str:
    return f"{plan.name}-trial-{number:03d}"


def trial_settings(plan: SweepPlan, number: int, values: dict, run_id: str = "") -> TrainSettings:
    """The stage's settings of one trial: the fixed ones, the suggested ones, its own folder (named after its run
    too: concurrent workers may give two trials one number) and run name; a validation objective also picks the
    trial's best checkpoint."""
    folder = Path(plan.base.output_dir) / "-".join(filter(None, (trial_name(plan, number), run_id[:8])))
    metric = plan.objective if plan.objective.startswith("val/") else plan.base.checkpoint_metric
    return dataclasses.replace(plan.base, **values, output_dir=str(folder), run_name=trial_name(plan, number),
                               checkpoint_metric=metric)


def evaluation_settings(plan: SweepPlan, model_uri: str, output_dir: Path) -> EvaluateSettings:
    """`ldmflow evaluate` of a trial's model on the stage's validation split, with evaluate's defaults."""
    base = plan.base
    return EvaluateSettings(model_uri=model_uri, manifest_path=base.manifest_path, split=base.val_split,
                            train_split=base.split, data_root=base.data_root,
                            allow_outside_root=base.allow_outside_root, output_dir=str(output_dir / "evaluate"),
                            condition_spec=_condition_spec(base) if _condition_spec(base) != "none" else
                            EvaluateSettings.condition_spec, experiment_name=base.experiment_name)


def pruned_tags(step: int) -> dict[str, str]:
    return {SWEEP_PRUNED_TAG: str(step)}


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
