"""Ctrl-C and SIGTERM during a long command: its run ends KILLED, no partial output folder is left, and the command
exits at once with 128 + the signal's number (130, 143), in one line."""

from __future__ import annotations

import os
import signal
import time

import pytest
from mlflow import MlflowClient

from cli_runner import invoke
from sampling.test_sampler import tiny_legacy


class Unhandled(Exception):
    """What a SIGTERM the command did not handle raises here (instead of killing the test process)."""


def _unhandled(signum, frame):
    raise Unhandled(signum)


@pytest.fixture(autouse=True)
def sigterm_fallback():
    previous = signal.signal(signal.SIGTERM, _unhandled)
    yield
    signal.signal(signal.SIGTERM, previous)


def _signal_itself(signal_number: int) -> None:
    os.kill(os.getpid(), signal_number)
    time.sleep(30)  # a long step: the signal must cut it short


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("when", ["generating", "writing"])
def test_an_interrupted_sample_ends_killed_and_leaves_nothing(tmp_path, monkeypatch, signal_number, when):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    (tmp_path / "model").mkdir()
    sampler = tiny_legacy()
    monkeypatch.setattr("ldmflow.workflows.sample.load_sampler", lambda *args, **kwargs: sampler)
    if when == "generating":
        monkeypatch.setattr(sampler, "generate", lambda *args, **kwargs: _signal_itself(signal_number))
    else:
        from ldmflow.workflows import sample

        written = []

        def write_then_stop(path, image, image_format):
            sample_write(path, image, image_format)
            written.append(path)
            if len(written) == 2:
                _signal_itself(signal_number)

        sample_write = sample.write_image
        monkeypatch.setattr(sample, "write_image", write_then_stop)
    started = time.monotonic()
    result = invoke("sample", "--model_uri", str(tmp_path / "model"), "--output_dir",
                    str(tmp_path / "out"), "--num_images", "3", "--num_inference_steps", "2", ok=False)
    assert time.monotonic() - started < 20
    assert result.exit_code == 128 + signal_number, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert errors == [f"Error: stopped by {signal.Signals(signal_number).name}; the run (if any) ended KILLED."]
    assert list((tmp_path / "out").iterdir()) == []  # neither a samples folder nor its temporary one
    [run] = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
    assert run.info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is _unhandled  # the command's own handler is gone with it


def test_an_interrupted_pipeline_parent_run_ends_killed(tmp_path, monkeypatch):
    import mlflow

    from ldmflow.tracking.run_tracker import recording_failure

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(KeyboardInterrupt):
        with mlflow.start_run() as parent, recording_failure(parent.info.run_id, tmp_path):
            raise KeyboardInterrupt
    assert MlflowClient().get_run(parent.info.run_id).info.status == "KILLED"


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_sweep_ends_killed_and_says_which_signal(tmp_path, monkeypatch, signal_number):
    from workflows.test_sweep import _prepare, study_runs, sweep_args

    _prepare(tmp_path, monkeypatch)
    monkeypatch.setattr("ldmflow.workflows.sweep_trial._Objective.__call__",
                        lambda self, trial: _signal_itself(signal_number))
    started = time.monotonic()
    result = invoke(*sweep_args("--n_trials", "2"), ok=False)
    assert time.monotonic() - started < 30
    assert result.exit_code == 128 + signal_number, result.output
    assert f"Error: stopped by {signal.Signals(signal_number).name}" in result.output
    parent, _ = study_runs("demo", numbered_by_run=True)  # the interrupted trial has no number tag yet
    assert parent.info.status == "KILLED"


@pytest.mark.train
def test_a_training_interrupted_by_ctrl_c_ends_killed_with_no_half_written_folder(tmp_path, monkeypatch):
    from ldmflow.data.demo import make_demo_dataset
    from tiny import TINY_SIZES

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    manifest = make_demo_dataset(tmp_path / "data", num_images=8, resolution=32)
    monkeypatch.setattr("ldmflow.training.loop._optimizer_step", lambda *args: _signal_itself(signal.SIGINT))
    result = invoke("legacy-ddpm", "--manifest_path", str(manifest), "--output_dir",
                    str(tmp_path / "out"), *TINY_SIZES, "--block_out_channels", "16,16",
                    "--max_train_steps", "4", "--split", "all", "--val_split", "", ok=False)
    assert result.exit_code == 130, result.output
    assert "Error: stopped by SIGINT; the run (if any) ended KILLED." in result.output
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    [run] = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
    assert run.info.status == "KILLED"
