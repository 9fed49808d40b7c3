"""Which MLflow store ldmflow talks to: `MLFLOW_TRACKING_URI`, else `./mlflow.db` (SQLite) with `./mlartifacts`.

The plain file store (`./mlruns`, `file:` URIs) is refused: MLflow 3.13+ no longer supports it for new
features (logged models, datasets, the registry), so a run there would fail half-way through.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from ldmflow.errors import LdmflowError, require_modules
from ldmflow.models.kinds import LATENT_DDPM
from ldmflow.tags import EXPERIMENT_KIND_TAG, EXPERIMENT_NOTE_TAG, STAGE_TAG

logger = logging.getLogger(__name__)

RETRY_SECONDS_ENV = "LDMFLOW_TRACKING_RETRY_SECONDS"  # how long a run waits for a server that went away
DEFAULT_RETRY_SECONDS = 60.0
DEFAULT_DB_NAME = "mlflow.db"
ARTIFACTS_DIR_NAME = "mlartifacts"
_SQLITE_PREFIX = "sqlite:///"


def resolve_tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, or `sqlite:///<cwd>/mlflow.db`; SQLite paths are made absolute."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        return _checked_sqlite_file(_SQLITE_PREFIX + str(Path.cwd() / DEFAULT_DB_NAME))
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("", "file") or len(scheme) == 1:  # a bare path, file:..., or a Windows drive letter
        raise LdmflowError(
            f"MLFLOW_TRACKING_URI={uri!r} is a plain file store, which MLflow 3.13+ refuses. Use a SQLite "
            f"database instead (e.g. MLFLOW_TRACKING_URI=sqlite:///mlflow.db, the default when it is unset) "
            "or a tracking server (http://host:5000)."
        )
    if scheme == "sqlite":
        return _checked_sqlite_file(_absolute_sqlite_uri(uri))
    return uri


_SQLITE_HEADER = b"SQLite format 3\0"


def _checked_sqlite_file(uri: str) -> str:
    """The URI, once its database file is absent (MLflow creates it), empty or an SQLite database: anything else
    is named for what it is, not left to end as an unexpected error of SQLAlchemy's."""
    path = sqlite_db_path(uri)
    if path.is_dir():
        raise LdmflowError(f"The tracking store {path} is a folder, not an SQLite database file: set "
                           "MLFLOW_TRACKING_URI to the database (sqlite:///path/to/mlflow.db).")
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_SQLITE_HEADER))
    except FileNotFoundError:
        return uri
    except OSError as error:
        raise LdmflowError(f"Cannot read the tracking store {path}: {error.strerror or error}.") from None
    if head and head != _SQLITE_HEADER:
        what = "text" if all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head) else "binary data"
        raise LdmflowError(f"The tracking store {path} is not an SQLite database: it holds {what} starting "
                           f"{head[:12]!r}. Move it aside, or set MLFLOW_TRACKING_URI to your runs' database.")
    return uri


def _absolute_sqlite_uri(uri: str) -> str:
    """`sqlite:///rel.db` -> `sqlite:////abs/rel.db`, so runs started elsewhere share the same database."""
    if not uri.startswith(_SQLITE_PREFIX):
        raise LdmflowError(f"MLFLOW_TRACKING_URI={uri!r}: expected sqlite:///path/to/mlflow.db.")
    path, sep, query = uri[len(_SQLITE_PREFIX):].partition("?")
    db_path = Path(path).expanduser().absolute()
    if not db_path.parent.is_dir():
        raise LdmflowError(f"MLFLOW_TRACKING_URI={uri!r}: folder {db_path.parent} does not exist.")
    return _SQLITE_PREFIX + str(db_path) + sep + query


def sqlite_db_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, None for any other store."""
    if not uri.startswith(_SQLITE_PREFIX):
        return None
    return Path(uri[len(_SQLITE_PREFIX):].partition("?")[0])


def use_tracking_store() -> str:
    """Point MLflow (tracking and registry) at the resolved store and return its URI."""
    import mlflow

    uri = resolve_tracking_uri()
    check_database_driver(uri)
    mlflow.set_tracking_uri(uri)
    bound_http_retries()
    return uri


DATABASE_DRIVERS = {  # URI scheme -> (the module SQLAlchemy loads for it, how to install it)
    "postgresql": ("psycopg2", "pip install 'ldmflow[server]'"),
    "postgresql+psycopg2": ("psycopg2", "pip install 'ldmflow[server]'"),
    "mysql": ("MySQLdb", "pip install mysqlclient"),
    "mysql+pymysql": ("pymysql", "pip install pymysql"),
    "mssql": ("pyodbc", "pip install pyodbc"),
    "mssql+pyodbc": ("pyodbc", "pip install pyodbc"),
}


def check_database_driver(uri: str) -> None:
    """A database tracking URI whose driver is not installed: one line naming it, before MLflow is called."""
    scheme = uri.partition("://")[0].lower()
    if scheme in DATABASE_DRIVERS:
        module, install = DATABASE_DRIVERS[scheme]
        require_modules((module,), f"The tracking URI {scheme}://...", install)


def retry_seconds() -> float:
    """LDMFLOW_TRACKING_RETRY_SECONDS (default 60): the most a run waits for a tracking server that went away."""
    text = os.environ.get(RETRY_SECONDS_ENV, "").strip()
    try:
        seconds = float(text) if text else DEFAULT_RETRY_SECONDS
    except ValueError:
        raise LdmflowError(f"{RETRY_SECONDS_ENV}={text!r}: expected a number of seconds.") from None
    if not seconds >= 0:
        raise LdmflowError(f"{RETRY_SECONDS_ENV}={text!r}: expected a number of seconds >= 0.")
    return seconds


def bound_http_retries() -> None:
    """Fit MLflow's per-request HTTP retries (7, about 4 minutes, by default) into a quarter of retry_seconds(),
    unless the user set MLFLOW_HTTP_REQUEST_MAX_RETRIES: a server gone for good then costs about that, not
    minutes per request. Backoffs are 0, 2f, 4f, ... seconds for backoff factor f."""
    if "MLFLOW_HTTP_REQUEST_MAX_RETRIES" in os.environ:
        return
    factor = float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2") or 2)
    budget, retries, waited = retry_seconds() / 4, 0, 0.0
    while retries < 7:
        pause = factor * 2 ** retries if retries else 0.0  # the wait before retry number retries + 1
        if waited + pause > budget:
            break
        waited, retries = waited + pause, retries + 1
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(retries)


def stop_waiting_for_server() -> None:
    """After giving up on the server: the run's remaining bookkeeping calls fail at once (their values go to
    the pending file), instead of each retrying."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"


def reachable_store() -> str:
    """The store to read from: use_tracking_store(), failing within seconds (not minutes of retries) when its
    server is down, and without creating an empty SQLite database where none is."""
    uri = resolve_tracking_uri()
    database = sqlite_db_path(uri)
    if database is not None and not database.is_file():
        unset = not os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        raise LdmflowError(
            f"No MLflow store at {database}" + (" (MLFLOW_TRACKING_URI is unset, so ldmflow looks for ./mlflow.db "
                                                "in the current folder)" if unset else "") +
            ". Run from the folder that holds your runs' mlflow.db, or set MLFLOW_TRACKING_URI.")
    uri = use_tracking_store()
    check_server_reachable(uri)
    return uri


ASK_FOR_EDIT = ("ask the experiment's owner (or the server's admin) for EDIT permission, or use another "
                "--experiment_name")


def access_problem(error: Exception, what: str, remedy: str = ASK_FOR_EDIT) -> str | None:
    """One line for a server that refused these credentials (401) or this user (403); None for other errors."""
    code, text = getattr(error, "error_code", ""), str(error)
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if code == "UNAUTHENTICATED" or "error code 401" in text:
        if not user:
            return ("the server requires a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                    "(`ldmflow server` prints them)")
        return f"the server refused the login of {user!r}: check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    if code == "PERMISSION_DENIED" or "error code 403" in text:
        return f"user {user!r} may not {what}: {remedy}"
    return None


def server_answers(timeout: float = 5.0) -> bool:
    """True unless the tracking store is a server that does not accept a connection."""
    try:
        check_server_reachable(resolve_tracking_uri(), timeout)
    except LdmflowError:
        return False
    return True


def check_server_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast on a server that is down, instead of after MLflow's ~4 minutes of HTTP retries."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as error:
        raise LdmflowError(
            f"Cannot reach the MLflow tracking server at {uri} ({error}). Start it, fix MLFLOW_TRACKING_URI, "
            "or (training, sampling) pass --no_mlflow to work without tracking."
        ) from None
    if parsed.scheme == "https":
        check_certificate_trusted(uri, parsed.hostname, port, timeout)


def check_certificate_trusted(uri: str, host: str, port: int, timeout: float = 5.0) -> None:
    """Fail in one line on a certificate this client does not trust (MLflow would retry for minutes), trusting
    what MLflow's client trusts: MLFLOW_TRACKING_SERVER_CERT_PATH, else the system's authorities."""
    import ssl

    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return
    context = ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None)
    try:
        with socket.create_connection((host, port), timeout=timeout) as connection:
            with context.wrap_socket(connection, server_hostname=host):
                pass
    except ssl.SSLCertVerificationError as error:
        raise LdmflowError(
            f"The tracking server at {uri} presents a certificate this machine does not trust "
            f"({error.verify_message}): set MLFLOW_TRACKING_SERVER_CERT_PATH to its certificate "
            "(`ldmflow server` prints where it is)."
        ) from None


EXPERIMENT_DESCRIPTION = f"""Runs of ldmflow: one run per stage (`vae`, `latent_ddpm`, `legacy_ddpm`, `probe`, `sample`,
`evaluate`; the `{STAGE_TAG}` column), pipeline steps as child runs.

- **Compare**: select runs, *Compare*; training curves are `loss`, `val/psnr` (VAE) and `val/denoise_loss_ema`
  (latent DDPM); evaluation metrics start with `eval/`.
- **Previews**: each run's *Artifacts* `images/` (and the image slider under *Model metrics*), from step 0.
- **Models**: *Models* tab; every registered version's description links its run, dataset and VAE.
- Filters: `tags.{STAGE_TAG} = '{LATENT_DDPM.name}'`, `params.resolution = '256'`,
  `dataset.digest = '<digest>'`.
"""


def ensure_experiment(name: str) -> str:
    """The id of experiment `name`, created if needed (artifacts next to the SQLite database by default)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not name or not name.strip():
        raise LdmflowError("--experiment_name must not be empty.")
    uri = use_tracking_store()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(uri, name),
                                            tags={EXPERIMENT_NOTE_TAG: EXPERIMENT_DESCRIPTION,
                                                  EXPERIMENT_KIND_TAG: "custom_model_development"})
        except MlflowException as error:  # created by a concurrent process in the meantime, or refused
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                _raise_if_refused(error, uri, name)
                raise
    if experiment.lifecycle_stage == "deleted":
        raise LdmflowError(
            f"Experiment {name!r} was deleted. Restore it (mlflow experiments restore --experiment-id "
            f"{experiment.experiment_id}) or choose another --experiment_name."
        )
    return experiment.experiment_id


def _raise_if_refused(error: Exception, uri: str, name: str) -> None:
    """A server's readers may not create experiments (docs/mlflow.md, the team server's roles): say so."""
    reason = access_problem(error, "create experiments on this server (readers only read)",
                            "ask its admin to make you an editor, or for EDIT on an existing --experiment_name")
    if reason:
        raise LdmflowError(f"Cannot create experiment {name!r} in {uri}: {reason}.") from None


def _artifact_location(uri: str, name: str) -> str | None:
    """`<db dir>/mlartifacts/<name>` for SQLite; None (the server's default) for a tracking server."""
    db_path = sqlite_db_path(uri)
    if db_path is None:
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"
    return (db_path.parent / ARTIFACTS_DIR_NAME / folder).as_uri()


def equals(field: str, value) -> str:
    """A `filter_string` clause matching `field` equal to `value`. MLflow's filter parser has no escapes, so a value
    holding both quote kinds (or a backslash) is matched with LIKE, each of those characters a one-character
    wildcard: a superset of the matches, which the caller narrows to equal values."""
    text = str(value)
    if not ("'" in text and '"' in text) and "\\" not in text:
        return f"{field} = {filter_value(text)}"
    pattern = re.sub(r"['\\\\]", "_", text)
    return f"{field} LIKE '{pattern}'"


def filter_value(value) -> str:
    """A string literal for an MLflow `filter_string` (double quotes when the value holds a single quote)."""
    text = str(value)
    return f'"{text}"' if "'" in text else f"'{text}'"


def tag_run(run_id: str, tags: dict[str, str], client=None) -> None:
    """Set several tags on a run in one request (one `log_batch`), with `client` or the active store's."""
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    (client or MlflowClient()).log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
