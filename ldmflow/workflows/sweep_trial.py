"""One worker of a sweep: ask the study for trials and train each one in its own run until the study is done.

A trial's run is the one its study made (MlflowStorage), so the study sees its state; the trainer attaches to
it, and the pruner is a small callback the training loop calls after each validation.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import optuna  # this module runs only inside `ldmflow sweep`, which checks Optuna is installed

from ldmflow.errors import LdmflowError, Stopped
from ldmflow.evaluation.metric_names import EVALUATION
from ldmflow.settings import SweepSettings
from ldmflow.tracking.store import tag_run
from ldmflow.workflows.sweep_plan import (MODEL_ID_ATTR, SweepPlan, evaluation_settings, pruned_tags, trial_settings,
                                          trial_tags)
from ldmflow.workflows.sweep_space import settings_values

logger = logging.getLogger(__name__)


class _Pruned(Stopped, optuna.TrialPruned):
    """A pruned trial: Optuna marks it pruned, and the run tracker knows it is not a failure."""


def optimize(study, plan: SweepPlan, runs, settings: SweepSettings) -> KeyboardInterrupt | None:
    """Run trials until the study has --n_trials finished or pruned ones, or --timeout; the interruption after
    Ctrl-C or SIGTERM (None otherwise).

    A trial that fails (bad combination of values, divergence) is recorded FAILED and the sweep goes on."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED)
    if len(study.get_trials(deepcopy=False, states=done)) >= settings.n_trials:
        logger.info("Study %s already has %d trials.", plan.name, settings.n_trials)
        return None
    try:
        study.optimize(_Objective(plan, runs), n_trials=settings.n_trials, timeout=settings.timeout,
                       catch=(LdmflowError,), callbacks=[MaxTrialsCallback(settings.n_trials, states=done)])
    except KeyboardInterrupt as interruption:  # Ctrl-C or SIGTERM: kept, so the command says which
        logger.warning("Interrupted: the running trial is marked FAILED; run the same command to continue.")
        return interruption
    finally:
        if hasattr(study._storage, "flush_all_batches"):
            study._storage.flush_all_batches()
    return None


class _Objective:
    """Train one trial in its run and return its objective value; the run ends KILLED when pruned, FAILED on an
    error or Ctrl-C."""

    def __init__(self, plan: SweepPlan, runs):
        self.plan, self.runs = plan, runs

    def __call__(self, trial) -> float:
        run_id = self.runs.start(trial)
        try:
            value = self._train(trial, run_id)
        except optuna.TrialPruned:
            self.runs.end(run_id, "KILLED")
            raise
        except LdmflowError as error:  # recorded FAILED; the next trial starts
            logger.warning("Trial %d failed: %s", trial.number, error)
            self.runs.end(run_id, "FAILED")
            raise
        except BaseException:
            self.runs.end(run_id, "FAILED")
            raise
        self.runs.end(run_id, "FINISHED")
        return value

    def _train(self, trial, run_id: str) -> float:
        from ldmflow.workflows.train import TrialRun, run_training

        plan = self.plan
        values = settings_values(plan.space.suggest(trial), plan.base)
        tag_run(run_id, trial_tags(plan, trial.number, values))
        if hasattr(trial.study._storage, "flush_all_batches"):  # the suggested params reach the run first
            trial.study._storage.flush_all_batches()
        settings = trial_settings(plan, trial.number, values, run_id)
        logger.info("Trial %d: %s", trial.number, ", ".join(f"{k}={v}" for k, v in values.items()))
        pruning = _Pruning(trial, plan.objective, run_id)
        if settings.replicates > 1:
            return self._train_replicates(trial, run_id, settings, pruning)
        outcome, model_uri = run_training(settings, trial=TrialRun(run_id, pruning))
        trial.set_user_attr(MODEL_ID_ATTR, model_uri.removeprefix("models:/"))
        value = outcome.metric_value if outcome.metric == plan.objective else pruning.last
        if plan.objective.startswith(EVALUATION):
            value = _evaluate(plan, model_uri, Path(settings.output_dir), run_id)
        if value is None or not math.isfinite(value):
            raise LdmflowError(f"Trial {trial.number} logged no finite {plan.objective}.")
        logger.info("Trial %d: %s = %.6g", trial.number, plan.objective, value)
        return value


    def _train_replicates(self, trial, run_id: str, settings, pruning) -> float:
        """--replicates N on a sweep: the trial's run is the parent of N seeds (the first one reports to the
        pruner); its objective is their mean (`_sd`, `_min`, `_max` beside it on the run), and the trial's model,
        which the sweep registers if it wins, is the replicate nearest that mean."""
        from mlflow import MlflowClient

        from ldmflow.tags import REPLICATE_REGISTERED_TAG, REPLICATES_TAG
        from ldmflow.workflows.replicates import log_group_metrics, nearest_the_mean, train_in_runs

        plan, objective = self.plan, self.plan.objective
        tag_run(run_id, {REPLICATES_TAG: str(settings.replicates)})
        replicates = train_in_runs(settings, run_id, pruning)
        for replicate in replicates:  # each one's objective as a single trial's would be
            if objective.startswith(EVALUATION):
                folder = Path(settings.output_dir) / f"replicate-{replicate.seed - settings.seed}"
                replicate.metrics[objective] = _evaluate(plan, replicate.model_uri, folder, replicate.run_id)
            elif replicate.selection and replicate.selection[0] == objective:  # its best checkpoint's score
                replicate.metrics[objective] = replicate.selection[1]
        summary = log_group_metrics(MlflowClient(), run_id, replicates)
        chosen, why = nearest_the_mean(replicates)
        trial.set_user_attr(MODEL_ID_ATTR, chosen.model_uri.removeprefix("models:/"))
        tag_run(run_id, {REPLICATE_REGISTERED_TAG: f"{chosen.model_uri}: {why}"})
        value = summary.get(objective)
        if value is None or not math.isfinite(value):
            raise LdmflowError(f"Trial {trial.number} logged no finite {objective} on every replicate.")
        logger.info("Trial %d: %s = %.6g (mean of %d seeds, sd %.3g)", trial.number, objective, value,
                    len(replicates), summary[objective + "_sd"])
        return value


class _Pruning:
    """The loop's validation callback: report the objective, and stop the trial when the pruner says so."""

    def __init__(self, trial, objective: str, run_id: str):
        self.trial, self.objective, self.run_id = trial, objective, run_id
        self.last: float | None = None

    def __call__(self, step: int, metrics: dict) -> None:
        if self.objective not in metrics:
            return
        self.last = float(metrics[self.objective])
        self.trial.report(self.last, step)
        if self.trial.should_prune():
            tag_run(self.run_id, pruned_tags(step))
            logger.info("Trial %d pruned at step %d (%s %.6g).", self.trial.number, step, self.objective, self.last)
            raise _Pruned(f"at step {step}: {self.objective} {self.last:.6g}")



def _evaluate(plan: SweepPlan, model_uri: str, output_dir: Path, run_id: str) -> float:
    """`ldmflow evaluate` of the trial's model; the objective is also logged on the trial's run."""
    from mlflow import MlflowClient

    from ldmflow.workflows.evaluate import run_evaluation

    metrics = run_evaluation(evaluation_settings(plan, model_uri, output_dir))
    if plan.objective not in metrics:
        raise LdmflowError(f"The evaluation of {model_uri} did not compute {plan.objective} (see its run).")
    MlflowClient().log_metric(run_id, plan.objective, metrics[plan.objective])
    return metrics[plan.objective]
