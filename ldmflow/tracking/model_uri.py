"""Turn what a user passes as a model (a folder or an MLflow URI) into a local folder plus where it came from;
what that folder holds is models/saved_model.py's business.

Accepted forms: a local folder, `runs:/<run_id>/<path>`, `models:/<name>/<version>` (or `/latest`),
`models:/<name>@<alias>` and `models:/<model_id>` (an MLflow 3 logged model, `m-...`). Every bad form gets one
message naming the offending part and, where short, what exists instead.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ldmflow.errors import MAX_LISTED, LdmflowError, cause_line, listing
from ldmflow.files import disk_problem, publish_folder
from ldmflow.models.saved_model import VaeRecord, recorded_vae_dir
from ldmflow.tracking.store import equals, filter_value

ACCEPTED_FORMS = ("a local folder, runs:/<run_id>/<path>, models:/<name>/<version>, models:/<name>@<alias> "
                  "or models:/<model_id>")
_NOT_FOUND_CODES = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local folder, with its MLflow identity where known (None otherwise)."""

    local_dir: Path
    uri: str
    model_name: str | None = None
    model_version: str | None = None
    run_id: str | None = None
    model_id: str | None = None
    is_registered: bool = False


def resolve_model_source(uri_or_path, dst_dir: str | Path | None = None) -> ModelSource:
    """Resolve and (for MLflow URIs) download a model; `dst_dir` defaults to a fresh temporary folder."""
    text = str(uri_or_path).strip()
    if not text:
        raise LdmflowError(f"Empty model path; expected {ACCEPTED_FORMS}.")
    _refuse_control_characters(text)
    if text.startswith("models:"):
        return _resolve_models_uri(text, dst_dir)
    if text.startswith("runs:"):
        return _resolve_runs_uri(text, dst_dir)
    scheme = urlparse(text).scheme
    if scheme == "file":
        text = urlparse(text).path
    elif len(scheme) > 1:
        raise LdmflowError(f"Unsupported model URI {text!r}; expected {ACCEPTED_FORMS}.")
    path = Path(text).expanduser()
    try:
        if not path.exists():
            raise LdmflowError(f"Model folder {text} does not exist (expected {ACCEPTED_FORMS}).")
        if not path.is_dir():
            raise LdmflowError(f"Model path {text} is a file; expected a model folder.")
        return ModelSource(local_dir=path.resolve(), uri=str(uri_or_path))
    except OSError as error:  # a name the OS refuses (too long, ...)
        raise LdmflowError(f"Model path {text[:200]!r} is not usable here: {error.strerror or error}.") from None


def _refuse_control_characters(text: str) -> None:
    """A NUL or a line break is in no path or registered name; refused before the OS or MLflow sees it."""
    if any(ord(char) < 32 or ord(char) == 127 for char in text):
        raise LdmflowError(f"Model URI {text[:200]!r} has a control character (a NUL, a line break, ...); "
                           f"expected {ACCEPTED_FORMS}.")


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/...` -> (name or model id, version or None, alias or None); a model id has neither."""
    _refuse_control_characters(uri)
    if not uri.startswith("models:/") or uri.startswith("models://"):
        raise LdmflowError(f"Malformed model URI {uri!r}: expected models:/<name>/<version>, "
                           "models:/<name>@<alias> or models:/<model_id>.")
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, _, alias = rest.rpartition("@")
        if not name or not alias or "/" in alias:
            raise LdmflowError(f"Malformed model URI {uri!r}: expected models:/<name>@<alias>.")
        return name, None, alias
    if "/" in rest:
        name, _, version = rest.rpartition("/")
        if not name or not (version.isdigit() or version == "latest"):
            raise LdmflowError(f"Malformed model URI {uri!r}: the version must be a number or 'latest' "
                               "(models:/<name>/<version>).")
        return name, version, None
    if rest.startswith("m-"):
        return rest, None, None
    raise LdmflowError(f"Malformed model URI {uri!r}: give a version (models:/{rest or '<name>'}/1), an alias "
                       f"(models:/{rest or '<name>'}@champion) or a logged model id (models:/m-...).")


def registered_version(client, name: str, version: str | None, alias: str | None):
    """The ModelVersion for a name and version/alias/'latest', or an LdmflowError listing what exists."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as error:
        _raise_unless_missing(error)
        names = [m.name for m in client.search_registered_models(max_results=MAX_LISTED + 1)]
        known = f"registered models: {listing(names)}" if names else "no models are registered there"
        raise LdmflowError(f"Registered model {name!r} does not exist in {client.tracking_uri} ({known}).") from None
    if alias is not None:
        try:
            return client.get_model_version_by_alias(name, alias)
        except MlflowException as error:
            _raise_unless_missing(error)
            aliases = ", ".join(f"@{a} -> v{v}" for a, v in sorted((model.aliases or {}).items())) or "none"
            raise LdmflowError(f"Model {name!r} has no alias {alias!r} (aliases: {aliases}).") from None
    versions = _version_numbers(client, name)
    if version == "latest":
        if not versions:
            raise LdmflowError(f"Model {name!r} has no versions yet.")
        version = str(versions[-1])
    if int(version) not in versions:
        raise LdmflowError(f"Model {name!r} has no version {version} "
                           f"(versions: {listing([str(v) for v in versions]) or 'none'}).")
    return client.get_model_version(name, version)


def _version_numbers(client, name: str) -> list[int]:
    versions, token = [], None
    while True:
        page = client.search_model_versions(filter_string=equals("name", name), max_results=1000,
                                            page_token=token)
        versions += [int(v.version) for v in page if v.name == name]
        token = page.token
        if not token:
            return sorted(versions)


def _resolve_models_uri(uri: str, dst_dir) -> ModelSource:
    from mlflow import MlflowClient

    from ldmflow.tracking.store import reachable_store

    name, version, alias = parse_models_uri(uri)
    client = MlflowClient(reachable_store())
    if version is None and alias is None:
        return _resolve_model_id(client, uri, name, dst_dir)
    found = registered_version(client, name, version, alias)
    local = _download(f"models:/{name}/{found.version}", dst_dir)
    return ModelSource(local_dir=local, uri=uri, model_name=name, model_version=str(found.version),
                       run_id=found.run_id or None, model_id=version_model_id(found), is_registered=True)


def _resolve_model_id(client, uri: str, model_id: str, dst_dir) -> ModelSource:
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_logged_model(model_id)
    except MlflowException as error:
        _raise_unless_missing(error)
        raise LdmflowError(f"Logged model {model_id!r} does not exist (from {uri!r}).") from None
    run_id = model.source_run_id or None
    found = _registered_version_of(client, model_id, run_id)
    local = _download(f"models:/{model_id}", dst_dir)
    return ModelSource(local_dir=local, uri=uri, model_name=found.name if found else None,
                       model_version=str(found.version) if found else None, run_id=run_id, model_id=model_id,
                       is_registered=found is not None)


def _registered_version_of(client, model_id: str | None, run_id: str | None):
    """A registered version made from this logged model, found through its run (None if never registered)."""
    if not model_id or not run_id:
        return None
    for version in client.search_model_versions(filter_string=f"run_id = {filter_value(run_id)}"):
        if version_model_id(version) == model_id:
            return version
    return None


def version_model_id(version) -> str | None:
    """The logged model behind a registered version (SQLite stores only its source, models:/<model_id>)."""
    model_id = getattr(version, "model_id", None)
    if model_id:
        return model_id
    source = getattr(version, "source", "") or ""
    match = re.match(r"^models:/(m-[0-9a-f]+)/?$", source)
    return match.group(1) if match else None


def _resolve_runs_uri(uri: str, dst_dir) -> ModelSource:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from ldmflow.tracking.store import reachable_store

    run_id, _, path = uri[len("runs:"):].lstrip("/").partition("/")
    if not uri.startswith("runs:/") or not run_id or not path.strip("/"):
        raise LdmflowError(f"Malformed run URI {uri!r}: expected runs:/<run_id>/<path>, e.g. runs:/<run_id>/model.")
    client = MlflowClient(reachable_store())
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        _raise_unless_missing(error)
        raise LdmflowError(f"Run {run_id!r} does not exist (from {uri!r}).") from None
    top = path.strip("/").split("/")[0]
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id], max_results=100,
                                         filter_string=f"source_run_id = {filter_value(run_id)}")
    model_id = next((m.model_id for m in logged if m.name == top), None)
    try:
        local = _download(uri, dst_dir)
    except LdmflowError:
        names = sorted({a.path for a in client.list_artifacts(run_id)} | {m.name for m in logged})
        raise LdmflowError(f"Run {run_id} has no artifact or model {path!r} "
                           f"(it has: {listing(names) or 'nothing'}).") from None
    found = _registered_version_of(client, model_id, run_id)
    return ModelSource(local_dir=local, uri=uri, model_name=found.name if found else None,
                       model_version=str(found.version) if found else None, run_id=run_id, model_id=model_id,
                       is_registered=found is not None)


def _download(uri: str, dst_dir) -> Path:
    """Download into a temporary sibling of `dst_dir`, renamed to it once complete: a failed download (a full
    disk, a server gone) leaves nothing behind, and its cause is kept in the one line."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    if dst_dir is None:
        dst_dir = Path(tempfile.mkdtemp(prefix="ldmflow-download-"))
    dst_dir = Path(dst_dir).absolute()  # MLflow returns absolute paths
    try:
        dst_dir.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{dst_dir.name}.", suffix=".tmp", dir=dst_dir.parent))
    except OSError as error:
        raise LdmflowError(f"Could not download {uri} into {dst_dir}: {disk_problem(error, dst_dir.parent)}.") from None
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(temporary)))
        publish_folder(temporary, dst_dir)
    except (MlflowException, OSError) as error:
        cause = download_cause(error, temporary)  # before the cleanup frees the space a full disk lacked
        shutil.rmtree(temporary, ignore_errors=True)
        raise LdmflowError(f"Could not download {uri} into {dst_dir}: {cause.rstrip('.')}.") from None
    return dst_dir / local.relative_to(temporary)


def download_cause(error: BaseException, folder: Path) -> str:
    """Why a download failed, in one line: a full disk named as such (MLflow's message may not say it), else
    `errors.cause_line`."""
    problem = disk_problem(error, folder)
    return problem if problem.startswith("the disk is full") else cause_line(error)


def fetch_model(uri: str) -> Path:
    """The local folder of a model URI (downloaded into a fresh temporary folder): what `models/saved_model.py`
    calls to fetch a VAE again that a latent DDPM's record names but that is gone from its path."""
    return resolve_model_source(uri).local_dir


def vae_source_from_file(folder) -> ModelSource:
    """The VAE a latent-ddpm output folder records in vae_source.json: its local folder if still there, else
    its URI downloaded again; with the registry identity that was recorded."""
    local = recorded_vae_dir(folder, fetch_model)
    record = VaeRecord.read(folder)
    version = record.vae_model_version
    return ModelSource(local_dir=local, uri=record.vae_uri or str(local), model_name=record.vae_model_name or None,
                       model_version=str(version) if version else None, run_id=record.vae_run_id or None,
                       model_id=record.vae_model_id or None, is_registered=bool(record.vae_model_name))


def _raise_unless_missing(error: Exception) -> None:
    """A lookup error that is not 'no such thing' (server down, auth...) must not read as 'does not exist'."""
    if getattr(error, "error_code", None) not in _NOT_FOUND_CODES:
        raise LdmflowError(f"MLflow request failed: {str(error).splitlines()[0][:300]}") from None
