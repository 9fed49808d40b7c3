"""The study run's reports read back against the study: each trial once with its final state, the history plot's
best value never worsening whatever order the storage lists trials in, the study's settings as params, and a
worker that joins a study a moment after its creation."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import optuna
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from mlflow import MlflowClient

from ldmflow.tags import SWEEP_BEST_TRIAL_TAG
from ldmflow.tracking import study as study_module
from ldmflow.tracking.study import DEFINITION_ATTR, open_study
from ldmflow.tracking.study_report import (TRIALS_TABLE, best_so_far, log_study_params, log_study_report,
                                           trials_table)


class Shuffled:
    """A study whose storage lists its trials out of order and some twice (as MlflowStorage can)."""

    def __init__(self, study, seed):
        self.study, self.rng = study, random.Random(seed)
        self.direction = study.direction

    def get_trials(self, deepcopy=True):
        trials = list(self.study.get_trials(deepcopy=deepcopy))
        trials += trials[: len(trials) // 2]
        self.rng.shuffle(trials)
        return trials


def _study(values, direction):
    study = optuna.create_study(direction=direction)
    for value in values:
        study.add_trial(optuna.trial.create_trial(params={"x": value}, distributions={
            "x": optuna.distributions.FloatDistribution(-1e6, 1e6)}, value=value))
    return study


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=8), maximise=st.booleans(), seed=st.integers())
def test_the_history_is_by_trial_number_and_its_best_never_worsens(values, maximise, seed):
    direction = "maximize" if maximise else "minimize"
    numbers, drawn, best = best_so_far(Shuffled(_study(values, direction), seed))
    assert numbers == list(range(len(values))) and drawn == values
    pick = max if maximise else min
    assert best == [pick(values[: i + 1]) for i in range(len(values))]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    client = MlflowClient()
    return client, client.create_run(client.create_experiment("sweeps")).info.run_id


class Runs:
    def __init__(self, parent_run_id):
        self.parent_run_id = parent_run_id

    def run_of(self, trial):
        return f"run-{trial._trial_id}"


@settings(max_examples=20, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=6), seed=st.integers())
def test_the_trials_table_has_one_row_per_trial_whatever_the_storage_lists(values, seed):
    study = _study(values, "maximize")
    table = trials_table(Shuffled(study, seed), Runs("parent"))
    assert list(table["number"]) == list(range(len(values))) and list(table["value"]) == values
    assert list(table["run_id"]) == [f"run-{t._trial_id}" for t in study.trials]
    assert set(table["state"]) == {"COMPLETE"} and list(table["params_x"]) == values


def test_every_worker_replaces_the_trials_table_and_it_matches_the_study(store, tmp_path):
    client, parent = store
    study = _study([0.1, 0.5, 0.3], "maximize")
    running = study.ask()  # a trial another worker still runs when the first worker reports
    log_study_report(study, Runs(parent), "ldmflow vae ...")
    study.tell(running, 0.9)
    log_study_report(study, Runs(parent), "ldmflow vae ...")  # the last worker
    table = json.loads(Path(client.download_artifacts(parent, TRIALS_TABLE, str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [(row["number"], row["state"], row["value"]) for row in rows] == [
        (t.number, t.state.name, t.value) for t in study.trials]
    assert client.get_run(parent).data.tags[SWEEP_BEST_TRIAL_TAG] == "3"


def test_the_study_run_has_its_settings_as_params_once(store):
    client, parent = store
    log_study_params(parent, {"sweep_objective": "val/psnr", "learning_rate": "0.001"})
    log_study_params(parent, {"sweep_objective": "val/psnr", "learning_rate": "0.002"})  # a second worker
    assert client.get_run(parent).data.params == {"sweep_objective": "val/psnr", "learning_rate": "0.001"}


DEFINITION = {"stage": "vae", "space": {"learning_rate": [0.0001, 0.01]}, "objective": "val/psnr",
              "direction": "maximize"}


@pytest.mark.parametrize("recorded_after", [0.5, None])
def test_a_worker_joining_a_study_just_created_waits_for_its_definition(monkeypatch, recorded_after):
    storage = optuna.storages.InMemoryStorage()
    created = optuna.create_study(storage=storage, study_name="race", direction="maximize")
    if recorded_after is None:  # its creator died before recording it: the joining worker records it
        monkeypatch.setattr(study_module, "DEFINITION_WAIT_SECONDS", 0.5)
    else:
        threading.Timer(recorded_after, created.set_user_attr, (DEFINITION_ATTR, DEFINITION)).start()
    started = time.monotonic()
    joined = open_study(storage, "race", DEFINITION, None, None)
    assert joined.user_attrs[DEFINITION_ATTR] == DEFINITION and time.monotonic() - started < 5


def test_the_trials_table_still_loads_as_an_mlflow_table(store):
    client, parent = store
    log_study_report(_study([0.1, 0.2], "minimize"), Runs(parent), None)
    experiment = client.get_run(parent).info.experiment_id
    assert list(client.load_table(experiment, TRIALS_TABLE, run_ids=[parent])["number"]) == [0, 1]
