"""Tracking store and RunTracker: default store, params once, batched metrics, outage survival, images, datasets."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path

import mlflow
import pytest
from hypothesis import HealthCheck, given, settings as settings_profile, strategies as st
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from ldmflow.errors import LdmflowError
from ldmflow.settings import VaeSettings
from ldmflow.tracking import store
from ldmflow.tracking.pending import PENDING_FILE, replay_pending
from ldmflow.tracking.run_tracker import NullTracker, RunTracker, open_run


@pytest.fixture(autouse=True)
def no_leaked_mlflow_state(monkeypatch):
    """Every test ends with no active run and MLflow's global tracking URI reset."""
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture
def sqlite_store(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return tmp_path


def settings(tmp_path: Path, **overrides) -> VaeSettings:
    return VaeSettings(**{"manifest_path": str(tmp_path / "manifest.json"), "output_dir": str(tmp_path / "out"),
                          "run_name": "test-run", **overrides})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_default_store_is_sqlite_next_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert store.resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    experiment_id = store.ensure_experiment("ldmflow")
    assert store.ensure_experiment("ldmflow") == experiment_id
    experiment = MlflowClient().get_experiment(experiment_id)
    assert experiment.artifact_location == (tmp_path / "mlartifacts" / "ldmflow").as_uri()
    assert (tmp_path / "mlflow.db").is_file()


def test_relative_sqlite_uri_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs.db")
    assert store.resolve_tracking_uri() == f"sqlite:///{tmp_path}/runs.db"


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "./mlruns", "/srv/mlruns"])
def test_file_store_is_refused(uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(LdmflowError, match="plain file store"):
        store.resolve_tracking_uri()


def test_unreachable_server_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(LdmflowError, match="Cannot reach the MLflow tracking server.*--no_mlflow"):
        with open_run(settings(tmp_path), "vae", enabled=True):
            pass
    assert time.monotonic() - started < 10


def test_disabled_tracking_is_a_null_tracker(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open_run(settings(tmp_path), "vae", enabled=False) as tracker:
        assert isinstance(tracker, NullTracker)
        tracker.log_metrics({"loss": 1.0}, 1)
        tracker.log_image(Image.new("RGB", (8, 8)), "preview", 1)
    assert not (tmp_path / "mlflow.db").exists()


def test_params_logged_once_and_mlflow_run_params_kept(sqlite_store, monkeypatch, caplog):
    """Under `mlflow run -P`, params already in the run are skipped (no 'Changing param values' error)."""
    client = MlflowClient(store.use_tracking_store())
    run = client.create_run(store.ensure_experiment("ldmflow"))
    client.log_param(run.info.run_id, "learning_rate", "1e-4")  # as `-P learning_rate=1e-4` would
    client.log_param(run.info.run_id, "num_epochs", "50")
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    caplog.set_level(logging.WARNING)
    with open_run(settings(sqlite_store), "vae", enabled=True) as tracker:
        assert tracker.run_id == run.info.run_id
        tracker.log_params({"learning_rate": "0.0001", "extra": "1"})  # again: still no error
        tracker.log_params({"extra": "1"})
        tracker.log_params({"num_epochs": "60"})  # a different value: kept, with a warning
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.params["learning_rate"] == "1e-4"
    assert finished.data.params["num_epochs"] == "50"
    assert finished.data.params["kl_weight"] == "0.0001"
    assert finished.data.params["extra"] == "1"
    assert finished.data.tags["ldmflow.stage"] == "vae"
    assert "'num_epochs' is already '50'" in caplog.text
    assert "learning_rate" not in caplog.text  # 1e-4 and 0.0001 are one value: no warning


def test_equal_params_from_mlflow_run_do_not_warn(sqlite_store, monkeypatch, caplog):
    """MLflow Projects logs `-P` values shell-quoted (`''` for an empty one): the same value is no conflict."""
    client = MlflowClient(store.use_tracking_store())
    run = client.create_run(store.ensure_experiment("ldmflow"))
    for key, logged in {"latent_cache_dir": "''", "stage_options": "'--resolution 64'", "seed": "0"}.items():
        client.log_param(run.info.run_id, key, logged)  # as `mlflow run` logs MLproject's values
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    caplog.set_level(logging.WARNING)
    with open_run(settings(sqlite_store), "vae", enabled=True) as tracker:
        tracker.log_params({"latent_cache_dir": "", "stage_options": "--resolution 64", "seed": "0"})
        tracker.log_params({"seed": "1"})
    assert "is already" in caplog.text and "'seed'" in caplog.text
    assert "latent_cache_dir" not in caplog.text and "stage_options" not in caplog.text


def test_a_child_run_goes_to_its_parents_experiment(sqlite_store):
    """A probe trained under `mlflow run -e evaluate --experiment-name x` nests under the evaluate run, in x."""
    client = MlflowClient(store.use_tracking_store())
    parent = client.create_run(store.ensure_experiment("entry-point-experiment"))
    with open_run(settings(sqlite_store), "probe", enabled=True, parent_run_id=parent.info.run_id) as tracker:
        pass
    child = client.get_run(tracker.run_id)
    assert child.info.experiment_id == parent.info.experiment_id
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id


def test_new_run_in_experiment_ends_failed_on_exception(sqlite_store):
    with pytest.raises(RuntimeError, match="boom"):
        with open_run(settings(sqlite_store, experiment_name="exp-a"), "vae", enabled=True) as tracker:
            raise RuntimeError("boom")
    run = MlflowClient().get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.info.run_name == "test-run"
    assert MlflowClient().get_experiment(run.info.experiment_id).name == "exp-a"
    assert mlflow.active_run() is None


def test_a_run_given_a_parent_is_nested_under_it(sqlite_store):
    from ldmflow.tags import PARENT_RUN_TAG

    with open_run(settings(sqlite_store, run_name="parent"), "evaluate", enabled=True) as parent:
        pass
    with open_run(settings(sqlite_store), "probe", enabled=True, parent_run_id=parent.run_id) as child:
        pass
    assert MlflowClient().get_run(child.run_id).data.tags[PARENT_RUN_TAG] == parent.run_id
    assert PARENT_RUN_TAG not in MlflowClient().get_run(parent.run_id).data.tags


def test_system_metrics_are_recorded(sqlite_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    with open_run(settings(sqlite_store), "vae", enabled=True) as tracker:
        time.sleep(1.0)
    metrics = MlflowClient().get_run(tracker.run_id).data.metrics
    assert any(key.startswith("system/") for key in metrics)


class CountingLogBatch:
    """Wraps MlflowClient.log_batch; can hold the first call to let values pile up behind it."""

    def __init__(self, monkeypatch, hold_first: bool = False):
        self.calls: list[int] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        if not hold_first:
            self.release.set()
        original = MlflowClient.log_batch

        def log_batch(client, run_id, metrics=(), params=(), tags=(), **kwargs):
            self.entered.set()
            self.release.wait(10)
            self.calls.append(len(metrics))
            return original(client, run_id, metrics=metrics, params=params, tags=tags, **kwargs)

        monkeypatch.setattr(MlflowClient, "log_batch", log_batch)


def test_metrics_are_batched(sqlite_store, monkeypatch):
    with open_run(settings(sqlite_store), "vae", enabled=True) as tracker:
        assert tracker.flush(10)
        counter = CountingLogBatch(monkeypatch, hold_first=True)
        tracker.log_metrics({"loss": 1.0, "mse": 0.5, "kl": 0.1}, step=0)
        assert counter.entered.wait(10)
        for step in range(1, 31):  # piles up while the first request is in flight
            tracker.log_metrics({"loss": 1.0 / step, "mse": 0.5, "kl": 0.1}, step=step)
        counter.release.set()
        assert tracker.flush(10)
        assert counter.calls == [3, 90]  # one request per log_metrics call at most, here 2 for 31 calls
    client = MlflowClient()
    assert len(client.get_metric_history(tracker.run_id, "loss")) == 31
    assert client.get_run(tracker.run_id).data.metrics["loss"] == pytest.approx(1 / 30)


def test_bad_metric_key_is_skipped_not_fatal(sqlite_store, caplog):
    with open_run(settings(sqlite_store), "vae", enabled=True) as tracker:
        tracker.log_metrics({"loss": 1.0, "bad key!": 2.0}, step=1)
        assert tracker.flush(10)
    assert set(MlflowClient().get_run(tracker.run_id).data.metrics) >= {"loss"}
    assert "bad key!" in caplog.text


CALLING_THREADS: list[str] = []


def failing(*args, **kwargs):
    CALLING_THREADS.append(threading.current_thread().name)
    raise MlflowException("API request failed: Connection refused", error_code="TEMPORARILY_UNAVAILABLE")


def test_outage_training_goes_on_pending_written_and_replayed(sqlite_store, monkeypatch, caplog):
    caplog.set_level(logging.WARNING)
    with monkeypatch.context() as outage:
        with open_run(settings(sqlite_store), "vae", enabled=True) as tracker:
            assert tracker.flush(10)
            outage.setattr(MlflowClient, "log_batch", failing)
            outage.setattr(MlflowClient, "log_image", failing)
            CALLING_THREADS.clear()
            for step in range(20):  # a train-like loop: must neither fail nor wait on MLflow
                tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step)
                if step % 10 == 0:
                    tracker.log_image(Image.new("RGB", (16, 16), "blue"), "preview", step)
                tracker.set_tags({"ldmflow.last_checkpoint": f"checkpoint-{step}"})
            assert tracker.flush(5) is False
            # MLflow was called, and never from the training thread: training does not wait on an outage
            assert CALLING_THREADS and threading.main_thread().name not in CALLING_THREADS
            assert tracker.in_outage
    assert caplog.text.count("MLflow is unreachable") == 1
    pending = sqlite_store / "out" / PENDING_FILE
    records = [json.loads(line) for line in pending.read_text().splitlines()]
    assert sum(r["kind"] == "metric" for r in records) == 40
    assert {r["run_id"] for r in records} == {tracker.run_id}
    assert "preview image(s) were not uploaded" in caplog.text

    assert replay_pending(pending) == 40 + 20
    client = MlflowClient()
    history = client.get_metric_history(tracker.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(20))
    assert client.get_run(tracker.run_id).data.tags["ldmflow.last_checkpoint"] == "checkpoint-19"
    assert not pending.exists() and pending.with_name(PENDING_FILE + ".replayed").exists()


def test_outage_recovers_without_losing_metrics(sqlite_store, monkeypatch, caplog):
    caplog.set_level(logging.WARNING)
    client = MlflowClient(store.use_tracking_store())
    run_id = client.create_run(store.ensure_experiment("ldmflow")).info.run_id
    tracker = RunTracker(run_id, output_dir=sqlite_store, first_backoff=0.05)
    with monkeypatch.context() as outage:
        outage.setattr(MlflowClient, "log_batch", failing)
        for step in range(5):
            tracker.log_metrics({"loss": float(step)}, step)
        deadline = time.monotonic() + 5
        while not tracker.in_outage and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tracker.in_outage
    for step in range(5, 8):
        tracker.log_metrics({"loss": float(step)}, step)
    assert tracker.flush(10)
    tracker.close()
    assert "reachable again" in caplog.text
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(8))
    assert not (sqlite_store / PENDING_FILE).exists()


def test_replay_of_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(LdmflowError, match="does not exist"):
        replay_pending(tmp_path / PENDING_FILE)


def test_log_image_shows_up_as_step_images(sqlite_store):
    with open_run(settings(sqlite_store), "vae", enabled=True) as tracker:
        for step in (5, 10):
            tracker.log_image(Image.new("RGB", (16, 16), "red"), "val/reconstructions", step)
        assert tracker.flush(10)
    client = MlflowClient()
    names = [Path(a.path).name for a in client.list_artifacts(tracker.run_id, "images")]
    assert sum(n.startswith("val~reconstructions+step+5+") and n.endswith(".png") for n in names) == 1
    assert sum(n.startswith("val~reconstructions+step+10+") and n.endswith(".webp") for n in names) == 1
    assert client.get_run(tracker.run_id).data.tags["mlflow.loggedImages"] == "True"


def test_dataset_input_is_logged_and_searchable_by_digest(sqlite_store):
    digest = "ab" * 32  # a sha256 hex digest (longer than MLflow's 36-character column)
    (sqlite_store / "manifest.json").write_text("[]")
    with open_run(settings(sqlite_store), "vae", enabled=True) as tracker:
        assert tracker.log_dataset(sqlite_store / "manifest.json", digest, "train", 12, "manifest-train")
        assert tracker.log_dict({"a": 1}, "info/stats.json")
        assert tracker.flush(10)
    run = MlflowClient().get_run(tracker.run_id)
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == digest[:36]
    assert dataset_input.dataset.name == "manifest-train"
    assert json.loads(dataset_input.dataset.profile) == {"num_records": 12, "split": "train", "full_digest": digest}
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"
    assert run.data.tags["dataset_digest"] == digest
    found = mlflow.search_runs(search_all_experiments=True, output_format="list",
                               filter_string=f"dataset.digest = '{digest[:36]}'")
    assert [r.info.run_id for r in found] == [tracker.run_id]


def test_runs_of_the_same_seed_get_different_names(sqlite_store):
    import random

    names = []
    for _ in range(2):
        random.seed(0)  # what the trainers' set_seed does before the run opens
        with open_run(settings(sqlite_store, run_name=None), "vae") as tracker:
            names.append(MlflowClient().get_run(tracker.run_id).info.run_name)
    assert names[0] != names[1] and all(name.startswith("vae-") for name in names)


def test_a_failing_tracker_is_not_masked_and_the_run_is_not_left_running(sqlite_store, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("tracker broke")

    monkeypatch.setattr(RunTracker, "__init__", broken)
    with pytest.raises(RuntimeError, match="tracker broke"):
        with open_run(settings(sqlite_store), "vae"):
            pass
    [run] = MlflowClient().search_runs([store.ensure_experiment("ldmflow")])
    assert run.info.status == "FAILED"


@pytest.mark.parametrize("args", [["lineage", "models:/ldmflow-vae/1"], ["models"],
                                  ["sample", "--model_uri", "models:/ldmflow-latent-ddpm/1", "--no_mlflow"],
                                  ["sample", "--model_uri", "runs:/0123abcd/model", "--no_mlflow"]])
def test_commands_against_a_server_that_is_down_fail_within_seconds(tmp_path, monkeypatch, args):
    from cli_runner import invoke

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    result = invoke(*args, ok=False)
    assert result.exit_code == 1 and "Cannot reach the MLflow tracking server" in result.output
    assert time.monotonic() - started < 60  # MLflow's own HTTP retries take minutes; this is a loose bound


def test_a_version_shows_the_metrics_of_its_own_weights_not_of_the_last_step(sqlite_store):
    from ldmflow.tracking.lineage import _registered_weights_metrics
    from ldmflow.tracking.registry import _link_metrics_at

    client = MlflowClient()
    with mlflow.start_run() as run:
        for step, loss in ((0, 3.0), (10, 2.0), (20, 1.0)):
            mlflow.log_metric("loss", loss, step=step)
        mlflow.log_metric("val/denoise_loss", 0.5, step=12)  # the best checkpoint's validation
        mlflow.log_metric("val/denoise_loss", 0.9, step=20)
        model = mlflow.create_external_model(name="weights")
    _link_metrics_at(client, run.info.run_id, model.model_id, step=12)
    assert _registered_weights_metrics(client, model.model_id) == {"loss": 2.0, "val/denoise_loss": 0.5}
    assert client.get_run(run.info.run_id).data.metrics["loss"] == 1.0  # the run keeps its last values


@settings_profile(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(min_size=1, max_size=64).filter(lambda data: not data.startswith(b"SQLite format 3\0")),
       default=st.booleans())
def test_a_store_file_that_is_not_a_database_is_named_for_what_it_is(tmp_path_factory, monkeypatch, content, default):
    from cli_runner import invoke

    folder = tmp_path_factory.mktemp("store")
    (folder / "mlflow.db").write_bytes(content)
    monkeypatch.chdir(folder)
    if default:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    result = invoke("models", ok=False)
    assert result.exit_code == 1, result.output
    assert f"Error: The tracking store {folder / 'mlflow.db'} is not an SQLite database: it holds" in result.output


def test_a_store_that_is_a_folder_is_named_so(tmp_path, monkeypatch):
    (tmp_path / "mlflow.db").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(LdmflowError, match="mlflow.db is a folder, not an SQLite database file"):
        store.resolve_tracking_uri()
