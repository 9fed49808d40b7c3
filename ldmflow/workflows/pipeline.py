"""The `pipeline` entry point: vae -> latent_ddpm -> sample -> evaluate as child runs of one parent run.

Multistep style (MLflow's multistep_workflow example), with its reuse check done right: a step is reused
when a FINISHED run of the same entry point exists with the same parameters (compared as the strings MLflow
stored), the same code version, and a registered model; found with a `filter_string`, not by scanning runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ldmflow.environment import environment_tags
from ldmflow.errors import LdmflowError
from ldmflow.models.kinds import LATENT_DDPM, VAE
from ldmflow.settings import PipelineSettings, param_value
from ldmflow.tags import (CODE_VERSION_TAG, DATASET_DIGEST_TAG, ENTRY_POINT_TAG, PARENT_RUN_TAG,
                          PIPELINE_TAG_PREFIX, REGISTERED_URI_TAG, RUN_NAME_TAG, STAGE_TAG)
from ldmflow.tracking.store import filter_value

logger = logging.getLogger(__name__)
PIPELINE_STAGE = "pipeline"  # the stage tag of a pipeline's parent run


def project_dir() -> Path:
    """The ldmflow project (MLproject) to run steps from: the source checkout, or the current directory."""
    for candidate in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (candidate / "MLproject").is_file():
            return candidate
    raise LdmflowError("The pipeline runs the project's MLflow entry points: start it from an ldmflow checkout "
                       "(the folder with MLproject).")


def code_version() -> str:
    """Digest of the code that trains (package, entry points, MLproject): a changed trainer is never reused."""
    digest, root = hashlib.sha256(), project_dir()
    files = sorted((root / "ldmflow").rglob("*.py")) + sorted((root / "entrypoints").glob("*.py"))
    for path in files + [root / "MLproject"]:
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def find_reusable_run(client, experiment_id: str, entry_point: str, parameters: dict[str, str], version: str,
                      dataset_digest: str | None = None):
    """The newest finished run of `entry_point` with exactly these params, code version and data, else None."""
    clauses = [f"tags.`{ENTRY_POINT_TAG}` = {filter_value(entry_point)}", "attributes.status = 'FINISHED'",
               f"tags.`{CODE_VERSION_TAG}` = {filter_value(version)}"]
    if dataset_digest:  # the manifest's content, not just its path
        clauses.append(f"tags.`{DATASET_DIGEST_TAG}` = {filter_value(dataset_digest)}")
    clauses += [f"params.`{key}` = {filter_value(value)}" for key, value in sorted(parameters.items())]
    runs = client.search_runs([experiment_id], filter_string=" and ".join(clauses),
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _run_step(client, experiment_id: str, entry_point: str, parameters: dict[str, str], version: str,
              dataset_digest: str | None = None):
    """Reuse a matching finished run or launch the entry point as a child of the active run."""
    import mlflow

    previous = find_reusable_run(client, experiment_id, entry_point, parameters, version, dataset_digest)
    if previous is not None:
        logger.info("Step %s: reusing finished run %s.", entry_point, previous.info.run_id)
        return previous, True
    logger.debug("Step %s: starting with %s", entry_point, parameters)  # its run's first line says it started
    with this_python_first_on_path():
        submitted = mlflow.projects.run(str(project_dir()), entry_point=entry_point, parameters=parameters,
                                        env_manager="local", experiment_id=experiment_id, synchronous=True)
    client.set_tag(submitted.run_id, CODE_VERSION_TAG, version)
    return client.get_run(submitted.run_id), False


@contextlib.contextmanager
def this_python_first_on_path():
    """MLflow Projects starts a step with the `python` first on PATH (`python -m entrypoints.<step>`), which need
    not be the Python running ldmflow (a system Python without its packages): put a `python` that runs this one
    first, for as long as the step runs. A script, not a link, so a virtual environment's Python stays itself."""
    with tempfile.TemporaryDirectory(prefix="ldmflow-python-") as folder:
        launcher = Path(folder) / "python"
        launcher.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        launcher.chmod(0o755)
        previous = os.environ.get("PATH", "")
        os.environ["PATH"] = folder + os.pathsep + previous
        try:
            yield
        finally:
            os.environ["PATH"] = previous


def _step_parameters(settings: PipelineSettings) -> dict[str, dict[str, str]]:
    """Each step's MLproject parameters, as the strings MLflow stores (the reuse check compares those)."""
    return {step: {name: param_value(value) for name, value in arguments.items() if value is not None}
            for step, arguments in settings.step_arguments().items()}  # None: the step's own default applies


def _sample_conditions(settings: PipelineSettings, manifest) -> dict[str, str]:
    """A conditions file spanning the training range, so the sample step shows conditioned images."""
    from ldmflow.sampling.condition_input import spanning_conditions, write_conditions_file

    if manifest.spec.is_empty:
        return {}
    path = Path(settings.output_root).resolve() / "sample_conditions.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_conditions_file(spanning_conditions(manifest, settings.num_images), manifest.spec, path)
    return {"conditions_file": str(path)}


def _registered_uri(run, step: str) -> str:
    uri = run.data.tags.get(REGISTERED_URI_TAG)
    if not uri:
        raise LdmflowError(f"Pipeline step {step}: run {run.info.run_id} registered no model (tag {REGISTERED_URI_TAG}).")
    return uri


def evaluation_metrics(run_id: str) -> dict[str, float]:
    """The `eval/` metrics of an evaluate run (what `make demo` prints at the end)."""
    from mlflow import MlflowClient

    metrics = MlflowClient().get_run(run_id).data.metrics
    return {key: value for key, value in metrics.items() if key.startswith("eval/")}


@dataclass(frozen=True)
class PipelineResult:
    """Each step's run, the registered models' URIs, and which steps were reused; the parent run's
    `ldmflow.pipeline.<field>` tags."""

    vae_run_id: str
    vae_uri: str
    vae_reused: bool
    latent_ddpm_run_id: str
    latent_ddpm_uri: str
    latent_ddpm_reused: bool
    sample_run_id: str
    sample_reused: bool
    evaluate_run_id: str
    evaluate_reused: bool

    def tags(self) -> dict[str, str]:
        return {f"{PIPELINE_TAG_PREFIX}{key}": str(value) for key, value in dataclasses.asdict(self).items()}


def run_pipeline(settings: PipelineSettings, parent_run_id: str | None = None) -> PipelineResult:
    """Run (or reuse) the four steps under one parent run (itself nested under `parent_run_id`: a replicate)."""
    import mlflow
    from mlflow import MlflowClient

    from ldmflow.tracking.store import ensure_experiment, use_tracking_store

    from ldmflow.data.manifest import load_manifest

    # Validate the inputs before the parent run opens, so bad input leaves no failed runs behind.
    manifest = load_manifest(settings.manifest_path, condition_spec=settings.condition_spec)
    version = code_version()
    use_tracking_store()
    experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID") or ensure_experiment(settings.experiment_name)
    client = MlflowClient()
    params = _step_parameters(settings)
    from ldmflow.tracking.run_tracker import (MLFLOW_RANDOM_NAME, UI_HINT_SHOWN_ENV, default_run_name, recording_failure,
                                              run_location)

    attach = os.environ.get("MLFLOW_RUN_ID")
    name = default_run_name(PIPELINE_STAGE, settings)
    nesting = {PARENT_RUN_TAG: parent_run_id} if parent_run_id and not attach else None
    with (mlflow.start_run(run_id=attach, experiment_id=experiment_id, run_name=None if attach else name,
                           tags=nesting, nested=mlflow.active_run() is not None) as parent,
          recording_failure(parent.info.run_id, settings.output_root)):
        if attach and MLFLOW_RANDOM_NAME.match(parent.info.run_name or ""):
            mlflow.set_tag(RUN_NAME_TAG, name)
        logger.info("MLflow run %s (%s, the steps are its child runs); watch it live: %s", parent.info.run_id, name,
                    run_location(mlflow.get_tracking_uri(), parent))
        os.environ[UI_HINT_SHOWN_ENV] = "1"  # the steps (child processes) need not repeat it
        existing = client.get_run(parent.info.run_id).data.params
        mlflow.log_params({k: v for k, v in settings.to_params().items() if k not in existing})
        mlflow.set_tags({STAGE_TAG: PIPELINE_STAGE, CODE_VERSION_TAG: version, **environment_tags()})
        digest = manifest.digest
        vae_run, vae_reused = _run_step(client, experiment_id, VAE.name, params[VAE.name], version, digest)
        vae_uri = _registered_uri(vae_run, VAE.name)
        latent_run, latent_reused = _run_step(client, experiment_id, LATENT_DDPM.name,
                                              {**params[LATENT_DDPM.name], "vae_uri": vae_uri}, version, digest)
        unet_uri = _registered_uri(latent_run, LATENT_DDPM.name)
        sample_params = {**params["sample"], "model_uri": unet_uri, **_sample_conditions(settings, manifest)}
        sample_run, sample_reused = _run_step(client, experiment_id, "sample", sample_params, version)
        evaluate_run, evaluate_reused = _run_step(client, experiment_id, "evaluate",
                                                  {**params["evaluate"], "model_uri": unet_uri}, version, digest)
        result = PipelineResult(vae_run_id=vae_run.info.run_id, vae_uri=vae_uri, vae_reused=vae_reused,
                                latent_ddpm_run_id=latent_run.info.run_id, latent_ddpm_uri=unet_uri,
                                latent_ddpm_reused=latent_reused, sample_run_id=sample_run.info.run_id,
                                sample_reused=sample_reused, evaluate_run_id=evaluate_run.info.run_id,
                                evaluate_reused=evaluate_reused)
        mlflow.set_tags(result.tags())
    return result
