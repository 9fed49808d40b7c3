"""The team server beyond one machine, for real: PostgreSQL with passwords only, HTTPS with a self-signed
certificate on the machine's non-loopback address, users and grants, no secret in runs or logs, and a backup
restored into a fresh root.

Needs PostgreSQL (`initdb`, `pg_ctl`, `psql`, `pg_dump`); see test_team_server.py for skipping on purpose.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ldmflow.server.postgres import pg_tool
from ldmflow.server.team_server import read_state, start_server, stop_server

pytestmark = [pytest.mark.server, pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("LDMFLOW_SKIP_SERVER_TESTS") == "1",
                                 reason="LDMFLOW_SKIP_SERVER_TESTS=1: team server tests skipped on request")]
CLIENT_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")


def network_address() -> str:
    """This machine's address on its network (not loopback), as other machines reach it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
        address = probe.getsockname()[0]
    assert not address.startswith("127."), "the machine needs a non-loopback address for these tests"
    return address


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("secure-server") / "root"
    host = network_address()
    started = ldmflow("server", "--root", str(root), "--host", host, "--port", str(free_port(host)), "--self_signed")
    assert started.exit_code == 0, started.stderr
    state = read_state(root)
    assert f"export MLFLOW_TRACKING_SERVER_CERT_PATH={state.trust_cert}" in started.stdout
    yield {"state": state, "root": root}
    stop_server(root)


def ldmflow(*arguments: str, stdin: str = ""):
    """`ldmflow ...` in this process (this checkout's code, no interpreter start): .exit_code, .stdout, .stderr."""
    from click.testing import CliRunner

    from ldmflow.cli import cli

    return CliRunner().invoke(cli, list(arguments), input=stdin, catch_exceptions=False)


def downgrade_schema(root: Path) -> None:
    """Take the stopped server's tracking schema one MLflow migration back (alembic downgrade -1)."""
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config

    from ldmflow.server.postgres import PASSWORD_FILE, database_uri, start_postgres, stop_postgres

    port = free_port("127.0.0.1")
    data = start_postgres(root, port)
    try:
        os.environ["PGPASSFILE"] = str(root / PASSWORD_FILE)
        command.downgrade(_get_alembic_config(database_uri(port, "mlflow")), "-1")
    finally:
        os.environ.pop("PGPASSFILE")
        stop_postgres(data)


def every_command_line() -> str:
    """What `ps` shows of every process on this machine."""
    lines = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(path.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # it ended meanwhile
            pass
    return "\n".join(lines)


@pytest.fixture
def as_user(server, monkeypatch):
    def login(name: str, password: str, trust: bool = True) -> MlflowClient:
        state = server["state"]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", state.tracking_uri)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        if trust:
            monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", state.trust_cert)
        else:
            monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH", raising=False)
        return MlflowClient(state.tracking_uri)

    return login


def test_postgres_needs_a_password_and_keeps_it_private(server):
    root, state = server["root"], server["state"]
    result = subprocess.run([pg_tool("psql"), "-w", "-h", "127.0.0.1", "-p", str(state.pg_port), "-U", "ldmflow",
                             "-c", "SELECT 1", "mlflow"], capture_output=True, text=True, timeout=30,
                            env={key: value for key, value in os.environ.items() if not key.startswith("PG")})
    assert result.returncode != 0 and "password" in result.stderr, result.stderr
    rules = [line.split() for line in (root / "postgres" / "pg_hba.conf").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules and {rule[-1] for rule in rules} == {"scram-sha-256"}
    for secret in ("pgpass", "admin_password", "server.json", "basic_auth.ini", "tls/server.key"):
        assert (root / secret).stat().st_mode & 0o077 == 0, secret
    with pytest.raises(OSError):  # nothing but loopback
        socket.create_connection((state.host, state.pg_port), timeout=2).close()


def test_a_trusting_client_logs_over_https_and_an_untrusting_one_is_refused_in_one_line(server, as_user, tmp_path):
    client = as_user("admin", server["state"].password)
    assert server["state"].tracking_uri.startswith(f"https://{server['state'].host}:")
    run = client.create_run(client.create_experiment("over-https"))
    client.log_metric(run.info.run_id, "loss", 0.5, step=1)
    (tmp_path / "note.txt").write_text("through the proxy")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    client.set_terminated(run.info.run_id)
    assert client.get_metric_history(run.info.run_id, "loss")[0].value == 0.5
    assert list((server["root"] / "artifacts").rglob("note.txt"))

    as_user("admin", server["state"].password, trust=False)
    result = ldmflow("models")
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert result.exit_code == 1 and len(errors) == 1 and "Traceback" not in result.stderr
    assert "does not trust" in errors[0] and "MLFLOW_TRACKING_SERVER_CERT_PATH" in errors[0]


def test_users_and_grants_hold_and_no_password_is_logged(server, as_user):
    root = str(server["root"])
    added = ldmflow("server", "add-user", "rita", "--root", root)
    assert added.exit_code == 0, added.stderr
    reader_password = added.stdout.rsplit(": ", 1)[1].strip()
    editor_password = "editor-password-from-stdin"
    added = ldmflow("server", "add-user", "ed", "--role", "editor", "--password_stdin", "--root", root,
                    stdin=editor_password + "\n")
    assert added.exit_code == 0 and editor_password not in added.stdout + added.stderr
    assert ldmflow("server", "grant", "ed", "--experiment", "ed-work", "--permission", "EDIT", "--root",
                   root).exit_code == 0
    admin = as_user("admin", server["state"].password)
    other = admin.create_experiment("not-eds")
    users = ldmflow("server", "list-users", "--root", root).stdout.split()
    assert {"admin", "rita", "ed"} <= set(users)

    editor = as_user("ed", editor_password)
    mine = editor.get_experiment_by_name("ed-work").experiment_id
    run = editor.create_run(mine)
    editor.log_metric(run.info.run_id, "loss", 1.0)
    with pytest.raises(Exception, match="PERMISSION_DENIED|403"):
        editor.create_run(other)
    reader = as_user("rita", reader_password)
    assert reader.get_run(run.info.run_id).data.metrics == {"loss": 1.0}  # readers read everything
    with pytest.raises(Exception, match="PERMISSION_DENIED|403"):
        reader.create_run(mine)

    removed = ldmflow("server", "remove-user", "rita", "--root", root)
    assert removed.exit_code == 0, removed.stderr
    admin = as_user("admin", server["state"].password)
    for seen in admin.search_runs([mine, other]):
        logged = " ".join([*seen.data.params.values(), *seen.data.tags.values()])
        assert reader_password not in logged and editor_password not in logged
    logs = " ".join(path.read_text(errors="replace") for path in Path(root).rglob("*.log"))
    command_lines = every_command_line()
    for secret in (reader_password, editor_password, server["state"].password,
                   (Path(root) / "pgpass").read_text().strip().rsplit(":", 1)[1]):
        assert secret not in logs and secret not in command_lines


def test_plain_http_beyond_loopback_is_refused_in_one_line(tmp_path):
    host = network_address()
    result = ldmflow("server", "--root", str(tmp_path / "root"), "--host", host, "--port", str(free_port(host)))
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "Refusing to serve passwords in clear text" in result.stderr and "--self_signed" in result.stderr
    assert not (tmp_path / "root" / "postgres").exists()


def test_a_backup_restored_into_a_fresh_root_holds_the_same_runs_models_and_artifacts(server, as_user, tmp_path,
                                                                                       monkeypatch):
    admin = as_user("admin", server["state"].password)
    run = admin.create_run(admin.create_experiment("kept"))
    for step in range(3):
        admin.log_metric(run.info.run_id, "loss", 1.0 / (step + 1), step=step)
    (tmp_path / "weights.bin").write_bytes(bytes(range(256)))
    admin.log_artifact(run.info.run_id, str(tmp_path / "weights.bin"), "model")
    admin.create_registered_model("kept-model")
    version = admin.create_model_version("kept-model", f"{run.info.artifact_uri}/model", run.info.run_id,
                                         tags={"stage": "candidate"})
    admin.set_registered_model_alias("kept-model", "champion", version.version)
    history = [(m.step, m.value) for m in admin.get_metric_history(run.info.run_id, "loss")]
    status = ldmflow("server", "status", "--root", str(server["root"]))
    assert status.exit_code == 0 and '"mlflow_server": "ok"' in status.stdout and '"schema"' in status.stdout

    assert ldmflow("server", "backup", "--root", str(server["root"]), "--to", str(tmp_path / "backup")).exit_code == 0
    restored = ldmflow("server", "restore", "--from", str(tmp_path / "backup"), "--root", str(tmp_path / "new"))
    assert restored.exit_code == 0, restored.stderr
    downgrade_schema(tmp_path / "new")  # as if MLflow had been upgraded since the backup
    port = str(free_port("127.0.0.1"))
    refused = ldmflow("server", "--root", str(tmp_path / "new"), "--port", port)
    assert refused.exit_code == 1 and "ldmflow server upgrade" in refused.stderr, refused.stderr
    upgraded = ldmflow("server", "upgrade", "--root", str(tmp_path / "new"), "--backup_to", str(tmp_path / "before"))
    assert upgraded.exit_code == 0 and (tmp_path / "before" / "mlflow.dump").exists(), upgraded.stderr
    state = start_server(tmp_path / "new", int(port))
    try:
        assert state.password == server["state"].password  # the admin's account came with the backup
        monkeypatch.setenv("MLFLOW_TRACKING_URI", state.tracking_uri)
        monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
        copy = MlflowClient(state.tracking_uri)
        again = copy.get_run(run.info.run_id)
        assert [(m.step, m.value) for m in copy.get_metric_history(run.info.run_id, "loss")] == history
        assert again.info.experiment_id == run.info.experiment_id
        found = copy.get_model_version_by_alias("kept-model", "champion")
        assert found.version == version.version and found.tags == {"stage": "candidate"}
        downloaded = copy.download_artifacts(run.info.run_id, "model/weights.bin", str(tmp_path / "back"))
        assert Path(downloaded).read_bytes() == bytes(range(256))
    finally:
        stop_server(tmp_path / "new")
