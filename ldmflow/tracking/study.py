"""A sweep's Optuna study kept in the tracking store itself: the study is a parent run, each trial a child run.

`mlflow.optuna.MlflowStorage` does the storing; `SweepStorage` adds what a study shared by many workers needs:
- one study per name: two workers that create it at once keep the oldest run (MlflowStorage would make two);
- a heartbeat (a tag on the trial's run), so a trial whose worker was killed (kill -9, a lost node) is marked
  FAILED by another worker and retried once (Optuna's RetryFailedTrialCallback).
Any machine with the tracking URI (and a login) joins a study by running the same command.
"""

from __future__ import annotations

import json
import logging
import os
import time

from ldmflow.errors import LdmflowError
from ldmflow.tags import OPTUNA_STUDY_DIRECTION_TAG, PARENT_RUN_TAG, RUN_NAME_TAG, SWEEP_HEARTBEAT_TAG

logger = logging.getLogger(__name__)
HEARTBEAT_ENV = "LDMFLOW_SWEEP_HEARTBEAT_SECONDS"  # seconds between a trial's heartbeats; stale after 3 missed
DEFAULT_HEARTBEAT_SECONDS = 60
DEFINITION_ATTR = "ldmflow_definition"  # the study's user attribute: stage, space, objective and direction


def heartbeat_seconds() -> int:
    try:
        return max(1, int(os.environ.get(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_SECONDS)))
    except ValueError:
        raise LdmflowError(f"{HEARTBEAT_ENV} must be a whole number of seconds.") from None


def sweep_storage(experiment_id: str):
    """The storage of every study in this experiment (import here: optuna is the `sweep` extra)."""
    try:
        from mlflow.optuna import MlflowStorage
        from optuna.storages._heartbeat import BaseHeartbeat
    except ImportError:
        raise LdmflowError("ldmflow sweep needs Optuna: pip install 'ldmflow[sweep]' (or optuna>=4.5).") from None

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


def recorded_definition(storage, name: str) -> dict | None:
    """What the study `name` was created for (None: no such study yet); reads, creates nothing."""
    runs = storage.study_runs(name)
    if not runs:
        return None
    value = runs[0].data.tags.get(f"user_{DEFINITION_ATTR}")  # MlflowStorage's spelling of a user attribute
    return json.loads(value) if value else {}


def open_study(storage, name: str, definition: dict, sampler, pruner):
    """Create the study or join it; a study of this name made for another space, stage or objective is refused."""
    import optuna

    recorded = recorded_definition(storage, name)
    if recorded is not None and recorded != definition:
        changed = [key for key in sorted(set(recorded) | set(definition)) if recorded.get(key) != definition.get(key)]
        raise LdmflowError(f"Study {name!r} exists with another {', '.join(changed)} (recorded: "
                           f"{json.dumps({key: recorded.get(key) for key in changed})[:300]}); use another "
                           "--study_name, or the same space and objective to continue it.")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # ldmflow logs one line per trial itself
    study = optuna.create_study(storage=storage, study_name=name, direction=definition["direction"], sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    if recorded is None:
        study.set_user_attr(DEFINITION_ATTR, definition)
        storage.flush_all_batches()
    return study


def study_run_id(study) -> str:
    """The parent run that holds the study (MlflowStorage's study id is its run id)."""
    return study._study_id
