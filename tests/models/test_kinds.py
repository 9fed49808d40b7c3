"""models/kinds.py and models/saved_model.py on folders of files only (no weights): each kind is told from its
files, a logged model from its artifacts' layout, and vae_source.json goes through its record both ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ldmflow.errors import LdmflowError
from ldmflow.files import model_digest
from ldmflow.models.kinds import (KINDS, LATENT_DDPM, LEGACY_DDPM, MLMODEL_FILE, PROBE, VAE, detect_kind, kind_named,
                                  kind_trained_by, logged_kind, model_root, names)
from ldmflow.models.saved_model import (VaeRecord, check_recorded_vae, find_diffusers_folder, latent_ddpm_folders,
                                        recorded_vae_dir)


def saved(folder: Path, kind) -> Path:
    """A folder holding `kind`'s files (configs only: detection never reads weights)."""
    for name in kind.files:
        path = folder / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"_class_name": kind.config_class, "scaling_factor": 0.5}
                                   if kind.config_class else {}))
    return folder


def logged(folder: Path, kind) -> Path:
    """A downloaded ldmflow MLflow model of `kind`: MLmodel and the kind's folder under artifacts/."""
    folder.mkdir(parents=True)
    (folder / MLMODEL_FILE).write_text("flavors: {}\n")
    saved(folder / kind.logged_dir, kind)
    return folder


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.name)
def test_each_kind_is_told_from_its_saved_folder_and_its_logged_model(tmp_path, kind):
    assert detect_kind(saved(tmp_path / "saved", kind)) is kind
    assert detect_kind(logged(tmp_path / "logged", kind)) is kind
    assert logged_kind(tmp_path / "logged") is kind and logged_kind(tmp_path / "saved") is None
    assert find_diffusers_folder(tmp_path / "logged", kind) == tmp_path / "logged" / kind.logged_dir
    assert find_diffusers_folder(tmp_path / "saved", kind) == tmp_path / "saved"


def test_a_whole_run_downloaded_is_read_at_its_model_folder(tmp_path):
    run = tmp_path / "run"
    logged(run / "model", VAE)
    assert model_root(run) == run / "model" and detect_kind(run) is VAE


def test_names_and_settings_lead_to_their_kind():
    required = {"manifest_path": "m.json", "output_dir": "out", "vae_uri": "vae"}
    for kind in KINDS:
        settings = kind.settings(**{key: value for key, value in required.items()
                                    if key in kind.settings.__dataclass_fields__})
        assert kind_named(kind.name) is kind and kind_trained_by(settings) is kind
    assert names((VAE, PROBE)) == f"{VAE.name} or {PROBE.name}" and names((VAE,)) == VAE.name
    with pytest.raises(LdmflowError, match="Unknown model kind 'gan'"):
        kind_named("gan")


def test_a_folder_of_no_kind_and_a_folder_of_another_kind_are_one_line_each(tmp_path):
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(LdmflowError, match=r"is not an ldmflow model: .*\(found: notes.txt\)"):
        detect_kind(tmp_path)
    with pytest.raises(LdmflowError, match=f"is a {VAE.name} model, not a {LATENT_DDPM.name} model"):
        find_diffusers_folder(logged(tmp_path / "vae", VAE), LATENT_DDPM)
    with pytest.raises(LdmflowError, match=f"is not a {LEGACY_DDPM.name} model: expected model_index.json"):
        find_diffusers_folder(saved(tmp_path / "probe", PROBE), LEGACY_DDPM)


def test_the_vae_record_reads_what_it_wrote_and_checks_the_vae(tmp_path):
    vae = saved(tmp_path / "vae", VAE)
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    model = saved(tmp_path / "latent", LATENT_DDPM)
    record = VaeRecord(vae_path=str(vae), vae_uri="models:/ldmflow-vae/1", vae_scaling_factor=0.5,
                       vae_digest=model_digest(vae), condition_spec="temperature:1")
    path = record.write(model)
    assert list(json.loads(path.read_text())) == [field for field in VaeRecord.__dataclass_fields__]
    assert VaeRecord.read(model) == record == VaeRecord.read(path)
    check_recorded_vae(vae, path)
    assert recorded_vae_dir(model) == vae
    assert latent_ddpm_folders(model).vae_dir == vae
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"trained over")
    with pytest.raises(LdmflowError, match="is not the one this latent model was trained with"):
        recorded_vae_dir(model)  # without a way to fetch it again, a changed VAE is refused


def test_a_gone_vae_is_fetched_again_through_its_recorded_uri(tmp_path):
    fetched = saved(tmp_path / "download", VAE)
    model = saved(tmp_path / "latent", LATENT_DDPM)
    VaeRecord(vae_path=str(tmp_path / "gone"), vae_uri="models:/ldmflow-vae/1").write(model)
    asked = []
    assert recorded_vae_dir(model, lambda uri: asked.append(uri) or fetched) == fetched
    assert asked == ["models:/ldmflow-vae/1"]
    with pytest.raises(LdmflowError, match="is gone; load the model through its URI"):
        recorded_vae_dir(model)
    VaeRecord(vae_path=str(tmp_path / "gone")).write(model)
    with pytest.raises(LdmflowError, match="is gone and no vae_uri is recorded"):
        recorded_vae_dir(model, lambda uri: fetched)


def test_an_older_record_with_unknown_keys_still_reads(tmp_path):
    (tmp_path / "vae_source.json").write_text(json.dumps({"vae_path": "/v", "added_later": 1}))
    assert VaeRecord.read(tmp_path) == VaeRecord(vae_path="/v")
