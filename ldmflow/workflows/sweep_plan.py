"""A sweep's plan and each trial's names, tags and settings: what `ldmflow sweep` and its workers both read.

Its own module so that sweep.py (the command) and sweep_trial.py (a worker) share it without importing each other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ldmflow.data.manifest import NothingUsableError, load_manifest
from ldmflow.errors import LdmflowError
from ldmflow.evaluation.metric_names import (DENOISE_LOSS_EMA, RECONSTRUCTION_PREFIX, VALIDATION, VALIDATION_METRICS,
                                             higher_is_better, stage_metrics)
from ldmflow.models.kinds import LATENT_DDPM, LEGACY_DDPM, VAE, Kind
from ldmflow.settings import EvaluateSettings, SweepSettings, TrainSettings, param_value
from ldmflow.tags import RUN_NAME_TAG, SWEEP_PARAM_TAG_PREFIX, SWEEP_PRUNED_TAG, SWEEP_STUDY_TAG, SWEEP_TRIAL_TAG
from ldmflow.workflows.sweep_space import SearchSpace, load_space

STAGE_KINDS = {kind.command: kind for kind in (VAE, LATENT_DDPM, LEGACY_DDPM)}
MODEL_ID_ATTR = "model_id"  # a finished trial's user attribute: its logged model


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
    spec = stage_condition_spec(base)
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


def stage_condition_spec(base: TrainSettings) -> str:
    return getattr(base, "condition_spec", "none")


def _default_objective(kind: Kind, base: TrainSettings) -> str:
    """The stage's own checkpoint metric without a probe (a latent DDPM with one defaults to condition error)."""
    metrics = VALIDATION_METRICS[kind]
    return DENOISE_LOSS_EMA if DENOISE_LOSS_EMA in metrics and base.use_ema else metrics[0]


def _check_objective(kind: Kind, base: TrainSettings, objective: str, spec: str) -> None:
    known = stage_metrics(kind, spec)
    if objective not in known and not (kind is VAE and objective.startswith(RECONSTRUCTION_PREFIX)):
        raise LdmflowError(f"--objective {objective}: {kind.command} never logs it; it logs "
                           f"{', '.join(known)}.")
    if not objective.startswith(VALIDATION):
        return
    if base.eval_epochs == 0 or not base.val_split:
        raise LdmflowError(f"--objective {objective} is a validation metric: leave out --eval_epochs 0 and give "
                           "the stage a --val_split.")
    try:
        load_manifest(base.manifest_path, base.val_split, spec, base.data_root, base.allow_outside_root)
    except NothingUsableError:
        raise LdmflowError(f"--objective {objective} needs validation, but the manifest has no usable "
                           f"'{base.val_split}' entries (--val_split).") from None


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
    metric = plan.objective if plan.objective.startswith(VALIDATION) else plan.base.checkpoint_metric
    return dataclasses.replace(plan.base, **values, output_dir=str(folder), run_name=trial_name(plan, number),
                               checkpoint_metric=metric)


def evaluation_settings(plan: SweepPlan, model_uri: str, output_dir: Path) -> EvaluateSettings:
    """`ldmflow evaluate` of a trial's model on the stage's validation split, with evaluate's defaults."""
    base = plan.base
    return EvaluateSettings(model_uri=model_uri, manifest_path=base.manifest_path, split=base.val_split,
                            train_split=base.split, data_root=base.data_root,
                            allow_outside_root=base.allow_outside_root, output_dir=str(output_dir / "evaluate"),
                            condition_spec=stage_condition_spec(base) if stage_condition_spec(base) != "none" else
                            EvaluateSettings.condition_spec, experiment_name=base.experiment_name)


def pruned_tags(step: int) -> dict[str, str]:
    return {SWEEP_PRUNED_TAG: str(step)}


