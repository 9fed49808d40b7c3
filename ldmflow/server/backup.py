"""Backups of a team server, schema upgrades and its status: `ldmflow server backup | restore | upgrade | status`.

A backup is a folder (mode 0700: it holds the admin password) with `mlflow.dump` and `mlflow_auth.dump`
(pg_dump's custom format), `artifacts/`, `admin_password` and `backup.json` (versions and time). `restore`
builds a fresh root from it; `ldmflow server --root NEW_ROOT` then serves the same runs, models and users.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ldmflow.errors import LdmflowError
from ldmflow.server.postgres import (DATABASES, DB_USER, client_environment, database_uri, pg_tool, run_client,
                                     start_postgres, stop_postgres)
from ldmflow.server.team_server import ADMIN_PASSWORD_FILE, STATE_FILE, free_port, read_state, unverified


def backup(root: str | Path, target: str | Path) -> Path:
    """Dump both databases of the running server in `root` and copy its artifacts into `target` (new)."""
    root = Path(root).resolve()
    return _dump(root, read_state(root).pg_port, Path(target).resolve())


def upgrade(root: str | Path, target: str | Path) -> Path:
    """Back up the stopped server in `root` into `target`, then `mlflow db upgrade` its tracking database to the
    installed MLflow's schema."""
    root = Path(root).resolve()
    if (root / STATE_FILE).exists():
        raise LdmflowError(f"Stop the server first: ldmflow server-stop --root {root}")
    port = free_port()
    data = start_postgres(root, port)
    try:
        _dump(root, port, Path(target).resolve())
        run_client(root, [sys.executable, "-m", "mlflow", "db", "upgrade", database_uri(port, "mlflow")],
                   root / "upgrade.log")
    finally:
        stop_postgres(data)
    return Path(target).resolve()


def _dump(root: Path, pg_port: int, target: Path) -> Path:
    if target.exists() and any(target.iterdir()):
        raise LdmflowError(f"{target} is not empty; back up into a new folder.")
    target.mkdir(parents=True, exist_ok=True)
    os.chmod(target, 0o700)
    for database in DATABASES:
        run_client(root, [pg_tool("pg_dump"), "-h", "127.0.0.1", "-p", str(pg_port), "-U", DB_USER, "-Fc",
                          "-f", str(target / f"{database}.dump"), database], target / "backup.log")
    if (root / "artifacts").exists():
        shutil.copytree(root / "artifacts", target / "artifacts")
    shutil.copy2(root / ADMIN_PASSWORD_FILE, target / ADMIN_PASSWORD_FILE)
    (target / "backup.json").write_text(json.dumps({"made": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                    "root": str(root), "mlflow": _mlflow_version()}, indent=2))
    return target


def restore(source: str | Path, root: str | Path) -> Path:
    """A new root holding the backup in `source` (its own database password; start it with `ldmflow server`)."""
    source, root = Path(source).resolve(), Path(root).resolve()
    needed = [*(f"{database}.dump" for database in DATABASES), ADMIN_PASSWORD_FILE]
    missing = [name for name in needed if not (source / name).exists()]
    if missing:
        raise LdmflowError(f"{source} is not an ldmflow server backup ({', '.join(missing)} missing).")
    if root.exists() and any(root.iterdir()):
        raise LdmflowError(f"{root} is not empty; restore into a new folder.")
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o711)
    port = free_port()
    data = start_postgres(root, port)
    try:
        for database in DATABASES:
            run_client(root, [pg_tool("pg_restore"), "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER,
                              "--no-owner", "--exit-on-error", "-d", database, str(source / f"{database}.dump")],
                       root / "restore.log")
    finally:
        stop_postgres(data)
    if (source / "artifacts").exists():
        shutil.copytree(source / "artifacts", root / "artifacts")
    shutil.copy2(source / ADMIN_PASSWORD_FILE, root / ADMIN_PASSWORD_FILE)
    return root


def status(root: str | Path) -> dict:
    """Health, versions and disk use of the server in `root`."""
    import psycopg2

    root = Path(root).resolve()
    state = read_state(root)
    report = {"tracking_uri": state.tracking_uri, "mlflow_server": _health(state), "mlflow": _mlflow_version()}
    try:
        with psycopg2.connect(host="127.0.0.1", port=state.pg_port, user=DB_USER, dbname="mlflow",
                              passfile=client_environment(root)["PGPASSFILE"], connect_timeout=5) as connection:
            with connection.cursor() as cursor:
                cursor.execute("SHOW server_version")
                report["postgresql"] = cursor.fetchone()[0]
                cursor.execute("SELECT version_num FROM alembic_version")
                report["schema"] = cursor.fetchone()[0]
        connection.close()
    except psycopg2.Error as error:
        report["postgresql"] = f"unreachable ({str(error).strip().splitlines()[0]})"
    report["disk_bytes"] = {name: _size(root / name) for name in ("postgres", "artifacts")}
    report["disk_free_bytes"] = shutil.disk_usage(root).free
    return report


def _health(state) -> str:
    try:
        with urllib.request.urlopen(f"{state.address.local_url}/health", timeout=5, context=unverified()):
            return "ok"
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code}"
    except OSError as error:
        return f"unreachable ({type(error).__name__})"


def _mlflow_version() -> str:
    from importlib.metadata import version

    return version("mlflow")


def _size(path: Path) -> int:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file()) if path.exists() else 0

