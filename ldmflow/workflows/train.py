"""One training run from settings: validate inputs, open the MLflow run, train, register the model.

Inputs are validated (manifest, VAE) before the MLflow run opens, so bad input never leaves a failed run
behind; only the main process talks to MLflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

from ldmflow.data.manifest import Manifest, NothingUsableError, load_manifest
from ldmflow.errors import LdmflowError, cause_line
from ldmflow.files import folder_lock
from ldmflow.models.kinds import LATENT_DDPM, LEGACY_DDPM, PROBE, VAE, Kind, kind_trained_by
from ldmflow.settings import LatentDdpmSettings, LegacyDdpmSettings, ProbeSettings, TrainSettings, VaeSettings
from ldmflow.tags import LATENT_CACHE_DIR_TAG, LATENT_CACHE_TAG, REGISTERED_URI_TAG, RESUMED_FROM_RUN_TAG

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrialRun:
    """How a sweep's trial trains: in the run its study made (`run_id`), told of each validation (which may stop
    it), its model logged but not registered (the sweep registers the best trial's at the end)."""

    run_id: str
    on_validation: object  # loop.ValidationCallback


def _log_latent_cache(tracker, cache, split: str, num_records: int) -> None:
    """Which cache the model was trained from: its key digest and folder as tags, and the cache as a dataset
    input beside the manifest (its digest is the key's)."""
    tracker.set_tags({LATENT_CACHE_TAG: cache.key.digest, LATENT_CACHE_DIR_TAG: str(cache.folder)})
    tracker.log_dataset(cache.folder, cache.key.digest, split, num_records, tag_digest=False,
                        name=f"latent cache {cache.key.digest[:12]} ({cache.key.resolution} px, {cache.key.dtype}"
                             f"{', flips' if cache.key.flip else ''})")


def _load(settings: TrainSettings, split: str, condition_spec: str) -> Manifest:
    return load_manifest(settings.manifest_path, split=split, condition_spec=condition_spec,
                         data_root=settings.data_root, allow_outside_root=settings.allow_outside_root,
                         max_image_pixels=settings.max_image_pixels)


def _validation_manifest(settings: TrainSettings, train: Manifest) -> Manifest | None:
    """The val split when the manifest has one, else None; never an image that is also trained on."""
    if not settings.val_split or settings.eval_epochs == 0:
        return None
    try:
        val = _load(settings, settings.val_split, getattr(settings, "condition_spec", "none"))
    except NothingUsableError:
        logger.info("No usable '%s' entries: validation metrics are skipped.", settings.val_split)
        return None
    trained = {record.image_path for record in train.records}
    shared = [record.image_path for record in val.records if record.image_path in trained]
    if shared:
        raise LdmflowError(
            f"--split {settings.split!r} and --val_split {settings.val_split!r} share {len(shared)} image(s) "
            f"(e.g. {shared[0]}): validation would score images the model trains on. Train on a split without "
            "them, or pass --val_split '' to train without validation.")
    return val


def _vae_task(settings: VaeSettings, manifest: Manifest, val: Manifest | None, vae_source, accelerator):
    from ldmflow.training.vae_task import VaeTask

    probe = _registered_probe(settings, manifest, accelerator) if val is not None else None
    return VaeTask(settings, manifest, val, _val_conditions(settings, probe, val) if probe else None)


def _latent_task(settings: LatentDdpmSettings, manifest: Manifest, val: Manifest | None, vae_source, accelerator):
    from ldmflow.training.latent_task import LatentDdpmTask

    probe = _registered_probe(settings, manifest, accelerator) if val is not None else None
    return LatentDdpmTask(settings, manifest, vae_source, val, probe)


def _legacy_task(settings: LegacyDdpmSettings, manifest: Manifest, val: Manifest | None, vae_source, accelerator):
    from ldmflow.training.legacy_task import LegacyDdpmTask

    return LegacyDdpmTask(settings, manifest, val)


def _probe_task(settings: ProbeSettings, manifest: Manifest, val: Manifest | None, vae_source, accelerator):
    from ldmflow.training.probe_task import ProbeTask

    return ProbeTask(settings, manifest, val)


# Each kind's training task, from (settings, train split, val split or None, VAE source, accelerator).
_TASKS = {VAE: _vae_task, LATENT_DDPM: _latent_task, LEGACY_DDPM: _legacy_task, PROBE: _probe_task}


def _build_task(kind: Kind, settings: TrainSettings, manifest: Manifest, vae_source, accelerator):
    return _TASKS[kind](settings, manifest, _validation_manifest(settings, manifest), vae_source, accelerator)


def _on_main(accelerator, resolve):
    """`resolve()` (a registry search, a download) on the main process only, its result shared with the others.

    Downloads go inside output_dir, so every process reads the same local folder.
    """
    from accelerate.utils import broadcast_object_list

    payload = [None]
    if accelerator.is_main_process:
        try:
            payload = [("ok", resolve())]
        except LdmflowError as error:
            payload = [("error", str(error))]
    if accelerator.num_processes > 1:
        payload = broadcast_object_list(payload)
    status, value = payload[0]
    if status == "error":
        raise LdmflowError(value)
    return value


def resolve_vae(vae_uri: str, download_dir: Path, accelerator):
    """The VAE's ModelSource, its local_dir the diffusers folder (downloaded once, by the main process)."""
    from ldmflow.models.saved_model import find_diffusers_folder
    from ldmflow.tracking.model_uri import resolve_model_source

    def resolve():
        source = resolve_model_source(vae_uri, dst_dir=download_dir)
        return dataclasses.replace(source, local_dir=find_diffusers_folder(source.local_dir, VAE))

    return _on_main(accelerator, resolve)


def _val_conditions(settings: VaeSettings, probe_dir: Path, val: Manifest):
    """The val split's conditions (as the probe's spec names them) for the VAE's `val/recon/...` scores."""
    from ldmflow.evaluation.adherence import SplitConditions
    from ldmflow.models.probe import ProbeReader

    reader = ProbeReader.from_folder(probe_dir)
    spec = str(reader.encoder.spec)
    return SplitConditions.of(reader, _load(settings, settings.val_split, spec), _load(settings, settings.split, spec),
                              [record.image_path for record in val.records])


def _registered_probe(settings: TrainSettings, manifest: Manifest, accelerator) -> Path | None:
    """The folder of this dataset's registered condition probe, if there is one: validation then also scores
    condition adherence (latent DDPM) or how well reconstructions keep the conditions (VAE, any probe of the
    dataset). None without tracking or conditions."""
    from ldmflow.models.saved_model import find_diffusers_folder
    from ldmflow.tracking.model_uri import resolve_model_source
    from ldmflow.tracking.registry import registered_probe_uri

    spec = None if kind_trained_by(settings) is VAE else str(manifest.spec)
    if settings.no_mlflow or (spec is not None and manifest.spec.is_empty) or settings.eval_epochs == 0:
        return None

    def resolve():
        from mlflow.exceptions import MlflowException

        from ldmflow.tracking.store import access_problem

        try:
            uri = registered_probe_uri(manifest.digest, spec)
        except MlflowException as error:  # before any run: a refused login is said as such
            reason = access_problem(error, "read the model registry")
            raise LdmflowError(f"Cannot look up the dataset's condition probe: "
                               f"{reason or cause_line(error)}.") from None
        if uri is None:
            return None
        logger.info("Validation reads conditions back with the dataset's probe %s.", uri)
        source = resolve_model_source(uri, dst_dir=Path(settings.output_dir) / ".probe_download")
        return find_diffusers_folder(source.local_dir, PROBE)

    return _on_main(accelerator, resolve)


def run_training(settings: TrainSettings, parent_run_id: str | None = None, trial: TrialRun | None = None,
                 register: bool = True):
    """Train the model `settings` describes, tracked in MLflow unless --no_mlflow, in a run nested under
    `parent_run_id` when given (a probe trained for an evaluation, a replicate), or in a sweep's trial run.

    Returns (TrainingOutcome, the registered model's URI or None; a trial's, or with register False: its logged
    model, models:/<id>)."""
    from ldmflow.training.prepare import build_accelerator

    kind = kind_trained_by(settings)
    accelerator = build_accelerator(settings)
    is_main = accelerator.is_main_process
    with folder_lock(settings.output_dir, f"ldmflow {kind.name}") if is_main else contextlib.nullcontext():
        return _train_in(settings, kind, accelerator, parent_run_id, trial, register)


def _train_in(settings: TrainSettings, kind: Kind, accelerator, parent_run_id: str | None, trial: TrialRun | None,
              register: bool):
    """run_training with the output folder locked by the main process."""
    from ldmflow.tracking.registry import log_and_register
    from ldmflow.tracking.run_tracker import close_abandoned_run, open_run
    from ldmflow.tracking.store import check_server_reachable, retry_seconds, use_tracking_store
    from ldmflow.training.loop import train
    from ldmflow.training.prepare import prepare

    is_main = accelerator.is_main_process
    patience = retry_seconds()  # how long the end of the run waits for a tracking server that went away
    if is_main and not settings.no_mlflow:  # down or untrusted: one line before the lookups below (probe, VAE)
        check_server_reachable(use_tracking_store())
    manifest = _load(settings, settings.split, getattr(settings, "condition_spec", "none"))
    Path(settings.output_dir).mkdir(parents=True, exist_ok=True)
    vae_source = resolve_vae(settings.vae_uri, Path(settings.output_dir) / ".vae_download", accelerator) \
        if kind is LATENT_DDPM else None
    task = _build_task(kind, settings, manifest, vae_source, accelerator)
    prepared = prepare(settings, task, accelerator, manifest.digest)  # bad input fails before a run opens
    model_uri = None
    with open_run(settings, kind.name, enabled=is_main and not settings.no_mlflow, parent_run_id=parent_run_id,
                  run_id=trial.run_id if trial else None) as tracker:
        tracker.log_dataset(manifest.path, manifest.digest, settings.split, len(manifest.records),
                            name=f"{Path(manifest.path).stem} ({settings.split}, {len(manifest.records)} images)")
        if task.latent_cache is not None:
            _log_latent_cache(tracker, task.latent_cache, settings.split, len(manifest.records))
        previous = (prepared.resumed_tags or {}).get(RESUMED_FROM_RUN_TAG)
        if previous and tracker.run_id and previous != tracker.run_id:
            close_abandoned_run(previous, tracker.run_id)
        if not manifest.spec.is_empty:
            tracker.log_dict({"condition_spec": str(manifest.spec), "stats": manifest.stats.to_dict(manifest.spec)},
                             "conditioning.json")
        outcome = train(settings, task, tracker, prepared, trial.on_validation if trial else None)
        if is_main and not settings.no_mlflow:
            tracker.wait_for_store(patience)
            registered = log_and_register(
                kind.name, outcome.model_dir, tracker, registered_model_name=settings.registered_model_name,
                alias=settings.register_alias, vae_source=vae_source, dataset_digest=manifest.digest,
                condition_spec=None if manifest.spec.is_empty else str(manifest.spec),
                extra_tags=outcome.version_tags(), step=outcome.step, register=register and trial is None)
            if register and trial is None:
                tracker.set_tags({REGISTERED_URI_TAG: registered.model_uri})
            model_uri = registered.model_uri
    accelerator.end_training()
    return outcome, model_uri
