"""End-to-end training on tiny models and demo data: layouts, stock-diffusers loading, resume, bad flags."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_runner import invoke
from fakes import RecordingTracker, with_nan_losses
from tiny import TINY_SIZES

pytestmark = pytest.mark.train  # most tests here train a tiny model; `make test-fast` skips them

TINY = [*TINY_SIZES,
        "--learning_rate", "1e-3", "--no_mlflow", "--logging_steps", "2"]
TINY_UNET = ["--block_out_channels", "32,32", "--num_preview_images", "2", "--preview_inference_steps", "3"]



@pytest.fixture(scope="module")
def data(make_demo) -> Path:
    return make_demo(24)


@pytest.fixture(scope="module")
def vae_dir(data, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("vae")
    invoke("vae", "--manifest_path", str(data), "--output_dir", str(output), *TINY, "--num_epochs", "2",
           "--block_out_channels", "16,16,16,16", "--save_images_epochs", "1", "--scaling_factor_batches", "3")
    return output


@pytest.fixture(scope="module")
def latent_dir(data, vae_dir, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("latent")
    invoke("latent-ddpm", "--manifest_path", str(data), "--vae_path", str(vae_dir), "--output_dir", str(output),
           *TINY, *TINY_UNET, "--num_epochs", "1", "--use_ema", "--save_images_epochs", "1")
    return output


def test_vae_writes_diffusers_weights_with_measured_scaling_factor(vae_dir, data):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir)
    assert vae.config.latent_channels == 4 and len(vae.config.block_out_channels) == 4
    factor = vae.config.scaling_factor
    assert factor != pytest.approx(0.18215) and factor != 1.0 and factor > 0
    assert sorted(p.name for p in (vae_dir / "images").iterdir())  # reconstruction previews
    # latents * scaling_factor have (about) unit variance on the training images
    from ldmflow.data.dataset import ManifestImageDataset
    from ldmflow.data.manifest import load_manifest

    dataset = ManifestImageDataset(load_manifest(data).records, 32)
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample() * factor  # (N, 4, 4, 4)
    assert latents.shape[1:] == (4, 4, 4)
    assert 0.7 < latents.std().item() < 1.3
    assert not any(p.name.startswith(".") for p in vae_dir.iterdir()), "no temporary folders left behind"


def test_latent_ddpm_layout_and_the_original_sampling_loop(latent_dir, vae_dir):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    assert (latent_dir / "unet" / "config.json").is_file()
    assert (latent_dir / "scheduler_config.json").is_file()
    assert any((latent_dir / "images").iterdir())
    source = json.loads((latent_dir / "vae_source.json").read_text())
    assert Path(source["vae_path"]) == vae_dir.resolve()
    assert source["condition_spec"] == "temperature:1,wind:3,wind_mag:1"

    # The original README's loop, changed only to UNet2DConditionModel + encoder_hidden_states=None, fp32 CPU.
    vae = AutoencoderKL.from_pretrained(vae_dir)
    unet = UNet2DConditionModel.from_pretrained(latent_dir / "unet")
    scheduler = DDPMScheduler.from_pretrained(latent_dir)
    assert scheduler.config.clip_sample is False  # latents are not bounded to [-1, 1]
    cond_dim = unet.config.projection_class_embeddings_input_dim or 0
    assert cond_dim == 5 + 3  # value dims + one presence flag per condition (docs/training.md)
    cond = torch.zeros((1, cond_dim)) if cond_dim > 0 else None
    scheduler.set_timesteps(5)
    latent_size = unet.config.sample_size
    latents = torch.randn((1, unet.config.in_channels, latent_size, latent_size))
    with torch.no_grad():
        for t in scheduler.timesteps:
            noise_pred = unet(latents, t, encoder_hidden_states=None, class_labels=cond).sample
            latents = scheduler.step(noise_pred, t, latents).prev_sample
        images = vae.decode(latents / vae.config.scaling_factor).sample
    raw = (images / 2 + 0.5)[0].permute(1, 2, 0).cpu().numpy()  # the README's images, before its clamp
    assert raw.shape == (32, 32, 3) and np.isfinite(raw).all()
    assert raw.std() > 0 and np.abs(raw).max() < 10  # an image, not a constant or a blow-up


def test_latent_sampler_follows_the_saved_condition_layout(latent_dir):
    from ldmflow.errors import LdmflowError
    from ldmflow.sampling.load import load_sampler

    sampler = load_sampler(latent_dir, device="cpu")
    images = sampler.generate([{"temperature": 10.0, "wind": [1, 0, 0]}] * 2, num_inference_steps=3)
    assert images.shape == (2, 32, 32, 3)
    with pytest.raises(LdmflowError, match="humidity.*temperature:1,wind:3,wind_mag:1"):
        sampler.generate([{"humidity": 1.0}])
    with pytest.raises(LdmflowError, match="missing condition.*wind"):
        sampler.generate([{"temperature": 1.0}])


def test_unconditional_latent_model_has_no_class_embedding(data, vae_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    invoke("latent-ddpm", "--manifest_path", str(data), "--vae_uri", str(vae_dir), "--output_dir", str(tmp_path),
           *TINY, *TINY_UNET, "--max_train_steps", "2", "--condition_spec", "none", "--cache_latents",
           "--random_flip")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert unet.config.projection_class_embeddings_input_dim is None and unet.class_embedding is None


def test_per_condition_dropout_is_logged_recorded_with_the_training_range_and_allows_partial_requests(
        data, vae_dir, tmp_path):
    from ldmflow.errors import LdmflowError
    from ldmflow.settings import LatentDdpmSettings

    dropout = "wind=0.5,wind_mag=0.5"
    assert LatentDdpmSettings(manifest_path="m", output_dir="o", vae_uri="v",
                              cond_dropout_per_condition=dropout).to_params()["cond_dropout_per_condition"] == dropout
    invoke("latent-ddpm", "--manifest_path", str(data), "--vae_uri", str(vae_dir), "--output_dir", str(tmp_path),
           *TINY, *TINY_UNET, "--max_train_steps", "2", "--cond_dropout_per_condition", dropout)
    record = json.loads((tmp_path / "conditioning.json").read_text())
    assert record["cond_dropout_per_condition"] == {"temperature": 0.0, "wind": 0.5, "wind_mag": 0.5}
    assert set(record["trained_range"]["temperature"]) == {"min", "max"}
    assert set(record["stats"]["temperature"]) == {"mean", "std"}
    from ldmflow.sampling.load import load_sampler

    sampler = load_sampler(tmp_path, device="cpu")
    assert sampler.generate([{"temperature": 10.0}], num_inference_steps=2).shape == (1, 32, 32, 3)
    with pytest.raises(LdmflowError, match=r"missing condition\(s\) \['temperature'\]; this model was trained to "
                                           r"do without \['wind', 'wind_mag'\] only"):
        sampler.generate([{"wind": [1.0, 0.0, 0.0]}], num_inference_steps=2)


def test_legacy_ddpm_saves_a_ddpm_pipeline(data, tmp_path):
    from diffusers import DDPMPipeline

    invoke("legacy-ddpm", "--manifest_path", str(data), "--output_dir", str(tmp_path), *TINY, *TINY_UNET,
           "--max_train_steps", "2", "--use_ema")
    pipeline = DDPMPipeline.from_pretrained(tmp_path)
    images = pipeline(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_v_prediction_min_snr_and_gradient_accumulation_train(data, tmp_path, caplog):
    caplog.set_level("INFO")
    invoke("legacy-ddpm", "--manifest_path", str(data), "--output_dir", str(tmp_path), *TINY, *TINY_UNET,
           "--max_train_steps", "3", "--prediction_type", "v_prediction", "--snr_gamma", "5",
           "--gradient_accumulation_steps", "2", "--checkpointing_steps", "3", "--save_images_epochs", "100")
    assert "Training 3 steps (1 epochs of 3 steps)" in caplog.text  # 22 images / batch 4 = 5 batches -> 3 steps
    assert (tmp_path / "checkpoint-3").is_dir()
    from diffusers import DDPMScheduler

    assert DDPMScheduler.from_pretrained(tmp_path, subfolder="scheduler").config.prediction_type == "v_prediction"


def test_train_legacy_ddpm_console_script_has_the_original_flags():
    import subprocess
    import sys

    script = Path(sys.executable).parent / "train-legacy-ddpm"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    for flag in ("--manifest_path", "--resolution", "--train_batch_size", "--mixed_precision", "--use_ema"):
        assert flag in result.stdout


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.portable
def test_resume_after_a_kill_continues_exactly(data, vae_dir, tmp_path):
    common = ["--manifest_path", str(data), "--vae_uri", str(vae_dir), *TINY, *TINY_UNET, "--max_train_steps",
              "6", "--checkpointing_steps", "2", "--save_images_epochs", "100", "--random_flip", "--use_ema",
              "--condition_spec", "temperature:1,wind:3:flipx=0,wind_mag:1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    invoke("latent-ddpm", *common, "--output_dir", str(straight))
    invoke("latent-ddpm", *common, "--output_dir", str(resumed))
    # Simulate a kill right after checkpoint-2: later checkpoints and outputs gone, a half-written one left.
    for name in ("checkpoint-4", "checkpoint-6", "unet"):
        shutil.rmtree(resumed / name)
    shutil.copytree(resumed / "checkpoint-2", resumed / ".checkpoint-4.tmp")
    (resumed / ".checkpoint-4.tmp" / "training_state.json").unlink()
    result = invoke("latent-ddpm", *common, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest")
    assert (resumed / "checkpoint-6").is_dir()
    expected, actual = _weights(straight), _weights(resumed)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)
    assert "Error" not in result.output


class _Payload:
    """Unpickling this runs code: it creates the file named in `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def checkpointed_run(data, tmp_path_factory) -> Path:
    """A legacy DDPM's output folder with checkpoint-2 (with EMA); copy it before changing anything."""
    output = tmp_path_factory.mktemp("checkpointed") / "out"
    invoke("legacy-ddpm", "--manifest_path", str(data), "--output_dir", str(output), *TINY, *TINY_UNET,
           "--checkpointing_steps", "2", "--save_images_epochs", "100", "--use_ema", "--max_train_steps", "2")
    return output


@pytest.mark.parametrize("target", ["optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"])
def test_a_checkpoint_holding_a_crafted_pickle_is_refused_without_running_it(data, checkpointed_run, tmp_path,
                                                                               target):
    import shutil

    output, marker = tmp_path / "out", tmp_path / "code-ran"
    shutil.copytree(checkpointed_run, output)
    common = ["--manifest_path", str(data), "--output_dir", str(output), *TINY, *TINY_UNET, "--checkpointing_steps",
              "2", "--save_images_epochs", "100", "--use_ema"]
    checkpoint = output / "checkpoint-2"
    assert {"training_state.json", "ema.json", "ema.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    assert not list(checkpoint.glob("custom_checkpoint_*"))  # the loop's own state is never pickled
    torch.save({"state": _Payload(marker)}, checkpoint / target)
    (checkpoint / "checkpoint_files.json").unlink()  # a crafter drops the seal: read as an older ldmflow's checkpoint
    result = invoke("legacy-ddpm", *common, "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
                    ok=False)
    assert not marker.exists()
    assert result.exit_code != 0
    assert "Cannot resume from" in result.output and "pickle" in result.output and "Traceback" not in result.output


def test_a_checkpoint_from_before_json_state_is_refused_with_a_reason(tmp_path):
    from ldmflow.errors import LdmflowError
    from ldmflow.training.checkpoints import find_resume_checkpoint

    old = tmp_path / "checkpoint-2"
    old.mkdir()
    (old / "custom_checkpoint_0.pkl").write_bytes(b"")
    with pytest.raises(LdmflowError, match="no longer unpickles"):
        find_resume_checkpoint(tmp_path, str(old))


def test_bad_flags_give_clear_errors(data, tmp_path):
    result = invoke("vae", "--manifest_path", str(data), "--output_dir", str(tmp_path), "--resolution", "30",
                    ok=False)
    assert result.exit_code != 0 and "--resolution must be a positive multiple of 8, got 30" in result.output
    result = invoke("vae", "--manifest_path", str(data), "--output_dir", str(tmp_path), "--lr_scheduler", "warp",
                    ok=False)
    assert result.exit_code != 0 and "'warp' is not one of" in result.output
    result = invoke("vae", "--manifest_path", str(data), "--output_dir", str(tmp_path), "--block_out_channels",
                    "16,16", ok=False)
    assert result.exit_code != 0 and "--downsample_factor 8 needs 4 --block_out_channels" in result.output
    result = invoke("vae", "--manifest_path", str(data), "--output_dir", str(tmp_path), "--register_alias", "v2",
                    ok=False)
    assert result.exit_code == 1 and "reserved by MLflow" in result.output
    result = invoke("vae", "--manifest_path", str(data), "--output_dir", str(tmp_path), "--resume_from_checkpoint",
                    str(tmp_path / "checkpoint-9"), "--no_mlflow", ok=False)
    assert result.exit_code == 1 and "not a complete ldmflow checkpoint folder" in result.output
    result = invoke("legacy-ddpm", "--manifest_path", str(data), "--output_dir", str(tmp_path), "--ddpm_num_steps",
                    "10", ok=False)
    assert result.exit_code == 1 and "--preview_inference_steps (25) cannot exceed --ddpm_num_steps (10)" in result.output


def test_a_folder_that_is_not_a_vae_is_refused(data, latent_dir, tmp_path):
    result = invoke("latent-ddpm", "--manifest_path", str(data), "--vae_uri", str(latent_dir / "unet"),
                    "--output_dir", str(tmp_path / "out"), *TINY, *TINY_UNET, ok=False)
    assert result.exit_code == 1
    assert "is not a vae model" in result.output or "not a diffusers AutoencoderKL folder" in result.output


def test_condition_spec_mismatch_names_the_entry(data, vae_dir, tmp_path):
    result = invoke("latent-ddpm", "--manifest_path", str(data), "--vae_uri", str(vae_dir), "--output_dir",
                    str(tmp_path), *TINY, *TINY_UNET, "--condition_spec", "temperature:1,wind:2", ok=False)
    assert result.exit_code == 1 and "wind" in result.output and "entry" in result.output


def test_xformers_request_falls_back_to_sdpa_and_fp16_to_fp32_on_cpu(data, tmp_path, caplog):
    caplog.set_level("WARNING")
    invoke("legacy-ddpm", "--manifest_path", str(data), "--output_dir", str(tmp_path), *TINY,
           "--block_out_channels", "32,32,32", "--max_train_steps", "1", "--save_images_epochs", "100",
           "--num_preview_images", "1", "--preview_inference_steps", "1", "--eval_epochs", "0",
           "--enable_xformers_memory_efficient_attention", "--mixed_precision", "fp16")
    assert "xformers" in caplog.text and "PyTorch SDPA" in caplog.text
    assert "fp16 needs CUDA" in caplog.text
    assert (tmp_path / "unet").is_dir()


def test_nonfinite_losses_skip_steps_then_stop_with_the_last_good_checkpoint(data, tmp_path):
    from ldmflow.data.manifest import load_manifest
    from ldmflow.errors import LdmflowError
    from ldmflow.settings import LegacyDdpmSettings
    from ldmflow.training.legacy_task import LegacyDdpmTask
    from ldmflow.training.loop import train
    from ldmflow.training.prepare import build_accelerator, prepare

    Diverging = with_nan_losses(LegacyDdpmTask, lambda call: call > 2)  # finite for two steps, then NaN forever

    settings = LegacyDdpmSettings(manifest_path=str(data), output_dir=str(tmp_path), resolution=32,
                                 train_batch_size=4, block_out_channels=(32, 32), layers_per_block=1,
                                 lr_warmup_steps=0, checkpointing_steps=2, logging_steps=1, max_nonfinite_steps=3,
                                 max_train_steps=20, no_mlflow=True)
    task = Diverging(settings, load_manifest(data, condition_spec="none"))
    with pytest.raises(LdmflowError, match=r"3 non-finite losses in a row by step 5; the last good checkpoint is "
                                           r".*checkpoint-4"):
        recorder = RecordingTracker()
        train(settings, task, recorder, prepare(settings, task, build_accelerator(settings)))
    assert (tmp_path / "checkpoint-2").is_dir()
    logged = dict(recorder.metrics)
    assert logged[3]["nonfinite_steps"] == 1 and logged[2]["nonfinite_steps"] == 0
    # the skipped steps did not touch the weights saved at step 4 (taken after two skipped steps)
    from safetensors.torch import load_file

    at_2 = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    at_4 = load_file(tmp_path / "checkpoint-4" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in at_4.values())
    assert all(torch.equal(at_2[k], at_4[k]) for k in at_2)


def test_a_tracked_resume_is_tagged_with_the_run_and_step_it_continues(data, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    output = tmp_path / "pixel"
    common = ["legacy-ddpm", "--manifest_path", str(data), "--output_dir", str(output), *TINY[:-3], *TINY_UNET,
              "--max_train_steps", "4", "--checkpointing_steps", "2", "--save_images_epochs", "100",
              "--experiment_name", "resume-test", "--logging_steps", "1"]
    invoke(*common)
    shutil.rmtree(output / "checkpoint-4")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("resume-test")
    [killed] = client.search_runs([experiment.experiment_id])
    client.update_run(killed.info.run_id, status="RUNNING")  # what kill -9 leaves behind
    # other settings or other data: refused before any run opens
    result = invoke(*common, "--resume_from_checkpoint", "latest", "--learning_rate", "0.002", ok=False)
    assert result.exit_code == 1 and "--learning_rate '0.001' -> '0.002'" in result.output
    assert "--allow_changed_settings" in result.output
    invoke(*common, "--resume_from_checkpoint", "latest")
    first, second = sorted(client.search_runs([experiment.experiment_id]), key=lambda r: r.info.start_time)
    assert first.info.status == "KILLED" and first.data.tags["ldmflow.resumed_by_run_id"] == second.info.run_id
    assert second.info.status == "FINISHED"
    assert second.data.tags["ldmflow.resumed_from_step"] == "2"
    assert second.data.tags["ldmflow.resumed_from_run_id"] == first.info.run_id
    assert second.data.tags["ldmflow.resumed_from_checkpoint"].endswith("checkpoint-2")
    assert second.data.tags["ldmflow.last_checkpoint_step"] == "4"
    history = client.get_metric_history(second.info.run_id, "loss")
    assert [m.step for m in history] == [3, 4]  # continues at the saved step
    assert mlflow.active_run() is None
    # a checkpoint of another model size: one clear message, and no failed run left behind
    other = [a if a != "32,32" else "32,64" for a in common]
    result = invoke(*other, "--resume_from_checkpoint", "latest", ok=False)
    assert result.exit_code == 1 and "does not match this model and settings" in result.output
    assert "size mismatch" in result.output
    assert len(client.search_runs([experiment.experiment_id])) == 2


def test_a_latent_model_refuses_a_vae_that_was_trained_over(latent_dir, vae_dir, tmp_path):
    from diffusers import AutoencoderKL

    model, vae = tmp_path / "latent", tmp_path / "vae"
    shutil.copytree(latent_dir, model)
    shutil.copytree(vae_dir, vae)
    record = json.loads((model / "vae_source.json").read_text())
    assert len(record["vae_digest"]) == 64 and record["vae_scaling_factor"] > 0
    record["vae_path"], record["vae_uri"] = str(vae), str(vae)
    (model / "vae_source.json").write_text(json.dumps(record))
    sample = ["sample", "--model_uri", str(model), "--output_dir", str(tmp_path / "samples"), "--num_images", "1",
              "--num_inference_steps", "2", "--no_mlflow", "--condition", "temperature=10", "--condition",
              "wind=1,0,0", "--condition", "wind_mag=1"]
    invoke(*sample)  # the recorded VAE: fine
    retrained = AutoencoderKL.from_pretrained(vae)
    with torch.no_grad():
        next(retrained.parameters()).add_(0.01)
    retrained.save_pretrained(vae)  # e.g. a later `ldmflow vae --output_dir` on the same folder
    result = invoke(*sample, ok=False)
    assert result.exit_code == 1 and "is not the one this latent model was trained with" in result.output
    from ldmflow.sampling.load import load_sampler

    with pytest.raises(Exception, match="is not the one this latent model was trained with"):
        load_sampler(model, device="cpu")


def test_conditions_and_guidance_change_the_samples(latent_dir):
    from ldmflow.sampling.load import load_sampler

    sampler = load_sampler(latent_dir, device="cpu")
    cold = {"temperature": [-15.0], "wind": [8.0, 0.0, 0.0], "wind_mag": [8.0]}
    warm = {"temperature": [35.0], "wind": [0.0, 2.0, 0.0], "wind_mag": [2.0]}

    def sample(condition, guidance):
        return sampler.generate([condition], guidance_scale=guidance, num_inference_steps=3, seeds=[7])

    reference = sample(cold, 3.0)
    np.testing.assert_array_equal(reference, sample(cold, 3.0))  # same seed, same request: same image
    assert np.abs(reference - sample(warm, 3.0)).mean() > 1e-4  # other conditions: another image
    assert np.abs(reference - sample(cold, 1.0)).mean() > 1e-4  # guidance changes it too


def test_sampling_writes_a_new_folder_and_never_deletes_files(latent_dir, tmp_path):
    output = tmp_path / "mine"
    output.mkdir()
    (output / "sample_0000.png").write_bytes(b"the user's own file")
    args = ["sample", "--model_uri", str(latent_dir), "--output_dir", str(output), "--num_images", "2",
            "--num_inference_steps", "2", "--no_mlflow"]
    first = Path(invoke(*args).output.strip().splitlines()[-1])
    second = Path(invoke(*args).output.strip().splitlines()[-1])
    assert (output / "sample_0000.png").read_bytes() == b"the user's own file"
    assert first.parent.parent == output and first != second and first.is_file() and second.is_file()
    assert sorted(p.name for p in first.parent.iterdir()) == ["grid.png", "sample_0000.png", "sample_0001.png"]


def test_any_latent_shape_trains_samples_and_is_recorded(data, tmp_path):
    """An f4 VAE with 8 latent channels: the latent DDPM, its sampler and vae_source.json follow its shape."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ldmflow.sampling.load import load_sampler

    vae_out, ldm_out = tmp_path / "vae", tmp_path / "ldm"
    invoke("vae", "--manifest_path", str(data), "--output_dir", str(vae_out), *TINY, "--max_train_steps", "2",
           "--block_out_channels", "16,16,16", "--downsample_factor", "4", "--latent_channels", "8",
           "--save_images_epochs", "100", "--scaling_factor_batches", "1")
    vae = AutoencoderKL.from_pretrained(vae_out)
    assert vae.config.latent_channels == 8 and len(vae.config.block_out_channels) == 3
    invoke("latent-ddpm", "--manifest_path", str(data), "--vae_uri", str(vae_out), "--output_dir", str(ldm_out),
           *TINY, *TINY_UNET, "--max_train_steps", "2", "--cache_latents", "--save_images_epochs", "100")
    unet = UNet2DConditionModel.from_pretrained(ldm_out / "unet")
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.sample_size) == (8, 8, 8)
    source = json.loads((ldm_out / "vae_source.json").read_text())
    assert (source["vae_latent_channels"], source["vae_downsample_factor"]) == (8, 4)
    images = load_sampler(ldm_out, device="cpu").generate(
        [{"temperature": 10.0, "wind": [1, 0, 0]}], num_inference_steps=2)
    assert images.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("flags, message", [
    (["--downsample_factor", "3"], "--downsample_factor must be 4, 8 or 16, got 3"),
    (["--downsample_factor", "16"], "--downsample_factor 16 needs 5 --block_out_channels"),
    (["--downsample_factor", "16", "--block_out_channels", "8,8,8,8,8", "--resolution", "40"],
     "--resolution 40 is not a multiple of --downsample_factor 16"),
    (["--latent_channels", "0"], "--latent_channels"),
])
def test_bad_latent_shape_flags_are_one_line(data, tmp_path, flags, message):
    result = invoke("vae", "--manifest_path", str(data), "--output_dir", str(tmp_path), "--no_mlflow", *flags,
                    ok=False)
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_a_latent_resolution_the_unet_cannot_downsample_is_refused(data, vae_dir, tmp_path):
    result = invoke("latent-ddpm", "--manifest_path", str(data), "--vae_uri", str(vae_dir), "--output_dir",
                    str(tmp_path), *TINY, "--resolution", "48", "--block_out_channels", "32,32,32", ok=False)
    assert result.exit_code != 0
    assert "--resolution 48 must be a multiple of 32: the VAE downsamples x8 and the UNet's 3" in result.output
