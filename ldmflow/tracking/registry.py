"""Log a finished training output as an MLflow pyfunc model, register it, and tag its lineage.

Each model carries its diffusers folders as pyfunc artifacts (stock `from_pretrained` loads them after
`mlflow.artifacts.download_artifacts`), a copy of the ldmflow package as code (it loads without ldmflow
installed), explicit pip requirements, and a signature with params for serving: model_package.py makes it,
each kind's saved folder under artifacts/ (ldmflow/models/kinds.py); this module logs, registers and describes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from ldmflow.environment import environment_tags
from ldmflow.errors import LdmflowError, cause_line
from ldmflow.evaluation.metric_names import CONDITION_ERROR_SUFFIXES, EVALUATION, HEADLINE_SCORES
from ldmflow.models.kinds import CONDITIONING_FILE, LATENT_DDPM, PROBE, VAE, VAE_SOURCE_FILE, kind_named
from ldmflow.models.saved_model import VaeRecord, find_diffusers_folder
from ldmflow.tags import (CONDITION_SPEC_TAG, DATASET_DIGEST_TAG, DOWNSAMPLE_FACTOR_TAG, DOWNSTREAM_TAG, ENV_LOCK_TAG,
                          LATENT_CHANNELS_TAG, OMITTABLE_CONDITIONS_TAG, STAGE_VERSION_TAG, VAE_MODEL_NAME_TAG,
                          VAE_MODEL_VERSION_TAG, VAE_RUN_TAG, VAE_SHAPE_TAG_PREFIX, VAE_URI_TAG)
from ldmflow.tracking.model_package import model_code, package_artifacts, package_copy, pip_requirements
from ldmflow.tracking.model_uri import ModelSource, vae_source_from_file

logger = logging.getLogger(__name__)
@dataclass(frozen=True)
class RegisteredModel:
    """What `log_and_register` made: `model_uri` (models:/name/version) is what users pass on."""

    name: str
    version: str
    model_id: str
    model_uri: str
    run_id: str


def log_and_register(stage: str, output_dir, tracker_or_run_id, registered_model_name: str | None = None,
                     alias: str | None = None, vae_source: ModelSource | None = None, *, dataset_digest: str,
                     condition_spec: str | None = None, extra_tags: dict | None = None,
                     step: int | None = None, register: bool = True) -> RegisteredModel:
    """Log `output_dir` of `stage` as a pyfunc model in the run, register it and tag run and version.

    `register=False` (a sweep's trial): log and tag only; the result's version is "" and its `model_uri` the
    logged model's (models:/<model id>), which `register_logged_model` registers later.

    `step`: the step of the weights in `output_dir` (the best checkpoint's; default the run's last): the logged
    model carries the run's metrics as they were then, so a version shows the scores of its own weights.

    For latent_ddpm, `vae_source` (or else `output_dir/vae_source.json`) gives the VAE that is bundled into the
    model and recorded as lineage (and as a model input of the run when it has a logged model id).
    """
    import mlflow
    from mlflow import MlflowClient

    from ldmflow.tracking.store import access_problem, tag_run, use_tracking_store

    kind = kind_named(stage)
    output_dir = Path(output_dir)
    name = registered_model_name or kind.registered_name
    run_id, last_step = _run_of(tracker_or_run_id)
    client = MlflowClient(use_tracking_store())
    tags = {STAGE_VERSION_TAG: stage, DATASET_DIGEST_TAG: dataset_digest,
            ENV_LOCK_TAG: environment_tags()[ENV_LOCK_TAG]}  # the lock beside the model's requirements.txt
    if kind is LATENT_DDPM:
        vae_source = vae_source or vae_source_from_file(output_dir)
        tags[CONDITION_SPEC_TAG] = condition_spec or _recorded_condition_spec(output_dir)
        tags[OMITTABLE_CONDITIONS_TAG] = _omittable_conditions(output_dir)
        tags.update(vae_lineage_tags(vae_source))
    elif condition_spec:
        tags[CONDITION_SPEC_TAG] = condition_spec
    if kind is VAE:
        tags.update(latent_shape_tags(find_diffusers_folder(output_dir, VAE)))
    tags.update({k: str(v) for k, v in (extra_tags or {}).items()})
    with tempfile.TemporaryDirectory(prefix="ldmflow-model-") as staging, _active_run(run_id), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")  # a signature is given
        artifacts, model_class, signature = package_artifacts(kind, output_dir, Path(staging), vae_source, tags)
        try:
            info = mlflow.pyfunc.log_model(
                name=stage, python_model=model_code(model_class, Path(staging)), artifacts=artifacts,
                signature=signature, code_paths=[package_copy(Path(staging))], pip_requirements=pip_requirements(),
                tags=tags, step=last_step if step is None else step)
            _link_metrics_at(client, run_id, info.model_id, last_step if step is None else step)
            version = _register(client, name, info.model_id, run_id, tags) if register else ""
        except (mlflow.exceptions.MlflowException, OSError) as error:  # server down, disk full, someone's model...
            reason = access_problem(error, f"add versions to registered model {name!r}", "ask its owner (or the "
                                    "server's admin) for EDIT on it, or pass another --registered_model_name")
            raise LdmflowError(f"Could not log or register the {stage} model in MLflow: "
                               f"{reason or cause_line(error)}. The trained model is safe in {output_dir}."
                               ) from None
    if not register:
        tag_run(run_id, tags, client)
        logger.info("Logged the %s model %s (run %s).", stage, info.model_id, run_id)
        return RegisteredModel(name, "", info.model_id, f"models:/{info.model_id}", run_id)
    registered = RegisteredModel(name, str(version), info.model_id, f"models:/{name}/{version}", run_id)
    _tag(client, registered, tags, alias, vae_source)
    logger.info("Registered %s (run %s, logged model %s)%s.", registered.model_uri, run_id, info.model_id,
                f" with alias @{alias}" if alias else "")
    return registered


def register_logged_model(model_id: str, registered_model_name: str | None = None,
                          alias: str | None = None) -> RegisteredModel:
    """Register a model that `log_and_register(register=False)` logged (a sweep's best trial), with the lineage
    tags it was logged with, as `log_and_register` would have."""
    from mlflow import MlflowClient

    from ldmflow.tracking.store import use_tracking_store

    client = MlflowClient(use_tracking_store())
    logged = client.get_logged_model(model_id)
    tags = {key: value for key, value in logged.tags.items() if not key.startswith("mlflow.")}
    name = registered_model_name or kind_named(tags[STAGE_VERSION_TAG]).registered_name
    version = _register(client, name, model_id, logged.source_run_id, tags)
    registered = RegisteredModel(name, str(version), model_id, f"models:/{name}/{version}", logged.source_run_id)
    _tag(client, registered, tags, alias, _recorded_vae_source(client, tags))
    logger.info("Registered %s (run %s, logged model %s)%s.", registered.model_uri, registered.run_id, model_id,
                f" with alias @{alias}" if alias else "")
    return registered


def _recorded_vae_source(client, tags: dict) -> ModelSource | None:
    """The VAE of a logged latent DDPM as its lineage tags recorded it (enough to link the versions)."""
    if VAE_URI_TAG not in tags:
        return None
    name, version = tags.get(VAE_MODEL_NAME_TAG), tags.get(VAE_MODEL_VERSION_TAG)
    model_id = None
    if name and version:
        with contextlib.suppress(Exception):  # the VAE version may live in another store
            model_id = client.get_model_version(name, version).model_id
    return ModelSource(Path(), tags[VAE_URI_TAG], name, version, tags.get(VAE_RUN_TAG), model_id, bool(version))


def _link_metrics_at(client, run_id: str, model_id: str, step: int) -> None:
    """Link each run metric's last value at or before `step` to the logged model: `log_model` links only the
    values logged at exactly `step`, which misses the training loss of a best checkpoint between log points."""
    from mlflow.entities import Metric

    linked = {metric.key for metric in client.get_logged_model(model_id).metrics or []}
    rows = []
    for key in client.get_run(run_id).data.metrics:
        if key in linked or key.startswith("system/"):
            continue
        earlier = [m for m in client.get_metric_history(run_id, key) if m.step <= step and m.model_id is None]
        if earlier:
            last = max(earlier, key=lambda m: (m.step, m.timestamp))
            rows.append(Metric(key=key, value=last.value, timestamp=last.timestamp, step=last.step, run_id=run_id,
                               model_id=model_id))
    if rows:
        client.log_batch(run_id=run_id, metrics=rows)


def _register(client, name: str, model_id: str, run_id: str, tags: dict[str, str]) -> str:
    """A new version of `name` (created when missing) from the logged model, as `log_model(registered_model_name=)`
    does, but without its two lines printed on stderr per model (ldmflow logs one line of its own)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    return client.create_model_version(name, f"models:/{model_id}", run_id=run_id, tags=tags,
                                       model_id=model_id).version


def registered_probe_uri(dataset_digest: str, condition_spec: str | None) -> str | None:
    """models:/ldmflow-probe/<newest version trained on this manifest for these conditions (None: any)>, or None."""
    from mlflow import MlflowClient

    from ldmflow.tracking.store import filter_value, use_tracking_store

    name = PROBE.registered_name
    query = f"name = {filter_value(name)} AND tags.{DATASET_DIGEST_TAG} = {filter_value(dataset_digest)}"
    if condition_spec is not None:
        query += f" AND tags.{CONDITION_SPEC_TAG} = {filter_value(condition_spec)}"
    versions = MlflowClient(use_tracking_store()).search_model_versions(filter_string=query, max_results=1000)
    newest = max(versions, key=lambda v: int(v.version), default=None)
    return None if newest is None else f"models:/{name}/{newest.version}"


def latent_shape_tags(vae_dir: Path) -> dict[str, str]:
    """`latent_channels` and `downsample_factor` of a VAE folder: the first-stage trade-off, searchable."""
    config = json.loads((Path(vae_dir) / "config.json").read_text())
    return {LATENT_CHANNELS_TAG: str(config["latent_channels"]),
            DOWNSAMPLE_FACTOR_TAG: str(2 ** (len(config["block_out_channels"]) - 1))}


def vae_lineage_tags(vae_source: ModelSource) -> dict[str, str]:
    """The VAE a latent DDPM was trained on (and its latent shape); a plain folder VAE only has `vae_uri`."""
    values = {VAE_URI_TAG: vae_source.uri, VAE_MODEL_NAME_TAG: vae_source.model_name,
              VAE_MODEL_VERSION_TAG: vae_source.model_version, VAE_RUN_TAG: vae_source.run_id}
    tags = {key: str(value) for key, value in values.items() if value}
    with contextlib.suppress(LdmflowError, OSError):  # a VAE not at hand locally has no shape tags
        shape = latent_shape_tags(find_diffusers_folder(vae_source.local_dir, VAE))
        tags.update({f"{VAE_SHAPE_TAG_PREFIX}{key}": value for key, value in shape.items()})
    return tags


def _run_of(tracker_or_run_id) -> tuple[str, int]:
    """(run id, step to link the final metrics to the logged model); flushes a tracker's buffered metrics."""
    if isinstance(tracker_or_run_id, str):
        if not tracker_or_run_id:
            raise LdmflowError("log_and_register needs an MLflow run id (tracking is disabled?).")
        return tracker_or_run_id, 0
    run_id = getattr(tracker_or_run_id, "run_id", None)
    if not run_id:
        raise LdmflowError("log_and_register needs an MLflow run; this run is not tracked (--no_mlflow).")
    if not tracker_or_run_id.flush(timeout=120):
        logger.warning("Some metrics are not uploaded yet; the logged model may miss its final metrics.")
    return run_id, int(getattr(tracker_or_run_id, "last_step", 0))


@contextlib.contextmanager
def _active_run(run_id: str):
    """Make `run_id` the active run for `log_model` (resuming a finished run restores its status after)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    try:
        status = mlflow.MlflowClient().get_run(run_id).info.status
    except MlflowException:
        raise LdmflowError(f"Run {run_id!r} does not exist in the MLflow store.") from None
    mlflow.start_run(run_id=run_id, nested=active is not None)
    try:
        yield
    finally:
        mlflow.end_run(status if status != "RUNNING" else "FINISHED")


def _recorded_condition_spec(output_dir: Path) -> str:
    conditioning = output_dir / CONDITIONING_FILE
    if conditioning.is_file() and (spec := json.loads(conditioning.read_text()).get("condition_spec")):
        return str(spec)
    if (output_dir / VAE_SOURCE_FILE).is_file() and (spec := VaeRecord.read(output_dir).condition_spec):
        return str(spec)
    return "none"


def _omittable_conditions(output_dir: Path) -> str:
    """The conditions a partial request may leave out (trained with --cond_dropout_per_condition), so the registry
    finds the versions that sample "temperature only"; "none" for a model that needs every condition."""
    from ldmflow.models.conditioning import ConditionEncoder

    conditioning = output_dir / CONDITIONING_FILE
    omittable = ConditionEncoder.load(conditioning).omittable if conditioning.is_file() else ()
    return ",".join(omittable) or "none"


def _tag(client, registered: RegisteredModel, tags: dict, alias: str | None, vae_source: ModelSource | None) -> None:
    """Tags on the version and the run, the VAE as a model input of the run, and the alias."""
    from mlflow.entities import LoggedModelInput

    from ldmflow.tracking.store import tag_run

    for key, value in tags.items():
        client.set_model_version_tag(registered.name, registered.version, key, value)
    tag_run(registered.run_id, tags, client)
    if vae_source is not None and vae_source.model_id:
        client.log_inputs(registered.run_id, models=[LoggedModelInput(vae_source.model_id)])
    if alias:
        client.set_registered_model_alias(registered.name, alias, registered.version)
    _describe(client, registered, tags, vae_source)


def _describe(client, registered: RegisteredModel, tags: dict, vae_source: ModelSource | None) -> None:
    """Markdown on the version (links to its run, dataset and VAE version), a description of the registered
    model, and on the VAE version the latent DDPM trained on it: lineage in both directions, without scrolling
    through tag boxes."""
    stage = tags[STAGE_VERSION_TAG]
    run_link = f"[{registered.run_id[:8]}](#/experiments/{_experiment_of(client, registered.run_id)}/runs/" \
               f"{registered.run_id})"
    lines = [f"**{stage}** trained in run {run_link} on dataset `{tags[DATASET_DIGEST_TAG][:12]}`."]
    if tags.get(CONDITION_SPEC_TAG):
        lines.append(f"Conditions: `{tags[CONDITION_SPEC_TAG]}`.")
    if tags.get(OMITTABLE_CONDITIONS_TAG, "none") != "none":
        lines.append(f"A request may leave out: {tags[OMITTABLE_CONDITIONS_TAG].replace(',', ', ')}.")
    if vae_source is not None and vae_source.model_name and vae_source.model_version:
        lines.append(f"VAE: [{vae_source.model_name} v{vae_source.model_version}]"
                     f"(#/models/{vae_source.model_name}/versions/{vae_source.model_version}).")
        with contextlib.suppress(Exception):  # the VAE version may live in another store
            _add_downstream(client, vae_source, f"{registered.name}/{registered.version}")
    elif vae_source is not None:
        lines.append(f"VAE: `{vae_source.uri}` (a folder, not a registered version).")
    lines.append(f"Evaluate it with `ldmflow evaluate --model_uri {registered.model_uri}`; its evaluations are "
                 f"listed by `ldmflow lineage {registered.model_uri}`.")
    client.update_model_version(registered.name, registered.version, description="\n\n".join(lines))
    model = client.get_registered_model(registered.name)
    if not model.description:
        client.update_registered_model(registered.name, description=kind_named(stage).description)


def _add_downstream(client, vae_source: ModelSource, downstream: str) -> None:
    version = client.get_model_version(vae_source.model_name, vae_source.model_version)
    known = [item for item in version.tags.get(DOWNSTREAM_TAG, "").split(",") if item]
    client.set_model_version_tag(vae_source.model_name, vae_source.model_version, DOWNSTREAM_TAG,
                                 ",".join(known + [downstream]))
    note = f"Latent DDPM trained on this VAE: [{downstream}](#/models/{downstream.replace('/', '/versions/')})."
    client.update_model_version(vae_source.model_name, vae_source.model_version,
                                description=f"{version.description or ''}\n\n{note}".strip())


def add_evaluation_note(client, model_name: str, version: str, run_id: str, metrics: dict[str, float]) -> None:
    """One line per evaluation in the version's description: a link to the evaluate run and its headline
    scores (`metrics` keyed `eval/<name>`), so the registry page shows how good a version is."""
    scores = {key.removeprefix(EVALUATION): value for key, value in metrics.items() if key.count("/") <= 1}
    names = [name for name in HEADLINE_SCORES if name in scores] + \
        sorted(name for name in scores if name.endswith(CONDITION_ERROR_SUFFIXES))
    summary = ", ".join(f"{name} {scores[name]:.4g}" for name in names)
    note = (f"Evaluated in run [{run_id[:8]}](#/experiments/{_experiment_of(client, run_id)}/runs/{run_id}): "
            f"{summary or 'see the run'}.")
    described = client.get_model_version(model_name, version).description or ""
    client.update_model_version(model_name, version, description=f"{described}\n\n{note}".strip())


def _experiment_of(client, run_id: str) -> str:
    return client.get_run(run_id).info.experiment_id
