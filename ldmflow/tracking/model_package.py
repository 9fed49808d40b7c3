"""What a logged ldmflow model is made of: its files linked into each kind's layout under artifacts/, its code (a
copy of the package and a models-from-code file) and its pip requirements. registry.py logs and registers it."""

from __future__ import annotations

import os
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ldmflow.errors import LdmflowError
from ldmflow.files import MODEL_FILE_SUFFIXES
from ldmflow.models.kinds import (CONDITIONING_FILE, LATENT_DDPM, LEGACY_DDPM, PIPELINE_PARTS, PROBE, SCHEDULER_FILE,
                                  UNET_FOLDER, VAE, VAE_SOURCE_FILE, Kind)
from ldmflow.models.saved_model import find_diffusers_folder
from ldmflow.tags import CONDITION_SPEC_TAG
from ldmflow.tracking.model_uri import ModelSource

# ldmflow's own runtime dependencies (pyproject.toml), next to the exactly pinned torch/diffusers/mlflow.
_UNPINNED_REQUIREMENTS = ["accelerate>=1.0,<2", "pillow>=10", "numpy>=1.24", "pandas>=2.0", "safetensors>=0.4",
                          "click>=8.1", "tifffile>=2023.1", "psutil>=5.9"]


def pip_requirements() -> list[str]:
    """torch, diffusers and mlflow pinned to this environment (without local tags like +cpu), then ldmflow's deps."""
    pinned = []
    for package in ("torch", "diffusers", "mlflow"):
        try:
            pinned.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            pinned.append(package)
    return pinned + _UNPINNED_REQUIREMENTS


def model_code(model_class: type, staging: Path) -> str:
    """The model as code (MLflow's models-from-code): loading it runs this file against the bundled ldmflow
    package; nothing is unpickled."""
    path = staging / "model_code.py"
    path.write_text(f'''"""ldmflow {model_class.__name__}, logged as code: see ldmflow.tracking.pyfunc_models."""

import mlflow.models

from {model_class.__module__} import {model_class.__name__}

mlflow.models.set_model({model_class.__name__}())
''')
    return str(path)


def package_artifacts(kind: Kind, output_dir: Path, staging: Path, vae_source: ModelSource | None, tags: dict):
    """Link (or copy) the model's files into its kind's logged layout; returns (artifacts, python model class,
    signature). Each artifact is named after its folder or file, so artifacts/ holds the kind's saved folder."""
    return _ARTIFACTS[kind](output_dir, staging, vae_source, tags)


def _vae_artifacts(output_dir: Path, staging: Path, vae_source, tags: dict):
    from ldmflow.tracking import pyfunc_models

    _link_tree(find_diffusers_folder(output_dir, VAE), staging / VAE.artifact, top_level_only=True)
    return {VAE.artifact: str(staging / VAE.artifact)}, pyfunc_models.VaePyfunc, pyfunc_models.vae_signature()


def _probe_artifacts(output_dir: Path, staging: Path, vae_source, tags: dict):
    from ldmflow.tracking import pyfunc_models

    _link_tree(output_dir, staging / PROBE.artifact, top_level_only=True)
    return {PROBE.artifact: str(staging / PROBE.artifact)}, pyfunc_models.ProbePyfunc, \
        pyfunc_models.probe_signature(tags[CONDITION_SPEC_TAG])


def _legacy_ddpm_artifacts(output_dir: Path, staging: Path, vae_source, tags: dict):
    from ldmflow.tracking import pyfunc_models

    folder = find_diffusers_folder(output_dir, LEGACY_DDPM)
    for part in PIPELINE_PARTS:
        _link_tree(folder / part, staging / LEGACY_DDPM.artifact / part)
    return ({LEGACY_DDPM.artifact: str(staging / LEGACY_DDPM.artifact)}, pyfunc_models.LegacyDdpmPyfunc,
            pyfunc_models.legacy_signature())


def _latent_ddpm_artifacts(output_dir: Path, staging: Path, vae_source: ModelSource, tags: dict):
    from ldmflow.tracking import pyfunc_models

    folder = find_diffusers_folder(output_dir, LATENT_DDPM)
    _link_tree(folder / UNET_FOLDER, staging / UNET_FOLDER)
    _link_tree(find_diffusers_folder(vae_source.local_dir, VAE), staging / VAE.artifact, top_level_only=True)
    artifacts = {"unet": str(staging / UNET_FOLDER), VAE.artifact: str(staging / VAE.artifact)}
    for key, file_name in (("scheduler", SCHEDULER_FILE), ("conditioning", CONDITIONING_FILE),
                           ("vae_source", VAE_SOURCE_FILE)):
        if (folder / file_name).is_file():
            _link_tree(folder / file_name, staging / file_name)
            artifacts[key] = str(staging / file_name)
    return artifacts, pyfunc_models.LatentDiffusionPyfunc, pyfunc_models.latent_signature(tags[CONDITION_SPEC_TAG])


_ARTIFACTS = {VAE: _vae_artifacts, PROBE: _probe_artifacts, LEGACY_DDPM: _legacy_ddpm_artifacts,
              LATENT_DDPM: _latent_ddpm_artifacts}


def _link_tree(source: Path, target: Path, top_level_only: bool = False) -> None:
    """Hard-link files (no copy of multi-GB weights; falls back to copying across filesystems)."""
    if source.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _link(source, target)
        return
    if not source.is_dir():
        raise LdmflowError(f"Missing {source}: the training output is incomplete.")
    for path in sorted(source.rglob("*") if not top_level_only else source.iterdir()):
        if not path.is_file() or (top_level_only and not path.name.endswith(MODEL_FILE_SUFFIXES)):
            continue
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        _link(path, destination)


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def package_copy(staging: Path) -> str:
    """A clean copy of the ldmflow package (no caches) for the model's code_paths."""
    import ldmflow

    target = staging / "code" / "ldmflow"
    shutil.copytree(Path(ldmflow.__file__).parent, target,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    return str(target)
