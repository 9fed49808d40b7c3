"""The team server beyond one machine, for real: PostgreSQL with passwords only, HTTPS with a self-signed
certificate on the machine's non-loopback address, readers that create nothing, editors that log to their own
experiments only, no secret in runs or logs; slow: a training registered over HTTPS, a backup restored into a
fresh root.

One server for the module. Its unmarked tests are `make test`'s crossing of the team-server boundary (logins,
roles, trust: about a minute, mostly the server's start and stop). Needs PostgreSQL (`initdb`, `pg_ctl`, `psql`,
`pg_dump`); see test_team_server.py for skipping on purpose.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ldmflow.data.demo import make_demo_dataset
from ldmflow.server.postgres import pg_tool
from ldmflow.server.team_server import read_state, start_server, stop_server
from tiny import TINY_SIZES

pytestmark = [pytest.mark.server,
              pytest.mark.skipif(os.environ.get("LDMFLOW_SKIP_SERVER_TESTS") == "1",
                                 reason="LDMFLOW_SKIP_SERVER_TESTS=1: team server tests skipped on request")]
BIN = Path(sys.executable).parent
VAE = [*TINY_SIZES, "--block_out_channels", "8,8,8,8", "--scaling_factor_batches", "1", "--max_train_steps", "2"]
EDITOR_PASSWORD = "editor-password-from-stdin"

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
    data = make_demo_dataset(root.parent / "data", num_images=8, resolution=32)
    yield {"state": state, "root": root, "data": data, "stdout": started.stdout}
    stop_server(root)


@pytest.fixture(scope="module")
def accounts(server):
    """A reader (rita) and an editor (ed) with EDIT on experiment ed-work, added as an admin would."""
    root = str(server["root"])
    added = ldmflow("server", "add-user", "rita", "--root", root)
    assert added.exit_code == 0, added.stderr
    reader_password = added.stdout.rsplit(": ", 1)[1].strip()
    added = ldmflow("server", "add-user", "ed", "--role", "editor", "--password_stdin", "--root", root,
                    stdin=EDITOR_PASSWORD + "\n")
    assert added.exit_code == 0 and EDITOR_PASSWORD not in added.stdout + added.stderr
    granted = ldmflow("server", "grant", "ed", "--experiment", "ed-work", "--permission", "EDIT", "--root", root)
    assert granted.exit_code == 0, granted.stderr
    return {"rita": reader_password, "ed": EDITOR_PASSWORD, "admin": server["state"].password}


def ldmflow(*arguments: str, stdin: str = ""):
    """`ldmflow ...` in this process (this checkout's code, no interpreter start): .exit_code, .stdout, .stderr."""
    from cli_runner import invoke

    return invoke(*arguments, ok=False, input=stdin)


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


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Error")]


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
    def login(name: str | None, password: str | None, trust: bool = True) -> MlflowClient:
        state = server["state"]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", state.tracking_uri)
        for key, value in (("MLFLOW_TRACKING_USERNAME", name), ("MLFLOW_TRACKING_PASSWORD", password)):
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, value)
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


def test_the_printed_sweep_storage_holds_a_study_with_the_password_from_pgpass(server, monkeypatch):
    """`ldmflow server` makes the `optuna` database and prints its storage URL, which holds no password."""
    from ldmflow.tracking.study import optuna_storage

    root, state = server["root"], server["state"]
    storage = f"postgresql+psycopg2://ldmflow@127.0.0.1:{state.pg_port}/optuna"
    assert f"export PGPASSFILE={root / 'pgpass'}, then ldmflow sweep ... --storage {storage}" in server["stdout"]
    for key in [key for key in os.environ if key.startswith("PG")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PGPASSFILE", str(root / "pgpass"))
    import optuna

    study = optuna.create_study(storage=optuna_storage(storage, ""), study_name="printed-storage")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    assert len(optuna.load_study(study_name="printed-storage", storage=storage).trials) == 1


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


@pytest.mark.parametrize("user, password, message", [
    (None, None, "the server requires a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
    ("admin", "wrong-password", "the server refused the login of 'admin'"),
])
def test_no_or_wrong_credentials_are_one_line_before_training(server, as_user, tmp_path, user, password, message):
    as_user(user, password)
    result = ldmflow("vae", "--manifest_path", str(server["data"]), "--output_dir", str(tmp_path / "vae"), *VAE,
                     "--experiment_name", "locked")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert len(error_lines(result)) == 1 and message in error_lines(result)[0]
    assert not (tmp_path / "vae" / "config.json").exists()


def test_a_reader_reads_everything_and_creates_nothing(server, accounts, as_user, tmp_path):
    import requests

    admin = as_user("admin", accounts["admin"])
    shared = admin.create_experiment("shared")
    run = admin.create_run(shared)
    admin.log_metric(run.info.run_id, "loss", 1.0)
    admin.create_registered_model("admins-model")
    reader = as_user("rita", accounts["rita"])
    assert reader.get_run(run.info.run_id).data.metrics == {"loss": 1.0}
    assert "admins-model" in [model.name for model in reader.search_registered_models()]
    refusals = {"an experiment": lambda: reader.create_experiment("ritas"),
                "a run": lambda: reader.create_run(shared),
                "a registered model": lambda: reader.create_registered_model("ritas-model"),
                "a model version": lambda: reader.create_model_version("admins-model", run.info.artifact_uri,
                                                                       run.info.run_id)}
    for what, create in refusals.items():
        with pytest.raises(Exception, match="403") as refused:
            create()
        assert "Permission denied" in str(refused.value), what
    answer = requests.post(f"{server['state'].tracking_uri}/api/2.0/mlflow/experiments/create", json={"name": "x"},
                           auth=("rita", accounts["rita"]), verify=server["state"].trust_cert, timeout=30)
    assert answer.status_code == 403 and "Permission denied" in answer.text


@pytest.mark.parametrize("experiment, message", [
    ("ritas-own", "Cannot create experiment 'ritas-own' in https://"),
    ("shared-read-only", "user 'rita' may not log runs to experiment 'shared-read-only'"),
])
def test_a_reader_cannot_train_and_is_told_in_one_line(server, accounts, as_user, tmp_path, experiment, message):
    admin = as_user("admin", accounts["admin"])
    found = admin.get_experiment_by_name("shared-read-only")
    experiment_id = found.experiment_id if found else admin.create_experiment("shared-read-only")
    as_user("rita", accounts["rita"])
    result = ldmflow("vae", "--manifest_path", str(server["data"]), "--output_dir", str(tmp_path / "vae"), *VAE,
                     "--experiment_name", experiment)
    assert result.exit_code == 1 and len(error_lines(result)) == 1 and "Traceback" not in result.stderr
    assert message in error_lines(result)[0] and "user 'rita' may not" in error_lines(result)[0]
    admin = as_user("admin", accounts["admin"])
    assert admin.get_experiment_by_name("ritas-own") is None  # nothing half-made
    assert admin.search_runs([experiment_id]) == [] and not (tmp_path / "vae" / "config.json").exists()


def test_an_editor_logs_to_its_own_and_granted_experiments_only(server, accounts, as_user):
    admin = as_user("admin", accounts["admin"])
    others = admin.create_experiment("not-eds")
    admins_run = admin.create_run(others)
    admin.create_registered_model("admins-other-model")
    editor = as_user("ed", accounts["ed"])
    granted = editor.get_experiment_by_name("ed-work").experiment_id
    editor.log_metric(editor.create_run(granted).info.run_id, "loss", 1.0)
    own = editor.create_experiment("eds-own")  # an editor creates experiments (and models), and MANAGEs them
    editor.create_run(own)
    editor.create_registered_model("eds-model")
    for create in (lambda: editor.create_run(others),
                   lambda: editor.log_metric(admins_run.info.run_id, "loss", 2.0),
                   lambda: editor.create_model_version("admins-other-model", admins_run.info.artifact_uri,
                                                      admins_run.info.run_id)):
        with pytest.raises(Exception, match="403"):
            create()
    refused = ldmflow("server", "grant", "rita", "--experiment", "ed-work", "--permission", "EDIT", "--root",
                      str(server["root"]))
    assert refused.exit_code == 1 and len(error_lines(refused)) == 1
    assert "'rita' is a reader" in refused.stderr and "set-role rita --role editor" in refused.stderr


def test_roles_change_and_no_password_is_logged(server, accounts, as_user):
    root = str(server["root"])
    added = ldmflow("server", "add-user", "tom", "--root", root)
    assert added.exit_code == 0, added.stderr
    password = added.stdout.rsplit(": ", 1)[1].strip()
    assert ldmflow("server", "set-role", "tom", "--role", "editor", "--root", root).exit_code == 0
    listed = ldmflow("server", "list-users", "--root", root).stdout.splitlines()
    assert {"admin (admin)", "rita (reader)", "ed (editor)", "tom (editor)"} <= set(listed)
    made = as_user("tom", password).create_experiment("toms")
    assert ldmflow("server", "set-role", "tom", "--role", "reader", "--root", root).exit_code == 0
    with pytest.raises(Exception, match="403"):  # a reader again: not even in what it made
        as_user("tom", password).create_run(made)
    removed = ldmflow("server", "remove-user", "tom", "--root", root)
    assert removed.exit_code == 0, removed.stderr

    admin = as_user("admin", accounts["admin"])
    for seen in admin.search_runs([e.experiment_id for e in admin.search_experiments()]):
        logged = " ".join([*seen.data.params.values(), *seen.data.tags.values()])
        assert all(secret not in logged for secret in (password, *accounts.values()))
    logs = " ".join(path.read_text(errors="replace") for path in Path(root).rglob("*.log"))
    command_lines = every_command_line()
    for secret in (password, *accounts.values(), (Path(root) / "pgpass").read_text().strip().rsplit(":", 1)[1]):
        assert secret not in logs and secret not in command_lines


@pytest.mark.slow
@pytest.mark.train
def test_an_editor_trains_and_registers_over_https_and_an_untrusting_client_is_refused(server, accounts, as_user,
                                                                                       tmp_path):
    import mlflow

    state = server["state"]
    assert state.tracking_uri.startswith("https://") and not state.host.startswith("127.")
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=state.tracking_uri, MLFLOW_TRACKING_USERNAME="ed",
               MLFLOW_TRACKING_PASSWORD=accounts["ed"], MLFLOW_TRACKING_SERVER_CERT_PATH=state.trust_cert,
               OMP_NUM_THREADS="1", PATH=f"{BIN}:{env['PATH']}")
    command = [str(BIN / "ldmflow"), "vae", "--manifest_path", str(server["data"]), *VAE, "--experiment_name",
               "ed-work", "--registered_model_name", "https-vae"]
    trained = subprocess.run([*command, "--output_dir", str(tmp_path / "vae")], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    admin = as_user("admin", accounts["admin"])
    granted = admin.get_experiment_by_name("ed-work").experiment_id
    version = admin.get_model_version("https-vae", "1")
    assert admin.get_run(version.run_id).info.experiment_id == granted
    folder = Path(mlflow.artifacts.download_artifacts("models:/https-vae/1", dst_path=str(tmp_path / "back"),
                                                      tracking_uri=state.tracking_uri))
    assert (folder / "MLmodel").is_file() and list(folder.rglob("*.safetensors"))  # through the artifact proxy
    runs = len(admin.search_runs([granted]))

    del env["MLFLOW_TRACKING_SERVER_CERT_PATH"]
    refused = subprocess.run([*command, "--output_dir", str(tmp_path / "untrusted")], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    errors = error_lines(refused)
    assert refused.returncode == 1 and len(errors) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "does not trust" in errors[0] and "MLFLOW_TRACKING_SERVER_CERT_PATH" in errors[0]
    assert len(admin.search_runs([granted])) == runs
    assert not [path for path in (tmp_path / "untrusted").rglob("*") if path.is_file()]


def test_plain_http_beyond_loopback_is_refused_in_one_line(tmp_path):
    host = network_address()
    result = ldmflow("server", "--root", str(tmp_path / "root"), "--host", host, "--port", str(free_port(host)))
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "Refusing to serve passwords in clear text" in result.stderr and "--self_signed" in result.stderr
    assert not (tmp_path / "root" / "postgres").exists()


@pytest.mark.slow
def test_a_backup_restored_into_a_fresh_root_holds_the_same_runs_models_roles_and_artifacts(server, accounts, as_user,
                                                                                             tmp_path, monkeypatch):
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
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ed")  # roles live in the auth database: a new server
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", accounts["ed"])  # process keeps them
        copy.create_experiment("eds-after-restore")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "rita")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", accounts["rita"])
        with pytest.raises(Exception, match="403"):
            copy.create_experiment("ritas-after-restore")
    finally:
        stop_server(tmp_path / "new")
