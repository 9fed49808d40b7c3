"""Registering each stage, model URI resolution, lineage, list_models and the pyfunc models, on one SQLite store.

The store and its models are built once for the module (MLflow model logging is the slow part).
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import AutoencoderKL, DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from mlflow import MlflowClient
from PIL import Image

from ldmflow.data.conditions import ConditionSpec, ConditionStats
from ldmflow.errors import LdmflowError
from ldmflow.models.conditioning import ConditionEncoder
from ldmflow.tracking.lineage import format_lineage, format_models, lineage, list_models, sample_run_tags
from ldmflow.models.kinds import LATENT_DDPM, LEGACY_DDPM, VAE
from ldmflow.models.saved_model import find_diffusers_folder, latent_ddpm_folders
from ldmflow.tracking.model_uri import resolve_model_source
from ldmflow.tracking.registry import log_and_register
from ldmflow.tracking.run_tracker import open_run
from fakes import tracked_folder

SPEC = "temperature:1,wind:3,wind_mag:1"
DIGEST = "0123456789abcdef" * 4


@dataclass(frozen=True)
class RunSettings:
    output_dir: str
    experiment_name: str = "ldmflow"
    run_name: str | None = None

    def to_params(self) -> dict[str, str]:
        return {"output_dir": self.output_dir}


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                         latent_channels=4, norm_num_groups=8, sample_size=32, layers_per_block=1)


def write_latent_output(folder: Path, vae_source) -> None:
    """What `ldmflow latent-ddpm` writes: unet/, scheduler_config.json, conditioning.json, vae_source.json."""
    spec = ConditionSpec.parse(SPEC)
    encoder = ConditionEncoder(spec, ConditionStats((10.0, 0.0, 0.0, 0.0, 1.0), (5.0, 1.0, 1.0, 1.0, 0.5)))
    UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2D", block_out_channels=(32, 32),
        layers_per_block=1, norm_num_groups=8, class_embed_type="projection",
        projection_class_embeddings_input_dim=encoder.encoded_dim).save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(folder)
    encoder.save(folder)
    (folder / "images").mkdir()
    vae_dir = find_diffusers_folder(vae_source.local_dir, VAE)
    (folder / "vae_source.json").write_text(json.dumps({
        "vae_path": str(vae_dir), "vae_uri": vae_source.uri, "vae_model_name": vae_source.model_name,
        "vae_model_version": vae_source.model_version, "vae_run_id": vae_source.run_id,
        "vae_model_id": vae_source.model_id, "condition_spec": SPEC}))


def write_pixel_output(folder: Path) -> None:
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), block_out_channels=(32, 32), layers_per_block=1,
                       norm_num_groups=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    (folder / "images").mkdir()


def train_and_register(root: Path, stage: str, folder: str, **kwargs):
    """A run as the trainers make it: open_run, metrics, then log_and_register inside the run."""
    with open_run(RunSettings(str(root / folder), run_name=folder), stage, enabled=True) as tracker:
        tracker.log_metrics({"loss": 0.25, "val/psnr": 21.5, "latent_scaling_factor": 0.8}, step=4)
        return log_and_register(stage, root / folder, tracker, dataset_digest=DIGEST, **kwargs)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One SQLite store holding: VAE v1 (@champion), latent DDPM v1 on it, a latent DDPM on a plain VAE folder,
    a legacy pixel DDPM, and two sample runs of the latent DDPM."""
    root = tmp_path_factory.mktemp("registry")
    with tracked_folder(root):
        torch.manual_seed(0)
        tiny_vae().save_pretrained(root / "vae_out")
        (root / "vae_out" / "images").mkdir()
        vae = train_and_register(root, "vae", "vae_out", alias="champion",
                                 extra_tags={"checkpoint": "best", "checkpoint_step": "4",
                                             "checkpoint_metric": "val/psnr", "checkpoint_metric_value": "21.5"})
        vae_source = resolve_model_source("models:/ldmflow-vae@champion", dst_dir=root / "downloaded_vae")
        write_latent_output(root / "ldm_out", vae_source)
        ldm = train_and_register(root, "latent_ddpm", "ldm_out", vae_source=vae_source, condition_spec=SPEC)
        folder_source = resolve_model_source(str(root / "vae_out"))
        write_latent_output(root / "ldm_plain", folder_source)
        plain = train_and_register(root, "latent_ddpm", "ldm_plain", registered_model_name="custom-ldm")
        write_pixel_output(root / "pixel_out")
        pixel = train_and_register(root, "legacy_ddpm", "pixel_out", alias="prod")
        ldm_source = resolve_model_source(ldm.model_uri, dst_dir=root / "downloaded_ldm")
        samples = []
        for index in range(2):
            with open_run(RunSettings(str(root / f"samples{index}")), "sample", enabled=True) as tracker:
                tracker.set_tags(sample_run_tags(ldm_source))
                samples.append(tracker.run_id)
        yield {"root": root, "vae": vae, "ldm": ldm, "plain": plain, "pixel": pixel, "samples": samples,
               "vae_source": vae_source, "ldm_source": ldm_source}
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)


def test_each_stage_is_registered_with_tags_on_version_and_run(env):
    client = MlflowClient()
    assert (env["vae"].name, env["vae"].version) == ("ldmflow-vae", "1")
    assert (env["ldm"].name, env["pixel"].name, env["plain"].name) == (
        "ldmflow-latent-ddpm", "ldmflow-legacy-ddpm", "custom-ldm")
    expected = {"vae": {"stage": "vae"}, "pixel": {"stage": "legacy_ddpm"},
                "ldm": {"stage": "latent_ddpm", "condition_spec": SPEC, "vae_model_name": "ldmflow-vae",
                        "vae_model_version": "1", "vae_run_id": env["vae"].run_id,
                        "vae_uri": "models:/ldmflow-vae@champion"}}
    for key, tags in expected.items():
        info = env[key]
        version_tags = client.get_model_version(info.name, info.version).tags
        run_tags = client.get_run(info.run_id).data.tags
        for tag, value in {**tags, "dataset_digest": DIGEST}.items():
            assert version_tags[tag] == value, (key, tag)
            assert run_tags[tag] == value, (key, tag)
    assert str(client.get_model_version_by_alias("ldmflow-vae", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("ldmflow-legacy-ddpm", "prod").version) == "1"


def test_a_refused_registration_is_one_line_naming_the_model(tmp_path, monkeypatch):
    """A team server's editor adding a version to someone else's model gets 403 (docs/mlflow.md, the roles)."""
    from mlflow.exceptions import MlflowException

    def refused(*args, **kwargs):
        raise MlflowException("API request to endpoint /api/2.0/mlflow/model-versions/create failed with error "
                              "code 403 != 200. Response body: 'Permission denied'")

    with tracked_folder(tmp_path):
        tiny_vae().save_pretrained(tmp_path / "vae_out")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ed")
        monkeypatch.setattr(MlflowClient, "create_model_version", refused)
        with pytest.raises(LdmflowError, match=r"user 'ed' may not add versions to registered model 'theirs': ask "
                                               r"its owner .* for EDIT on it.*The trained model is safe in"):
            train_and_register(tmp_path, "vae", "vae_out", registered_model_name="theirs")
    mlflow.set_tracking_uri(None)


def test_plain_folder_vae_is_recorded_by_its_path(env):
    tags = MlflowClient().get_model_version("custom-ldm", "1").tags
    assert tags["vae_uri"] == str(env["root"] / "vae_out")
    assert not {"vae_model_name", "vae_model_version", "vae_run_id"} & set(tags)


def test_latent_run_records_the_vae_as_a_model_input(env):
    run = MlflowClient().get_run(env["ldm"].run_id)
    assert [m.model_id for m in run.inputs.model_inputs] == [env["vae"].model_id]
    assert env["vae_source"].model_id == env["vae"].model_id


def test_final_metrics_are_linked_to_the_logged_model(env):
    model = MlflowClient().get_logged_model(env["vae"].model_id)
    assert {m.key: m.value for m in model.metrics}["latent_scaling_factor"] == pytest.approx(0.8)


@pytest.mark.parametrize("form", ["models:/ldmflow-vae/1", "models:/ldmflow-vae@champion", "models:/ldmflow-vae/latest",
                                  "model_id", "runs"])
def test_every_uri_form_resolves_to_the_vae(env, form, tmp_path):
    vae = env["vae"]
    uri = {"model_id": f"models:/{vae.model_id}", "runs": f"runs:/{vae.run_id}/vae"}.get(form, form)
    source = resolve_model_source(uri, dst_dir=tmp_path)
    assert (source.uri, source.run_id, source.model_id) == (uri, vae.run_id, vae.model_id)
    assert (source.model_name, source.model_version, source.is_registered) == ("ldmflow-vae", "1", True)
    folder = find_diffusers_folder(source.local_dir, VAE)
    assert isinstance(AutoencoderKL.from_pretrained(folder), AutoencoderKL)


def test_local_folder_resolves_without_mlflow_identity(env):
    source = resolve_model_source(str(env["root"] / "vae_out"))
    assert source.local_dir == env["root"] / "vae_out"
    assert (source.model_name, source.model_version, source.run_id, source.model_id) == (None,) * 4
    assert not source.is_registered
    assert find_diffusers_folder(source.local_dir, VAE) == env["root"] / "vae_out"


@pytest.mark.parametrize("uri, message", [
    ("no/such/folder", "Model folder no/such/folder does not exist"),
    ("models:/nope/1", r"Registered model 'nope' does not exist in sqlite:.* \(registered models: custom-ldm, ldmflow-latent"),
    ("models:/ldmflow-vae/7", r"Model 'ldmflow-vae' has no version 7 \(versions: 1\)"),
    ("models:/ldmflow-vae@best", r"Model 'ldmflow-vae' has no alias 'best' \(aliases: @champion -> v1\)"),
    ("models:/ldmflow-vae", "Malformed model URI 'models:/ldmflow-vae': give a version"),
    ("models:/ldmflow-vae/one", "the version must be a number or 'latest'"),
    ("models:/", "Malformed model URI"),
    ("models:/m-0123456789abcdef", "Logged model 'm-0123456789abcdef' does not exist"),
    ("runs:/", r"Malformed run URI 'runs:/': expected runs:/<run_id>/<path>"),
    ("runs:/0123456789abcdef0123456789abcdef/model", "Run '0123456789abcdef0123456789abcdef' does not exist"),
    ("s3://bucket/vae", "Unsupported model URI 's3://bucket/vae'"),
])
def test_bad_model_uris_have_clear_messages(env, uri, message):
    with pytest.raises(LdmflowError, match=message):
        resolve_model_source(uri)


def test_missing_run_artifact_lists_what_the_run_has(env):
    with pytest.raises(LdmflowError, match=r"has no artifact or model 'weights' \(it has: .*vae"):
        resolve_model_source(f"runs:/{env['vae'].run_id}/weights")


def test_wrong_kind_of_model_is_named(env):
    with pytest.raises(LdmflowError, match="is a latent_ddpm model, not a vae model"):
        find_diffusers_folder(env["ldm_source"].local_dir, VAE)


def test_downloaded_artifacts_are_stock_diffusers_folders(env, tmp_path):
    ldm = Path(mlflow.artifacts.download_artifacts(env["ldm"].model_uri, dst_path=str(tmp_path / "ldm")))
    folder = find_diffusers_folder(ldm, LATENT_DDPM)
    assert isinstance(UNet2DConditionModel.from_pretrained(folder / "unet"), UNet2DConditionModel)
    assert isinstance(AutoencoderKL.from_pretrained(folder / "vae"), AutoencoderKL)
    assert isinstance(DDPMScheduler.from_pretrained(folder), DDPMScheduler)
    assert json.loads((folder / "conditioning.json").read_text())["condition_spec"] == SPEC
    parts = latent_ddpm_folders(ldm)
    assert (parts.unet_dir, parts.vae_dir, parts.conditioning_path) == (
        folder / "unet", folder / "vae", folder / "conditioning.json")
    pixel = Path(mlflow.artifacts.download_artifacts(env["pixel"].model_uri, dst_path=str(tmp_path / "pixel")))
    assert isinstance(DDPMPipeline.from_pretrained(find_diffusers_folder(pixel, LEGACY_DDPM)), DDPMPipeline)
    requirements = (ldm / "requirements.txt").read_text()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements and "diffusers==" in requirements


def test_training_output_folder_finds_its_vae(env):
    parts = latent_ddpm_folders(env["root"] / "ldm_plain")
    assert parts.vae_dir == env["root"] / "vae_out"


def test_lineage_of_a_latent_ddpm(env):
    result = lineage("models:/ldmflow-latent-ddpm/1")
    assert result["dataset_digest"] == DIGEST
    assert result["vae"] == {"name": "ldmflow-vae", "version": "1", "run_id": env["vae"].run_id,
                             "uri": "models:/ldmflow-vae@champion"}
    assert result["ddpm"] == {"name": "ldmflow-latent-ddpm", "version": "1", "run_id": env["ldm"].run_id}
    assert sorted(result["samples"]) == sorted(env["samples"])
    assert format_lineage(result) == (f"dataset {DIGEST[:12]} -> ldmflow-vae v1 (run {env['vae'].run_id[:8]}) -> "
                                      f"ldmflow-latent-ddpm v1 (run {env['ldm'].run_id[:8]}) -> 2 sample runs")


def test_lineage_of_a_vae_lists_the_latent_ddpms_trained_on_it(env):
    result = lineage("models:/ldmflow-vae@champion")
    assert [(u["name"], u["version"]) for u in result["latent_ddpms"]] == [("ldmflow-latent-ddpm", "1")]
    assert sorted(result["samples"]) == sorted(env["samples"])
    assert format_lineage(result).endswith("ldmflow-latent-ddpm v1 (run " + env["ldm"].run_id[:8] + ") -> 2 sample runs")


def test_lineage_of_a_model_on_a_plain_vae_folder(env):
    text = format_lineage(lineage("models:/custom-ldm/1"))
    assert text.startswith(f"dataset {DIGEST[:12]} -> vae {env['root'] / 'vae_out'} -> custom-ldm v1")
    assert text.endswith("0 sample runs")


def test_list_models_shows_every_version_with_metrics(env):
    rows = list_models()
    assert [(r["name"], r["stage"]) for r in rows] == [
        ("ldmflow-vae", "vae"), ("custom-ldm", "latent_ddpm"), ("ldmflow-latent-ddpm", "latent_ddpm"),
        ("ldmflow-legacy-ddpm", "legacy_ddpm")]
    vae = rows[0]
    assert vae["aliases"] == ["champion"] and vae["loss"] == pytest.approx(0.25)
    assert vae["latent_scaling_factor"] == pytest.approx(0.8) and vae["val/psnr"] == pytest.approx(21.5)
    assert rows[2]["vae"] == "ldmflow-vae v1"
    table = format_models(rows)
    assert table.splitlines()[0].split() == ["MODEL", "STAGE", "ALIASES", "RUN", "DATASET", "VAE", "WEIGHTS", "LOSS",
                                             "VAL_PSNR", "VAL_DENOISE", "EVAL_FID", "SCALE"]
    assert vae["checkpoint"] == "best@4 (val/psnr=21.5)" and rows[3]["checkpoint"] == ""
    assert "ldmflow-vae v1" in table and "@champion" in table and "best@4 (val/psnr=21.5)" in table


def decode(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def test_latent_pyfunc_generates_one_image_per_row(env):
    model = mlflow.pyfunc.load_model(env["ldm"].model_uri)
    frame = pd.DataFrame({"temperature": [5.0, 15.0, 25.0], "wind_0": [1.0, 0.0, 0.0], "wind_1": [0.0, 1.0, 0.0],
                          "wind_2": [0.0, 0.0, 1.0], "wind_mag": [1.0, 1.0, 1.0], "seed": [1, 2, 3]})
    out = model.predict(frame, params={"num_inference_steps": 2, "batch_size": 2})
    assert list(out.columns) == ["image", "seed"] and out["seed"].tolist() == [1, 2, 3]
    images = [np.asarray(decode(text)) for text in out["image"]]
    assert [image.shape for image in images] == [(32, 32, 3)] * 3
    again = model.predict(frame.iloc[[1]], params={"num_inference_steps": 2})
    assert np.array_equal(np.asarray(decode(again["image"][0])), images[1])  # a seed reproduces its image
    unconditional = model.predict(pd.DataFrame({"seed": [7, 8]}), params={"num_inference_steps": 2})
    assert len(unconditional) == 2
    with pytest.raises(Exception, match="missing condition"):
        model.predict(frame[["temperature", "seed"]], params={"num_inference_steps": 2})


def test_latent_model_serving_json_with_params_and_mixed_rows(env):
    """The scoring server's path: JSON records (one conditioned, one blank = unconditional) plus params."""
    payload = json.dumps({"dataframe_records": [{"temperature": 12, "wind_0": 1, "wind_1": 0, "wind_2": 0,
                                                 "wind_mag": 1, "seed": 3}, {"seed": 4}],
                          "params": {"num_inference_steps": 2, "guidance_scale": 2.0}})
    out = mlflow.models.validate_serving_input(env["ldm"].model_uri, payload)
    assert out["seed"].tolist() == [3, 4] and decode(out["image"][1]).size == (32, 32)


def test_vae_pyfunc_reconstructs_encodes_and_decodes(env):
    model = mlflow.pyfunc.load_model(env["vae"].model_uri)
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(buffer, format="PNG")
    frame = pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()] * 2})
    recon = model.predict(frame)
    assert decode(recon["image"][0]).size == (32, 32)
    latents = model.predict(frame, params={"mode": "encode"})
    assert np.asarray(latents["latent"][0]).shape == (4, 4, 4)
    as_json = pd.DataFrame({"latent": [json.dumps(latents["latent"][0])]})
    decoded = model.predict(as_json, params={"mode": "decode"})
    assert decode(decoded["image"][0]).size == (32, 32)
    with pytest.raises(Exception, match="expected \\(4, h, w\\)"):
        model.predict(pd.DataFrame({"latent": [json.dumps([[0.0]])]}), params={"mode": "decode"})


def test_pixel_pyfunc_takes_seeds_or_a_count(env):
    model = mlflow.pyfunc.load_model("models:/ldmflow-legacy-ddpm@prod")
    by_seed = model.predict(pd.DataFrame({"seed": [3, 4]}), params={"num_inference_steps": 2})
    assert by_seed["seed"].tolist() == [3, 4] and decode(by_seed["image"][0]).size == (16, 16)
    by_count = model.predict(pd.DataFrame({"seed": [0]}), params={"num_inference_steps": 2, "num_images": 3})
    assert len(by_count) == 3


def test_serving_limits_give_clear_errors(env, monkeypatch):
    monkeypatch.setenv("LDMFLOW_SERVING_MAX_ROWS", "3")
    monkeypatch.setenv("LDMFLOW_SERVING_MAX_IMAGE_PIXELS", "1000")
    legacy = mlflow.pyfunc.load_model("models:/ldmflow-legacy-ddpm@prod")
    with pytest.raises(Exception, match=r"4 images in one request; this server allows 3"):
        legacy.predict(pd.DataFrame({"seed": [1, 2, 3, 4]}), params={"num_inference_steps": 2})
    with pytest.raises(Exception, match=r"4 images in one request"):
        legacy.predict(pd.DataFrame({"seed": [0]}), params={"num_inference_steps": 2, "num_images": 4})
    with pytest.raises(Exception, match=r"Param num_inference_steps must be between 1 and 1000 .* got 5000"):
        legacy.predict(pd.DataFrame({"seed": [1]}), params={"num_inference_steps": 5000})
    vae = mlflow.pyfunc.load_model(env["vae"].model_uri)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buffer, format="PNG")
    with pytest.raises(Exception, match=r"Row 0: the image is 64x64, over this server's limit of 1000 pixels"):
        vae.predict(pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()]}))


@pytest.mark.processes
def test_model_loads_from_its_own_code_without_ldmflow_installed(env, tmp_path):
    """A fresh interpreter outside the repo (no ldmflow on its path) loads and runs the latent model, from code
    (MLflow's models-from-code): nothing in the model is a pickle."""
    local = mlflow.artifacts.download_artifacts(env["ldm"].model_uri, dst_path=str(tmp_path / "model"))
    assert not list(Path(local).rglob("*.pkl"))
    assert "model_code_path" in (Path(local) / "MLmodel").read_text()
    script = (
        "import importlib.util, sys\n"
        "installed = importlib.util.find_spec('ldmflow') is not None\n"
        "import mlflow.pyfunc, pandas as pd\n"
        f"model = mlflow.pyfunc.load_model({local!r})\n"
        "out = model.predict(pd.DataFrame({'seed': [1]}), params={'num_inference_steps': 1})\n"
        "import ldmflow\n"
        "print(installed, len(out), ldmflow.__file__)\n"
    )
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    installed, count, ldmflow_file = result.stdout.split()[-3:]
    assert count == "1"
    assert Path(ldmflow_file).is_relative_to(Path(local) / "code")  # even where ldmflow is installed


def test_the_served_signatures_declare_every_param_predict_reads():
    """MLflow drops (with a warning) any param the signature leaves out: dtype was silently ignored."""
    from ldmflow.tracking.pyfunc_models import LATENT_DEFAULTS, LEGACY_DEFAULTS, latent_signature, legacy_signature

    assert {p.name for p in latent_signature("temperature:1").params} == set(LATENT_DEFAULTS)
    assert {p.name: p.default for p in legacy_signature().params} == LEGACY_DEFAULTS
