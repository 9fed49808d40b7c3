"""The team server's accounts, through MLflow's auth REST API as the admin in `<root>/server.json`.

Passwords come from stdin or are generated, and are printed once by the CLI; they never reach a command line,
a run or a log.

Roles are MLflow's own roles, kept in its auth database (so they outlive restarts and come with backups). The
server runs MLflow's workspace mode, where every account reads the default workspace (default_permission READ)
but only a member holding USE on the workspace may create experiments or registered models:
- `reader` holds nothing: it reads every experiment and model and creates nothing, so it logs nowhere (a run,
  a logged model or a model version needs EDIT on its experiment or model, which nobody gives it);
- `editor` holds USE: it may also create experiments and registered models (MLflow makes the creator their
  MANAGE) and log to those, and to the experiments `grant` gives it EDIT or MANAGE on; nowhere else;
- `admin` is MLflow's admin flag: anything, users included.
MLflow ties creating experiments and creating registered models to the same USE, so an editor cannot be kept from
making experiments without also being kept from registering what it trains.
An account with neither role (made before roles, or through MLflow's own sign-up page) is a reader.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from ldmflow.errors import LdmflowError

ROLES = ("reader", "editor", "admin")
PERMISSIONS = ("READ", "EDIT", "MANAGE")
ROLE_GRANTS = {"reader": (), "editor": (("workspace", "*", "USE"),)}  # (resource type, pattern, permission)
ROLE_DESCRIPTIONS = {"reader": "ldmflow reader: reads everything, creates and logs nothing",
                     "editor": "ldmflow editor: creates experiments and models, logs to its own and granted ones"}


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
        client.create_user(name, password)  # a reader until the role is assigned: a failure leaves no writer
        if role == "admin":
            client.update_user_admin(name, True)
        else:
            client.assign_role(name, _role_id(client, role))


def _role_id(client, role: str) -> int:
    """The id of MLflow role `role` in the default workspace, made (or completed) with ROLE_GRANTS[role]."""
    from mlflow.utils.workspace_utils import DEFAULT_WORKSPACE_NAME

    found = {existing.name: existing.id for existing in client.list_roles(DEFAULT_WORKSPACE_NAME)}
    role_id = found.get(role) or client.create_role(DEFAULT_WORKSPACE_NAME, role, ROLE_DESCRIPTIONS[role]).id
    held = {(grant.resource_type, grant.resource_pattern, grant.permission)
            for grant in client.list_role_permissions(role_id)}
    for resource_type, pattern, permission in ROLE_GRANTS[role]:
        if (resource_type, pattern, permission) not in held:
            client.add_role_permission(role_id, resource_type, pattern, permission)
    return role_id


def role_of(user: dict) -> str:
    """admin, editor or reader, from an account as MLflow lists it ({is_admin, roles: [{name, ...}]})."""
    if user.get("is_admin"):
        return "admin"
    return "editor" if "editor" in {role.get("name") for role in user.get("roles", [])} else "reader"


def set_role(root: str | Path, name: str, role: str) -> None:
    """Make `name` a reader, editor or admin. A new reader also loses every grant beyond READ (MANAGE of the
    experiments and models it made included): it then reads them only."""
    if role not in ROLES:
        raise LdmflowError(f"--role must be one of {', '.join(ROLES)}, not {role!r}.")
    with admin_client(root) as (client, _):
        _role_named(client, name)  # the account exists
        held = {assigned.name: assigned.id for assigned in client.list_user_roles(name)}
        client.update_user_admin(name, role == "admin")
        for other in set(ROLE_GRANTS) - {role}:
            if other in held:
                client.unassign_role(name, held[other])
        if role in ROLE_GRANTS and role not in held:
            client.assign_role(name, _role_id(client, role))
        if role == "reader":
            for own in (role_id for role_name, role_id in held.items() if role_name.startswith("__user_")):
                for grant in client.list_role_permissions(own):  # its own grants: MLflow keeps them in a role
                    if grant.permission != "READ":
                        client.remove_role_permission(grant.id)


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
        if permission != "READ" and _role_named(client, name) == "reader":
            raise LdmflowError(f"{name!r} is a reader, and readers only read: make it an editor first "
                               f"(`ldmflow server set-role {name} --role editor`).")
        tracking = MlflowClient(state.tracking_uri)
        found = tracking.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else tracking.create_experiment(experiment)
        client.grant_user_permission(name, RESOURCE_TYPE_EXPERIMENT, experiment_id, permission)


def list_users(root: str | Path) -> list[dict]:
    """[{username, role}] of every account."""
    with admin_client(root) as (client, _):
        return [{"username": user["username"], "role": role_of(user)} for user in _listed_users(client)]


def _listed_users(client) -> list[dict]:
    from mlflow.server.auth.routes import LIST_USERS

    return client._request(LIST_USERS, "GET").get("users", [])  # the route exists; the client has no method for it


def _role_named(client, name: str) -> str:
    user = next((user for user in _listed_users(client) if user["username"] == name), None)
    if user is None:
        raise LdmflowError(f"No user {name!r} on this server (see `ldmflow server list-users`).")
    return role_of(user)
