"""--replicate_group: one replicate group trained by several processes, each taking the next free seed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from cli_runner import invoke
from ldmflow.errors import LdmflowError
from ldmflow.settings import VaeSettings
from ldmflow.tags import (REGISTERED_URI_TAG, REPLICATE_GROUP_TAG, REPLICATE_INDEX_TAG, REPLICATE_OF_TAG,
                          REPLICATE_REGISTERED_TAG)
from tiny import TINY_COMMANDS

TINY_VAE = dict(resolution=32, train_batch_size=4, layers_per_block=1, lr_warmup_steps=0, max_train_steps=2,
                block_out_channels=(8, 8, 8, 8), scaling_factor_batches=1)
VAE = ["vae", "--manifest_path", "data/manifest.json", "--output_dir", "out", *TINY_COMMANDS["vae"],
       "--replicates", "3", "--replicate_group", "g"]


@pytest.fixture
def client(tmp_path, monkeypatch) -> MlflowClient:
    """A fresh SQLite store in tmp_path, the working folder."""
    from ldmflow.tracking.store import use_tracking_store

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    use_tracking_store()
    return MlflowClient()


def _group(client):
    experiment = client.get_experiment_by_name("ldmflow").experiment_id
    [parent] = client.search_runs([experiment], f"tags.`{REPLICATE_GROUP_TAG}` = 'g'")
    children = client.search_runs([experiment], f"tags.`{REPLICATE_OF_TAG}` = '{parent.info.run_id}'")
    return parent, children


@pytest.mark.train
def test_a_worker_leaves_a_claimed_seed_to_its_holder_and_a_rerun_finishes_and_summarises_the_group(
        demo_manifest, tmp_path, client):
    (tmp_path / "data").symlink_to(demo_manifest.parent)
    from ldmflow.workflows.replicates import _claim_next, _join_group

    settings = VaeSettings(manifest_path="data/manifest.json", output_dir="out", replicates=3, replicate_group="g",
                           **TINY_VAE)  # what VAE's command line says
    parent_id = _join_group(client, settings, "vae")
    assert _join_group(client, settings, "vae") == parent_id  # a second worker joins, it does not start another
    index, other_worker = _claim_next(client, settings, parent_id, "vae")  # another worker holds seed 0 ...
    assert index == 0
    invoke(*VAE)  # ... so this one trains seeds 1 and 2, and leaves the summary to whoever finishes seed 0
    parent, children = _group(client)
    assert sorted(run.data.tags[REPLICATE_INDEX_TAG] for run in children) == ["0", "1", "2"]
    assert parent.info.status == "RUNNING" and "val/psnr" not in parent.data.metrics
    client.set_terminated(other_worker, "FAILED")  # that worker died: its seed is free again
    result = invoke(*VAE)  # the same command continues the group
    parent, children = _group(client)
    finished = [run for run in children if run.info.status == "FINISHED"]
    assert sorted(int(run.data.params["seed"]) for run in finished) == [0, 1, 2]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["val/psnr_max"] >= parent.data.metrics["val/psnr"] >= parent.data.metrics["val/psnr_min"]
    assert parent.data.tags[REGISTERED_URI_TAG] == "models:/ldmflow-vae/1"
    assert "nearest to the group's mean" in parent.data.tags[REPLICATE_REGISTERED_TAG]
    assert client.get_model_version("ldmflow-vae", "1").run_id in {run.info.run_id for run in finished}
    assert "Traceback" not in result.output


@pytest.mark.train
def test_a_worker_with_another_recipe_is_refused_in_one_line(demo_manifest, client):
    from ldmflow.workflows.replicates import _join_group

    settings = VaeSettings(manifest_path=str(demo_manifest), output_dir="out", replicates=3, replicate_group="g")
    parent_id = _join_group(client, settings, "vae")
    other = VaeSettings(manifest_path=str(demo_manifest), output_dir="elsewhere", replicates=3, replicate_group="g",
                        learning_rate=1e-3, seed=5)
    with pytest.raises(LdmflowError, match=rf"Replicate group 'g' \(run {parent_id}\) trains another recipe: "
                                           r"--learning_rate '0.0001' there, '0.001' here\."):
        _join_group(client, other, "vae")


def test_a_group_name_needs_two_or_more_replicates():
    with pytest.raises(LdmflowError, match="--replicate_group 'g' names a group of --replicates 2 or more"):
        VaeSettings(manifest_path="m.json", output_dir="out", replicate_group="g")


@pytest.mark.slow
def test_two_worker_processes_share_the_seeds_of_one_group(demo_manifest, tmp_path):
    (tmp_path / "data").symlink_to(demo_manifest.parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    subprocess.run([sys.executable, "-m", "ldmflow", "init-store"], cwd=tmp_path, env=env, check=True)
    command = [sys.executable, "-m", "ldmflow", *VAE, "--replicates", "4", "--max_train_steps", "20"]
    workers = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("ldmflow").experiment_id
    [parent] = client.search_runs([experiment], f"tags.`{REPLICATE_GROUP_TAG}` = 'g'")
    children = client.search_runs([experiment], f"tags.`{REPLICATE_OF_TAG}` = '{parent.info.run_id}'")
    assert sorted(int(run.data.params["seed"]) for run in children) == [0, 1, 2, 3]  # each seed once
    assert {run.info.status for run in children} == {"FINISHED"} and parent.info.status == "FINISHED"
    assert len(client.search_model_versions("name = 'ldmflow-vae'")) == 1


def test_any_group_name_and_count_is_a_group_or_one_line():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import given, strategies as st

    @hypothesis.settings(max_examples=60, deadline=None)
    @given(st.one_of(st.none(), st.text(max_size=20)), st.integers(-2, 4))
    def check(name, count):
        try:
            settings = VaeSettings(manifest_path="m.json", output_dir="out", replicate_group=name, replicates=count)
        except LdmflowError as error:
            assert "\n" not in str(error)
            return
        assert settings.replicates >= 1 and (name is None or (name.strip() and settings.replicates >= 2))

    check()
