"""Validation during training (fixed-noise denoising loss, no leakage) and the best checkpoint it picks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from safetensors.torch import load_file

from cli_runner import invoke
from ldmflow.data.manifest import load_manifest
from ldmflow.errors import LdmflowError
from ldmflow.settings import LegacyDdpmSettings
from ldmflow.training.legacy_task import LegacyDdpmTask
from ldmflow.training.loop import train
from ldmflow.training.prepare import build_accelerator, prepare
from fakes import RecordingTracker, with_nan_losses

pytestmark = pytest.mark.train  # most tests here train a tiny model; `make test-fast` skips them


@pytest.fixture(scope="module")
def data(make_demo) -> Path:
    return make_demo(12, val_fraction=0.25)



class Scripted(LegacyDdpmTask):
    """A legacy DDPM whose validation loss is read from a script, so which epoch is best is known."""

    def __init__(self, settings, data, losses):
        super().__init__(settings, load_manifest(data, condition_spec="none"),
                         load_manifest(data, split="val", condition_spec="none"))
        self.losses = list(losses)

    def validation_loss(self, accelerator, unet):
        return self.losses.pop(0)


def settings_for(data: Path, output: Path, **overrides) -> LegacyDdpmSettings:
    values = dict(manifest_path=str(data), output_dir=str(output), resolution=32, train_batch_size=3,
                  block_out_channels=(16, 16), layers_per_block=1, lr_warmup_steps=0, learning_rate=1e-3,
                  num_preview_images=1, preview_inference_steps=1, save_images_epochs=100, logging_steps=1,
                  checkpointing_steps=3, num_epochs=3, no_mlflow=True)
    return LegacyDdpmSettings(**{**values, **overrides})


def run(settings, task, recorder=None):
    recorder = recorder or RecordingTracker()
    return train(settings, task, recorder, prepare(settings, task, build_accelerator(settings))), recorder


def unet_weights(folder: Path) -> dict:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_the_validation_loss_uses_fixed_noise_and_timesteps(data, tmp_path):
    settings = settings_for(data, tmp_path)
    task = LegacyDdpmTask(settings, load_manifest(data, condition_spec="none"),
                          load_manifest(data, split="val", condition_spec="none"))
    accelerator = build_accelerator(settings)
    unet, _ = task.setup(accelerator)
    first, second = task.validation_loss(accelerator, unet), task.validation_loss(accelerator, unet)
    assert first == second and first > 0  # the same weights score the same, every time
    torch.manual_seed(123)  # the global RNG plays no part
    assert task.validation_loss(accelerator, unet) == first
    with torch.no_grad():
        next(unet.parameters()).add_(0.5)
    assert task.validation_loss(accelerator, unet) != first


def test_each_epoch_logs_raw_and_ema_validation_losses(data, tmp_path):
    settings = settings_for(data, tmp_path, use_ema=True, num_epochs=2)
    task = LegacyDdpmTask(settings, load_manifest(data, condition_spec="none"),
                          load_manifest(data, split="val", condition_spec="none"))
    outcome, recorder = run(settings, task)
    validated = [(step, m) for step, m in recorder.metrics if "val/denoise_loss" in m]
    assert [step for step, _ in validated] == [3, 6]  # 9 training images, batch 3: 3 steps per epoch
    assert all("val/denoise_loss_ema" in m for _, m in validated)
    assert outcome.metric == "val/denoise_loss_ema"  # the registered weights are the EMA's, so is the choice


def test_validation_runs_about_num_validations_times_unless_eval_epochs_is_given(data, tmp_path):
    from ldmflow.training.prepare import validation_interval

    def every(**overrides) -> int:
        return validation_interval(settings_for(data, tmp_path, **overrides), overrides.get("num_epochs", 3))

    assert every(num_epochs=300) == 15  # the demo's latent DDPM: 20 validations, not 300
    assert every(num_epochs=6, num_validations=4) == 2  # round(6 / 4)
    assert every(num_epochs=4) == 1  # never less than every epoch
    assert every(num_epochs=300, eval_epochs=7) == 7 and every(num_epochs=300, eval_epochs=0) == 0
    settings = settings_for(data, tmp_path, num_epochs=4, num_validations=2)
    _, recorder = run(settings, Scripted(settings, data, [1.0] * 4))
    assert [step // 3 for step, m in recorder.metrics if "val/denoise_loss" in m] == [2, 4]  # the last included


def test_the_best_validated_weights_are_exported_and_chosen(data, tmp_path):
    settings = settings_for(data, tmp_path)
    outcome, recorder = run(settings, Scripted(settings, data, [0.5, 0.3, 0.4]))
    assert (outcome.checkpoint, outcome.step, outcome.metric, outcome.metric_value) == \
        ("best", 6, "val/denoise_loss", 0.3)
    assert outcome.model_dir == tmp_path / "best"
    assert outcome.version_tags() == {"checkpoint": "best", "checkpoint_step": "6",
                                      "checkpoint_metric": "val/denoise_loss", "checkpoint_metric_value": "0.3"}
    best, last, at_6 = unet_weights(tmp_path / "best"), unet_weights(tmp_path), \
        load_file(tmp_path / "checkpoint-best" / "model.safetensors")
    assert all(torch.equal(best[key], at_6[key]) for key in best)  # the weights of step 6, not the last ones
    assert not all(torch.equal(best[key], last[key]) for key in best)
    assert recorder.tags["ldmflow.best_checkpoint_step"] == "6"


def test_register_last_and_a_best_last_epoch_need_no_export(data, tmp_path):
    settings = settings_for(data, tmp_path / "last", register="last")
    outcome, _ = run(settings, Scripted(settings, data, [0.5, 0.3, 0.4]))
    assert (outcome.checkpoint, outcome.step, outcome.model_dir) == ("last", 9, tmp_path / "last")
    settings = settings_for(data, tmp_path / "improving")
    outcome, _ = run(settings, Scripted(settings, data, [0.5, 0.4, 0.3]))
    assert (outcome.checkpoint, outcome.step, outcome.model_dir) == ("best", 9, tmp_path / "improving")
    assert not (tmp_path / "improving" / "best").exists()


def test_a_resumed_run_keeps_its_best_so_far(data, tmp_path):
    settings = settings_for(data, tmp_path, num_epochs=2)
    run(settings, Scripted(settings, data, [0.5, 0.3]))
    resumed = settings_for(data, tmp_path, num_epochs=3, resume_from_checkpoint="latest")
    outcome, _ = run(resumed, Scripted(resumed, data, [0.4]))  # worse than the 0.3 of step 6
    assert (outcome.checkpoint, outcome.step, outcome.metric_value) == ("best", 6, 0.3)


def test_checkpoint_metric_must_be_one_the_run_validates(data, tmp_path):
    settings = settings_for(data, tmp_path, checkpoint_metric="val/fid")
    task = Scripted(settings, data, [])
    with pytest.raises(LdmflowError, match=r"--checkpoint_metric val/fid: this run validates val/denoise_loss\."):
        prepare(settings, task, build_accelerator(settings))
    settings = settings_for(data, tmp_path, checkpoint_metric="val/denoise_loss", eval_epochs=0)
    with pytest.raises(LdmflowError, match=r"validates nothing \(no val split, or --eval_epochs 0\)"):
        prepare(settings, Scripted(settings, data, []), build_accelerator(settings))


def test_validation_never_scores_training_images(data, tmp_path):
    args = ["vae", "--manifest_path", str(data), "--output_dir", str(tmp_path), "--resolution", "32",
            "--block_out_channels", "8,8,8,8", "--layers_per_block", "1", "--no_mlflow"]
    result = invoke(*args, "--split", "all", ok=False)
    assert result.exit_code == 1
    assert "--split 'all' and --val_split 'val' share 3 image(s)" in result.output
    assert "--val_split ''" in result.output
    result = invoke(*args, "--split", "all", "--val_split", "", "--max_train_steps", "1",
                    "--scaling_factor_batches", "1", "--save_images_epochs", "100", ok=False)
    assert result.exit_code == 0, result.output


def _vae_run(data: Path, output: Path):
    from ldmflow.settings import VaeSettings
    from ldmflow.training.vae_task import VaeTask

    settings = VaeSettings(manifest_path=str(data), output_dir=str(output), resolution=32, train_batch_size=3,
                           block_out_channels=(8, 8, 8, 8), layers_per_block=1, num_epochs=1, lr_warmup_steps=0,
                           scaling_factor_batches=1, no_mlflow=True)
    task = VaeTask(settings, load_manifest(data, condition_spec="none"),
                   load_manifest(data, split="val", condition_spec="none"))
    return run(settings, task)


def test_the_vae_validates_with_lpips_from_local_weights_and_never_downloads(data, tmp_path, monkeypatch, caplog,
                                                                             lpips_weights):
    from ldmflow.models.perceptual import ALEXNET_FILE, LINEAR_CACHE_NAME, WEIGHTS_ENV

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"an optional metric downloaded {url}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty hub cache
    caplog.set_level("INFO")
    _, recorder = _vae_run(data, tmp_path / "without")
    validated = [m for _, m in recorder.metrics if "val/psnr" in m]
    assert validated and not any("val/lpips" in m for m in validated)
    [skipped] = [r.getMessage() for r in caplog.records if "val/lpips is skipped" in r.getMessage()]
    assert "no LPIPS weights here" in skipped and WEIGHTS_ENV in skipped and "--perceptual_weights" in skipped

    monkeypatch.setenv(WEIGHTS_ENV, str(lpips_weights))  # a folder
    _, recorder = _vae_run(data, tmp_path / "with")
    [validated] = [m for _, m in recorder.metrics if "val/psnr" in m]
    assert 0 < validated["val/lpips"] < 1

    monkeypatch.delenv(WEIGHTS_ENV)  # or a first download's cache
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    for name, cached in ((ALEXNET_FILE, ALEXNET_FILE), ("alex.pth", LINEAR_CACHE_NAME)):
        (cache / cached).write_bytes((lpips_weights / name).read_bytes())
    _, recorder = _vae_run(data, tmp_path / "cached")
    [cached] = [m for _, m in recorder.metrics if "val/psnr" in m]
    assert cached["val/lpips"] == pytest.approx(validated["val/lpips"], rel=1e-4)


def test_the_scaling_factor_is_measured_on_a_seeded_random_sample():
    from ldmflow.training.vae_task import scaling_factor_sample

    sample = scaling_factor_sample(1000, 50, seed=0)
    assert len(set(sample)) == 50 and sample == scaling_factor_sample(1000, 50, seed=0)
    assert sorted(sample) != list(range(50)) and max(sample) > 500  # not the manifest's first entries
    assert sample != scaling_factor_sample(1000, 50, seed=1)
    assert sorted(scaling_factor_sample(10, 50, seed=0)) == list(range(10))  # fewer images: all of them


def test_weights_that_are_not_finite_are_never_written(data, tmp_path):
    class Overflowing(LegacyDdpmTask):
        """Finite losses and gradients, but the weights turn to inf after the second step."""

        def after_optimizer_step(self, model, step):
            super().after_optimizer_step(model, step)
            self.steps = getattr(self, "steps", 0) + 1
            if self.steps == 2:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("inf"))

    settings = settings_for(data, tmp_path, checkpointing_steps=1, num_epochs=1)
    task = Overflowing(settings, load_manifest(data, condition_spec="none"), None)
    with pytest.raises(LdmflowError, match=r"non-finite by step 2; checkpoint-2 was not written and the last "
                                           r"checkpoint is .*checkpoint-1\. Lower --learning_rate"):
        run(settings, task)
    assert (tmp_path / "checkpoint-1").is_dir() and not (tmp_path / "checkpoint-2").exists()


def test_the_saved_weights_are_the_ema_weights(data, tmp_path):
    settings = settings_for(data, tmp_path, use_ema=True, num_epochs=1, register="last")
    task = LegacyDdpmTask(settings, load_manifest(data, condition_spec="none"), None)
    prepared = prepare(settings, task, build_accelerator(settings))
    train(settings, task, RecordingTracker(), prepared)
    saved = unet_weights(tmp_path)
    unet = prepared.accelerator.unwrap_model(prepared.model)
    names = [name for name, _ in unet.named_parameters()]
    assert all(torch.equal(saved[name], shadow.cpu()) for name, shadow in zip(names, task.ema.shadow_params))
    live = dict(unet.named_parameters())
    assert not all(torch.equal(saved[name], live[name].detach().cpu()) for name in names)  # not the raw weights


def test_two_trainings_never_share_an_output_folder(data, tmp_path):
    from ldmflow.files import folder_lock

    args = ["legacy-ddpm", "--manifest_path", str(data), "--output_dir", str(tmp_path), "--resolution", "32",
            "--block_out_channels", "16,16", "--layers_per_block", "1", "--max_train_steps", "1", "--no_mlflow",
            "--save_images_epochs", "100"]
    with folder_lock(tmp_path, "ldmflow vae (run 1234)"):
        result = invoke(*args, ok=False)
    assert result.exit_code == 1
    assert f"{tmp_path} is in use by ldmflow vae (run 1234) (pid" in result.output
    assert not (tmp_path / "unet").exists()
    assert invoke(*args, ok=False).exit_code == 0  # free again once the other one ends


def test_a_resume_on_changed_data_is_refused_unless_allowed(data, tmp_path):
    import json as json_module
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data.parent, copy)
    settings = settings_for(copy / "manifest.json", tmp_path / "out", num_epochs=1, checkpointing_steps=3)
    first = LegacyDdpmTask(settings, load_manifest(settings.manifest_path, condition_spec="none"), None)
    manifest = load_manifest(settings.manifest_path, condition_spec="none")
    train(settings, first, RecordingTracker(), prepare(settings, first, build_accelerator(settings), manifest.digest))
    entries = json_module.loads((copy / "manifest.json").read_text())
    entries["items"].pop()  # the data changed since
    (copy / "manifest.json").write_text(json_module.dumps(entries))
    changed = load_manifest(settings.manifest_path, condition_spec="none")
    for allow in (False, True):
        resumed = settings_for(copy / "manifest.json", tmp_path / "out", num_epochs=2, resume_from_checkpoint="latest",
                               allow_changed_settings=allow)
        task = LegacyDdpmTask(resumed, changed, None)
        if allow:
            prepare(resumed, task, build_accelerator(resumed), changed.digest)
        else:
            with pytest.raises(LdmflowError, match=r"the manifest's content \(digest .* -> .*\)"):
                prepare(resumed, task, build_accelerator(resumed), changed.digest)


def test_unreadable_images_met_in_training_are_counted_named_and_warned_once(data, tmp_path, caplog):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data.parent, copy)
    settings = settings_for(copy / "manifest.json", tmp_path / "out", num_epochs=2, logging_steps=3)
    manifest = load_manifest(settings.manifest_path, condition_spec="none")
    broken = manifest.records[0].image_path
    broken.write_bytes(broken.read_bytes()[:60] + b"\0" * 40)  # damaged after the manifest was checked
    partly_nan = np.full((32, 32, 3), 0.5, np.float32)
    partly_nan[:4] = np.nan
    tifffile.imwrite(manifest.records[1].image_path, partly_nan)  # a float TIFF under the PNG's name
    logged = {}

    class Keeper(RecordingTracker):
        def log_dict(self, obj, artifact_file):
            logged[artifact_file] = obj
            return True

    caplog.set_level("WARNING")
    _, recorder = run(settings, LegacyDdpmTask(settings, manifest, None), Keeper())
    counts = [m["unreadable_substitutions"] for _, m in recorder.metrics if "unreadable_substitutions" in m]
    assert counts[-1] >= 2  # met in each of the two epochs, replaced each time
    assert logged["unreadable_images.json"] == {"unreadable_images": [str(broken)]}
    [warning] = [r.message for r in caplog.records if "could not be read" in r.message]
    assert warning.startswith("1 image(s) could not be read during training")
    assert logged["non_finite_images.json"] == {"non_finite_images": [str(manifest.records[1].image_path)]}
    assert [m["non_finite_images"] for _, m in recorder.metrics if "non_finite_images" in m] == [1]
    assert any(r.message.startswith("1 image(s) had NaN or infinite pixels") for r in caplog.records)


def test_sigterm_checkpoints_marks_the_run_killed_and_exits_non_zero(data, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlflow import MlflowClient

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    env.pop("MLFLOW_RUN_ID", None)
    output = tmp_path / "out"
    command = [sys.executable, "-m", "ldmflow", "legacy-ddpm", "--manifest_path", str(data), "--output_dir",
               str(output), "--resolution", "32", "--block_out_channels", "16,16", "--layers_per_block", "1",
               "--max_train_steps", "100000", "--checkpointing_steps", "100000", "--save_images_epochs", "100000",
               "--eval_epochs", "0", "--experiment_name", "preempted"]
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    seen = ""
    deadline = time.monotonic() + 120
    while "Training 100000 steps" not in seen and time.monotonic() < deadline:  # the loop has started
        seen += process.stderr.readline()
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "SIGTERM: stopped at step" in seen + rest
    assert [p.name for p in output.iterdir() if p.name.startswith("checkpoint-")]
    experiment = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_experiment_by_name("preempted")
    [run] = MlflowClient(env["MLFLOW_TRACKING_URI"]).search_runs([experiment.experiment_id])
    assert run.info.status == "KILLED"


def test_the_lr_schedule_keeps_step_with_global_step_across_skipped_steps(data, tmp_path):
    class OneBadStep(with_nan_losses(LegacyDdpmTask, lambda call: call == 3)):
        def after_optimizer_step(self, model, step):
            self.ema_updates = getattr(self, "ema_updates", 0) + 1

    settings = settings_for(data, tmp_path, lr_scheduler="constant_with_warmup", lr_warmup_steps=10,
                            learning_rate=1e-3, max_train_steps=6, num_epochs=10)
    task = OneBadStep(settings, load_manifest(data, condition_spec="none"), None)
    _, recorder = run(settings, task)
    logged = {step: m for step, m in recorder.metrics if "lr" in m}
    assert logged[3]["nonfinite_steps"] == 1
    assert logged[6]["lr"] == pytest.approx(1e-3 * 6 / 10)  # warm-up at step 6, though step 3 was skipped
    assert task.ema_updates == 6  # skipped on the device: the EMA steps too, towards the same weights


def test_a_nonfinite_step_is_skipped_on_the_device_and_read_with_the_metrics(data, tmp_path, monkeypatch, caplog):
    """No host sync per step: fused AdamW's found_inf leaves the weights as they were (with weight decay, a
    zero-gradient update would still move them; a NaN one would poison them), and the count is read only at
    log points."""
    from ldmflow.training.skipped_steps import SkippedSteps

    reads, real_read = [], SkippedSteps.read
    monkeypatch.setattr(SkippedSteps, "read", lambda self: reads.append(1) or real_read(self))

    class OneBadStep(with_nan_losses(LegacyDdpmTask, lambda call: call == 3)):
        weights = []

        def after_optimizer_step(self, model, step):
            OneBadStep.weights.append([p.detach().clone() for p in model.parameters()])

    caplog.set_level("WARNING")
    settings = settings_for(data, tmp_path, max_train_steps=6, num_epochs=10, logging_steps=3,
                            checkpointing_steps=100, adam_weight_decay=0.1)
    _, recorder = run(settings, OneBadStep(settings, load_manifest(data, condition_spec="none"), None))
    before, skipped, after = OneBadStep.weights[1:4]
    assert all(torch.equal(a, b) for a, b in zip(before, skipped))
    assert all(torch.isfinite(p).all() for p in after) and not all(torch.equal(a, b) for a, b in zip(skipped, after))
    logged = {step: m for step, m in recorder.metrics if "nonfinite_steps" in m}
    assert sorted(logged) == [3, 6] and logged[3]["nonfinite_steps"] == 1 and logged[6]["nonfinite_steps"] == 1
    assert len(reads) == 2  # once per log point, not once per step
    assert "1 step(s) skipped by step 3 (1 in all)" in caplog.text


def test_a_full_disk_is_named_and_leaves_no_half_written_checkpoint(data, tmp_path, monkeypatch):
    import errno

    from accelerate import Accelerator

    def full(self, output_dir, *args, **kwargs):
        (tmp_path / ".checkpoint-3.tmp").mkdir(exist_ok=True)
        (tmp_path / ".checkpoint-3.tmp" / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", full)
    settings = settings_for(data, tmp_path, checkpointing_steps=3, num_epochs=1)
    with pytest.raises(LdmflowError, match=r"Could not write checkpoint-3 in .*: the disk is full \(.* MiB free\)"):
        run(settings, LegacyDdpmTask(settings, load_manifest(data, condition_spec="none"), None))
    assert not (tmp_path / ".checkpoint-3.tmp").exists()


def test_a_full_disk_while_saving_the_model_is_named_and_leaves_no_temporary_folder(data, tmp_path, monkeypatch):
    from diffusers import ModelMixin
    from safetensors import SafetensorError

    def full(self, folder, *args, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(ModelMixin, "save_pretrained", full)
    settings = settings_for(data, tmp_path, checkpointing_steps=2, max_train_steps=2)
    with pytest.raises(LdmflowError, match=r"Could not write the model in .*: the disk is full \(.* MiB free\)\. "
                                           r"Free some space, then resume from .*checkpoint-2"):
        run(settings, LegacyDdpmTask(settings, load_manifest(data, condition_spec="none"), None))
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "unet").exists()


def test_a_step_the_grad_scaler_skips_moves_neither_the_ema_nor_the_lr_schedule_off_step(data, tmp_path,
                                                                                         monkeypatch):
    """fp16's GradScaler skips an optimizer step on overflow (accelerate reports it as
    `step_was_skipped`; there is no fp16 on this CPU, so the report is simulated at step 3)."""
    from accelerate.optimizer import AcceleratedOptimizer

    class CountingEma(LegacyDdpmTask):
        def after_optimizer_step(self, model, step):
            self.ema_updates = getattr(self, "ema_updates", 0) + 1

    steps = []
    real_step = AcceleratedOptimizer.step

    def step(self, *args, **kwargs):
        steps.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(AcceleratedOptimizer, "step", step)
    monkeypatch.setattr(AcceleratedOptimizer, "step_was_skipped", property(lambda self: len(steps) == 3))
    settings = settings_for(data, tmp_path, lr_scheduler="constant_with_warmup", lr_warmup_steps=10,
                            learning_rate=1e-3, max_train_steps=6, num_epochs=10)
    task = CountingEma(settings, load_manifest(data, condition_spec="none"), None)
    _, recorder = run(settings, task)
    logged = {step: m for step, m in recorder.metrics if "lr" in m}
    assert task.ema_updates == 5  # not after the skipped step
    assert logged[6]["lr"] == pytest.approx(1e-3 * 6 / 10)
    assert logged[6]["nonfinite_steps"] == 0  # a scaler skip is not a non-finite loss
