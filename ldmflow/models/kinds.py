"""The kinds of model ldmflow trains, and each one's names and folder layout, in one mapping.

A kind is told from a folder as diffusers tells a model class, by its files and its config's `_class_name`.
What a saved folder of each kind holds (its task's `save` writes it):

- vae:         config.json (an AutoencoderKL) and its weights
- latent_ddpm: unet/, scheduler_config.json, vae_source.json, and conditioning.json when it is conditioned
- legacy_ddpm: a DDPMPipeline: model_index.json, unet/, scheduler/
- probe:       config.json (a ConditionProbe), its weights and conditioning.json

A logged ldmflow MLflow model holds that folder at artifacts/<artifact>/; a latent DDPM's is artifacts/ itself,
with the VAE it was trained on in artifacts/vae/.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ldmflow.errors import LdmflowError, listing
from ldmflow.settings import LatentDdpmSettings, LegacyDdpmSettings, ProbeSettings, TrainSettings, VaeSettings

UNET_FOLDER = "unet"  # a DDPM's UNet, in a latent DDPM's folder and in a DDPMPipeline
SCHEDULER_FILE = "scheduler_config.json"  # a latent DDPM's noise schedule
VAE_SOURCE_FILE = "vae_source.json"  # the VAE a latent DDPM was trained on: path, URI, weights digest, scale
CONDITIONING_FILE = "conditioning.json"  # a conditioned model's condition spec and normalisation statistics
PIPELINE_PARTS = ("model_index.json", UNET_FOLDER, "scheduler")  # what a logged legacy DDPM bundles
MLMODEL_FILE = "MLmodel"  # marks a logged MLflow model


@dataclass(frozen=True)
class Kind:
    """One kind of model: its names, and how its saved folder looks."""

    name: str  # the `stage` tag of its runs and versions; its MLflow entry point, task and logged model name
    command: str  # the `ldmflow` command that trains it
    settings: type[TrainSettings]  # that command's settings
    registered_name: str  # the registered model its versions go to unless told otherwise
    artifact: str  # its folder inside a logged model's artifacts/ ("": artifacts/ itself)
    files: tuple[str, ...]  # what its saved folder must hold; a trailing / marks a folder
    config_class: str | None  # the `_class_name` of its config.json, when it has one
    layout: str  # what a folder of this kind holds, said when a folder is not one
    description: str  # its registered model's description
    summary: str  # the one line of help of the command that trains it

    @property
    def logged_dir(self) -> str:
        """Its folder inside a logged ldmflow MLflow model."""
        return f"artifacts/{self.artifact}" if self.artifact else "artifacts"

    def holds(self, folder) -> bool:
        """Whether `folder` is a saved folder of this kind."""
        folder = Path(folder)
        for name in self.files:
            path = folder / name
            if not (path.is_dir() if name.endswith("/") else path.is_file()):
                return False
        return self.config_class is None or _class_name(folder / "config.json") == self.config_class


VAE = Kind(
    name="vae", command="vae", settings=VaeSettings, registered_name="ldmflow-vae", artifact="vae",
    files=("config.json",), config_class="AutoencoderKL",
    layout="expected config.json of an AutoencoderKL and its weights",
    description="ldmflow's AutoencoderKL (diffusers format): encodes images to the latents the latent DDPMs "
                "train on.",
    summary="Train an AutoencoderKL (by default 4 latent channels, x8) and save it in diffusers format at "
            "--output_dir.")
LATENT_DDPM = Kind(
    name="latent_ddpm", command="latent-ddpm", settings=LatentDdpmSettings, registered_name="ldmflow-latent-ddpm",
    artifact="", files=(f"{UNET_FOLDER}/config.json", SCHEDULER_FILE), config_class=None,
    layout="expected unet/ and scheduler_config.json (a latent-ddpm output folder)",
    description="ldmflow's conditioned latent DDPM (a diffusers UNet2DConditionModel) with the VAE it was trained "
                "on; the `condition_spec` tag says what it is conditioned on.",
    summary="Train a conditioned UNet2DConditionModel on a VAE's latents; writes unet/, scheduler, vae_source.json.")
LEGACY_DDPM = Kind(
    name="legacy_ddpm", command="legacy-ddpm", settings=LegacyDdpmSettings, registered_name="ldmflow-legacy-ddpm",
    artifact="pipeline", files=("model_index.json", f"{UNET_FOLDER}/"), config_class=None,
    layout="expected model_index.json, unet/ and scheduler/ (a DDPMPipeline folder)",
    description="ldmflow's unconditional pixel-space DDPM (a diffusers DDPMPipeline), for comparison.",
    summary="Train the original unconditional pixel-space UNet2DModel; saved as a DDPMPipeline folder.")
PROBE = Kind(
    name="probe", command="probe", settings=ProbeSettings, registered_name="ldmflow-probe", artifact="probe",
    files=("config.json",), config_class="ConditionProbe",
    layout="expected config.json of a ConditionProbe (an `ldmflow probe` output folder)",
    description="ldmflow's condition probe: reads the conditions back from images, to score condition adherence.",
    summary="Train the condition probe that evaluation reads conditions back with; registered as ldmflow-probe.")

KINDS = (VAE, LATENT_DDPM, LEGACY_DDPM, PROBE)  # the order of listings
_DETECTION_ORDER = (LATENT_DDPM, LEGACY_DDPM, VAE, PROBE)  # a logged latent DDPM also holds a VAE: test it first
_BY_NAME = {kind.name: kind for kind in KINDS}
_BY_SETTINGS = {kind.settings: kind for kind in KINDS}


def kind_named(name: str) -> Kind:
    """The kind called `name` (a `stage` tag), or one clear error."""
    if name not in _BY_NAME:
        raise LdmflowError(f"Unknown model kind {name!r}; expected one of {', '.join(_BY_NAME)}.")
    return _BY_NAME[name]


def kind_trained_by(settings: TrainSettings) -> Kind:
    """The kind a training command's settings train."""
    return _BY_SETTINGS[type(settings)]


def names(kinds: tuple[Kind, ...] = KINDS) -> str:
    """`vae, latent_ddpm, legacy_ddpm or probe`, for messages."""
    listed = [kind.name for kind in kinds]
    return f"{', '.join(listed[:-1])} or {listed[-1]}" if len(listed) > 1 else listed[0]


def model_root(folder) -> Path:
    """The folder, or its model/ when it is a whole run that `runs:/<id>/` downloaded."""
    root = Path(folder)
    if not (root / MLMODEL_FILE).is_file() and (root / "model" / MLMODEL_FILE).is_file():
        return root / "model"
    return root


def logged_kind(root: Path) -> Kind | None:
    """The kind of a logged ldmflow MLflow model, from its artifacts' layout; None if `root` is not one."""
    if not (root / MLMODEL_FILE).is_file():
        return None
    return next((kind for kind in _DETECTION_ORDER if kind.holds(root / kind.logged_dir)), None)


def detect_kind(folder) -> Kind:
    """The kind of a saved model folder or a downloaded ldmflow MLflow model, or one clear error."""
    root = model_root(folder)
    kind = logged_kind(root) or next((kind for kind in _DETECTION_ORDER if kind.holds(root)), None)
    if kind is None:
        found = sorted(path.name for path in root.iterdir()) if root.is_dir() else []
        raise LdmflowError(f"{folder} is not an ldmflow model: expected the folder of a {names()} model, or its "
                           f"MLflow model (found: {listing(found) or 'nothing'}).")
    return kind


def _class_name(config: Path) -> str | None:
    try:
        return json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
