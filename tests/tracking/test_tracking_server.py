"""The REST path against a real `mlflow server` on 127.0.0.1: log, register, resolve; then a mid-run outage."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from diffusers import AutoencoderKL
from mlflow import MlflowClient
from PIL import Image

from ldmflow.settings import VaeSettings
from ldmflow.models.kinds import VAE
from ldmflow.models.saved_model import find_diffusers_folder
from ldmflow.tracking.model_uri import resolve_model_source
from ldmflow.tracking.registry import log_and_register
from ldmflow.tracking.pending import PENDING_FILE, replay_pending
from ldmflow.tracking.run_tracker import open_run

pytestmark = pytest.mark.train  # most tests here train a tiny model; `make test-fast` skips them

DIGEST = "feedface" * 8


class Server:
    """An `mlflow server` subprocess (SQLite backend, proxied artifacts) in its own process group."""

    def __init__(self, root: Path):
        self.root = root
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root}/server.db",
                   "--artifacts-destination", str(self.root / "server-artifacts"), "--serve-artifacts"]
        environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        environment.pop("MLFLOW_TRACKING_URI", None)
        self.process = subprocess.Popen(command, cwd=self.root, env=environment, start_new_session=True,
                                        stdout=open(self.root / "server.log", "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1):
                    return
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def rest_env(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a stopped server fails at once, not in ~4 min
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    yield tmp_path
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def settings(root: Path) -> VaeSettings:
    return VaeSettings(manifest_path=str(root / "manifest.json"), output_dir=str(root / "vae_out"),
                       run_name="rest-vae")


def test_log_register_and_resolve_through_the_server(server, rest_env):
    root = rest_env
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
                  norm_num_groups=8, sample_size=32, layers_per_block=1).save_pretrained(root / "vae_out")
    (root / "manifest.json").write_text("[]")
    with open_run(settings(root), "vae", enabled=True) as tracker:
        tracker.log_metrics({"loss": 0.5, "val/psnr": 20.0}, 3)
        tracker.log_image(Image.new("RGB", (16, 16), "green"), "reconstructions", 3)
        assert tracker.log_dataset(root / "manifest.json", DIGEST, "train", 4, "manifest-train")
        registered = log_and_register("vae", root / "vae_out", tracker, alias="champion", dataset_digest=DIGEST)
    client = MlflowClient()
    run = client.get_run(registered.run_id)
    assert run.info.status == "FINISHED" and run.data.params["kl_weight"] == "0.0001"
    assert run.data.metrics["val/psnr"] == 20.0 and run.data.tags["stage"] == "vae"
    assert run.inputs.dataset_inputs[0].dataset.digest == DIGEST[:36]
    assert any(a.path.endswith(".png") for a in client.list_artifacts(registered.run_id, "images"))
    source = resolve_model_source("models:/ldmflow-vae@champion", dst_dir=root / "download")
    assert (source.model_version, source.run_id, source.model_id) == ("1", registered.run_id, registered.model_id)
    assert isinstance(AutoencoderKL.from_pretrained(find_diffusers_folder(source.local_dir, VAE)), AutoencoderKL)
    by_run = resolve_model_source(f"runs:/{registered.run_id}/vae", dst_dir=root / "download-run")
    assert by_run.model_id == registered.model_id
    stored = list((server.root / "server-artifacts").rglob("diffusion_pytorch_model.safetensors"))
    assert stored, "the model's weights went through the server's artifact proxy"


def test_server_outage_mid_run_keeps_training_and_replays(server, rest_env, caplog, monkeypatch):
    caplog.set_level(logging.WARNING)
    threads, log_batch = [], MlflowClient.log_batch

    def recorded(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return log_batch(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", recorded)
    try:
        with open_run(settings(rest_env), "vae", enabled=True) as tracker:
            tracker.log_metrics({"loss": 1.0}, 0)
            assert tracker.flush(10)
            server.stop()
            for step in range(1, 21):
                tracker.log_metrics({"loss": 1.0 / step}, step)
            # the server was called, never from the training thread: training does not wait on the outage
            assert threads and threading.main_thread().name not in threads
    finally:
        server.start()
    assert caplog.text.count("MLflow is unreachable") == 1
    pending = rest_env / "vae_out" / PENDING_FILE
    lines = [json.loads(line) for line in pending.read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["metric"] * 20 + ["status"]
    assert MlflowClient().get_run(tracker.run_id).info.status == "RUNNING"  # the server missed the end
    assert replay_pending(pending) == 20
    history = MlflowClient().get_metric_history(tracker.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(21))
    assert MlflowClient().get_run(tracker.run_id).info.status == "FINISHED"


def test_a_server_gone_for_good_ends_the_run_within_the_retry_budget(server, rest_env, monkeypatch):
    """The server dies during training and stays down: the process stops waiting after
    LDMFLOW_TRACKING_RETRY_SECONDS (not minutes of HTTP retries per request), keeps what it could not send in
    the pending file, and exits non-zero with one line."""
    from cli_runner import invoke
    from ldmflow.training import loop

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")  # ldmflow bounds MLflow's retries itself
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT")
    monkeypatch.setenv("LDMFLOW_TRACKING_RETRY_SECONDS", "8")
    invoke("demo-data", "--output_dir", "data", "--num_images", "8", "--resolution", "32")
    train, ended = loop.train, {}

    def train_then_lose_the_server(*args, **kwargs):
        outcome = train(*args, **kwargs)
        server.stop()
        ended["at"] = time.monotonic()
        return outcome

    monkeypatch.setattr(loop, "train", train_then_lose_the_server)
    try:
        result = invoke(
            "vae", "--manifest_path", "data/manifest.json", "--output_dir", "vae_out", "--resolution", "32",
            "--train_batch_size", "4", "--layers_per_block", "1", "--block_out_channels", "8,8,8,8",
            "--max_train_steps", "2", "--logging_steps", "1", "--save_images_epochs", "100", "--eval_epochs", "0",
            ok=False)
        waited = time.monotonic() - ended["at"]
    finally:
        server.start()
    assert result.exit_code != 0
    assert "MLflow stayed unreachable for 8 s after training" in result.output
    assert "Traceback" not in result.output
    assert waited < 60, f"took {waited:.0f} s after training; MLflow's default retries alone take about 4 minutes"
    pending = rest_env / "vae_out" / PENDING_FILE
    lines = [json.loads(line) for line in pending.read_text().splitlines()]
    assert lines[-1]["kind"] == "status"
    replay_pending(pending)
    run_id = lines[-1]["run_id"]
    assert MlflowClient().get_run(run_id).info.status == "FAILED"
