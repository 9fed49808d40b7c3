"""End to end through MLflow Projects: vae -> latent_ddpm (vae_uri=models:/...) -> sample, then the registry,
lineage, pyfunc serving input and the pipeline's reuse, all in a temporary SQLite store."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ldmflow.tracking.model_uri import version_model_id
from tiny import TINY_SIZES, as_project_params

PROJECT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = as_project_params(TINY_SIZES)

pytestmark = pytest.mark.train  # the chain through `mlflow run` (subprocesses); the longest two are slow


def mlflow_run(env: dict, entry_point: str, *params: str) -> subprocess.CompletedProcess:
    command = [str(BIN / "mlflow"), "run", str(PROJECT), "-e", entry_point, "--env-manager", "local",
               "--experiment-name", "ldmflow", *params]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=env["WORKDIR"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def ldmflow(env: dict, *args: str, ok: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "ldmflow"), *args], env=env, capture_output=True, text=True, timeout=timeout,
                            cwd=env["WORKDIR"])
    if ok:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Three `mlflow run` commands in sequence against one temporary SQLite store."""
    root = tmp_path_factory.mktemp("projects")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "WORKDIR": str(root),
           "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}
    env.pop("MLFLOW_RUN_ID", None)
    ldmflow(env, "demo-data", "--output_dir", str(root / "data"), "--num_images", "24", "--resolution", "32")
    manifest = root / "data" / "manifest.json"
    mlflow_run(env, "vae", "-P", f"manifest_path={manifest}", "-P", f"output_dir={root / 'vae'}", *TINY,
               "-P", "block_out_channels=16,16,16,16", "-P", "max_train_steps=4", "-P", "scaling_factor_batches=2",
               "-P", "save_images_epochs=1")
    mlflow_run(env, "latent_ddpm", "-P", f"manifest_path={manifest}", "-P", "vae_uri=models:/ldmflow-vae/1",
               "-P", f"output_dir={root / 'ldm'}", *TINY, "-P", "block_out_channels=32,32", "-P", "max_train_steps=4",
               "-P", "use_ema=true", "-P", "num_preview_images=2", "-P", "preview_inference_steps=2",
               "-P", "save_images_epochs=1", "-P", "learning_rate=1e-3")
    mlflow_run(env, "sample", "-P", "model_uri=models:/ldmflow-latent-ddpm/1", "-P",
               f"output_dir={root / 'samples'}", "-P", "num_images=2", "-P", "num_inference_steps=2")
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    yield env, manifest
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def test_registry_links_the_unet_to_the_exact_vae_version_and_dataset(store):
    env, manifest = store
    client = _client()
    vae = client.get_model_version("ldmflow-vae", "1")
    unet = client.get_model_version("ldmflow-latent-ddpm", "1")
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert vae.tags["stage"] == "vae" and unet.tags["stage"] == "latent_ddpm"
    assert vae.tags["dataset_digest"] == unet.tags["dataset_digest"] == digest
    assert unet.tags["condition_spec"] == "temperature:1,wind:3,wind_mag:1"
    assert unet.tags["vae_model_name"] == "ldmflow-vae" and unet.tags["vae_model_version"] == "1"
    assert unet.tags["vae_run_id"] == vae.run_id and unet.tags["vae_uri"] == "models:/ldmflow-vae/1"
    run = client.get_run(unet.run_id)
    for key in ("vae_model_name", "vae_model_version", "vae_run_id", "vae_uri"):
        assert run.data.tags[key] == unet.tags[key]
    # the VAE is a model input of the UNet's run; the manifest is its dataset input, with the digest
    assert [i.model_id for i in run.inputs.model_inputs] == [version_model_id(vae)]
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [digest[:36]]  # MLflow keeps 36 chars
    assert run.data.tags["dataset_digest"] == digest


def test_runs_log_params_metrics_previews_and_conditions(store):
    client = _client()
    unet = client.get_model_version("ldmflow-latent-ddpm", "1")
    run = client.get_run(unet.run_id)
    assert run.data.params["vae_uri"] == "models:/ldmflow-vae/1"  # from `-P`, one name for the VAE
    assert "vae_path" not in run.data.params
    assert run.data.params["condition_spec"] == "temperature:1,wind:3,wind_mag:1"
    assert {"loss", "lr", "grad_norm", "images_per_second", "nonfinite_steps", "val/denoise_loss",
            "val/denoise_loss_ema"} <= set(run.data.metrics)
    assert unet.tags["checkpoint"] == "best" and unet.tags["checkpoint_metric"] == "val/denoise_loss_ema"
    assert float(unet.tags["checkpoint_metric_value"]) == pytest.approx(run.data.metrics["val/denoise_loss_ema"],
                                                                        rel=1e-5)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "conditioning.json" in artifacts and "images" in artifacts
    vae_run = client.get_run(client.get_model_version("ldmflow-vae", "1").run_id)
    assert {"mse", "l1", "kl", "val/psnr", "val/ssim", "latent_scaling_factor"} <= set(vae_run.data.metrics)
    vae_version = client.get_model_version("ldmflow-vae", "1")
    assert (vae_version.tags["checkpoint"], vae_version.tags["checkpoint_metric"]) == ("best", "val/psnr")
    assert vae_run.info.status == "FINISHED"


def test_lineage_json_and_models_listing(store):
    env, _ = store
    chain = json.loads(ldmflow(env, "lineage", "models:/ldmflow-latent-ddpm/1", "--json").stdout)
    client = _client()
    vae = client.get_model_version("ldmflow-vae", "1")
    assert chain["vae"]["name"] == "ldmflow-vae" and str(chain["vae"]["version"]) == "1"
    assert chain["vae"]["run_id"] == vae.run_id
    assert chain["ddpm"]["run_id"] == client.get_model_version("ldmflow-latent-ddpm", "1").run_id
    assert len(chain["samples"]) == 1
    sample_run = client.get_run(chain["samples"][0])
    assert sample_run.data.tags["ldmflow.model_uri"] == "models:/ldmflow-latent-ddpm/1"
    assert [i.model_id for i in sample_run.inputs.model_inputs] == [
        version_model_id(client.get_model_version("ldmflow-latent-ddpm", "1"))]
    text = ldmflow(env, "lineage", "models:/ldmflow-latent-ddpm/1").stdout
    assert "ldmflow-vae v1" in text and "ldmflow-latent-ddpm v1" in text
    listing = ldmflow(env, "models").stdout
    assert "ldmflow-vae" in listing and "ldmflow-latent-ddpm" in listing


def test_pyfunc_predicts_images_for_a_frame_of_conditions(store):
    import mlflow

    model = mlflow.pyfunc.load_model("models:/ldmflow-latent-ddpm/1")
    frame = pd.DataFrame({"temperature": [0.0, 30.0], "wind_0": [1.0, 0.0], "wind_1": [0.0, 1.0],
                          "wind_2": [0.0, 0.0], "wind_mag": [1.0, 1.0], "seed": [1, 2]})
    result = model.predict(frame, params={"num_inference_steps": 2})
    assert list(result.columns) == ["image", "seed"] and result["seed"].tolist() == [1, 2]
    import base64
    import io

    from PIL import Image

    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(text)))) for text in result["image"]]
    assert all(image.shape == (32, 32, 3) for image in images)
    assert not np.array_equal(images[0], images[1])  # other conditions and seed, another image


@pytest.mark.slow
def test_sample_errors_are_clear(store):
    env, _ = store
    result = ldmflow(env, "sample", "--model_uri", "models:/ldmflow-latent-ddpm/1", "--condition", "humidity=3",
                     "--no_mlflow", "--output_dir", env["WORKDIR"] + "/bad", ok=False)
    assert result.returncode == 1 and "temperature:1,wind:3,wind_mag:1" in result.stderr
    result = ldmflow(env, "sample", "--model_uri", "models:/no-such-model/1", "--no_mlflow", ok=False)
    assert result.returncode == 1 and "no-such-model" in result.stderr and "Traceback" not in result.stderr
    result = ldmflow(env, "sample", "--model_uri", "models:/ldmflow-latent-ddpm/7", "--no_mlflow", ok=False)
    assert result.returncode == 1 and "7" in result.stderr and "Traceback" not in result.stderr
    assert not (Path(env["WORKDIR"]) / "bad" / "grid.png").exists()
    # tracked: the bad condition is refused before any run opens, so no FAILED run is left behind
    before = len(_client().search_runs([_client().get_experiment_by_name("ldmflow").experiment_id]))
    result = ldmflow(env, "sample", "--model_uri", "models:/ldmflow-latent-ddpm/1", "--condition", "temperature=1",
                     "--output_dir", env["WORKDIR"] + "/bad", ok=False)
    assert result.returncode == 1 and "missing condition" in result.stderr and "wind" in result.stderr
    result = ldmflow(env, "sample", "--model_uri", "models:/ldmflow-latent-ddpm/1", "--num_inference_steps", "5000",
                     "--output_dir", env["WORKDIR"] + "/bad", ok=False)
    assert result.returncode == 1 and "between 1 and the model's 1000 training timesteps" in result.stderr
    result = ldmflow(env, "pipeline", "--manifest_path", env["WORKDIR"] + "/missing.json", ok=False)
    assert result.returncode == 1 and "missing.json" in result.stderr and "Traceback" not in result.stderr
    runs = _client().search_runs([_client().get_experiment_by_name("ldmflow").experiment_id])
    assert len(runs) == before and not [r for r in runs if r.info.status == "FAILED"]
    table = Path(env["WORKDIR"]) / "conditions.csv"
    table.write_text("temperature,wind_0,wind_1,wind_2,wind_mag\nwarm,1,0,0,1\n")
    result = ldmflow(env, "sample", "--model_uri", "models:/ldmflow-latent-ddpm/1", "--conditions_file", str(table),
                     "--no_mlflow", ok=False)
    assert result.returncode == 1 and "Row 0: condition 'temperature' is not a number" in result.stderr


@pytest.mark.slow
def test_pipeline_runs_children_under_one_parent_and_reuses_them(store):
    env, manifest = store
    params = ["-P", f"manifest_path={manifest}", "-P", f"output_root={env['WORKDIR']}/pipeline", "-P",
              "resolution=32", "-P", "vae_block_out_channels=16,16,16,16", "-P", "ddpm_block_out_channels=32,32",
              "-P", "layers_per_block=1", "-P", "vae_epochs=1", "-P", "ddpm_epochs=1", "-P", "num_images=2",
              "-P", "vae_train_batch_size=4", "-P", "ddpm_train_batch_size=4", "-P", "eval_num_samples=8", "-P", "lr_warmup_steps=0", "-P", "num_inference_steps=2"]
    first = mlflow_run(env, "pipeline", *params)
    second = mlflow_run(env, "pipeline", *params)
    assert "reusing finished run" not in first.stderr
    assert first.stderr.count("watch it live") == 1  # the pipeline's line; its steps do not repeat it
    assert (first.stdout + first.stderr).count("\ntemperature_mae ") == 1  # the evaluation table, once
    assert "Loaded " not in first.stderr and "Successfully registered" not in first.stderr
    assert "workflowType=machine_learning" in first.stderr  # MLflow 3's UI shows runs, not its GenAI view
    assert second.stderr.count("reusing finished run") == 4
    [summary] = [line for line in first.stdout.splitlines() if line.startswith("Pipeline: ")]
    assert "models:/ldmflow-vae/" in summary and "-> models:/ldmflow-latent-ddpm/" in summary
    assert "(val/psnr " in summary and " at its registered weights) -> " in summary  # the first stage's quality
    assert "(reused)" not in summary and [line for line in second.stdout.splitlines()
                                          if line.startswith("Pipeline: ")][0].count("(reused)") == 4
    assert "Evaluation of models:/ldmflow-latent-ddpm/" in second.stdout and "temperature_mae" in second.stdout
    client = _client()
    latest = client.get_model_version("ldmflow-latent-ddpm", "2")
    assert latest.tags["vae_model_version"] == "2"
    parent = client.get_run(latest.run_id).data.tags["mlflow.parentRunId"]
    assert client.get_run(parent).data.tags["ldmflow.stage"] == "pipeline"
    experiment = client.get_experiment_by_name("ldmflow")
    [probe] = client.search_runs([experiment.experiment_id], "tags.`ldmflow.stage` = 'probe'")
    evaluate = client.get_run(probe.data.tags["mlflow.parentRunId"])  # the evaluation that trained it
    assert evaluate.data.tags["ldmflow.stage"] == "evaluate"
    assert client.get_run(evaluate.data.tags["mlflow.parentRunId"]).data.tags["ldmflow.stage"] == "pipeline"


@pytest.mark.slow
def test_pipeline_replicates_are_one_parent_with_a_pipeline_per_seed_and_spread_metrics(store):
    env, manifest = store
    result = ldmflow(env, "pipeline", "--manifest_path", str(manifest), "--output_root",
                     f"{env['WORKDIR']}/replicates", "--resolution", "32", "--vae_block_out_channels", "16,16,16,16",
                     "--ddpm_block_out_channels", "32,32", "--layers_per_block", "1", "--vae_epochs", "1",
                     "--ddpm_epochs", "1", "--num_images", "2", "--vae_train_batch_size", "4",
                     "--ddpm_train_batch_size", "4", "--eval_num_samples", "8", "--lr_warmup_steps", "0",
                     "--num_inference_steps", "2", "--replicates", "3", "--seed", "5", timeout=1200)
    [header] = [line for line in result.stdout.splitlines() if line.startswith("Replicate group ")]
    group = header.split()[2].rstrip(":")
    assert "3 pipelines (seeds 5 to 7)" in header and "Nearest the mean: models:/ldmflow-latent-ddpm/" in result.stdout
    client = _client()
    parent = client.get_run(group)
    assert parent.data.tags["ldmflow.stage"] == "pipeline" and parent.data.tags["ldmflow.replicates"] == "3"
    children = client.search_runs([parent.info.experiment_id], f"tags.`ldmflow.replicate_of` = '{group}'")
    assert sorted(run.data.params["seed"] for run in children) == ["5", "6", "7"]
    assert all(run.data.tags["mlflow.parentRunId"] == group and run.data.tags["ldmflow.stage"] == "pipeline"
               for run in children)
    metrics = parent.data.metrics
    for key in ("eval/temperature_mae_pct", "vae_val/psnr"):
        assert {key, f"{key}_sd", f"{key}_min", f"{key}_max"} <= set(metrics)
        assert metrics[f"{key}_min"] <= metrics[key] <= metrics[f"{key}_max"] and metrics[f"{key}_sd"] > 0
