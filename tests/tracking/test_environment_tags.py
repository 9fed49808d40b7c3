"""Every run records the environment it ran in (ldmflow.env.* tags), and two runs on other numerics differ there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ldmflow import environment, lock
from ldmflow.tags import ENV_LOCK_TAG, ENV_TAG_PREFIX

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = ("python", "torch", "diffusers", "accelerate", "mlflow", "numpy", "pillow", "lock", "lock_match", "cpu",
            "cpu_capability", "threads")


@pytest.fixture(autouse=True)
def _fresh_tags():
    environment.environment_tags.cache_clear()
    yield
    environment.environment_tags.cache_clear()


def test_the_tags_name_versions_lock_cpu_and_its_numerics():
    tags = environment.environment_tags()
    assert all(ENV_TAG_PREFIX + name in tags for name in REQUIRED), sorted(tags)
    assert tags[ENV_LOCK_TAG] == lock.read_lock().short_digest and tags[ENV_TAG_PREFIX + "lock_match"] == "yes"
    assert tags[ENV_TAG_PREFIX + "torch"].startswith("2.") and int(tags[ENV_TAG_PREFIX + "threads"]) >= 1


def test_another_lock_has_another_digest_and_says_what_differs(tmp_path, monkeypatch):
    other = tmp_path / "requirements.lock"
    other.write_text(lock.LOCK_FILE.read_text().replace("numpy==", "numpy==0.0.1\n#"))
    monkeypatch.setattr(lock, "LOCK_FILE", other)
    tags = environment.lock_tags()
    assert tags["lock"] != lock.read_lock(lock.PYPROJECT.parent / "requirements.lock").short_digest
    assert tags["lock_match"].startswith("no: numpy 2.") and ", locked 0.0.1" in tags["lock_match"]


def test_an_unreadable_part_is_one_warning_line_never_a_failure(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(environment, "CPU_INFO", tmp_path / "no-cpuinfo")
    monkeypatch.setattr(environment.platform, "processor", lambda: "")
    assert environment.cpu_model(tmp_path / "no-cpuinfo") == (
        f"unknown ({tmp_path / 'no-cpuinfo'}: No such file or directory)")

    def broken():
        raise RuntimeError("no CUDA driver")

    monkeypatch.setattr(environment, "device_tags", broken)
    monkeypatch.setattr(lock, "LOCK_FILE", tmp_path / "absent.lock")
    caplog.set_level("WARNING")
    tags = environment.environment_tags()
    assert tags[ENV_TAG_PREFIX + "device"] == "unknown (RuntimeError: no CUDA driver)"
    assert tags[ENV_LOCK_TAG].startswith("none (")
    assert [r.getMessage() for r in caplog.records] == [
        "Environment tag ldmflow.env.device is unknown (RuntimeError: no CUDA driver)."]


RUN = """
import sys, types
from ldmflow.tracking.run_tracker import open_run
settings = types.SimpleNamespace(experiment_name="env", run_name=sys.argv[1], output_dir=None, to_params=dict)
with open_run(settings, "sample") as tracker:
    print(tracker.run_id)
"""


@pytest.mark.processes
def test_two_runs_on_other_cpu_numerics_differ_in_their_tags(tmp_path):
    """What the compare view shows: the same command under another CPU capability records another one."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_RUN_ID", None)
    ids = [subprocess.run([sys.executable, "-c", RUN, name], env={**env, **extra}, cwd=tmp_path, text=True,
                          capture_output=True, check=True).stdout.split()[-1]
           for name, extra in (("native", {}), ("emulated", {"ATEN_CPU_CAPABILITY": "default"}))]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    native, emulated = (client.get_run(run_id).data.tags for run_id in ids)
    capability = ENV_TAG_PREFIX + "cpu_capability"
    assert emulated[capability] == "DEFAULT" and native[capability] != "DEFAULT"
    assert native[ENV_LOCK_TAG] == emulated[ENV_LOCK_TAG] == lock.read_lock().short_digest
    differing = {key for key in native if key.startswith(ENV_TAG_PREFIX) and native[key] != emulated.get(key)}
    assert differing == {capability}
