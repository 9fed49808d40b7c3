"""`ldmflow evaluate`: quality metrics of a trained model, logged to a run linked to the model and the version.

- VAE: PSNR, SSIM, rFID/rKID of posterior-mode reconstructions of the split's images (and LPIPS when its
  weights are at hand), and the conditions the probe reads back from them (`recon/...`).
- Latent and legacy DDPM: FID and KID of `num_samples` generated images (seed + i, so two models meet the
  same noise) against the split's images; sample diversity.
- Conditioned latent DDPM: condition adherence read back by the dataset's condition probe, at the evaluated
  guidance and at guidance 1, next to the shuffled-request baseline and to the ceiling its own VAE sets (the
  probe on the real images' reconstructions, `recon/...`): `ceiling_lines` names the conditions it caps.
- A latent DDPM trained with --cond_dropout_per_condition is also asked for its first condition alone
  (`only_<name>/...`, the table's "<name> only" column): adherence on that condition, and the spread of the
  conditions left out across the samples over their spread in the data (`<other>_spread_ratio`).
- Every adherence score and FID/KID has a bootstrap 95% interval (`..._ci95`).

Everything that can fail on input (model, manifest, conditions, probe) is settled before the run opens. This
module loads, generates, reads and logs; the scores are computed in evaluation/scoring.py and printed by
evaluation/report.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldmflow.data.conditions import ConditionSpec
from ldmflow.data.manifest import Manifest, NothingUsableError, load_manifest
from ldmflow.errors import LdmflowError
from ldmflow.evaluation import distribution
from ldmflow.evaluation.adherence import (Requests, diversity, manifest_ranges, manifest_requests,
                                          mean_pairwise_distance, only_prefix, recorded_conditions, requests_of_only,
                                          spread_ratios)
from ldmflow.evaluation.scoring import AdherenceReadings, Scorer, adherence_scores, reconstruction_scores
from ldmflow.models.kinds import LATENT_DDPM, LEGACY_DDPM, PROBE, VAE, detect_kind, names
from ldmflow.models.probe import ProbeReader
from ldmflow.models.saved_model import find_diffusers_folder
from ldmflow.sampling.load import load_sampler
from ldmflow.sampling.sampler import check_generated
from ldmflow.settings import EvaluateSettings, ProbeSettings
from ldmflow.tags import DATASET_DIGEST_TAG, EVAL_RUN_TAG, EVAL_SKIPPED_TAG

logger = logging.getLogger(__name__)
EVALUATE_STAGE = "evaluate"
EVALUATED_KINDS = (VAE, LATENT_DDPM, LEGACY_DDPM)
DIVERSITY_REQUESTS, DIVERSITY_SEEDS = 8, 4  # requests x seeds generated for the diversity scores


@dataclass
class EvaluatedModel:
    stage: str  # the name of one of EVALUATED_KINDS
    model: object  # AutoencoderKL, or a Sampler (LatentSampler, LegacySampler)
    resolution: int
    spec: ConditionSpec  # what the model is conditioned on (none for the VAE and the legacy DDPM)
    first_stage: object = None  # the AutoencoderKL whose reconstructions cap a latent model (the VAE itself)


def load_evaluated_model(folder: Path) -> EvaluatedModel:
    """The model in a training output folder or a downloaded ldmflow MLflow model, with its stage."""
    from ldmflow.tracking.model_uri import fetch_model

    kind = detect_kind(folder)
    if kind not in EVALUATED_KINDS:
        raise LdmflowError(f"{folder}: evaluate takes a {names(EVALUATED_KINDS)} model (this is a {kind.name} "
                           "model).")
    if kind is VAE:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(find_diffusers_folder(folder, VAE)).eval()
        return EvaluatedModel(VAE.name, vae, int(vae.config.sample_size), ConditionSpec.parse("none"), vae)
    sampler = load_sampler(folder, fetch=fetch_model)
    if kind is LATENT_DDPM:
        return EvaluatedModel(LATENT_DDPM.name, sampler, sampler.image_size, sampler.condition_spec, sampler.vae)
    return EvaluatedModel(LEGACY_DDPM.name, sampler, sampler.image_size, ConditionSpec.parse("none"))


def load_split(settings: EvaluateSettings, split: str, spec: str) -> Manifest:
    try:
        return load_manifest(settings.manifest_path, split=split, condition_spec=spec, data_root=settings.data_root,
                             allow_outside_root=settings.allow_outside_root)
    except NothingUsableError as error:
        raise LdmflowError(f"--split {split}: {error}") from None


def _images(manifest: Manifest, resolution: int, count: int) -> np.ndarray:
    """(N, R, R, 3) in [0, 1]: the first `count` images of the split, center-cropped like training."""
    from ldmflow.data.dataset import ManifestImageDataset

    dataset = ManifestImageDataset(manifest.records[:count], resolution)
    return np.stack([(dataset[i]["pixel_values"].permute(1, 2, 0).numpy() + 1) / 2 for i in range(len(dataset))])


def check_conditions_known(manifest: Manifest) -> None:
    """A model's conditions must appear in the manifest (missing ones are zero-filled for training)."""
    present = np.stack([r.present for r in manifest.records]).astype(bool)
    absent = [name for name, known in zip(manifest.spec.names, present.any(axis=0)) if not known]
    if absent:
        raise LdmflowError(f"The manifest's split {manifest.report.split!r} has no value of {', '.join(absent)}, "
                           f"which the model is conditioned on ({manifest.spec}).")


def resolve_probe(settings: EvaluateSettings, spec: ConditionSpec, digest: str) -> ProbeReader:
    """--probe_uri, else this dataset's registered probe, else one trained now."""
    from ldmflow.tracking.model_uri import resolve_model_source
    from ldmflow.tracking.registry import registered_probe_uri

    uri = settings.probe_uri or (None if settings.no_mlflow else registered_probe_uri(digest, str(spec)))
    if uri is None:
        uri = _train_probe(settings, spec)
    else:
        logger.info("Condition probe: %s.", uri)
    source = resolve_model_source(uri)
    reader = ProbeReader.from_folder(find_diffusers_folder(source.local_dir, PROBE), uri=uri)
    if reader.encoder.spec != spec:
        raise LdmflowError(f"--probe_uri {uri} reads {reader.encoder.spec}; the evaluation needs {spec}.")
    trained_on = _probe_dataset(source)
    if trained_on and trained_on != digest:
        raise LdmflowError(f"--probe_uri {uri} was trained on another dataset (digest {trained_on[:12]}, this "
                           f"manifest's is {digest[:12]}): it would misread these images. Omit --probe_uri to use "
                           "(or train) this dataset's probe.")
    return reader


def _probe_dataset(source) -> str | None:
    """The dataset digest a tracked probe was trained on (its version's or run's tag), None when unknown."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        if source.model_name and source.model_version:
            version = MlflowClient().get_model_version(source.model_name, source.model_version)
            return version.tags.get(DATASET_DIGEST_TAG)
        if source.run_id:
            return MlflowClient().get_run(source.run_id).data.tags.get(DATASET_DIGEST_TAG)
    except MlflowException:
        return None
    return None


def _train_probe(settings: EvaluateSettings, spec: ConditionSpec) -> str:
    from ldmflow.tracking.run_tracker import outside_the_project_run
    from ldmflow.workflows.train import run_training

    output_dir = Path(settings.output_dir) / PROBE.name
    logger.info("No condition probe for this dataset yet: training one (%d epochs) in %s.", settings.probe_epochs,
                output_dir)
    with outside_the_project_run() as parent_run_id:
        probe = ProbeSettings(manifest_path=settings.manifest_path, output_dir=str(output_dir),
                              split=settings.train_split, val_split=settings.split, condition_spec=str(spec),
                              data_root=settings.data_root, allow_outside_root=settings.allow_outside_root,
                              num_epochs=settings.probe_epochs, seed=settings.seed, no_mlflow=settings.no_mlflow,
                              experiment_name=_experiment_of(parent_run_id) or settings.experiment_name)
        _, model_uri = run_training(probe, parent_run_id=parent_run_id)
    return model_uri or str(output_dir)


def _experiment_of(run_id: str | None) -> str | None:
    """The experiment `mlflow run --experiment-name` put the evaluate run in: the probe's run nests there."""
    if not run_id:
        return None
    import mlflow

    return mlflow.get_experiment(mlflow.get_run(run_id).info.experiment_id).name


def feature_extractor(settings: EvaluateSettings, probe: ProbeReader | None) -> tuple[object | None, str, str | None]:
    """(features module or None, its name, a sentence on what was skipped and why, or None)."""
    from ldmflow.models.probe import ProbeFeatures

    skipped = None
    if settings.feature_extractor in ("auto", "inception"):
        try:
            return distribution.inception_features(settings.inception_weights), distribution.INCEPTION, None
        except distribution.Unavailable as error:
            skipped = f"Inception features ({error})"
    if settings.feature_extractor in ("auto", "probe") and probe is not None:
        return ProbeFeatures(probe.probe), f"probe:{probe.uri}", \
            skipped and f"{skipped}; FID/KID use the condition probe's features instead"
    if settings.feature_extractor == "probe":
        return None, "", "FID/KID on probe features (no probe: --condition_spec is none)"
    return None, "", f"{skipped}, so FID/KID"


def _generate(settings: EvaluateSettings, evaluated: EvaluatedModel, conditions, seeds, guidance: float):
    from ldmflow.progress import Progress

    progress = Progress(f"evaluate: generating {len(seeds)} images (guidance {guidance:g})",
                        -(-len(seeds) // settings.batch_size), unit="batch")
    images = evaluated.model.generate(conditions, num_images=len(seeds), guidance_scale=guidance,
                                      num_inference_steps=settings.num_inference_steps, scheduler=settings.scheduler,
                                      seeds=seeds, batch_size=settings.batch_size, progress=progress)
    progress.close()
    return check_generated(images, guidance)


def _reconstruct(vae, images: np.ndarray, batch_size: int) -> np.ndarray:
    import torch

    rows = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            pixels = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).float() * 2 - 1
            decoded = vae.decode(vae.encode(pixels.to(vae.device)).latent_dist.mode()).sample
            rows.append(((decoded.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(rows)


@dataclass
class Evaluation:
    metrics: dict[str, float]
    params: dict[str, str]
    grid: object  # PIL image: samples (top) over real images (bottom) for the same requests
    table: dict[str, list]  # one row per evaluated sample, for mlflow.log_table
    skipped: str | None
    samples: np.ndarray | None = None  # (N, H, W, 3) in [0, 1]: the generated images, or a VAE's reconstructions
    real_images: np.ndarray | None = None  # (N, H, W, 3): the split's images they are compared with
    requests: Requests | None = None  # what a conditioned model's samples were asked for
    readings: np.ndarray | None = None  # (N, D): what the probe read from the samples (None: no probe)


def evaluate(settings: EvaluateSettings, evaluated: EvaluatedModel, real: Manifest, train: Manifest,
             probe: ProbeReader | None) -> Evaluation:
    """Every metric of `evaluated` against the split `real` (probe: None when nothing is conditioned)."""
    from ldmflow.sampling.grids import condition_label, image_grid, to_pil

    features, features_name, skipped = feature_extractor(settings, probe)
    real_images = _images(real, evaluated.resolution, settings.num_samples)
    metrics, labels, table, requests, read = {}, None, {}, None, None
    params = {"eval_num_samples": str(settings.num_samples), "eval_num_real": str(len(real_images)),
              "eval_feature_extractor": features_name or "none", "eval_stage": evaluated.stage}
    if evaluated.stage == VAE.name:
        generated = _reconstruct(evaluated.model, real_images, settings.batch_size)
        scores, missing = reconstruction_scores(real_images, generated, features=features,
                                                batch_size=settings.batch_size, seed=settings.seed,
                                                perceptual_weights=settings.perceptual_weights)
        metrics.update(scores)
        skipped = "; ".join(filter(None, [skipped, missing])) if missing else skipped
    else:
        seeds = [settings.seed + i for i in range(settings.num_samples)]
        if evaluated.stage == LATENT_DDPM.name and not evaluated.spec.is_empty:
            requests = manifest_requests(real, settings.num_samples)
        generated = _generate(settings, evaluated, requests.conditions if requests else None, seeds,
                              settings.guidance_scale)
        if features is not None:
            metrics.update(distribution.fid_kid(features, real_images, generated, settings.batch_size, settings.seed))
            metrics.update(_diversity(settings, evaluated, features, requests))
        table = {"seed": seeds}
    if probe is not None:
        read = probe.read(generated, settings.batch_size)
        scorer = Scorer(real.spec, manifest_ranges(train), settings.seed)
        truth = recorded_conditions(real, len(real_images))
        real_read = probe.read(real_images, settings.batch_size)
        metrics.update(scorer.errors(truth, real_read, "probe/"))
        if evaluated.stage == VAE.name:
            metrics.update(scorer.errors(truth, read, "recon/"))
        elif requests:
            metrics.update(adherence_scores(scorer, _adherence_readings(
                settings, evaluated, probe, requests, read, seeds=seeds, real_images=real_images, truth=truth)))
            if alone := _condition_alone(evaluated):
                training_read = probe.read(_images(train, evaluated.resolution, settings.num_samples),
                                           settings.batch_size)
                metrics.update(_partial_scores(settings, evaluated, probe, scorer, requests, seeds, alone,
                                               training_read))
            labels = [condition_label(c) for c in requests.conditions[:8]]
            table.update({f"requested_{column}": requests.values[:, i].tolist()
                          for i, column in enumerate(_columns(probe))})
        table.update({f"probed_{column}": read[:, i].tolist() for i, column in enumerate(_columns(probe))})
    table["image"] = to_pil(generated)
    count = min(8, len(generated), len(real_images))
    grid = image_grid(to_pil(np.concatenate([generated[:count], real_images[:count]])),
                      labels=(labels + [""] * count) if labels else None, columns=count)
    return Evaluation(metrics, params, grid, table, skipped, generated, real_images, requests, read)


def _adherence_readings(settings: EvaluateSettings, evaluated: EvaluatedModel, probe: ProbeReader, requests: Requests,
                        read: np.ndarray, *, seeds: list[int], real_images: np.ndarray,
                        truth: Requests) -> AdherenceReadings:
    """The probe's readings `adherence_scores` compares: the samples (`read`), the same requests and seeds at
    guidance 1 (unless 1 is the evaluated guidance), and the real images through the model's VAE (if it has one)."""
    unguided = reconstructions = None
    if settings.guidance_scale != 1.0:
        unguided = probe.read(_generate(settings, evaluated, requests.conditions, seeds, 1.0),
                                     settings.batch_size)
    if evaluated.first_stage is not None:
        reconstructions = probe.read(_reconstruct(evaluated.first_stage, real_images, settings.batch_size),
                                            settings.batch_size)
    return AdherenceReadings(requests, read, unguided, truth, reconstructions)


def _condition_alone(evaluated: EvaluatedModel) -> str | None:
    """The condition asked for alone in the table's "<name> only" column: the spec's first, when the model was
    trained to do without every other (--cond_dropout_per_condition); None otherwise."""
    first, *others = evaluated.spec.names
    encoder = evaluated.model.encoder  # a LatentSampler's: None for an unconditional one
    return first if others and encoder and set(others) <= set(encoder.omittable) else None


def _partial_scores(settings: EvaluateSettings, evaluated: EvaluatedModel, probe: ProbeReader, scorer: Scorer,
                    requests: Requests, seeds: list[int], name: str, training_read: np.ndarray) -> dict[str, float]:
    """`only_<name>/...`: the same requests and seeds giving `name` alone, scored on it only, and how widely the
    conditions left out vary across the samples against the data the model learnt (`<other>_spread_ratio`, over
    the probe's readings `training_read` of up to --num_samples training images: a few val images are too few to
    say how widely the data varies; the demo's 13 spread the wind 20% wider than its 115 training images)."""
    partial = requests_of_only(requests, evaluated.spec, name)
    read = probe.read(_generate(settings, evaluated, partial.conditions, seeds, settings.guidance_scale),
                             settings.batch_size)
    others = tuple(other for other in evaluated.spec.names if other != name)
    scores = {**scorer.errors(partial, read), **spread_ratios(evaluated.spec, read, training_read, others)}
    return {f"{only_prefix(name)}{key}": value for key, value in scores.items()}


def _columns(probe: ProbeReader) -> list[str]:
    from ldmflow.sampling.condition_input import component_columns

    return component_columns(probe.encoder.spec)


def _diversity(settings, evaluated, features, requested) -> dict:
    """Feature distances among DIVERSITY_SEEDS samples of each of DIVERSITY_REQUESTS requests (conditioned),
    or among all samples (unconditional)."""
    seeds = [10**6 + settings.seed + i for i in range(DIVERSITY_REQUESTS * DIVERSITY_SEEDS)]
    if requested is None:
        images = _generate(settings, evaluated, None, seeds[:DIVERSITY_REQUESTS * 2], settings.guidance_scale)
        return {"diversity": mean_pairwise_distance(distribution.extract(features, images))}
    chosen = requested.conditions[:DIVERSITY_REQUESTS]
    conditions = [c for c in chosen for _ in range(DIVERSITY_SEEDS)]
    images = _generate(settings, evaluated, conditions, seeds[:len(conditions)], settings.guidance_scale)
    groups = np.repeat(np.arange(len(chosen)), DIVERSITY_SEEDS)
    return diversity(distribution.extract(features, images), groups)


def run_evaluation(settings: EvaluateSettings) -> dict[str, float]:
    """Resolve and check everything, evaluate, and log an `evaluate` run linked to the model."""
    from ldmflow.tracking.lineage import record_sample_source
    from ldmflow.tracking.model_uri import resolve_model_source
    from ldmflow.tracking.run_tracker import open_run

    source = resolve_model_source(settings.model_uri)
    evaluated = load_evaluated_model(Path(source.local_dir))
    spec = evaluated.spec if not evaluated.spec.is_empty else ConditionSpec.parse(settings.condition_spec)
    real = load_split(settings, settings.split, str(spec))
    train = load_split(settings, settings.train_split, str(spec))
    if evaluated.stage == LATENT_DDPM.name and not evaluated.spec.is_empty:
        check_conditions_known(real)
    probe = None if spec.is_empty else resolve_probe(settings, spec, real.digest)
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open_run(settings, EVALUATE_STAGE, enabled=not settings.no_mlflow) as tracker:
        record_sample_source(tracker, source, stage=EVALUATE_STAGE)
        tracker.set_tags({DATASET_DIGEST_TAG: real.digest})
        result = evaluate(settings, evaluated, real, train, probe)
        metrics = {f"eval/{key}": value for key, value in result.metrics.items() if np.isfinite(value)}
        tracker.log_params(result.params | ({"eval_probe_uri": probe.uri} if probe else {}))
        tracker.log_metrics(metrics, step=0)
        tracker.log_image(result.grid, key="evaluation", step=0)
        result.grid.save(output_dir / "evaluation_grid.png")
        if result.skipped:
            line = f"Skipped {result.skipped}. To enable: {distribution.ENABLE}."
            logger.warning(line)
            tracker.set_tags({EVAL_SKIPPED_TAG: line[:5000]})
        if getattr(tracker, "run_id", None):
            _link_to_model(tracker, source, metrics, result.table)
    return metrics


def _link_to_model(tracker, source, metrics: dict[str, float], table: dict) -> None:
    """The scores on the logged model (MLflow 3 model metrics) and as tags of the registered version."""
    import mlflow
    from mlflow import MlflowClient

    from ldmflow.tracking.registry import add_evaluation_note

    tracker.flush()
    mlflow.log_table(data=table, artifact_file="evaluation_samples.json", run_id=tracker.run_id)
    if source.model_id:
        mlflow.log_metrics(metrics, step=0, run_id=tracker.run_id, model_id=source.model_id)
    if source.model_name and source.model_version:
        client = MlflowClient()
        for key, value in metrics.items():
            if key.count("/") == 1:  # the model's own scores; the other columns stay on the run
                client.set_model_version_tag(source.model_name, source.model_version, key, f"{value:.6g}")
        client.set_model_version_tag(source.model_name, source.model_version, EVAL_RUN_TAG, tracker.run_id)
        add_evaluation_note(client, source.model_name, source.model_version, tracker.run_id, metrics)
