"""The team server's PostgreSQL cluster: scram-sha-256 passwords on every connection, loopback and a private
Unix socket only.

The cluster is created with `initdb --auth=scram-sha-256` and a generated password, so pg_hba.conf has no
`trust` line and a passwordless `psql` is refused. The password lives in `<root>/pgpass` (mode 0600, libpq's
password-file format); clients (MLflow through psycopg2, pg_dump, psql) find it through PGPASSFILE, so no
URI, command line or log holds it. PostgreSQL refuses to run as root: as root, the cluster runs as the
`postgres` user and only the server programs (initdb, pg_ctl) run as that user.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
from pathlib import Path

from ldmflow.errors import LdmflowError
from ldmflow.files import write_private

DB_USER = "ldmflow"
DATABASES = ("mlflow", "mlflow_auth")  # tracking, and basic auth's users and permissions (both backed up)
SWEEP_DATABASE = "optuna"  # the Optuna studies of `ldmflow sweep --storage` (not backed up: the trials' runs are)
UNPRIVILEGED_USER = "postgres"  # who runs PostgreSQL when ldmflow runs as root
PASSWORD_FILE = "pgpass"


def start_postgres(root: Path, port: int) -> Path:
    """Create the cluster on first use (scram-sha-256, generated password), start it on 127.0.0.1:`port` and
    its private socket folder, and create the databases; returns the data folder."""
    data, sockets = root / "postgres", root / "sockets"
    for folder in (data, sockets):
        folder.mkdir(exist_ok=True)
        _hand_over(folder)
    if not (data / "PG_VERSION").exists():
        _create_cluster(root, data)
    elif "trust" in _hba_methods(data):
        raise LdmflowError(f"The PostgreSQL cluster in {data} trusts local connections (made before passwords "
                           "were required); migrate it as docs/mlflow.md says (Upgrading).")
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c password_encryption=scram-sha-256"
    as_db_owner([pg_tool("pg_ctl"), "-D", str(data), "-o", options, "-l", str(data / "server.log"), "-w", "start"],
                root / "pg_ctl.log")
    try:
        _create_databases(root, port)
    except BaseException:
        stop_postgres(data)
        raise
    return data


def schema_problem(root: Path, port: int) -> str | None:
    """One line when the tracking database's schema is older than the installed MLflow's (None: same, or new)."""
    import psycopg2
    from mlflow.store.db.utils import _get_latest_schema_revision

    connection = psycopg2.connect(host="127.0.0.1", port=port, user=DB_USER, dbname="mlflow",
                                  passfile=client_environment(root)["PGPASSFILE"])
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT to_regclass('alembic_version') IS NOT NULL")
            if not cursor.fetchone()[0]:
                return None  # a new database: MLflow creates the schema
            cursor.execute("SELECT version_num FROM alembic_version")
            found = cursor.fetchone()[0]
    finally:
        connection.close()
    latest = _get_latest_schema_revision()
    if found == latest:
        return None
    return (f"The tracking database's schema ({found}) is not the installed MLflow's ({latest}): back it up and "
            f"upgrade it with `ldmflow server upgrade --root {root} --backup_to NEW_FOLDER`.")


def stop_postgres(data: Path) -> None:
    if (data / "postmaster.pid").exists():
        as_db_owner([pg_tool("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], data.parent / "pg_ctl.log")


def database_uri(port: int, database: str) -> str:
    """SQLAlchemy URI without a password: psycopg2 reads it from PGPASSFILE (see client_environment)."""
    return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{port}/{database}"


def sweep_storage_uri(port: int) -> str:
    """`ldmflow sweep --storage` on this machine: no password, libpq reads it from PGPASSFILE (see sweep_exports)."""
    return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{port}/{SWEEP_DATABASE}"


def client_environment(root: Path) -> dict:
    """os.environ plus what a PostgreSQL client needs to log in: the password file, and nothing in argv."""
    return {**os.environ, "PGPASSFILE": str(root / PASSWORD_FILE), "PGUSER": DB_USER, "PGHOST": "127.0.0.1"}


def pg_tool(name: str) -> str | None:
    """A PostgreSQL program from PATH, else from Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    return str(versions[-1]) if versions else None


def as_db_owner(command: list, log: Path, check: bool = True) -> None:
    """Run a PostgreSQL server program as this user, or as UNPRIVILEGED_USER when this is root."""
    if os.geteuid() == 0:
        command = ["runuser", "-u", UNPRIVILEGED_USER, "--", *command]
    with open(log, "ab") as output:
        result = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, timeout=120)
    if check and result.returncode != 0:
        raise LdmflowError(f"`{' '.join(map(str, command[-4:]))}` failed; see {log}.")


def run_client(root: Path, command: list, log: Path) -> None:
    """Run a PostgreSQL client program (pg_dump, pg_restore, psql) with the password file; errors to `log`."""
    with open(log, "ab") as output:
        result = subprocess.run(command, env=client_environment(root), stdout=output, stderr=subprocess.STDOUT,
                                timeout=600)
    if result.returncode != 0:
        raise LdmflowError(f"`{Path(command[0]).name}` failed; see {log}.")


def _create_cluster(root: Path, data: Path) -> None:
    password = secrets.token_urlsafe(24)
    write_private(root / PASSWORD_FILE, f"127.0.0.1:*:*:{DB_USER}:{password}\n")
    initial = root / "sockets" / "initdb-password"  # readable by the cluster's owner, removed right after
    write_private(initial, password + "\n")
    _hand_over(initial)
    try:
        as_db_owner([pg_tool("initdb"), "-D", str(data), "-U", DB_USER, "--auth=scram-sha-256",
                     f"--pwfile={initial}", "-E", "UTF8"], root / "initdb.log")
    finally:
        initial.unlink()


def _create_databases(root: Path, port: int) -> None:
    import psycopg2

    connection = psycopg2.connect(host="127.0.0.1", port=port, user=DB_USER, dbname="postgres",
                                  passfile=client_environment(root)["PGPASSFILE"])
    connection.autocommit = True  # CREATE DATABASE runs outside a transaction
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT datname FROM pg_database")
            existing = {row[0] for row in cursor.fetchall()}
            for database in (*DATABASES, SWEEP_DATABASE):
                if database not in existing:
                    cursor.execute(f'CREATE DATABASE "{database}"')
    finally:
        connection.close()


def _hba_methods(data: Path) -> set[str]:
    """The authentication methods in pg_hba.conf's rules (the last word of each non-comment line)."""
    lines = (line.split("#", 1)[0].split() for line in (data / "pg_hba.conf").read_text().splitlines())
    return {words[-1] for words in lines if words}



def _hand_over(path: Path) -> None:
    """As root, give the path (and the way to it) to the user PostgreSQL runs as."""
    if os.geteuid() != 0:
        return
    user = pwd.getpwnam(UNPRIVILEGED_USER)
    os.chown(path, user.pw_uid, user.pw_gid)
    if path.is_dir():
        os.chmod(path, 0o700)
    for parent in path.parents:  # PostgreSQL must be able to reach its folder
        if parent.stat().st_mode & 0o001 == 0:
            os.chmod(parent, parent.stat().st_mode | 0o001)
