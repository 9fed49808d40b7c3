"""The `ldmflow` command line: one click group; heavy imports live inside the commands so --help is instant."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shlex
import signal
import sys
import threading
import traceback
import types
import typing

import click

from ldmflow.errors import (UNEXPECTED_EXIT_CODE, LdmflowError, cause_line, missing_package_line, traceback_file,
                            unexpected_error_line)
from ldmflow.models.kinds import LATENT_DDPM, LEGACY_DDPM, PROBE, VAE, Kind
from ldmflow.server.users import PERMISSIONS, ROLES
from ldmflow.settings import (DEFAULT_EXPERIMENT, CacheLatentsSettings, CheckManifestSettings, CompareSettings,
                              DemoDataSettings, EvaluateSettings, PipelineSettings, SampleSettings, ServerSettings,
                              SweepSettings, param_value, setting_fields)


class _Command(click.Command):
    """Turns LdmflowError (bad input, explained in its message) into one clear line and exit code 1, and any
    other exception into one line naming its traceback file and exit code 2 (--verbose also prints it)."""

    def invoke(self, ctx: click.Context):
        return _in_one_line(ctx, lambda: super(_Command, self).invoke(ctx))


class Interrupted(click.ClickException):
    """Ctrl-C or SIGTERM: the open run ended KILLED, partial outputs were removed; exit 128 + the signal's
    number, as a shell reports a process the signal ended."""

    def __init__(self, signal_number: int):
        super().__init__(f"stopped by {signal.Signals(signal_number).name}; the run (if any) ended KILLED.")
        self.exit_code = 128 + signal_number


class _Terminated(KeyboardInterrupt):
    """SIGTERM raised where the command is, as Ctrl-C is: the same cleanup runs on the way out."""

    signal_number = signal.SIGTERM


@contextlib.contextmanager
def _sigterm_interrupts():
    """For the command's duration, SIGTERM raises _Terminated (the training loop sets its own handler, which
    checkpoints first); outside the main thread signals cannot be handled, so nothing changes there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _in_one_line(ctx: click.Context, invoke):
    """LdmflowError -> its one line (exit 1); Ctrl-C or SIGTERM -> exit 130 or 143; click's own exits pass;
    anything else -> the unexpected line."""
    try:
        with _sigterm_interrupts():
            return invoke()
    except KeyboardInterrupt as error:
        raise Interrupted(getattr(error, "signal_number", signal.SIGINT)) from None
    except LdmflowError as error:
        raise click.ClickException(_one_line(error)) from None
    except (click.ClickException, click.exceptions.Exit, click.Abort):  # click's own: exit codes already chosen
        raise
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] == "ldmflow":
            raise _unexpected(ctx, error) from None  # ldmflow's own module: a bug
        raise click.ClickException(missing_package_line(error)) from None
    except Exception as error:
        if type(error).__module__.startswith("mlflow."):  # server errors, failed project steps
            raise click.ClickException(f"MLflow: {cause_line(error, 500)}") from None  # the cause after its ':'s
        raise _unexpected(ctx, error) from None


class UnexpectedError(click.ClickException):
    """An error ldmflow did not foresee: one line, exit code 2 (1 is for the user's own mistakes)."""

    exit_code = UNEXPECTED_EXIT_CODE


def _unexpected(ctx: click.Context, error: Exception) -> UnexpectedError:
    """Write the traceback (in the command's output folder when it exists), print it too under --verbose."""
    folder = next((ctx.params[key] for key in ("output_dir", "output_root") if ctx.params.get(key)), None)
    path = traceback_file(error, folder)
    if ctx.find_root().params.get("verbose"):
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    return UnexpectedError(unexpected_error_line(error, path))


def _one_line(error: LdmflowError) -> str:
    """The message of an LdmflowError, also when a DataLoader worker raised it: torch then wraps it as
    "Caught LdmflowError in DataLoader worker process 0. Original Traceback ..."; its last line is ours."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if last.startswith(("LdmflowError", "ldmflow.")) and ": " in last else last


class _Group(click.Group):
    command_class = _Command


class _CommandGroup(_Group):
    """A group that is also a command (`ldmflow server` starts, `ldmflow server add-user` manages)."""

    def invoke(self, ctx: click.Context):
        return _in_one_line(ctx, lambda: super(_CommandGroup, self).invoke(ctx))


QUIET_LOGGERS = ("urllib3", "alembic", "git", "PIL", "matplotlib", "accelerate", "httpx", "mlflow.store",
                 "mlflow.system_metrics", "mlflow.projects", "mlflow.tracking._tracking_service")


class _ShortFormatter(logging.Formatter):
    """`12:27:29 message`; the level only from warnings up (--verbose adds dates and logger names)."""

    def __init__(self):
        super().__init__("%(asctime)s %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            stamp, _, message = text.partition(" ")
            text = f"{stamp} {record.levelname}: {message}"
        return text


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr; only warnings from the chatty libraries ldmflow builds on (system-metrics chatter, the
    projects runner's long command lines), and no artifact progress bars where stderr is not a terminal
    (their carriage returns join into one long line in a log file)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s") if verbose
                         else _ShortFormatter())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not sys.stderr.isatty():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _comma_ints(ctx, param, value):
    if value is None or isinstance(value, tuple):
        return value
    try:
        return tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected a comma list of integers such as 32,64, got {value!r}") from None


def _option(item, kind, metadata) -> click.Option:
    """The click option of one settings field: flag name, aliases, type, default, choices and help."""
    required = item.default is dataclasses.MISSING
    names = [f"--{item.name}", *metadata.get("aliases", ())]
    options = {"help": metadata.get("help"), "required": required}
    if not required:
        options.update(default=item.default,
                       show_default=not (item.default is None or item.default is False or item.default == ()))
    optional = typing.get_origin(kind) in (typing.Union, types.UnionType)
    if optional:
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if kind is bool:
        if item.default is True:
            names[0] = f"--{item.name}/--no_{item.name}"
        return click.Option(names, is_flag=True, **options)
    if typing.get_origin(kind) is tuple and typing.get_args(kind)[0] is int:
        if not required:
            options["default"] = param_value(item.default)
        return click.Option(names, callback=_comma_ints, **options)
    if typing.get_origin(kind) is tuple:
        return click.Option(names, multiple=True, **{**options, "default": None})
    choices = metadata.get("choices")
    return click.Option(names, type=click.Choice(choices) if choices else kind, **options)


def settings_options(settings_class):
    """Decorate a command with one option per field of `settings_class` (the single source of defaults)."""

    def apply(function):
        params = getattr(function, "__click_params__", [])
        fields = sorted(setting_fields(settings_class), key=lambda f: f[0].default is not dataclasses.MISSING)
        params.extend(_option(item, kind, metadata) for item, kind, metadata in reversed(fields))
        function.__click_params__ = params
        return function

    return apply


@click.group(cls=_Group, context_settings={"auto_envvar_prefix": "LDMFLOW", "help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, and the traceback of an unexpected error.")
def cli(verbose: bool) -> None:
    """Train a VAE, a conditioned latent DDPM and a pixel DDPM from an image manifest, tracked in MLflow."""
    setup_logging(verbose)


@cli.command("check-manifest")
@settings_options(CheckManifestSettings)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a summary.")
def check_manifest_command(as_json, **options):
    """Validate a manifest before a long training: counts, missing and unreadable files, condition stats."""
    from ldmflow.data.check import check_manifest, format_report
    from ldmflow.data.manifest import NothingUsableError

    try:
        report, usable = check_manifest(**options), True
    except NothingUsableError as error:
        report, usable = error.report.to_dict(), False
        click.echo(f"Error: {error}", err=True)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if not usable:
        sys.exit(1)


@cli.command("cache-latents")
@settings_options(CacheLatentsSettings)
def cache_latents_command(**options):
    """Encode a dataset into the on-disk latent cache that `latent-ddpm --cache_latents` reads, on every process
    of `accelerate launch`; prints the cache's folder."""
    from ldmflow.workflows.cache_latents import run_cache_latents

    folder = run_cache_latents(CacheLatentsSettings(**options))
    if folder is not None:
        click.echo(str(folder))


@cli.command("demo-data")
@settings_options(DemoDataSettings)
def demo_data_command(**options):
    """Write a synthetic, condition-dependent dataset and its manifest.json (nothing is downloaded)."""
    from ldmflow.data.demo import make_demo_dataset

    click.echo(str(make_demo_dataset(**options)))


def _train_command(kind: Kind):
    """`ldmflow <kind.command>`: the kind's settings as options, its summary as help, trained (and replicated)
    by workflows/replicates.py; one per kind, as projects.py makes one entry point per kind."""

    def command(**options):
        from ldmflow.workflows.replicates import train

        train(kind.settings(**options))

    command.__doc__ = kind.summary
    return cli.command(kind.command)(settings_options(kind.settings)(command))


TRAIN_COMMANDS = {kind: _train_command(kind) for kind in (VAE, LATENT_DDPM, LEGACY_DDPM, PROBE)}


@cli.command("evaluate")
@settings_options(EvaluateSettings)
def evaluate_command(**options):
    """Score a model (FID/KID, condition adherence, diversity; PSNR/SSIM/rFID for a VAE) on a split."""
    from ldmflow.evaluation.report import format_metrics
    from ldmflow.workflows.evaluate import run_evaluation

    click.echo(format_metrics(run_evaluation(EvaluateSettings(**options))))


@cli.command("compare")
@click.argument("model_a")
@click.argument("model_b")
@settings_options(CompareSettings)
def compare_command(model_a, model_b, **options):
    """Is model A better than model B beyond noise? Both scored on the same requests and seeds; a model is a
    folder, runs:/..., models:/name/version or @alias, or a replicate group's parent run (runs:/<run_id>)."""
    from ldmflow.workflows.compare import run_compare

    settings = CompareSettings(**options)
    result = run_compare(model_a, model_b, settings)
    click.echo(result.text)
    if settings.fail_if_worse and result.worse_on(settings.fail_if_worse):
        click.echo(f"A is worse than B on {settings.fail_if_worse} beyond noise (--fail_if_worse).", err=True)
        raise SystemExit(1)


@cli.command("sample")
@settings_options(SampleSettings)
def sample_command(**options):
    """Generate images (and grid.png) from a trained model; logged as a run linked to the model."""
    from ldmflow.workflows.sample import run_sampling

    click.echo(str(run_sampling(SampleSettings(**options))))


@cli.command("pipeline")
@settings_options(PipelineSettings)
def pipeline_command(**options):
    """vae -> latent_ddpm -> sample -> evaluate as child runs of one parent run; unchanged finished steps are
    reused."""
    from ldmflow.evaluation.metric_names import PSNR, SSIM
    from ldmflow.evaluation.report import format_metrics
    from ldmflow.tracking.lineage import version_metrics
    from ldmflow.workflows.pipeline import evaluation_metrics, run_pipeline
    from ldmflow.workflows.replicates import format_group, run_pipeline_replicates

    settings = PipelineSettings(**options)
    if settings.replicates > 1:
        click.echo(format_group(run_pipeline_replicates(settings)))
        return
    result = run_pipeline(settings)

    def reused(flag: bool) -> str:
        return " (reused)" if flag else ""

    vae_quality = ", ".join(f"{key} {value:.4g}" for key, value in sorted(version_metrics(result.vae_uri).items())
                            if key in (PSNR, SSIM))  # the first stage's ceiling, as VAEs compare
    click.echo(f"Pipeline: {result.vae_uri}{reused(result.vae_reused)}"
               + (f" ({vae_quality} at its registered weights)" if vae_quality else "")
               + f" -> {result.latent_ddpm_uri}{reused(result.latent_ddpm_reused)}; "
               f"samples in run {result.sample_run_id}{reused(result.sample_reused)}, evaluation in run "
               f"{result.evaluate_run_id}{reused(result.evaluate_reused)}.")
    if result.evaluate_reused:  # else its own run printed the table above
        click.echo(f"\nEvaluation of {result.latent_ddpm_uri} (run {result.evaluate_run_id}):")
        click.echo(format_metrics(evaluation_metrics(result.evaluate_run_id)))


@cli.command("sweep", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@settings_options(SweepSettings)
def sweep_command(**options):
    """Search a stage's settings with Optuna: each trial an MLflow run under the study's run, the best registered
    as sweep-<study>. The stage's other options follow (e.g. --manifest_path ... --output_dir ...)."""
    from ldmflow.workflows.sweep import run_sweep

    settings = SweepSettings(**options)
    stage_args = [*shlex.split(settings.stage_options), *click.get_current_context().args]  # after our options
    summary = run_sweep(settings, *stage_options(settings.stage, stage_args))
    click.echo(f"Study {summary['study']} (run {summary['run_id']}, {summary['trials']} trials): best trial "
               f"{summary['best_trial']}, {summary['best_value']:.6g}, {json.dumps(summary['best_params'])}"
               + (f"; registered {summary['registered']}." if summary["registered"] else "."))


def stage_options(command_name: str, args: list[str]) -> tuple[dict, frozenset[str]]:
    """The options a stage's own command would parse from `args` (checked by it, said in one line), and the names of
    those that `args` gives."""
    command = cli.commands[command_name]
    try:
        with command.make_context(command_name, list(args), resilient_parsing=False) as ctx:
            given = frozenset(name for name in ctx.params
                              if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE)
            return dict(ctx.params), given
    except click.exceptions.Exit:
        raise LdmflowError(f"--help: see `ldmflow {command_name} --help` for the stage's options.") from None
    except click.ClickException as error:
        raise LdmflowError(f"The {command_name} options of the sweep: {error.format_message()}") from None


@cli.command("lineage")
@click.argument("model_uri")
@click.option("--json", "as_json", is_flag=True)
def lineage_command(model_uri, as_json):
    """Print dataset -> VAE -> latent DDPM -> sample runs for a registered model version."""
    from ldmflow.tracking.lineage import format_lineage, lineage
    from ldmflow.tracking.store import reachable_store

    reachable_store()
    chain = lineage(model_uri)
    click.echo(json.dumps(chain, indent=2) if as_json else format_lineage(chain))


@cli.command("models")
@click.option("--json", "as_json", is_flag=True)
def models_command(as_json):
    """List registered ldmflow model versions with their stage, lineage and key metrics."""
    from ldmflow.tracking.lineage import format_models, list_models
    from ldmflow.tracking.store import reachable_store

    store = reachable_store()
    rows = list_models()
    click.echo(json.dumps(rows, indent=2) if as_json else format_models(rows, store))


@cli.group("server", cls=_CommandGroup, invoke_without_command=True)
@settings_options(ServerSettings)
@click.pass_context
def server_command(ctx, **options):
    """Start a team MLflow server: PostgreSQL, proxied artifacts, basic auth, TLS beyond loopback (prints what to
    export). Its subcommands manage users, backups and status."""
    from ldmflow.server.team_server import start_server

    if ctx.invoked_subcommand:
        return
    settings = ServerSettings(**options)
    state = start_server(settings.root, settings.port, settings.host, settings.tls_cert, settings.tls_key,
                         settings.self_signed, settings.insecure)
    click.echo(f"MLflow server on {state.tracking_uri} (PostgreSQL on 127.0.0.1:{state.pg_port}); to use it:")
    click.echo(state.exports())
    if state.trust_cert:
        click.echo(f"Clients trust its self-signed certificate by copying {state.trust_cert} and setting "
                   "MLFLOW_TRACKING_SERVER_CERT_PATH to the copy.")
    click.echo(f"Sweeps on this machine, as this user (docs/sweeps.md): export PGPASSFILE={state.password_file()}, "
               f"then ldmflow sweep ... --storage {state.sweep_storage()}")
    click.echo(f"Stop it with: ldmflow server-stop --root {settings.root}")


ROLE_HELP = ("reader: reads everything, creates and logs nothing; editor: also creates experiments and models and "
             "logs to its own and where `grant` allows; admin: everything.")
ROOT_OPTION = click.option("--root", default=ServerSettings.root, show_default=True,
                           help="The folder `ldmflow server` used.")


@cli.command("server-stop")
@ROOT_OPTION
def server_stop_command(root):
    """Stop the team server started in --root (its MLflow server and PostgreSQL, nothing else)."""
    from ldmflow.server.team_server import stop_server

    stop_server(root)
    click.echo(f"Stopped the server in {root}.")


@server_command.command("add-user")
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), default="reader", show_default=True,
              help=ROLE_HELP)
@click.option("--password_stdin", is_flag=True, help="Read the password from stdin (else one is generated).")
@ROOT_OPTION
def server_add_user_command(name, role, password_stdin, root):
    """Create an account; a generated password is printed once, and never logged."""
    import secrets

    from ldmflow.server.users import add_user

    password = sys.stdin.readline().rstrip("\n") if password_stdin else secrets.token_urlsafe(15)
    add_user(root, name, password, role)
    click.echo(f"Added {role} {name!r}." + ("" if password_stdin else f" Password (shown once): {password}"))


@server_command.command("set-role")
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), required=True, help=ROLE_HELP)
@ROOT_OPTION
def server_set_role_command(name, role, root):
    """Change an account's role (a new reader keeps READ only, also on what it made)."""
    from ldmflow.server.users import set_role

    set_role(root, name, role)
    click.echo(f"{name!r} is now {'an' if role == 'admin' else 'a'} {role}.")


@server_command.command("remove-user")
@click.argument("name")
@ROOT_OPTION
def server_remove_user_command(name, root):
    """Delete an account (a login it made may be honoured for 30 s more: MLflow's login cache)."""
    from ldmflow.server.users import remove_user

    remove_user(root, name)
    click.echo(f"Removed {name!r}.")


@server_command.command("grant")
@click.argument("name")
@click.option("--experiment", required=True, help="Experiment name (created if missing).")
@click.option("--permission", type=click.Choice(PERMISSIONS, case_sensitive=False), required=True)
@ROOT_OPTION
def server_grant_command(name, experiment, permission, root):
    """Give a user READ, EDIT or MANAGE on one experiment."""
    from ldmflow.server.users import grant

    grant(root, name, experiment, permission)
    click.echo(f"{name!r} has {permission.upper()} on experiment {experiment!r}.")


@server_command.command("list-users")
@ROOT_OPTION
def server_list_users_command(root):
    """The server's accounts and their roles."""
    from ldmflow.server.users import list_users

    for user in list_users(root):
        click.echo(f"{user['username']} ({user['role']})")


@server_command.command("backup")
@ROOT_OPTION
@click.option("--to", "target", required=True, help="A new folder for the backup.")
def server_backup_command(root, target):
    """pg_dump of the tracking and auth databases, the artifacts and the admin password, into --to."""
    from ldmflow.server.backup import backup

    click.echo(f"Backed up {root} to {backup(root, target)}.")


@server_command.command("restore")
@click.option("--from", "source", required=True, help="A folder made by `ldmflow server backup`.")
@ROOT_OPTION
def server_restore_command(source, root):
    """Build a new --root from a backup; then start it with `ldmflow server --root ...`."""
    from ldmflow.server.backup import restore

    click.echo(f"Restored {source} into {restore(source, root)}; start it with: ldmflow server --root {root}")


@server_command.command("upgrade")
@ROOT_OPTION
@click.option("--backup_to", required=True, help="A new folder for the backup made before upgrading.")
def server_upgrade_command(root, backup_to):
    """Back up the stopped server, then upgrade its tracking schema to the installed MLflow (`mlflow db upgrade`)."""
    from ldmflow.server.backup import upgrade

    click.echo(f"Backed up to {upgrade(root, backup_to)} and upgraded; start it with: ldmflow server --root {root}")


@server_command.command("status")
@ROOT_OPTION
def server_status_command(root):
    """Health, versions and disk use of the server in --root."""
    from ldmflow.server.backup import status

    click.echo(json.dumps(status(root), indent=2))


@cli.command("init-store")
@click.option("--experiment_name", default=DEFAULT_EXPERIMENT, show_default=True)
def init_store_command(experiment_name):
    """Create the tracking store and experiment (artifacts next to a SQLite store) and print the store URI."""
    from ldmflow.tracking.store import ensure_experiment, use_tracking_store

    uri = use_tracking_store()
    ensure_experiment(experiment_name)
    click.echo(uri)


def main() -> None:
    """Console script `ldmflow`."""
    cli(prog_name="ldmflow")


def train_legacy_ddpm_main() -> None:
    """Console script `train-legacy-ddpm`: the original script's name for `ldmflow legacy-ddpm`."""
    setup_logging()
    TRAIN_COMMANDS[LEGACY_DDPM](prog_name="train-legacy-ddpm")
