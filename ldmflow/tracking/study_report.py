"""What a sweep leaves on its study's parent run: the trials table, the optimisation-history and
parameter-importance plots, the best trial's params and the command that trains it again.

Every worker writes them when it stops (the files are replaced, so the last worker's are complete).
"""

from __future__ import annotations

import logging
import warnings

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
    table = study.trials_dataframe(attrs=("number", "value", "state", "params", "duration"))
    if not table.empty:
        table["duration"] = table["duration"].dt.total_seconds()
        table["state"] = table["state"].astype(str)
        # by number, not position: another worker may add a trial between the table's read and this one
        run_ids = {trial.number: runs.run_of(trial) for trial in study.get_trials(deepcopy=False)}
        table["run_id"] = table["number"].map(run_ids)
        client.log_table(run_id, data=table, artifact_file=TRIALS_TABLE)
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


def _best(study):
    try:
        return study.best_trial
    except ValueError:  # no trial finished
        return None


def _log_plots(client, study, run_id: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as plots

    finished = [trial for trial in study.trials if trial.state == TrialState.COMPLETE]
    if len(finished) < 2:
        return
    drawings = ((HISTORY_PLOT, plots.plot_optimization_history), (IMPORTANCE_PLOT, plots.plot_param_importances))
    for name, draw in drawings:
        try:
            with warnings.catch_warnings():  # "experimental" warnings of optuna's matplotlib plots
                warnings.simplefilter("ignore")
                axes = draw(study)
            figure = axes.figure
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            client.log_figure(run_id, figure, name)
            plt.close(figure)
        except Exception as error:  # noqa: BLE001 - a plot (e.g. one param, no variance) must not fail the sweep
            logger.info("No %s: %s", name, str(error).splitlines()[0] if str(error) else type(error).__name__)
