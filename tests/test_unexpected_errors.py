"""An error ldmflow did not foresee: one `Error: unexpected ...` line, exit code 2, the traceback in a file,
--verbose prints it, and an open run ends FAILED with the error as a tag and the traceback as an artifact."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from cli_runner import invoke
from ldmflow.errors import LdmflowError

LINE = re.compile(r"^Error: unexpected RuntimeError: disk on fire \(full traceback in (.+); please report it\)$")


def _explode(**options):
    raise RuntimeError("disk on fire\nsecond line")


def _demo_data(tmp_path, monkeypatch, *flags):
    monkeypatch.setattr("ldmflow.data.demo.make_demo_dataset", _explode)
    return invoke(*flags, "demo-data", "--output_dir", str(tmp_path), ok=False)


def test_one_line_a_traceback_file_and_exit_code_2(tmp_path, monkeypatch):
    result = _demo_data(tmp_path, monkeypatch)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    path = Path(LINE.match(lines[0]).group(1))
    assert path.parent == tmp_path and path.name.startswith("ldmflow-error-")  # the output folder, when it exists
    text = path.read_text()
    assert text.startswith("Traceback") and "RuntimeError: disk on fire" in text and "_explode" in text


def test_without_an_output_folder_the_file_goes_to_the_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "temp"))
    (tmp_path / "temp").mkdir()
    result = _demo_data(tmp_path / "not-yet", monkeypatch)
    assert result.exit_code == 2
    assert Path(LINE.match(result.output.strip()).group(1)).parent == tmp_path / "temp"


def test_verbose_prints_the_traceback_too(tmp_path, monkeypatch):
    result = _demo_data(tmp_path, monkeypatch, "--verbose")
    assert result.exit_code == 2
    assert "Traceback (most recent call last)" in result.output and "in _explode" in result.output
    assert LINE.match(result.output.strip().splitlines()[-1])


def test_a_user_error_stays_exit_code_1(tmp_path):
    result = invoke("demo-data", "--output_dir", str(tmp_path), "--num_images", "0", ok=False)
    assert result.exit_code == 1 and result.output.startswith("Error: --num_images")


@dataclasses.dataclass
class _Settings:
    output_dir: str
    experiment_name: str = "unexpected"
    run_name: str | None = None

    def to_params(self):
        return {"output_dir": self.output_dir}


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), LdmflowError("bad input")], ids=["bug", "user"])
def test_an_open_run_ends_failed_with_the_error_as_a_tag(tmp_path, monkeypatch, error):
    from mlflow import MlflowClient

    from ldmflow.tags import ERROR_TAG
    from ldmflow.tracking.run_tracker import ERROR_ARTIFACT_PATH, open_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    with pytest.raises(type(error)):
        with open_run(_Settings(str(tmp_path)), "sample") as tracker:
            run_id = tracker.run_id
            raise error
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[ERROR_TAG] == f"{type(error).__name__}: {error}"
    artifacts = [item.path for item in client.list_artifacts(run_id, ERROR_ARTIFACT_PATH)]
    if isinstance(error, LdmflowError):  # explained by its message: no traceback to keep
        assert artifacts == []
    else:
        assert len(artifacts) == 1 and Path(artifacts[0]).name.startswith("ldmflow-error-")


def test_the_pyfunc_answers_bad_input_as_invalid_parameter_value():
    """So the REST scoring server returns 400 with ldmflow's message in `message`, not "unexpected error"."""
    import json

    import pandas as pd
    from mlflow.exceptions import MlflowException

    from ldmflow.tracking.pyfunc_models import LatentDiffusionPyfunc

    with pytest.raises(MlflowException) as caught:
        LatentDiffusionPyfunc().predict(None, pd.DataFrame({"seed": [1]}), params={"bogus": 1})
    assert isinstance(caught.value, LdmflowError)  # in-process callers catch it as before
    answer = json.loads(caught.value.serialize_as_json())
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE" and answer["message"].startswith("Unknown param(s)")
    assert caught.value.get_http_status_code() == 400


def test_the_pipelines_parent_run_records_the_error_too(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from ldmflow.tags import ERROR_TAG
    from ldmflow.tracking.run_tracker import ERROR_ARTIFACT_PATH, recording_failure

    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(RuntimeError):
        with mlflow.start_run() as run, recording_failure(run.info.run_id, tmp_path):
            raise RuntimeError("disk on fire")
    client = MlflowClient()
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FAILED" and finished.data.tags[ERROR_TAG] == "RuntimeError: disk on fire"
    assert len(client.list_artifacts(run.info.run_id, ERROR_ARTIFACT_PATH)) == 1


def test_clicks_own_exits_pass_through(tmp_path, monkeypatch):
    """click.exceptions.Exit and Abort are RuntimeErrors: they must not read as unexpected."""
    import click

    def leave(**options):
        raise click.exceptions.Exit(0)

    monkeypatch.setattr("ldmflow.data.demo.make_demo_dataset", leave)
    result = invoke("demo-data", "--output_dir", str(tmp_path), ok=False)
    assert result.exit_code == 0 and "unexpected" not in result.output
