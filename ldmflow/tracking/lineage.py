"""Lineage of registered ldmflow models (dataset -> VAE -> latent DDPM -> sample runs) and a model listing.

Everything is found with MLflow searches on tags (`filter_string`), never by scanning all runs in Python.
The sample and evaluate commands tag their runs through `record_sample_source(tracker, source)` so they show up
here.
"""

from __future__ import annotations

import logging

from ldmflow.errors import LdmflowError
from ldmflow.evaluation.metric_names import KEY_METRICS
from ldmflow.models.kinds import KINDS, LATENT_DDPM, VAE
from ldmflow.tags import (CHECKPOINT_METRIC_TAG, CHECKPOINT_METRIC_VALUE_TAG, CHECKPOINT_STEP_TAG, CHECKPOINT_TAG,
                          CONDITION_SPEC_TAG, DATASET_DIGEST_TAG, SAMPLE_MODEL_ID_TAG, SAMPLE_MODEL_NAME_TAG,
                          SAMPLE_MODEL_RUN_TAG, SAMPLE_MODEL_URI_TAG, SAMPLE_MODEL_VERSION_TAG, STAGE_TAG,
                          STAGE_VERSION_TAG, VAE_MODEL_NAME_TAG, VAE_MODEL_VERSION_TAG, VAE_RUN_TAG, VAE_URI_TAG)
from ldmflow.tracking.store import equals, filter_value

logger = logging.getLogger(__name__)
SAMPLE_STAGE = "sample"
EVALUATE_STAGE = "evaluate"
_PAGE = 1000


def sample_run_tags(source) -> dict[str, str]:
    """Tags a sample run sets (a ModelSource of the model it samples from), so `lineage` finds it."""
    values = {SAMPLE_MODEL_URI_TAG: source.uri, SAMPLE_MODEL_NAME_TAG: source.model_name,
              SAMPLE_MODEL_VERSION_TAG: source.model_version, SAMPLE_MODEL_ID_TAG: source.model_id,
              SAMPLE_MODEL_RUN_TAG: source.run_id}
    return {key: str(value) for key, value in values.items() if value}


def record_sample_source(tracker, source, stage: str = SAMPLE_STAGE) -> None:
    """Tag a sample (or evaluate) run with the model it used, and log that model as the run's input (lineage)."""
    tracker.set_tags({STAGE_TAG: stage, **sample_run_tags(source)})
    if source.model_id and getattr(tracker, "run_id", None):
        import mlflow
        from mlflow.entities import LoggedModelInput

        try:
            mlflow.log_input(model=LoggedModelInput(source.model_id))
        except mlflow.exceptions.MlflowException as error:
            logger.warning("Could not record model %s as the run's input: %s", source.model_id, error)


def lineage(model_uri: str) -> dict:
    """Where a registered version comes from and what was made from it (see `format_lineage`)."""
    from mlflow import MlflowClient

    from ldmflow.tracking.model_uri import parse_models_uri, registered_version, version_model_id
    from ldmflow.tracking.store import use_tracking_store

    client = MlflowClient(use_tracking_store())
    name, version, alias = parse_models_uri(model_uri)
    if version is None and alias is None:
        raise LdmflowError(f"{model_uri}: lineage needs a registered version (models:/<name>/<version> or @alias).")
    found = registered_version(client, name, version, alias)
    tags = dict(found.tags or {})
    stage = tags.get(STAGE_VERSION_TAG, "")
    me = {"name": found.name, "version": str(found.version), "run_id": found.run_id or ""}
    result = {"stage": stage, "dataset_digest": tags.get(DATASET_DIGEST_TAG, ""), "vae": None, "ddpm": None,
              "latent_ddpms": [], "samples": [],
              "evaluations": _sample_runs(client, found.name, str(found.version), version_model_id(found),
                                          EVALUATE_STAGE)}
    if stage == VAE.name:
        result["vae"] = {**me, "uri": f"models:/{found.name}/{found.version}"}
        for ddpm in _latent_ddpms_from_vae(client, found):
            ddpm["samples"] = _sample_runs(client, ddpm["name"], ddpm["version"], ddpm.pop("model_id"))
            result["latent_ddpms"].append(ddpm)
            result["samples"] += ddpm["samples"]
        return result
    result["ddpm"] = me
    result["samples"] = _sample_runs(client, found.name, str(found.version), version_model_id(found))
    if stage == LATENT_DDPM.name:
        result["vae"] = {"name": tags.get(VAE_MODEL_NAME_TAG, ""), "version": tags.get(VAE_MODEL_VERSION_TAG, ""),
                         "run_id": tags.get(VAE_RUN_TAG, ""), "uri": tags.get(VAE_URI_TAG, "")}
    return result


def _latent_ddpms_from_vae(client, vae_version) -> list[dict]:
    """Registered latent DDPM versions whose lineage tags point at this VAE version."""
    from ldmflow.tracking.model_uri import version_model_id

    if vae_version.run_id:
        query = f"tags.{VAE_RUN_TAG} = {filter_value(vae_version.run_id)}"
    else:
        query = (f"{equals(f'tags.{VAE_MODEL_NAME_TAG}', vae_version.name)} "
                 f"AND tags.{VAE_MODEL_VERSION_TAG} = {filter_value(vae_version.version)}")
    versions = _all_pages(lambda token: client.search_model_versions(filter_string=query, max_results=_PAGE,
                                                                     page_token=token))
    versions = [v for v in versions if vae_version.run_id or v.tags.get(VAE_MODEL_NAME_TAG) == vae_version.name]
    return [{"name": v.name, "version": str(v.version), "run_id": v.run_id or "",
             "model_id": version_model_id(v)} for v in sorted(versions, key=lambda v: (v.name, int(v.version)))]


def _sample_runs(client, name: str, version: str, model_id: str | None, stage: str = SAMPLE_STAGE) -> list[str]:
    """Ids of the sample (or evaluate) runs tagged with this version (by name+version, or its logged model id)."""
    queries = [f"{equals(f'tags.`{SAMPLE_MODEL_NAME_TAG}`', name)} "
               f"AND tags.`{SAMPLE_MODEL_VERSION_TAG}` = {filter_value(version)}"]
    if model_id:
        queries.append(f"tags.`{SAMPLE_MODEL_ID_TAG}` = {filter_value(model_id)}")
    run_ids: list[str] = []
    for query in queries:
        for run in _search_runs(client, f"{query} AND tags.`{STAGE_TAG}` = {filter_value(stage)}"):
            if run.info.run_id not in run_ids and run.data.tags.get(SAMPLE_MODEL_NAME_TAG, name) == name:
                run_ids.append(run.info.run_id)
    return run_ids


def _search_runs(client, filter_string: str) -> list:
    experiment_ids = [e.experiment_id for e in _all_pages(
        lambda token: client.search_experiments(max_results=_PAGE, page_token=token))]
    if not experiment_ids:
        return []
    return _all_pages(lambda token: client.search_runs(experiment_ids, filter_string=filter_string,
                                                       max_results=_PAGE, page_token=token))


def _all_pages(fetch) -> list:
    items, token = [], None
    while True:
        page = fetch(token)
        items += list(page)
        token = page.token
        if not token:
            return items


def _short(run_id: str | None) -> str:
    return (run_id or "?")[:8]


def format_lineage(d: dict) -> str:
    """`dataset <digest> -> ldmflow-vae v1 (run ab12cd34) -> ldmflow-latent-ddpm v1 (run ...) -> 2 sample runs`."""
    head = f"dataset {d.get('dataset_digest', '')[:12] or '?'}"
    vae = d.get("vae")
    if vae:
        if vae.get("name"):
            head += f" -> {vae['name']} v{vae['version']} (run {_short(vae.get('run_id'))})"
        else:
            head += f" -> vae {vae.get('uri') or '?'}"
    if d.get("stage") == VAE.name:
        if not d.get("latent_ddpms"):
            return head + " -> no latent DDPM trained from it yet"
        return "\n".join(f"{head} -> {m['name']} v{m['version']} (run {_short(m['run_id'])}) -> "
                         f"{_count(m['samples'])}" for m in d["latent_ddpms"])
    ddpm = d.get("ddpm") or {}
    return f"{head} -> {ddpm.get('name')} v{ddpm.get('version')} (run {_short(ddpm.get('run_id'))}) -> " \
           f"{_count(d.get('samples', []))}{_evaluations(d)}"


def _count(samples: list) -> str:
    return f"{len(samples)} sample run{'' if len(samples) == 1 else 's'}"


def _evaluations(d: dict) -> str:
    count = len(d.get("evaluations") or [])
    return f", {count} evaluation{'' if count == 1 else 's'}" if count else ""


def list_models() -> list[dict]:
    """Every registered ldmflow version (found by its `stage` tag) with lineage tags and key run metrics."""
    from mlflow import MlflowClient

    from ldmflow.tracking.store import use_tracking_store

    client = MlflowClient(use_tracking_store())
    versions = []
    stages = [kind.name for kind in KINDS]
    for stage in stages:
        versions += _all_pages(lambda token, stage=stage: client.search_model_versions(
            filter_string=f"tags.{STAGE_VERSION_TAG} = {filter_value(stage)}", max_results=_PAGE, page_token=token))
    from ldmflow.tracking.model_uri import version_model_id

    runs = _runs_by_id(client, sorted({v.run_id for v in versions if v.run_id}))
    aliases = _aliases_by_version(client, sorted({v.name for v in versions}))
    rows = []
    for v in sorted(versions, key=lambda v: (stages.index(v.tags[STAGE_VERSION_TAG]), v.name, int(v.version))):
        run = runs.get(v.run_id)
        metrics = _registered_weights_metrics(client, version_model_id(v)) or (run.data.metrics if run else {})
        rows.append({"name": v.name, "version": str(v.version), "stage": v.tags[STAGE_VERSION_TAG],
                     "aliases": aliases.get((v.name, str(v.version)), []), "run_id": v.run_id or "",
                     "dataset_digest": v.tags.get(DATASET_DIGEST_TAG, ""),
                     "vae": _vae_label(v.tags), "condition_spec": v.tags.get(CONDITION_SPEC_TAG, ""),
                     "checkpoint": _checkpoint_label(v.tags),
                     "eval_fid": _float_tag(v.tags, "eval/fid", "eval/rfid"),
                     **{key: metrics.get(key) for key in KEY_METRICS}})
    return rows


def version_metrics(uri: str) -> dict[str, float]:
    """The metrics of a registered version's weights (`models:/<name>/<version>`), e.g. the VAE's val/psnr
    that the pipeline reports; the run's last values when the version has no linked metrics."""
    from mlflow import MlflowClient

    from ldmflow.tracking.model_uri import parse_models_uri, registered_version, version_model_id

    client = MlflowClient()
    name, version, alias = parse_models_uri(uri)
    found = registered_version(client, name, version, alias)
    return _registered_weights_metrics(client, version_model_id(found)) or dict(client.get_run(found.run_id).data.metrics)


def _registered_weights_metrics(client, model_id: str | None) -> dict[str, float]:
    """The metrics linked to a version's logged model: the run's as they were at the registered weights' step
    (its last values may come from later, worse weights)."""
    from mlflow.exceptions import MlflowException

    if not model_id:
        return {}
    try:
        linked = client.get_logged_model(model_id).metrics or []
    except MlflowException:
        return {}
    return {m.key: m.value for m in sorted(linked, key=lambda m: (m.step, m.timestamp))}


def _aliases_by_version(client, names: list[str]) -> dict[tuple[str, str], list[str]]:
    """(name, version) -> aliases; search results do not carry aliases, registered models do."""
    aliases: dict[tuple[str, str], list[str]] = {}
    for name in names:
        for alias, version in sorted((client.get_registered_model(name).aliases or {}).items()):
            aliases.setdefault((name, str(version)), []).append(alias)
    return aliases


def _runs_by_id(client, run_ids: list[str]) -> dict:
    runs = {}
    for start in range(0, len(run_ids), 100):
        chunk = ", ".join(f"'{run_id}'" for run_id in run_ids[start:start + 100])
        for run in _search_runs(client, f"attributes.run_id IN ({chunk})"):
            runs[run.info.run_id] = run
    return runs


def _float_tag(tags: dict, *keys: str) -> float | None:
    """The first of `keys` that the version carries (evaluate writes its scores as version tags)."""
    return next((float(tags[key]) for key in keys if key in tags), None)


def _checkpoint_label(tags: dict) -> str:
    """`best@120 (val/psnr=23.1)` or `last@400`: which weights a version holds (registry tags)."""
    if not tags.get(CHECKPOINT_TAG):
        return ""
    label = f"{tags[CHECKPOINT_TAG]}@{tags.get(CHECKPOINT_STEP_TAG, '?')}"
    if tags.get(CHECKPOINT_METRIC_TAG):
        label += f" ({tags[CHECKPOINT_METRIC_TAG]}={float(tags[CHECKPOINT_METRIC_VALUE_TAG]):.4g})"
    return label


def _vae_label(tags: dict) -> str:
    if tags.get(VAE_MODEL_NAME_TAG):
        return f"{tags[VAE_MODEL_NAME_TAG]} v{tags.get(VAE_MODEL_VERSION_TAG, '?')}"
    return tags.get(VAE_URI_TAG, "")


def format_models(rows: list[dict], store: str = "this MLflow store") -> str:
    """A plain-text table of `list_models()` rows."""
    if not rows:
        return f"No ldmflow models are registered in {store}."
    header = ("MODEL", "STAGE", "ALIASES", "RUN", "DATASET", "VAE", "WEIGHTS", "LOSS", "VAL_PSNR", "VAL_DENOISE",
              "EVAL_FID", "SCALE")
    table = [header] + [(
        f"{r['name']} v{r['version']}", r["stage"], ",".join(f"@{a}" for a in r["aliases"]), _short(r["run_id"]),
        r["dataset_digest"][:12], r["vae"], r["checkpoint"], _number(r.get("loss")), _number(r.get("val/psnr")),
        _number(_first_known(r.get("val/denoise_loss_ema"), r.get("val/denoise_loss"))), _number(r.get("eval_fid")),
        _number(r.get("latent_scaling_factor"))) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table)


def _first_known(*values):
    return next((value for value in values if value is not None), None)


def _number(value) -> str:
    return "" if value is None else f"{value:.4g}"
