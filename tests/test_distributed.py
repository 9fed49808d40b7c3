"""Two CPU processes under `accelerate launch` (gloo): the run trains, only rank 0 writes, weights agree."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ldmflow.data.demo import make_demo_dataset


@pytest.mark.slow
def test_two_processes_train_and_only_the_main_one_writes(tmp_path):
    manifest = make_demo_dataset(tmp_path / "data", num_images=20, resolution=32, val_fraction=0.2)
    output = tmp_path / "vae"
    with socket.socket() as probe:  # a free rendezvous port: never collide with another run's 29500
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ldmflow", "vae",
               "--manifest_path", str(manifest), "--output_dir", str(output), "--resolution", "32",
               "--train_batch_size", "2", "--max_train_steps", "4", "--block_out_channels", "16,16,16,16",
               "--layers_per_block", "1", "--lr_warmup_steps", "0", "--checkpointing_steps", "2",
               "--scaling_factor_batches", "2", "--no_mlflow"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # never leave rank processes behind
        stdout, stderr = process.communicate()
        pytest.fail("two-process training did not finish in 180 s:\n" + stderr[-3000:])
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stderr
    assert (output / "config.json").is_file() and (output / "checkpoint-4").is_dir()
    # each process saved its own RNG state into the same checkpoint
    assert {p.name for p in (output / "checkpoint-4").glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
    assert result.stderr.count("Saved the VAE to") == 1
