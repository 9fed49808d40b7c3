"""Two CPU processes under `accelerate launch` (gloo): one shared shuffle, training, only rank 0 writes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch import launch_two_processes
from ldmflow.data.demo import make_demo_dataset


def _tiny_vae(manifest: Path, output: Path) -> Path:
    """A one-step x8 VAE (one process) for the latent DDPM tests to encode with."""
    from cli_runner import invoke

    result = invoke("vae", "--manifest_path", str(manifest), "--output_dir", str(output),
                    "--resolution", "32", "--max_train_steps", "1", "--block_out_channels",
                    "8,8,8,8", "--layers_per_block", "1", "--scaling_factor_batches", "1",
                    "--no_mlflow", ok=False)
    assert result.exit_code == 0, result.output
    return output


@pytest.mark.slow
def test_two_processes_see_every_image_once_per_epoch(tmp_path):
    launch_two_processes(tmp_path, str(Path(__file__).with_name("distributed_coverage.py")), str(tmp_path))
    ranks = [json.loads((tmp_path / f"seen_{rank}.json").read_text()) for rank in (0, 1)]
    for epoch in range(2):
        together = sorted(ranks[0]["seen"][epoch] + ranks[1]["seen"][epoch])
        assert together == list(range(20)), f"epoch {epoch}: {together}"
    assert ranks[0]["steps_per_epoch"] == ranks[1]["steps_per_epoch"] == 5  # 20 images / 2 ranks / batch 2
    assert ranks[0]["seen"][0] != ranks[0]["seen"][1]  # reshuffled each epoch


@pytest.mark.train  # the one two-process run in `make test`; the others are slow
def test_two_processes_train_and_only_the_main_one_writes(tmp_path):
    manifest = make_demo_dataset(tmp_path / "data", num_images=20, resolution=32, val_fraction=0.2)
    output = tmp_path / "vae"
    result = launch_two_processes(tmp_path, "-m", "ldmflow", "vae", "--manifest_path", str(manifest), "--output_dir", str(output),
                     "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "4",
                     "--block_out_channels", "16,16,16,16", "--layers_per_block", "1", "--lr_warmup_steps", "0",
                     "--checkpointing_steps", "2", "--scaling_factor_batches", "2", "--no_mlflow")
    assert "on 2 process(es)" in result.stderr
    assert (output / "config.json").is_file() and (output / "checkpoint-4").is_dir()
    # each process saved its own RNG state into the same checkpoint
    assert {p.name for p in (output / "checkpoint-4").glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
    from ldmflow.training.checkpoints import damage

    assert damage(output / "checkpoint-4") is None  # sealed once every process had written its files
    assert "random_states_1.pkl" in (output / "checkpoint-4" / "checkpoint_files.json").read_text()
    assert result.stderr.count("Saved the VAE to") == 1


@pytest.mark.slow
def test_two_processes_train_a_vae_with_its_discriminator(tmp_path):
    """The VAE and the PatchGAN discriminator both DDP-wrapped by accelerate, across --disc_start."""
    manifest = make_demo_dataset(tmp_path / "data", num_images=16, resolution=32, style="textured")
    output = tmp_path / "vae"
    result = launch_two_processes(tmp_path, "-m", "ldmflow", "vae", "--manifest_path", str(manifest), "--output_dir", str(output),
                     "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "4",
                     "--block_out_channels", "8,8,8,8", "--layers_per_block", "1", "--lr_warmup_steps", "0",
                     "--checkpointing_steps", "4", "--scaling_factor_batches", "1", "--disc_weight", "0.5",
                     "--disc_start", "2", "--disc_layers", "2", "--eval_epochs", "0", "--no_mlflow")
    assert "on 2 process(es)" in result.stderr and result.stderr.count("Saved the VAE to") == 1
    checkpoint = output / "checkpoint-4"
    assert {"model_1.safetensors", "optimizer_1.bin"} <= {p.name for p in checkpoint.iterdir()}


@pytest.mark.slow
def test_two_processes_train_a_latent_ddpm_from_a_shared_latent_cache(tmp_path):
    manifest = make_demo_dataset(tmp_path / "data", num_images=20, resolution=32, val_fraction=0.2)
    vae = _tiny_vae(manifest, tmp_path / "vae")
    output = tmp_path / "latent"
    result = launch_two_processes(tmp_path, "-m", "ldmflow", "latent-ddpm", "--manifest_path", str(manifest), "--vae_uri",
                     str(vae), "--output_dir", str(output), "--resolution", "32", "--train_batch_size", "2",
                     "--max_train_steps", "4", "--block_out_channels", "16,16", "--layers_per_block", "1",
                     "--lr_warmup_steps", "0", "--cache_latents", "--random_flip", "--use_ema",
                     "--condition_spec", "temperature:1,wind:3:flipx=0,wind_mag:1", "--num_preview_images", "1",
                     "--preview_inference_steps", "1", "--no_mlflow")
    # both processes encode their shard of one on-disk cache, flips included; the main process publishes it
    assert result.stderr.count("Encoding 16 images and their flips into the latent cache") == 1
    folder = re.search(r"into the latent cache (\S+) on 2 process", result.stderr).group(1)
    assert (Path(folder) / "index.json").is_file()  # published, complete
    assert "on 2 process(es)" in result.stderr
    assert (output / "unet" / "config.json").is_file() and (output / "vae_source.json").is_file()
    assert result.stderr.count("Saved the latent DDPM to") == 1  # only the main process writes


@pytest.mark.slow
def test_two_processes_train_the_pixel_ddpm(tmp_path):
    manifest = make_demo_dataset(tmp_path / "data", num_images=20, resolution=32, val_fraction=0.2)
    output = tmp_path / "legacy"
    result = launch_two_processes(tmp_path, "-m", "ldmflow", "legacy-ddpm", "--manifest_path", str(manifest), "--output_dir",
                     str(output), "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "4",
                     "--block_out_channels", "16,16", "--layers_per_block", "1", "--lr_warmup_steps", "0",
                     "--use_ema", "--checkpointing_steps", "2", "--num_preview_images", "1",
                     "--preview_inference_steps", "1", "--no_mlflow")
    assert "on 2 process(es)" in result.stderr and "16 images" in result.stderr
    assert (output / "unet" / "config.json").is_file() and (output / "checkpoint-4" / "ema.json").is_file()
    assert result.stderr.count("Saved the DDPMPipeline to") == 1  # only the main process writes


@pytest.mark.slow
def test_two_processes_train_a_latent_ddpm_encoding_each_batch(tmp_path):
    manifest = make_demo_dataset(tmp_path / "data", num_images=12, resolution=32)
    vae = _tiny_vae(manifest, tmp_path / "vae")
    output = tmp_path / "latent"
    result = launch_two_processes(tmp_path, "-m", "ldmflow", "latent-ddpm", "--manifest_path", str(manifest), "--vae_uri",
                     str(vae), "--output_dir", str(output), "--resolution", "32", "--train_batch_size", "2",
                     "--max_train_steps", "3", "--block_out_channels", "16,16", "--layers_per_block", "1",
                     "--lr_warmup_steps", "0", "--num_preview_images", "1", "--preview_inference_steps", "1",
                     "--no_mlflow")
    assert "latent cache" not in result.stderr and "on 2 process(es)" in result.stderr
    assert result.stderr.count("Saved the latent DDPM to") == 1


@pytest.mark.slow
def test_a_killed_rank_ends_the_other_within_a_bounded_time(tmp_path):
    """kill -9 of one rank mid-run: accelerate's launcher ends the other rank (no hang in a collective)."""
    import psutil

    manifest = make_demo_dataset(tmp_path / "data", num_images=20, resolution=32)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "ldmflow", "legacy-ddpm", "--manifest_path", str(manifest),
               "--output_dir", str(tmp_path / "out"), "--resolution", "32", "--train_batch_size", "2",
               "--max_train_steps", "100000", "--block_out_channels", "16,16", "--layers_per_block", "1",
               "--checkpointing_steps", "100000", "--save_images_epochs", "100000", "--eval_epochs", "0",
               "--no_mlflow"]
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        seen, deadline = "", time.monotonic() + 120
        while "Training 100000 steps" not in seen and time.monotonic() < deadline:
            seen += launcher.stderr.readline()
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                   if "ldmflow" in " ".join(p.cmdline()) and "accelerate" not in p.cmdline()[1]]
        assert len(workers) == 2, [p.cmdline() for p in workers]
        workers[1].kill()
        killed_at = time.monotonic()
        _, rest = launcher.communicate(timeout=180)
        assert launcher.returncode != 0
        assert time.monotonic() - killed_at < 120
        assert not any(worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE for worker in workers)
        assert "SIGKILL" in rest or "Signal 9" in rest or "exitcode" in rest
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)


@pytest.mark.portable
@pytest.mark.slow
def test_two_processes_with_accumulation_make_the_update_of_one_process_with_twice_the_batch(tmp_path):
    """The condition probe (no randomness in its loss; `wind` is present in every demo entry, so every
    batch's mean is over the same count): 2 processes x batch 2 x 2 accumulation steps against 1 process x
    batch 4 x 2 accumulation steps see the same images per update, so the weights agree to rounding. GroupNorm:
    BatchNorm's statistics are each process's own batch."""
    from safetensors.torch import load_file

    from cli_runner import invoke

    manifest = make_demo_dataset(tmp_path / "data", num_images=20, resolution=32, val_fraction=0.2)
    common = ["probe", "--manifest_path", str(manifest), "--condition_spec", "wind:3", "--resolution", "32",
              "--block_out_channels", "8,8", "--layers_per_block", "1", "--gradient_accumulation_steps", "2",
              "--max_train_steps", "2", "--eval_epochs", "0", "--no_mlflow", "--norm", "group"]
    one, two = tmp_path / "one", tmp_path / "two"
    result = invoke(*common, "--output_dir", str(one), "--train_batch_size", "4", ok=False)
    assert result.exit_code == 0, result.output
    launch_two_processes(tmp_path, "-m", "ldmflow", *common, "--output_dir", str(two), "--train_batch_size", "2")
    expected = load_file(next(one.glob("*.safetensors")))
    actual = load_file(next(two.glob("*.safetensors")))
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-5)
