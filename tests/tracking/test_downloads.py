"""A model download that fails keeps its cause in the one line and leaves nothing in the destination's folder:
a full disk (a small tmpfs, mounted where the test may) and the causes MLflow wraps."""

from __future__ import annotations

import os
import subprocess

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ldmflow.errors import LdmflowError
from ldmflow.tracking.model_uri import download_cause, resolve_model_source


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs: a larger download fills it. Skipped where mounting is not allowed (not root, a container)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def registered(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(os.urandom(300_000))
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tmp_path / "model"), "model")
    client = MlflowClient()
    client.create_registered_model("probe-model")
    client.create_model_version("probe-model", f"runs:/{run.info.run_id}/model", run.info.run_id)
    return "models:/probe-model/1"


def test_a_download_onto_a_full_disk_says_so_and_leaves_no_partial_folder(registered, full_disk):
    with pytest.raises(LdmflowError, match=r"Could not download models:/probe-model/1 into .*\.probe_download: "
                                           r"the disk is full \(0 MiB free\)\.$"):
        resolve_model_source(registered, dst_dir=full_disk / ".probe_download")
    assert os.listdir(full_disk) == []


@pytest.mark.parametrize("relative", [False, True])
def test_a_download_that_works_lands_in_its_folder_alone(registered, tmp_path, relative):
    folder = "out/.probe_download" if relative else tmp_path / "out" / ".probe_download"  # from tmp_path
    source = resolve_model_source(registered, dst_dir=folder)
    assert (source.local_dir / "weights.bin").stat().st_size == 300_000
    assert sorted(os.listdir(tmp_path / "out")) == [".probe_download"]


@pytest.mark.parametrize("error, cause", [
    (MlflowException("The following failures occurred while downloading one or more artifacts from file:///s: "
                     "{'model/w.bin': \"[Errno 13] Permission denied: '/d/w.bin'\"}"),
     "[Errno 13] Permission denied: '/d/w.bin'"),
    (MlflowException("Failed to download artifacts"), "Failed to download artifacts"),
])
def test_the_cause_mlflow_wraps_is_kept(tmp_path, error, cause):
    assert download_cause(error, tmp_path) == cause


def test_a_chained_os_error_is_said_with_its_file(tmp_path):
    try:
        try:
            raise PermissionError(13, "Permission denied", "/d/w.bin")
        except PermissionError as inner:
            raise MlflowException("Failed to download artifacts from path 'model'") from inner
    except MlflowException as error:
        assert download_cause(error, tmp_path) == "Permission denied: /d/w.bin"
