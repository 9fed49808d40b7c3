"""What a sweep leaves on its study's parent run: the trials table, the optimisation-history and
parameter-importance plots, the best trial's params and the command that trains it again.

Every worker writes them when it stops, replacing the files (never appending: MLflow's log_table would), so the
last worker's are complete; trials are listed once each, by number.
"""

from __future__ import annotations

import logging

from ldmflow.tags import SWEEP_BEST_COMMAND_TAG, SWEEP_BEST_RUN_TAG, SWEEP_BEST_TRIAL_TAG, SWEEP_BEST_VALUE_TAG

logger = logging.getLogger(__name__)
TRIALS_TABLE = "trials.json"
HISTORY_PLOT = "optimization_history.png"
IMPORTANCE_PLOT = "param_importances.png"
BEST_PARAMS = "best_params.json"
BEST_COMMAND = "best_command.txt"


def log_study_report(study, runs, best_command: str | None) -> None:
    """The table, the plots and the best trial on the study's parent run (plots need two finished trials);
    `runs` is the study's StudyRuns."""
    from mlflow import MlflowClient

    client, run_id = MlflowClient(), runs.parent_run_id
    table = trials_table(study, runs)
    if not table.empty:
        _replace_table(client, run_id, table, TRIALS_TABLE)
    _log_plots(client, study, run_id)
    best = _best(study)
    if best is None:
        return
    client.log_dict(run_id, best.params, BEST_PARAMS)
    tags = {SWEEP_BEST_TRIAL_TAG: str(best.number), SWEEP_BEST_RUN_TAG: runs.run_of(best) or "",
            SWEEP_BEST_VALUE_TAG: f"{best.value:.6g}"}
    if best_command:
        client.log_text(run_id, best_command + "\n", BEST_COMMAND)
        tags[SWEEP_BEST_COMMAND_TAG] = best_command[:5000]
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def trials_table(study, runs):
    """One row per trial (number, value, state, params_<name>, duration in seconds, run id), in trial-number
    order: a trial the storage lists twice is one row, two trials that share a number (MlflowStorage numbers by
    a metric history) stay two, told apart by their runs."""
    import pandas as pd

    trials = {runs.run_of(trial) or f"#{trial.number}": trial for trial in study.get_trials(deepcopy=False)}
    rows = [{"number": trial.number, "value": trial.value, "state": trial.state.name,
             **{f"params_{name}": value for name, value in trial.params.items()},
             "duration": trial.duration.total_seconds() if trial.duration else None,
             "run_id": None if key.startswith("#") else key} for key, trial in trials.items()]
    return pd.DataFrame(rows).sort_values("number", kind="stable") if rows else pd.DataFrame()


def _replace_table(client, run_id: str, table, artifact_file: str) -> None:
    """log_table's file and tag, but the file replaced: log_table appends to a table already there, so each
    worker's report added every trial again."""
    import json

    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    client.log_text(run_id, table.to_json(orient="split", index=False, date_format="iso"), artifact_file)
    logged = json.loads(client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    if {"path": artifact_file, "type": "table"} not in logged:
        logged.append({"path": artifact_file, "type": "table"})
        client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps(logged))


def _best(study):
    try:
        return study.best_trial
    except ValueError:  # no trial finished
        return None


def best_so_far(study) -> tuple[list[int], list[float], list[float]]:
    """The finished trials' numbers and values in trial-number order, and the best value up to each (the larger
    when maximising): what the history plot draws, whatever order the storage lists trials in."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    finished = sorted({trial.number: trial for trial in study.get_trials(deepcopy=False)
                       if trial.state == TrialState.COMPLETE}.values(), key=lambda trial: trial.number)
    pick = max if study.direction == StudyDirection.MAXIMIZE else min
    numbers, values, best = [t.number for t in finished], [float(t.value) for t in finished], []
    for value in values:
        best.append(value if not best else pick(best[-1], value))
    return numbers, values, best


def _log_plots(client, study, run_id: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numbers, values, best = best_so_far(study)
    if len(numbers) < 2:
        return
    figure, axes = plt.subplots(figsize=(8, 5))
    axes.plot(numbers, values, "o", label="objective value")
    axes.step(numbers, best, where="post", label="best value")
    axes.set(xlabel="trial", ylabel="objective value", title="Optimisation history")
    axes.legend()
    figure.tight_layout()
    client.log_figure(run_id, figure, HISTORY_PLOT)
    plt.close(figure)
    _log_importances(client, study, run_id)


def _log_importances(client, study, run_id: str) -> None:
    import warnings

    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    try:
        with warnings.catch_warnings():  # "experimental" warnings of optuna's matplotlib plots
            warnings.simplefilter("ignore")
            figure = plots.plot_param_importances(study).figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        client.log_figure(run_id, figure, IMPORTANCE_PLOT)
        plt.close(figure)
    except Exception as error:  # noqa: BLE001 - one param, or no variance: no plot, the sweep goes on
        logger.info("No %s: %s", IMPORTANCE_PLOT, str(error).splitlines()[0] if str(error) else type(error).__name__)


def log_study_params(run_id: str, params: dict[str, str]) -> None:
    """The study's settings as the parent run's params (once: MLflow params never change; a worker that finds
    them logged, or loses a race to log them, leaves them)."""
    from mlflow import MlflowClient
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    if client.get_run(run_id).data.params:
        return
    try:
        client.log_batch(run_id, params=[Param(key, str(value)[:6000]) for key, value in params.items()])
    except MlflowException as error:
        logger.debug("Study params already logged by another worker: %s", error)
