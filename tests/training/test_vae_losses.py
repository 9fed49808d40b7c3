"""The VAE's optional latent-diffusion losses: PatchGAN adversarial term, LPIPS, learned log-variance."""

from __future__ import annotations

import shutil
import urllib.error
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_runner import invoke
from ldmflow.data.manifest import load_manifest
from ldmflow.models.discriminator import PatchDiscriminator, adaptive_weight, discriminator_loss, generator_loss
from ldmflow.models.perceptual import WEIGHTS_ENV
from ldmflow.settings import VaeSettings
from ldmflow.training.loop import train
from ldmflow.training.prepare import build_accelerator, prepare
from ldmflow.training.vae_task import VaeTask
from fakes import RecordingTracker
from tiny import TINY_SIZES

pytestmark = [pytest.mark.train, pytest.mark.portable]  # most tests here train a tiny model; `make test-fast` skips them

TINY = [*TINY_SIZES, "--block_out_channels", "8,8,8,8", "--learning_rate", "1e-3", "--save_images_epochs", "100",
        "--scaling_factor_batches", "1", "--no_mlflow"]
ADVERSARIAL = ["--disc_weight", "0.5", "--disc_start", "3", "--disc_layers", "2"]


@pytest.fixture(scope="module")
def data(make_demo) -> Path:
    return make_demo(12, style="textured")



def train_vae(data: Path, output: Path, **overrides):
    values = dict(manifest_path=str(data), output_dir=str(output), resolution=32, train_batch_size=4,
                  layers_per_block=1, block_out_channels=(8, 8, 8, 8), lr_warmup_steps=0, learning_rate=1e-3,
                  save_images_epochs=100, scaling_factor_batches=1, logging_steps=1, no_mlflow=True,
                  max_train_steps=6, eval_epochs=0)
    settings = VaeSettings(**{**values, **overrides})
    task = VaeTask(settings, load_manifest(data, condition_spec="none"), None)
    recorder = RecordingTracker()
    train(settings, task, recorder, prepare(settings, task, build_accelerator(settings)))
    return task, {step: metrics for step, metrics in recorder.metrics if "mse" in metrics}


def test_hinge_and_vanilla_losses_and_the_adaptive_weight():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert discriminator_loss("hinge", real, fake) == pytest.approx(0.5 * (0.25 + 0.75))
    assert generator_loss("hinge", fake) == pytest.approx(0.75)
    softplus = torch.nn.functional.softplus
    assert discriminator_loss("vanilla", real, fake) == pytest.approx(
        0.5 * (softplus(-real).mean() + softplus(fake).mean()).item())
    layer = torch.nn.Parameter(torch.ones(3))
    # |d(4 w.x)/dw| / |d(w.x)/dw| = 4: the adversarial term is scaled up to the reconstruction's gradient
    x = torch.tensor([1.0, 2.0, 2.0])
    assert adaptive_weight((layer * x).sum() * 4, (layer * x).sum(), layer).item() == pytest.approx(4.0, rel=1e-3)
    assert PatchDiscriminator(num_layers=3)(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_the_discriminator_starts_at_disc_start_and_logs_its_metrics(data, tmp_path):
    task, logged = train_vae(data, tmp_path, disc_weight=0.5, disc_start=3, disc_layers=2)
    for step in (1, 2, 3):  # steps 0-2 (logged as 1-3): no adversarial term, no discriminator training
        assert logged[step]["g_adv"] == 0 and logged[step]["d_loss"] == 0 and logged[step]["adaptive_weight"] == 0
    for step in (4, 5, 6):
        assert logged[step]["d_loss"] > 0 and logged[step]["adaptive_weight"] > 0
        assert logged[step]["d_real"] != logged[step]["d_fake"]
    saved = {p.name for p in tmp_path.iterdir()}
    assert "diffusion_pytorch_model.safetensors" in saved  # the VAE alone: no discriminator in its folder
    vae_keys = load_file(tmp_path / "diffusion_pytorch_model.safetensors").keys()
    assert not any("main." in key for key in vae_keys)


def test_a_resume_across_disc_start_ends_exactly_where_an_uninterrupted_run_does(data, tmp_path):
    common = ["vae", "--manifest_path", str(data), *TINY, *ADVERSARIAL, "--max_train_steps", "6",
              "--checkpointing_steps", "2", "--eval_epochs", "0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    invoke(*common, "--output_dir", str(straight))
    invoke(*common, "--output_dir", str(resumed))
    checkpoint = resumed / "checkpoint-2"
    assert {"model_1.safetensors", "optimizer_1.bin", "scheduler_1.bin"} <= {p.name for p in checkpoint.iterdir()}
    for name in ("checkpoint-4", "checkpoint-6"):
        shutil.rmtree(resumed / name)
    invoke(*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest")
    for file in ("diffusion_pytorch_model.safetensors", "checkpoint-6/model_1.safetensors"):
        expected, actual = load_file(straight / file), load_file(resumed / file)
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)


def test_a_learned_log_variance_trains_and_stays_out_of_the_saved_vae(data, tmp_path):
    _, logged = train_vae(data, tmp_path, learn_logvar=True)
    assert logged[1]["logvar"] != logged[6]["logvar"]
    assert not any("logvar" in key for key in load_file(tmp_path / "diffusion_pytorch_model.safetensors"))


def test_the_perceptual_loss_trains_from_a_weights_folder(data, tmp_path, monkeypatch, lpips_weights):
    monkeypatch.setenv(WEIGHTS_ENV, str(lpips_weights))
    _, logged = train_vae(data, tmp_path / "out", perceptual_weight=1.0, eval_epochs=1)
    assert all(metrics["perceptual"] > 0 for metrics in logged.values())


def test_missing_perceptual_weights_fail_before_any_run_opens(data, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    result = invoke("vae", "--manifest_path", str(data), "--output_dir", str(tmp_path / "out"), *TINY[:-1],
                    "--perceptual_weight", "1", "--experiment_name", "lpips", ok=False)
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "--perceptual_weights DIR" in lines[0] and WEIGHTS_ENV in lines[0]
    experiment = MlflowClient(store).get_experiment_by_name("lpips")
    assert experiment is None or not MlflowClient(store).search_runs([experiment.experiment_id])
