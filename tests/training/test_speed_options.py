"""Throughput options: strided foreach EMA, torch.compile, channels-last, sampling batches and dtypes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from cli_runner import invoke
from ldmflow.errors import LdmflowError
from ldmflow.sampling.denoise import denoise, make_scheduler
from ldmflow.settings import LegacyDdpmSettings
from ldmflow.training.ddpm_task import StridedEMA
from tiny import TINY_SIZES

pytestmark = pytest.mark.train  # most tests here train a tiny model; `make test-fast` skips them

LEGACY = ["legacy-ddpm", *TINY_SIZES, "--block_out_channels", "16,16", "--learning_rate", "1e-3", "--num_preview_images", "1",
          "--preview_inference_steps", "2", "--save_images_epochs", "100", "--eval_epochs", "0", "--no_mlflow"]


@pytest.fixture(scope="module")
def data(make_demo) -> Path:
    return make_demo(12)



@pytest.mark.portable
def test_a_strided_ema_keeps_the_horizon_and_counts_optimizer_steps():
    weights = [torch.nn.Parameter(torch.zeros(3))]
    every_step = EMAModel(weights, decay=0.99, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    strided = StridedEMA(weights, every=4, decay=0.99, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    assert strided.foreach  # one fused update for every tensor
    assert strided.get_decay(40) == pytest.approx(every_step.get_decay(40) ** 4)
    for step in range(1, 401):
        with torch.no_grad():
            weights[0].fill_(step / 400)  # a weight drifting steadily
        every_step.step(weights)
        if step % 4 == 0:
            strided.step(weights)
    assert strided.optimization_step == every_step.optimization_step == 400
    torch.testing.assert_close(strided.shadow_params[0], every_step.shadow_params[0], atol=0.02, rtol=0)


def test_the_ema_updates_every_n_steps_in_training(data, tmp_path):
    invoke(*LEGACY, "--manifest_path", str(data), "--output_dir", str(tmp_path), "--use_ema", "--ema_update_every",
           "2", "--max_train_steps", "4", "--checkpointing_steps", "1")
    counted = [json.loads((tmp_path / f"checkpoint-{step}" / "ema.json").read_text())["optimization_step"]
               for step in (1, 2, 3, 4)]
    assert counted == [0, 2, 2, 4]  # updated after steps 2 and 4 only, each counting the steps it covers


def test_channels_last_trains_and_saves_plain_diffusers_weights(data, tmp_path):
    from diffusers import UNet2DModel

    invoke(*LEGACY, "--manifest_path", str(data), "--output_dir", str(tmp_path), "--channels_last",
           "--max_train_steps", "2")
    assert UNet2DModel.from_pretrained(tmp_path, subfolder="unet").config.sample_size == 32


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.train
def test_a_compiled_run_checkpoints_previews_and_resumes_uncompiled(data, tmp_path, backend):
    """torch.compile (on the CPU here, as on a GPU) with EMA, previews, a checkpoint and a resume without it:
    the same weights as a run never compiled. The eager backend traces the same graphs in seconds; inductor's kernels
    take minutes to build on a CPU, so that case runs in `make test-all`."""
    common = [*LEGACY, "--manifest_path", str(data), "--use_ema", "--max_train_steps", "4", "--checkpointing_steps",
              "2", "--save_images_epochs", "1", "--learning_rate", "1e-5"]  # Adam moves any weight <= 1e-5 a step
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    invoke(*common, "--output_dir", str(plain))
    invoke(*common, "--output_dir", str(compiled), "--torch_compile", "--compile_backend", backend)
    assert any((compiled / "images").iterdir())
    for name in ("checkpoint-4", "unet"):
        import shutil

        shutil.rmtree(compiled / name)
    invoke(*common, "--output_dir", str(compiled), "--resume_from_checkpoint", "latest")  # not compiled now
    expected = load_file(plain / "unet" / "diffusion_pytorch_model.safetensors")
    actual = load_file(compiled / "unet" / "diffusion_pytorch_model.safetensors")
    assert expected.keys() == actual.keys()  # no _orig_mod. prefixes
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-4)  # fused kernels round otherwise


@pytest.mark.portable
def test_all_unconditional_rows_are_denoised_once_per_step_not_twice():
    calls = []

    def model(sample, timestep, condition):
        calls.append(len(sample))
        return torch.zeros_like(sample)

    scheduler = make_scheduler("ddim", {"num_train_timesteps": 10})
    null = torch.zeros(3, 4)
    denoise(model, scheduler, torch.randn(3, 1, 4, 4), 2, condition=null.clone(), null_condition=null,
            guidance_scale=3.0)
    assert calls == [3, 3]
    calls.clear()
    denoise(model, scheduler, torch.randn(3, 1, 4, 4), 2, condition=torch.ones(3, 4), null_condition=null,
            guidance_scale=3.0)
    assert calls == [6, 6]


@pytest.mark.portable
def test_sampling_batches_do_not_change_the_images_and_dtype_is_fp32_on_cpu(data, tmp_path):
    from ldmflow.sampling.legacy import LegacySampler

    invoke(*LEGACY, "--manifest_path", str(data), "--output_dir", str(tmp_path), "--max_train_steps", "1")
    sampler = LegacySampler.from_folder(tmp_path, dtype="bf16")
    assert sampler.unet.dtype == torch.float32  # half precision only where it is fast
    together = sampler.generate(num_inference_steps=2, seeds=[5, 6, 7])
    one_by_one = sampler.generate(num_inference_steps=2, seeds=[5, 6, 7], batch_size=1)
    torch.testing.assert_close(torch.from_numpy(one_by_one), torch.from_numpy(together), atol=1e-5, rtol=0)
    with pytest.raises(LdmflowError, match="dtype must be one of fp32, bf16, fp16"):
        sampler.set_dtype("fp8")


def test_the_attention_head_size_is_configurable_and_checked(data, tmp_path):
    from diffusers import UNet2DModel

    invoke(*LEGACY, "--manifest_path", str(data), "--output_dir", str(tmp_path), "--max_train_steps", "1",
           "--block_out_channels", "16,32,32", "--attention_head_dim", "16")
    assert UNet2DModel.from_pretrained(tmp_path, subfolder="unet").config.attention_head_dim == 16
    with pytest.raises(LdmflowError, match="--attention_head_dim 24 must divide"):
        LegacyDdpmSettings(manifest_path="m", output_dir="o", block_out_channels=(16, 32, 32), attention_head_dim=24)


@pytest.mark.portable
def test_bf16_samples_look_like_fp32_ones(monkeypatch):
    """What `--dtype bf16` computes on a GPU (UNet and VAE in bf16, the scheduler in fp32), forced on the CPU,
    where ldmflow itself keeps fp32 because bf16 is slow there."""
    import ldmflow.sampling.latent as latent
    from diffusers import DDPMScheduler

    from ldmflow.models.architectures import build_latent_unet, build_vae

    torch.manual_seed(0)
    sampler = latent.LatentSampler(build_latent_unet((32, 32), 1, 8, 4, None).eval(),
                                   build_vae((16, 16, 16, 16), 1, 64, 4).eval(), DDPMScheduler().config, None)
    fp32 = sampler.generate(num_images=2, num_inference_steps=4, seeds=[3, 4])
    monkeypatch.setattr(latent, "model_dtype", lambda name, device: {"bf16": torch.bfloat16}.get(name, torch.float32))
    from diffusers.models import modeling_utils

    warned = []
    monkeypatch.setattr(modeling_utils.logger, "warning", lambda message, *args, **kwargs: warned.append(message))
    sampler.set_dtype("bf16")
    assert sampler.unet.dtype == torch.bfloat16 and sampler.vae.dtype == torch.bfloat16
    assert not warned  # diffusers' "should be kept in float32" on every cast, for models that have no such module
    bf16 = sampler.generate(num_images=2, num_inference_steps=4, seeds=[3, 4])
    assert bf16.dtype == fp32.dtype and bf16.shape == fp32.shape and np.isfinite(bf16).all()
    difference = np.abs(bf16 - fp32)
    assert difference.mean() < 0.02 and difference.max() < 0.25, (difference.mean(), difference.max())
    other_seeds = sampler.generate(num_images=2, num_inference_steps=4, seeds=[5, 6])
    assert np.abs(other_seeds - bf16).mean() > 5 * difference.mean()  # the tolerance is well below a real change
