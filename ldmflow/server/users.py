"""The team server's accounts, through MLflow's auth REST API as the admin in `<root>/server.json`.

Passwords come from stdin or are generated, and are printed once by the CLI; they never reach a command line,
a run or a log. Roles: every user reads every experiment (the server's default_permission is READ); `grant`
gives EDIT or MANAGE on one experiment; `admin` may do anything, users included.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from ldmflow.errors import LdmflowError

ROLES = ("reader", "editor", "admin")
PERMISSIONS = ("READ", "EDIT", "MANAGE")


@contextmanager
def admin_client(root: str | Path):
    """MLflow's AuthServiceClient logged in as the server's admin (credentials only for this block)."""
    from mlflow.server.auth.client import AuthServiceClient

    from ldmflow.server.team_server import read_state

    state = read_state(root)
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                                                  "MLFLOW_TRACKING_SERVER_CERT_PATH")}
    os.environ.update(MLFLOW_TRACKING_USERNAME=state.username, MLFLOW_TRACKING_PASSWORD=state.password)
    if state.trust_cert:
        os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"] = state.trust_cert
    try:
        yield AuthServiceClient(state.tracking_uri), state
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def add_user(root: str | Path, name: str, password: str, role: str = "reader") -> None:
    if role not in ROLES:
        raise LdmflowError(f"--role must be one of {', '.join(ROLES)}, not {role!r}.")
    if len(password) < 12:
        raise LdmflowError("The password must have at least 12 characters.")
    with admin_client(root) as (client, _):
        client.create_user(name, password)
        if role == "admin":
            client.update_user_admin(name, True)


def remove_user(root: str | Path, name: str) -> None:
    with admin_client(root) as (client, _):
        client.delete_user(name)


def grant(root: str | Path, name: str, experiment: str, permission: str) -> None:
    """Give `name` READ, EDIT or MANAGE on the experiment (created if it does not exist yet)."""
    from mlflow import MlflowClient
    from mlflow.server.auth.permissions import RESOURCE_TYPE_EXPERIMENT

    permission = permission.upper()
    if permission not in PERMISSIONS:
        raise LdmflowError(f"--permission must be one of {', '.join(PERMISSIONS)}, not {permission!r}.")
    with admin_client(root) as (client, state):
        tracking = MlflowClient(state.tracking_uri)
        found = tracking.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else tracking.create_experiment(experiment)
        client.grant_user_permission(name, RESOURCE_TYPE_EXPERIMENT, experiment_id, permission)


def list_users(root: str | Path) -> list[dict]:
    """[{username, is_admin}] of every account."""
    from mlflow.server.auth.routes import LIST_USERS

    with admin_client(root) as (client, _):
        answer = client._request(LIST_USERS, "GET")  # the route exists; the client has no method for it
    return [{"username": user["username"], "is_admin": user.get("is_admin", False)}
            for user in answer.get("users", [])]
