"""A team's MLflow server on this machine in one command: PostgreSQL, proxied artifacts and basic auth.

`ldmflow server` starts, under `--root`:
- a PostgreSQL cluster (`initdb`, `pg_ctl`) listening on 127.0.0.1 only, run by an unprivileged user
  (PostgreSQL refuses root: as root it runs as the `postgres` user), holding the tracking and auth databases;
- `mlflow server --app-name basic-auth` on 127.0.0.1 with `--serve-artifacts` into `<root>/artifacts`;
- an admin account with a random password, written with everything needed to stop it to `<root>/server.json`.
`ldmflow server-stop --root ...` stops exactly those processes. The database trusts local connections (the
machine's users are the team); give PostgreSQL passwords before exposing it beyond 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from ldmflow.errors import LdmflowError, require_modules

logger = logging.getLogger(__name__)
STATE_FILE = "server.json"
DB_USER = "ldmflow"
UNPRIVILEGED_USER = "postgres"  # who runs PostgreSQL when ldmflow runs as root


@dataclass
class ServerState:
    """What a running team server is: where, who may log in, and what to stop."""

    tracking_uri: str
    username: str
    password: str
    pg_data: str
    pg_port: int
    mlflow_pid: int

    def exports(self) -> str:
        return (f"export MLFLOW_TRACKING_URI={self.tracking_uri}\n"
                f"export MLFLOW_TRACKING_USERNAME={self.username}\n"
                f"export MLFLOW_TRACKING_PASSWORD={self.password}")


def start_server(root: str | Path, port: int = 5000) -> ServerState:
    """Start PostgreSQL and the MLflow server under `root`; returns their state (also in root/server.json)."""
    require_modules(("flask_wtf", "psycopg2"), "`ldmflow server` (MLflow's basic-auth app and PostgreSQL)",
                    "pip install 'ldmflow[server]'")
    root = Path(root).resolve()
    if (root / STATE_FILE).exists():
        raise LdmflowError(f"A server was already started in {root} ({STATE_FILE} exists); stop it first with "
                           f"`ldmflow server-stop --root {root}`.")
    for tool in ("initdb", "pg_ctl"):
        if _pg_tool(tool) is None:
            raise LdmflowError(f"`{tool}` was not found: install PostgreSQL (15 or newer) to run a team server.")
    _check_port_free(port)
    root.mkdir(parents=True, exist_ok=True)
    pg_port = _free_port()
    pg_data = _start_postgres(root, pg_port)
    try:
        state = start_mlflow(root, port, pg_data, pg_port, secrets.token_urlsafe(12))
    except BaseException:
        _stop_postgres(pg_data)
        raise
    (root / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    return state


def stop_server(root: str | Path) -> None:
    """Stop the MLflow server and PostgreSQL started in `root` (and nothing else)."""
    root = Path(root).resolve()
    try:
        state = ServerState(**json.loads((root / STATE_FILE).read_text()))
    except FileNotFoundError:
        raise LdmflowError(f"No server was started in {root} ({STATE_FILE} is missing).") from None
    stop_mlflow(state)
    _stop_postgres(Path(state.pg_data))
    (root / STATE_FILE).unlink()


def _start_postgres(root: Path, port: int) -> Path:
    data, sockets = root / "postgres", root / "sockets"
    for folder in (data, sockets):
        folder.mkdir(exist_ok=True)
        _hand_over(folder)
    if not (data / "PG_VERSION").exists():
        _as_db_owner([_pg_tool("initdb"), "-D", str(data), "-U", DB_USER, "--auth=trust", "-E", "UTF8"],
                     root / "initdb.log")
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1"
    _as_db_owner([_pg_tool("pg_ctl"), "-D", str(data), "-o", options, "-l", str(data / "server.log"), "-w",
                  "start"], root / "pg_ctl.log")
    for database in ("mlflow", "mlflow_auth"):
        _as_db_owner([_pg_tool("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER, database],
                     root / "createdb.log", check=False)  # already there after a restart
    return data


AUTH_CACHE_SECONDS = 30  # MLflow caches a verified login per worker this long


def start_mlflow(root: Path, port: int, pg_data: Path, pg_port: int, password: str) -> ServerState:
    """The MLflow server alone, on a running PostgreSQL (also how a stopped one is restarted)."""
    database = f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{pg_port}"
    config = root / "basic_auth.ini"
    config.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {database}/mlflow_auth\n"
                      f"admin_username = admin\nadmin_password = {password}\nauthorization_function = "
                      "mlflow.server.auth:authenticate_request_basic_auth\n"
                      # every request carries the password: without the cache each one pays a PBKDF2 check, which
                      # made the server, not the trainers, the bottleneck; a removed user may last AUTH_CACHE_SECONDS
                      f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n")
    environment = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(config),
                   "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    environment.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"{database}/mlflow", "--serve-artifacts", "--artifacts-destination",
               str(root / "artifacts"), "--app-name", "basic-auth", "--workers", "2"]
    with open(root / "mlflow.log", "ab") as log:
        process = subprocess.Popen(command, cwd=root, env=environment, start_new_session=True, stdout=log,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LdmflowError(f"The MLflow server exited at start; see {root / 'mlflow.log'}.")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return ServerState(url, "admin", password, str(pg_data), pg_port, process.pid)
        except OSError:
            time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    raise LdmflowError(f"The MLflow server did not answer within 2 minutes; see {root / 'mlflow.log'}.")


def stop_mlflow(state: ServerState) -> None:
    """The MLflow server alone (PostgreSQL keeps running)."""
    try:
        os.killpg(state.mlflow_pid, signal.SIGTERM)
        _wait_gone(state.mlflow_pid, 20)
    except ProcessLookupError:
        pass


def _stop_postgres(data: Path) -> None:
    if (data / "postmaster.pid").exists():
        _as_db_owner([_pg_tool("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], data.parent / "pg_ctl.log")


def _pg_tool(name: str) -> str | None:
    """A PostgreSQL program from PATH, else from Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    return str(versions[-1]) if versions else None


def _as_db_owner(command: list, log: Path, check: bool = True) -> None:
    """Run a PostgreSQL command as this user, or as UNPRIVILEGED_USER when this is root."""
    if os.geteuid() == 0:
        command = ["runuser", "-u", UNPRIVILEGED_USER, "--", *command]
    with open(log, "ab") as output:
        result = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, timeout=120)
    if check and result.returncode != 0:
        raise LdmflowError(f"`{' '.join(map(str, command[-4:]))}` failed; see {log}.")


def _hand_over(folder: Path) -> None:
    """As root, give the folder (and the way to it) to the user PostgreSQL runs as."""
    if os.geteuid() != 0:
        return
    user = pwd.getpwnam(UNPRIVILEGED_USER)
    os.chown(folder, user.pw_uid, user.pw_gid)
    os.chmod(folder, 0o700)
    for parent in folder.parents:  # PostgreSQL must be able to reach its folder
        if parent.stat().st_mode & 0o001 == 0:
            os.chmod(parent, parent.stat().st_mode | 0o001)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _check_port_free(port: int) -> None:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise LdmflowError(f"Port {port} is in use on 127.0.0.1; pass --port.") from None


def _wait_gone(pid: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it if this process started it (a zombie still takes signals)
        except ChildProcessError:
            pass
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)
