"""Where each kind's files lie in a saved model, and vae_source.json: the one home of both.

A folder may be a training output or a downloaded ldmflow MLflow model (models/kinds.py says what each holds).
`vae_source.json` is read and written only through `VaeRecord`, as diffusers reads and writes a config only
through its class: a latent DDPM decoded by another VAE gives wrong images without any other sign, so every
reader checks the VAE against it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ldmflow.errors import LdmflowError, listing
from ldmflow.files import model_digest
from ldmflow.models.kinds import (CONDITIONING_FILE, LATENT_DDPM, UNET_FOLDER, VAE, VAE_SOURCE_FILE, Kind,
                                  logged_kind, model_root)


@dataclass(frozen=True)
class VaeRecord:
    """vae_source.json: the VAE a latent DDPM was trained on (where it was, its URI and registry identity, its
    weights digest and latent shape) and the DDPM's condition spec. Fields are the file's keys, in its order."""

    vae_path: str = ""
    vae_uri: str | None = None
    vae_model_name: str | None = None
    vae_model_version: str | None = None
    vae_run_id: str | None = None
    vae_model_id: str | None = None
    vae_scaling_factor: float | None = None
    vae_digest: str | None = None
    vae_latent_channels: int | None = None
    vae_downsample_factor: int | None = None
    condition_spec: str | None = None

    def write(self, folder) -> Path:
        path = Path(folder) / VAE_SOURCE_FILE
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        return path

    @classmethod
    def read(cls, path) -> "VaeRecord":
        """From the file, or from a folder holding it; keys it does not know are ignored."""
        path = Path(path)
        path = path / VAE_SOURCE_FILE if path.is_dir() else path
        data = json.loads(path.read_text())
        return cls(**{field.name: data[field.name] for field in dataclasses.fields(cls) if field.name in data})

    def check(self, vae_dir, source_file) -> None:
        """The VAE in `vae_dir` is the recorded one (weights digest and scaling factor), or one clear error."""
        expected, found = self.vae_digest, None
        if expected and (found := model_digest(vae_dir)) != expected:
            raise LdmflowError(
                f"The VAE at {vae_dir} is not the one this latent model was trained with: its weights digest "
                f"{found[:12]} differs from {expected[:12]} recorded in {source_file} (the folder was trained over "
                f"or replaced). Use the registered model, or restore the VAE {self.vae_uri or ''}.".rstrip())
        factor = self.vae_scaling_factor
        config = json.loads((Path(vae_dir) / "config.json").read_text())
        if factor is not None and abs(float(config.get("scaling_factor", 0.0)) - float(factor)) > 1e-6 * abs(factor):
            raise LdmflowError(f"The VAE at {vae_dir} has scaling_factor {config.get('scaling_factor')}, but this "
                               f"latent model was trained with {factor} ({source_file}).")


def check_recorded_vae(vae_dir, source_file) -> None:
    """The VAE in `vae_dir` is the one `source_file` (a vae_source.json) recorded, or one clear error."""
    VaeRecord.read(source_file).check(vae_dir, source_file)


def recorded_vae_dir(folder, fetch: Callable[[str], Path] | None = None) -> Path:
    """The VAE folder a latent DDPM's vae_source.json names: where it was if it is still the same VAE, else its
    recorded URI fetched again (`fetch`: URI -> local folder; tracking passes its resolver), checked either way.
    Without `fetch` a changed VAE in place is refused rather than replaced."""
    source_file = Path(folder) / VAE_SOURCE_FILE
    if not source_file.is_file():
        raise LdmflowError(f"{folder} has neither a vae/ folder nor vae_source.json; cannot find its VAE.")
    record = VaeRecord.read(source_file)
    local = Path(record.vae_path or "")
    in_place = bool(record.vae_path) and VAE.holds(local)
    if not (in_place and (fetch is None or _is_recorded_vae(record, local, source_file))):
        if not record.vae_uri:
            raise LdmflowError(f"{source_file}: the VAE folder {local} is gone and no vae_uri is recorded.")
        if fetch is None:
            raise LdmflowError(f"{source_file}: the VAE folder {local} is gone; load the model through "
                               f"its URI so that {record.vae_uri} can be downloaded again.")
        local = find_diffusers_folder(fetch(record.vae_uri), VAE)
    record.check(local, source_file)
    return local


def _is_recorded_vae(record: VaeRecord, folder: Path, source_file: Path) -> bool:
    try:
        record.check(folder, source_file)
    except LdmflowError:
        return False  # changed since: the recorded vae_uri is tried next
    return True


def find_diffusers_folder(local_dir, kind: Kind) -> Path:
    """The diffusers folder of `kind` inside a downloaded ldmflow MLflow model, or a plain training output."""
    root = model_root(local_dir)
    logged = logged_kind(root)
    if logged is kind:
        return root / kind.logged_dir
    if logged is not None:
        raise LdmflowError(f"{local_dir} is a {logged.name} model, not a {kind.name} model.")
    if kind.holds(root):
        return root
    raise LdmflowError(f"{local_dir} is not a {kind.name} model: {kind.layout} (found: "
                       f"{listing(sorted(p.name for p in root.iterdir())) if root.is_dir() else 'no folder'}).")


@dataclass(frozen=True)
class LatentDdpmFolders:
    """The four inputs of `LatentSampler.from_folders`."""

    unet_dir: Path
    vae_dir: Path
    scheduler_dir: Path
    conditioning_path: Path | None


def latent_ddpm_folders(folder, fetch: Callable[[str], Path] | None = None) -> LatentDdpmFolders:
    """Sampler inputs from a latent-ddpm folder: its own vae/ (logged models) or the VAE in vae_source.json."""
    folder = find_diffusers_folder(folder, LATENT_DDPM)
    conditioning = folder / CONDITIONING_FILE
    vae_dir = folder / VAE.artifact
    if not VAE.holds(vae_dir):
        vae_dir = recorded_vae_dir(folder, fetch)
    return LatentDdpmFolders(folder / UNET_FOLDER, vae_dir, folder, conditioning if conditioning.is_file() else None)
