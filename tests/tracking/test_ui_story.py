"""What a user sees in the MLflow UI and the console: run names by stage, a step-0 preview, registered versions
whose Markdown links their run and VAE (and the VAE its latent DDPMs), an experiment description, and
read-only commands that never create an empty store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cli_runner import invoke
from ldmflow.data.demo import make_demo_dataset
from tiny import TINY_SIZES

pytestmark = pytest.mark.train  # most tests here train a tiny model; `make test-fast` skips them

TINY = [*TINY_SIZES,
        "--max_train_steps", "2", "--save_images_epochs", "1"]



@pytest.fixture(scope="module")
def story(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-story")
    store = f"sqlite:///{root}/mlflow.db"
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    os.environ["MLFLOW_TRACKING_URI"] = store
    os.environ.pop("MLFLOW_RUN_ID", None)
    data = make_demo_dataset(root / "data", num_images=12, resolution=32)
    invoke("vae", "--manifest_path", data, "--output_dir", root / "vae", *TINY, "--block_out_channels", "8,8,8,8",
           "--scaling_factor_batches", "1")
    invoke("latent-ddpm", "--manifest_path", data, "--vae_uri", "models:/ldmflow-vae/1", "--output_dir",
           root / "ldm", *TINY, "--block_out_channels", "16,16", "--num_preview_images", "1",
           "--preview_inference_steps", "1")
    invoke("sample", "--model_uri", "models:/ldmflow-latent-ddpm/1", "--output_dir", root / "samples",
           "--num_images", "1", "--num_inference_steps", "1")
    yield MlflowClient(store)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _runs(client) -> dict[str, object]:
    experiment = client.get_experiment_by_name("ldmflow")
    return {run.data.tags["ldmflow.stage"]: run for run in client.search_runs([experiment.experiment_id])}


def test_runs_are_named_by_stage_and_key_setting(story):
    names = {stage: run.info.run_name for stage, run in _runs(story).items()}
    assert names["vae"].startswith("vae-32px-") and names["latent_ddpm"].startswith("latent_ddpm-32px-")
    assert names["sample"].startswith("sample-g3-")


def test_a_preview_is_logged_at_step_zero(story):
    for stage, key in (("vae", "reconstructions"), ("latent_ddpm", "samples")):
        logged = [a.path for a in story.list_artifacts(_runs(story)[stage].info.run_id, "images")]
        assert any(path.startswith(f"images/{key}+step+0+") for path in logged), logged


def test_versions_describe_their_lineage_in_both_directions(story):
    ldm_run = _runs(story)["latent_ddpm"].info.run_id
    latent = story.get_model_version("ldmflow-latent-ddpm", "1")
    assert "[ldmflow-vae v1](#/models/ldmflow-vae/versions/1)" in latent.description
    assert f"runs/{ldm_run})" in latent.description and "Conditions: `temperature:1" in latent.description
    vae = story.get_model_version("ldmflow-vae", "1")
    assert vae.tags["latent_ddpm_versions"] == "ldmflow-latent-ddpm/1"
    assert "#/models/ldmflow-latent-ddpm/versions/1" in vae.description
    assert story.get_registered_model("ldmflow-vae").description.startswith("ldmflow's AutoencoderKL")


def test_the_experiment_and_dataset_say_what_they_are(story):
    experiment = story.get_experiment_by_name("ldmflow")
    assert "ldmflow.stage" in experiment.tags["mlflow.note.content"]
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on its runs
    dataset = story.get_run(_runs(story)["vae"].info.run_id).inputs.dataset_inputs[0].dataset
    assert dataset.name.startswith("manifest (train, ") and dataset.name.endswith(" images)")


@pytest.mark.parametrize("command", [["models"], ["lineage", "models:/ldmflow-vae/1"],
                                     ["sample", "--model_uri", "models:/ldmflow-vae/1", "--no_mlflow"]])
def test_read_only_commands_on_a_missing_store_say_so_and_create_nothing(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = invoke(*command, ok=False)
    assert result.exit_code != 0
    assert f"No MLflow store at {tmp_path / 'mlflow.db'} (MLFLOW_TRACKING_URI is unset" in result.output
    assert not list(tmp_path.iterdir())  # no mlflow.db, no mlartifacts


def test_training_reports_progress_lines_when_stderr_is_not_a_terminal(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="ldmflow.progress")
    monkeypatch.setenv("LDMFLOW_PROGRESS_SECONDS", "0")
    data = make_demo_dataset(tmp_path / "data", num_images=12, resolution=32)
    invoke("legacy-ddpm", "--manifest_path", data, "--output_dir", tmp_path / "out", *TINY, "--block_out_channels",
           "16,16", "--num_preview_images", "1", "--preview_inference_steps", "1", "--no_mlflow",
           "--logging_steps", "1")
    lines = [record.getMessage() for record in caplog.records if record.name == "ldmflow.progress"]
    assert lines[0].startswith("legacy_ddpm: step 1/2 (50%), ") and lines[-1].startswith("legacy_ddpm: step 2/2 (100%)")
    assert "img/s" in lines[-1] and "loss " in lines[-1] and "left" in lines[-1]


def test_work_shorter_than_the_progress_interval_prints_no_progress_line(monkeypatch, caplog):
    from ldmflow.progress import Progress

    caplog.set_level("INFO", logger="ldmflow.progress")
    monkeypatch.setenv("LDMFLOW_PROGRESS_SECONDS", "3600")
    quick = Progress("quick", total=3)
    for _ in range(3):
        quick.update(1, images=2)
    assert not caplog.records
    clock = [0.0]
    monkeypatch.setattr("ldmflow.progress.time.monotonic", lambda: clock[0])
    slow = Progress("slow", total=3)
    for _ in range(3):
        clock[0] += 1800.0  # the second step crosses the interval: one line, then the last one
        slow.update(1, images=2)
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["slow: step 2/3 (66%)", "slow: step 3/3 (100%)"]


def test_a_log_gets_a_progress_line_a_minute(monkeypatch, caplog):
    """By default (no LDMFLOW_PROGRESS_SECONDS): make demo's 3-minute training prints three lines, not six."""
    from ldmflow.progress import Progress

    caplog.set_level("INFO", logger="ldmflow.progress")
    monkeypatch.delenv("LDMFLOW_PROGRESS_SECONDS", raising=False)
    clock = [0.0]
    monkeypatch.setattr("ldmflow.progress.time.monotonic", lambda: clock[0])
    work = Progress("work", total=180)
    for _ in range(180):
        clock[0] += 1.0
        work.update(1)
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["work: step 60/180", "work: step 120/180",
                                                                       "work: step 180/180"]


def test_logged_models_are_named_by_stage(story):
    experiment = story.get_experiment_by_name("ldmflow")
    names = sorted(model.name for model in story.search_logged_models(experiment_ids=[experiment.experiment_id]))
    assert names == ["latent_ddpm", "vae"]


def test_preview_captions_fit_their_tiles():
    """MLflow shows the grid as is: a caption wider than its tile would be cut off mid-number."""
    import numpy as np
    from PIL import Image

    from ldmflow.sampling.grids import condition_label, image_grid

    conditions = [{"temperature": -4.16, "wind": [0.485, -6.55, 0.0], "wind_mag": 9.19}] * 4
    tiles = [Image.new("RGB", (64, 64), "gray")] * 4
    grid = np.asarray(image_grid(tiles, labels=[condition_label(c) for c in conditions]).convert("L"))
    tile_width = grid.shape[1] // 4
    captions = grid[tile_width:, :]  # tiles are upscaled to 128 px; below them, the caption strips
    for column in range(4):
        right_edge = captions[:, (column + 1) * tile_width - 3:(column + 1) * tile_width]
        assert (right_edge > 200).all()  # white: no glyph reaches the tile's edge
    assert (captions < 100).any()  # and there is text
