"""A team's MLflow server in one command: PostgreSQL, proxied artifacts, basic auth, TLS beyond loopback.

`ldmflow server` starts, under `--root`:
- a PostgreSQL cluster (postgres.py) with scram-sha-256 passwords on every connection, listening on 127.0.0.1
  and a private socket only, holding the tracking and auth databases;
- `mlflow server --app-name basic-auth --enable-workspaces` on `--host` (127.0.0.1 by default; any other address
  needs TLS, see tls.py) with `--serve-artifacts` into `<root>/artifacts`; workspace mode (everything stays in
  its default workspace) is what lets a reader read without creating anything (users.py);
- an admin account with a random password, written with everything needed to stop it to `<root>/server.json`
  (mode 0600, like every secret under the root).
`ldmflow server-stop --root ...` stops exactly those processes.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from ldmflow.errors import LdmflowError, require_modules
from ldmflow.files import write_private
from ldmflow.server.postgres import (PASSWORD_FILE, client_environment, database_uri, pg_tool, schema_problem,
                                     start_postgres, stop_postgres, sweep_storage_uri)
from ldmflow.server.tls import Address, choose_address, host_names, is_loopback

logger = logging.getLogger(__name__)
STATE_FILE = "server.json"
ADMIN_PASSWORD_FILE = "admin_password"  # kept across restarts: the auth database keeps the first one


@dataclass
class ServerState:
    """What a running team server is: where, who may log in, and what to stop."""

    tracking_uri: str
    username: str
    password: str
    pg_data: str
    pg_port: int
    mlflow_pid: int
    host: str = "127.0.0.1"
    port: int = 5000
    cert: str | None = None
    key: str | None = None
    trust_cert: str | None = None  # what clients set MLFLOW_TRACKING_SERVER_CERT_PATH to (self-signed only)

    @property
    def address(self) -> Address:
        return Address(self.host, self.port, self.cert, self.key)

    def exports(self) -> str:
        lines = [f"export MLFLOW_TRACKING_URI={self.tracking_uri}", f"export MLFLOW_TRACKING_USERNAME={self.username}",
                 f"export MLFLOW_TRACKING_PASSWORD={self.password}"]
        if self.trust_cert:
            lines.append(f"export MLFLOW_TRACKING_SERVER_CERT_PATH={self.trust_cert}")
        return "\n".join(lines)

    def sweep_storage(self) -> str:
        """What a sweep on this machine, as this OS user, passes to --storage, after `export PGPASSFILE=...`."""
        return sweep_storage_uri(self.pg_port)

    def password_file(self) -> str:
        return str(Path(self.pg_data).parent / PASSWORD_FILE)


def read_state(root: str | Path) -> ServerState:
    root = Path(root).resolve()
    try:
        return ServerState(**json.loads((root / STATE_FILE).read_text()))
    except FileNotFoundError:
        raise LdmflowError(f"No server was started in {root} ({STATE_FILE} is missing).") from None


def start_server(root: str | Path, port: int = 5000, host: str = "127.0.0.1", tls_cert: str | None = None,
                 tls_key: str | None = None, self_signed: bool = False, insecure: bool = False) -> ServerState:
    """Start PostgreSQL and the MLflow server under `root`; returns their state (also in root/server.json)."""
    require_modules(("flask_wtf", "psycopg2"), "`ldmflow server` (MLflow's basic-auth app and PostgreSQL)",
                    "pip install 'ldmflow[server]'")
    root = Path(root).resolve()
    if (root / STATE_FILE).exists():
        raise LdmflowError(f"A server was already started in {root} ({STATE_FILE} exists); stop it first with "
                           f"`ldmflow server-stop --root {root}`.")
    for tool in ("initdb", "pg_ctl"):
        if pg_tool(tool) is None:
            raise LdmflowError(f"`{tool}` was not found: install PostgreSQL (15 or newer) to run a team server.")
    _check_port_free(host, port)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o711)  # others may pass through (PostgreSQL's folder), not list or read
    address = choose_address(root, host, port, tls_cert, tls_key, self_signed, insecure)
    pg_port = free_port()
    pg_data = start_postgres(root, pg_port)
    try:
        problem = schema_problem(root, pg_port)
        if problem:
            raise LdmflowError(problem)
        state = start_mlflow(root, address, pg_data, pg_port, _admin_password(root))
    except BaseException:
        stop_postgres(pg_data)
        raise
    if self_signed:
        state.trust_cert = state.cert
    write_state(root, state)
    return state


def write_state(root: Path, state: ServerState) -> None:
    write_private(root / STATE_FILE, json.dumps(asdict(state), indent=2))


def _admin_password(root: Path) -> str:
    """The admin's password: made at the first start, then reused (MLflow creates the admin only once)."""
    path = root / ADMIN_PASSWORD_FILE
    if not path.exists():
        write_private(path, secrets.token_urlsafe(18))
    return path.read_text().strip()



def stop_server(root: str | Path) -> None:
    """Stop the MLflow server and PostgreSQL started in `root` (and nothing else)."""
    root = Path(root).resolve()
    state = read_state(root)
    stop_mlflow(state)
    stop_postgres(Path(state.pg_data))
    (root / STATE_FILE).unlink()


AUTH_CACHE_SECONDS = 30  # MLflow caches a verified login per worker this long
GRACEFUL_SECONDS = 5  # how long a stopping server waits for open requests


def start_mlflow(root: Path, address: Address, pg_data: Path, pg_port: int, password: str) -> ServerState:
    """The MLflow server alone, on a running PostgreSQL (also how a stopped one is restarted)."""
    config = root / "basic_auth.ini"
    auth_database = database_uri(pg_port, "mlflow_auth")
    write_private(config, f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {auth_database}\n"
                   f"admin_username = admin\nadmin_password = {password}\nauthorization_function = "
                   "mlflow.server.auth:authenticate_request_basic_auth\n"
                   "grant_default_workspace_access = true\n"  # every account reads the default workspace
                   # every request carries the password: without the cache each one pays a PBKDF2 check, which
                   # made the server, not the trainers, the bottleneck; a removed user may last AUTH_CACHE_SECONDS
                   f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n")
    environment = {**client_environment(root), "MLFLOW_AUTH_CONFIG_PATH": str(config),
                   "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    environment.pop("MLFLOW_TRACKING_URI", None)
    process = _launch_mlflow(root, address, pg_port, environment)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LdmflowError(f"The MLflow server exited at start; see {root / 'mlflow.log'}.")
        try:
            with urllib.request.urlopen(f"{address.local_url}/health", timeout=2, context=unverified()):
                return ServerState(address.url, "admin", password, str(pg_data), pg_port, process.pid, address.host,
                                   address.port, address.cert, address.key)
        except OSError:
            time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    raise LdmflowError(f"The MLflow server did not answer within 2 minutes; see {root / 'mlflow.log'}.")


def _launch_mlflow(root: Path, address: Address, pg_port: int, environment: dict) -> subprocess.Popen:
    command = [sys.executable, "-m", "mlflow", "server", "--host", address.host, "--port", str(address.port),
               "--backend-store-uri", database_uri(pg_port, "mlflow"), "--serve-artifacts",
               "--artifacts-destination", str(root / "artifacts"), "--app-name", "basic-auth", "--workers", "2",
               "--enable-workspaces"]  # MLflow's "may read but not create" needs its workspace mode (users.py)
    if not is_loopback(address.host):  # MLflow's DNS-rebinding guard accepts only private addresses by default
        names = host_names(address.host)
        command += ["--allowed-hosts", ",".join(names + [f"{name}:*" for name in names])]
    # a client's idle keep-alive connection would hold a stopping worker until server-stop kills it
    uvicorn = f"--timeout-graceful-shutdown {GRACEFUL_SECONDS}"
    if address.cert:
        uvicorn += f" --ssl-certfile {address.cert} --ssl-keyfile {address.key}"
    command += ["--uvicorn-opts", uvicorn]
    with open(root / "mlflow.log", "ab") as log:
        return subprocess.Popen(command, cwd=root, env=environment, start_new_session=True, stdout=log,
                                stderr=subprocess.STDOUT)


def unverified() -> ssl.SSLContext:
    """For polling our own child's /health only: the certificate is checked by every real client."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def stop_mlflow(state: ServerState) -> None:
    """The MLflow server alone (PostgreSQL keeps running)."""
    try:
        os.killpg(state.mlflow_pid, signal.SIGTERM)
        _wait_gone(state.mlflow_pid, 20)
    except ProcessLookupError:
        pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise LdmflowError(f"Cannot listen on {host}:{port} ({error.strerror}); pass --host or --port.") from None


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
