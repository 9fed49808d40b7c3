"""Checkpoints sealed with their files' sizes: a save cut short, or a file damaged since, never looks complete,
and `--resume_from_checkpoint latest` falls back to the newest intact checkpoint with a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from hypothesis import HealthCheck, given, settings, strategies as st

from ldmflow.errors import LdmflowError
from ldmflow.training.checkpoints import TrainingState, find_resume_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def accelerator():
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    return accelerator


def _two_checkpoints(accelerator, folder):
    for step in (2, 4):
        save_checkpoint(accelerator, folder, step, None, {"training_state": TrainingState(global_step=step)})
    return folder / "checkpoint-2", folder / "checkpoint-4"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 100), keep=st.floats(0, 1, exclude_max=True), remove=st.booleans())
def test_a_damaged_latest_checkpoint_is_named_and_latest_falls_back(accelerator, tmp_path_factory, caplog, which,
                                                                      keep, remove):
    older, newest = _two_checkpoints(accelerator, tmp_path_factory.mktemp("checkpoints"))
    files = sorted(p for p in newest.rglob("*") if p.is_file() and p.name != "checkpoint_files.json")
    victim = files[which % len(files)]
    if remove:
        victim.unlink()
    else:
        data = victim.read_bytes()
        victim.write_bytes(data[:int(len(data) * keep)])  # a save cut short: the file is shorter than written
    with caplog.at_level(logging.WARNING, logger="ldmflow.training.checkpoints"):
        assert find_resume_checkpoint(newest.parent, "latest") == older
    assert f"{newest} is damaged ({victim.relative_to(newest)} is" in caplog.text
    with pytest.raises(LdmflowError, match=f"checkpoint {newest} is damaged"):
        find_resume_checkpoint(newest.parent, str(newest))


def test_every_checkpoint_damaged_is_one_line(accelerator, tmp_path):
    for checkpoint in _two_checkpoints(accelerator, tmp_path):
        (checkpoint / "model.safetensors").write_bytes(b"")
    with pytest.raises(LdmflowError, match="every checkpoint in .* is damaged"):
        find_resume_checkpoint(tmp_path, "latest")


def test_a_checkpoint_saved_again_replaces_the_old_one_whole(accelerator, tmp_path):
    _two_checkpoints(accelerator, tmp_path)
    save_checkpoint(accelerator, tmp_path, 4, None, {"training_state": TrainingState(global_step=5)})
    assert find_resume_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-4"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_save_interrupted_by_ctrl_c_or_sigterm_leaves_no_partial_checkpoint(accelerator, tmp_path, monkeypatch):
    def interrupted(folder):
        (Path(folder) / "model.safetensors").parent.mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(accelerator, "save_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, tmp_path, 2, None, {"training_state": TrainingState(global_step=2)})
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_written_before_a_setting_existed_resumes_at_its_default_only():
    from ldmflow.settings import LatentDdpmSettings
    from ldmflow.training.prepare import _check_fingerprint, training_fingerprint

    def settings(**changes):
        return LatentDdpmSettings(manifest_path="m", output_dir="o", vae_uri="v", resume_from_checkpoint="latest",
                                  **changes)

    recorded = training_fingerprint(settings(), "digest")
    del recorded["settings"]["cond_dropout_per_condition"]  # what a checkpoint of an older ldmflow holds
    _check_fingerprint(settings(), recorded, training_fingerprint(settings(), "digest"))
    changed = settings(cond_dropout_per_condition="0.1")
    with pytest.raises(LdmflowError, match=r"--cond_dropout_per_condition '' -> '0\.1'"):
        _check_fingerprint(changed, recorded, training_fingerprint(changed, "digest"))
