"""A sweep's Optuna study and the MLflow runs of its trials: the study is a parent run, each trial a child run.

Two places can hold the study itself:
- the tracking store (default, nothing to set up): `mlflow.optuna.MlflowStorage`, whose study *is* the parent run
  and whose trials *are* the child runs. `SweepStorage` adds one study per name (two workers creating it at once
  keep the oldest run) and heartbeats (a tag on the trial's run), so a killed worker's trial is marked FAILED by
  another worker and retried once;
- an Optuna RDB storage (`--storage postgresql://...`): Optuna numbers trials in a database transaction and
  has heartbeats of its own; ldmflow then makes the parent and trial runs itself (`StudyRuns`).
Measured with 3 workers on one SQLite store (45 trials): MlflowStorage lost no trial but gave two trials the
same number, because it numbers a trial by its position in a metric history; docs/sweeps.md says when to use
an RDB storage.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings

from ldmflow.errors import LdmflowError
from ldmflow.tags import (OPTUNA_STUDY_DIRECTION_TAG, PARENT_RUN_TAG, RUN_NAME_TAG, SWEEP_HEARTBEAT_TAG,
                          SWEEP_STUDY_TAG)

logger = logging.getLogger(__name__)
HEARTBEAT_ENV = "LDMFLOW_SWEEP_HEARTBEAT_SECONDS"  # seconds between a trial's heartbeats; stale after 3 missed
DEFAULT_HEARTBEAT_SECONDS = 60
DEFINITION_ATTR = "ldmflow_definition"  # the study's user attribute: stage, space, objective and direction
RUN_ID_ATTR = "mlflow_run_id"  # a trial's user attribute in an RDB study: its MLflow run
DEFINITION_WAIT_SECONDS = 30.0  # how long a worker waits for the worker that created the study to record it


def heartbeat_seconds() -> int:
    try:
        return max(1, int(os.environ.get(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_SECONDS)))
    except ValueError:
        raise LdmflowError(f"{HEARTBEAT_ENV} must be a whole number of seconds.") from None


def sweep_storage(experiment_id: str):
    """The storage of every study in this experiment (import here: optuna is the `sweep` extra, which
    `run_sweep` checks first)."""
    from mlflow.optuna import MlflowStorage
    from optuna.storages._heartbeat import BaseHeartbeat

    class SweepStorage(MlflowStorage, BaseHeartbeat):
        """MlflowStorage with one study per name and heartbeats on the trials' runs."""

        def study_runs(self, name: str) -> list:
            """The runs of studies called `name`, oldest first (there is one unless two workers raced)."""
            runs = self._mlflow_client.search_runs([self._experiment_id], f"tags.`{RUN_NAME_TAG}` = '{name}'",
                                                   max_results=50)
            studies = [run for run in runs if OPTUNA_STUDY_DIRECTION_TAG in run.data.tags
                       and PARENT_RUN_TAG not in run.data.tags]
            return sorted(studies, key=lambda run: (run.info.start_time, run.info.run_id))

        def get_study_id_from_name(self, study_name: str):
            self.flush_all_batches()
            runs = self.study_runs(study_name)
            if not runs:
                raise KeyError(f"Study {study_name} not found")
            return runs[0].info.run_id

        def create_new_study(self, directions, study_name=None):
            mine = super().create_new_study(directions, study_name)
            oldest = self.get_study_id_from_name(study_name)
            if oldest != mine:  # another worker created it first: join that one
                self._mlflow_client.delete_run(mine)
            return oldest

        def record_heartbeat(self, trial_id) -> None:
            self._mlflow_client.set_tag(trial_id, SWEEP_HEARTBEAT_TAG, f"{time.time():.0f}")

        def _get_stale_trial_ids(self, study_id) -> list:
            """Running trials whose worker has not been heard of for three heartbeats."""
            limit = time.time() - 3 * self.get_heartbeat_interval()
            runs = self._mlflow_client.search_runs(
                [self._experiment_id], f"tags.`{PARENT_RUN_TAG}` = '{study_id}' AND attributes.status = 'RUNNING'",
                max_results=1000)
            return [run.info.run_id for run in runs
                    if float(run.data.tags.get(SWEEP_HEARTBEAT_TAG, run.info.start_time / 1000)) < limit]

        def get_heartbeat_interval(self) -> int:
            return heartbeat_seconds()

        def get_heartbeat_stale_trial_callback(self):
            from optuna.storages import RetryHeartbeatStaleTrialCallback

            return RetryHeartbeatStaleTrialCallback(max_retry=1)

    return SweepStorage(experiment_id)


def optuna_storage(storage: str, experiment_id: str):
    """The study's storage: "mlflow" (the tracking store) or an Optuna RDB URL, both with heartbeats."""
    if storage == "mlflow":
        return sweep_storage(experiment_id)
    import optuna

    from sqlalchemy.exc import IntegrityError

    for attempt in range(3):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna
                warnings.simplefilter("ignore")
                return optuna.storages.RDBStorage(storage, heartbeat_interval=heartbeat_seconds(),
                                                  grace_period=3 * heartbeat_seconds(),
                                                  heartbeat_stale_trial_callback=_fail_run_and_retry)
        except IntegrityError:  # workers starting together on a new database: another one made its tables first
            if attempt == 2:
                raise LdmflowError(f"--storage {storage.split('@')[-1]}: other workers kept creating its tables; "
                                   "start this worker again.") from None
            time.sleep(1 + attempt)
        except Exception as error:  # noqa: BLE001 - a bad URL, a missing driver, a refused login
            raise LdmflowError(f"--storage {storage.split('@')[-1]}: {str(error).splitlines()[0][:300]}") from None


def _fail_run_and_retry(study, trial) -> None:
    """A stale trial of an RDB study: its MLflow run is marked FAILED too, then the trial is retried once."""
    from mlflow import MlflowClient
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    if run_id:
        MlflowClient().set_terminated(run_id, "FAILED")
    RetryHeartbeatStaleTrialCallback(max_retry=1)(study, trial)


def recorded_definition(storage, name: str) -> dict | None:
    """What the study `name` was created for (None: no such study yet); reads, creates nothing."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return None
    return storage.get_study_user_attrs(study_id).get(DEFINITION_ATTR, {})


def open_study(storage, name: str, definition: dict, sampler, pruner):
    """Create the study or join it; a study of this name made for another space, stage or objective is refused."""
    import optuna

    recorded = recorded_definition(storage, name)
    deadline = time.monotonic() + DEFINITION_WAIT_SECONDS
    while recorded == {} and time.monotonic() < deadline:  # created a moment ago, its definition not yet recorded
        time.sleep(0.2)
        recorded = recorded_definition(storage, name)
    if recorded == {}:  # its creator never recorded one (it died first): this worker does
        recorded = None
    if recorded is not None and recorded != definition:
        changed = [key for key in sorted(set(recorded) | set(definition)) if recorded.get(key) != definition.get(key)]
        raise LdmflowError(f"Study {name!r} exists with another {', '.join(changed)} (recorded: "
                           f"{json.dumps({key: recorded.get(key) for key in changed})[:300]}); use another "
                           "--study_name, or the same space and objective to continue it.")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # ldmflow logs one line per trial (and per failure) itself
    study = optuna.create_study(storage=storage, study_name=name, direction=definition["direction"], sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    if recorded is None:
        study.set_user_attr(DEFINITION_ATTR, definition)
        if hasattr(storage, "flush_all_batches"):
            storage.flush_all_batches()
    return study


class StudyRuns:
    """The MLflow runs of a study: its parent run, and one child run per trial."""

    def __init__(self, study, experiment_id: str):
        from mlflow import MlflowClient

        self.study, self.client = study, MlflowClient()
        self.in_store = hasattr(study._storage, "flush_all_batches")  # MlflowStorage: its runs are the study's
        self.parent_run_id = study._study_id if self.in_store else self._parent_run(experiment_id)

    def start(self, trial) -> str:
        """The trial's run: MlflowStorage's, or a new child run of the parent (its id kept as a user attribute)."""
        if self.in_store:
            return trial._trial_id
        run = self.client.create_run(self.client.get_run(self.parent_run_id).info.experiment_id,
                                     tags={PARENT_RUN_TAG: self.parent_run_id})
        trial.set_user_attr(RUN_ID_ATTR, run.info.run_id)
        return run.info.run_id

    def end(self, run_id: str, status: str) -> None:
        """Set the run's final status, unless the study's storage does (MlflowStorage: when Optuna records it)."""
        if not self.in_store:
            self.client.set_terminated(run_id, status)

    def run_of(self, trial) -> str | None:
        return trial._trial_id if self.in_store else trial.user_attrs.get(RUN_ID_ATTR)

    def _parent_run(self, experiment_id: str) -> str:
        """The oldest run made for this study (two workers starting at once make two; the later one is deleted)."""
        name = self.study.study_name

        def oldest():
            runs = self.client.search_runs([experiment_id], f"tags.`{SWEEP_STUDY_TAG}` = '{name}'", max_results=100)
            parents = [run for run in runs if PARENT_RUN_TAG not in run.data.tags]
            return min(parents, key=lambda run: (run.info.start_time, run.info.run_id), default=None)

        found = oldest()
        if found is not None:
            return found.info.run_id
        mine = self.client.create_run(experiment_id, run_name=name, tags={SWEEP_STUDY_TAG: name}).info.run_id
        first = oldest().info.run_id
        if first != mine:
            self.client.delete_run(mine)
        return first
