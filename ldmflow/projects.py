"""MLflow Projects: MLproject rendered from the settings, and the glue that runs a click command from it; also
docs/options.md, every command's options as `--help` shows them (`python -m ldmflow.projects --options`).

`python -m ldmflow.projects > MLproject` (`make mlproject`) writes the file: every entry point declares every
setting of its command with the settings' own default, so MLproject never drifts from the CLI. MLflow has no
integer type: integers, booleans and lists are `string` parameters that the CLI checks. Paths and model URIs
are strings too: MLflow's `path` and `uri` types fail after the run is created, leaving it RUNNING, while
ldmflow's own checks fail cleanly (relative paths are then relative to the project folder).

MLflow appends every `-P` value that MLproject does not declare as `--name value`. Boolean click flags take
no value, so `--use_ema true` / `--use_ema false` are turned into `--use_ema` / nothing here, and empty
values of optional settings (`--max_train_steps ''`) are dropped so their default (None) applies. Any other
empty value reaches the CLI, whose checks speak (`-P condition_spec=` is an error, not the default spec).
"""

from __future__ import annotations

import dataclasses
import json

import click

from ldmflow.models.kinds import KINDS
from ldmflow.settings import (EvaluateSettings, PipelineSettings, SampleSettings, SweepSettings, param_value,
                              setting_fields)

# entry point -> (ldmflow command, settings), one per kind of model first. Each has entrypoints/<entry point>.py.
ENTRY_POINTS = {
    **{kind.name: (kind.command, kind.settings) for kind in KINDS},
    "sample": ("sample", SampleSettings),
    "evaluate": ("evaluate", EvaluateSettings),
    "pipeline": ("pipeline", PipelineSettings),
    "sweep": ("sweep", SweepSettings),
}

TRUE_WORDS = {"true", "1", "yes", "on"}
FALSE_WORDS = {"false", "0", "no", "off", ""}


def normalise_arguments(command: click.Command, argv: list[str]) -> list[str]:
    """Rewrite MLflow-style `--flag value` pairs for click boolean flags; drop `--option ''` of optional settings."""
    optional = {opt for param in command.params if isinstance(param, click.Option) and param.default is None
                for opt in param.opts}
    negations = {opt: (param.secondary_opts[0] if param.secondary_opts else None)
                 for param in command.params if isinstance(param, click.Option) and param.is_flag
                 for opt in param.opts}
    result, index = [], 0
    while index < len(argv):
        argument = argv[index]
        name, has_equals, inline = argument.partition("=")
        following = argv[index + 1] if index + 1 < len(argv) else None
        if name in negations:
            if has_equals:
                value, index = inline, index + 1
            elif following is not None and following.lower() in TRUE_WORDS | FALSE_WORDS:
                value, index = following, index + 2
            else:
                value, index = "true", index + 1
            if value.lower() in TRUE_WORDS:
                result.append(name)
            elif negations[name]:
                result.append(negations[name])
            continue
        if argument in optional and following == "":
            index += 2
            continue
        result.append(argument)
        index += 1
    return result


def run_entry_point(command_name: str, argv: list[str]) -> None:
    """Invoke `ldmflow <command_name>` with MLflow's arguments normalised (used by entrypoints/*.py)."""
    from ldmflow.cli import cli, setup_logging

    setup_logging()
    command = cli.commands[command_name]
    cli.main(args=[command_name, *normalise_arguments(command, argv)], prog_name="ldmflow")


def project_parameters(entry_point: str) -> dict[str, tuple[str, str | None]]:
    """name -> (MLproject type, default as MLflow passes it; None for a required parameter), in flag order.

    Settings that default to None (max_train_steps, data_root, ...) are not declared: MLflow would log their
    empty default as "''". `-P name=value` passes them all the same (as `--name value`). A required CLI output
    folder gets `outputs/<entry point>` under `mlflow run`, the one project-only default.
    """
    result = {}
    for item, kind, metadata in setting_fields(ENTRY_POINTS[entry_point][1]):
        if not metadata.get("project", True) or item.default is None:
            continue
        default = None if item.default is dataclasses.MISSING else param_value(item.default)
        if default is None and item.name == "output_dir":
            default = f"outputs/{entry_point}"
        result[item.name] = ("float" if kind is float else "string", default)
    return result


def _yaml_default(project_type: str, default: str) -> str:
    """A YAML scalar that reads back as `default` (floats with a dot, so YAML 1.1 loaders see a float)."""
    if project_type == "float":
        mantissa, _, exponent = default.partition("e")
        return (mantissa if "." in mantissa else mantissa + ".0") + (f"e{exponent}" if exponent else "")
    return json.dumps(default)


def _wrap(pieces: list[str], width: int = 110) -> list[str]:
    """Indented lines of whole `--flag {value}` pieces (YAML's `>-` joins them with spaces)."""
    lines = [""]
    for piece in pieces:
        if lines[-1] and len(lines[-1]) + 1 + len(piece) > width - 6:
            lines.append("")
        lines[-1] = f"{lines[-1]} {piece}".strip()
    return [" " * 6 + line for line in lines]


def render_mlproject() -> str:
    """The MLproject file: one entry point per ldmflow command, every setting a parameter."""
    lines = [
        "# Generated by `make mlproject` (python -m ldmflow.projects) from ldmflow/settings.py: do not edit.",
        "# Each entry point runs the ldmflow command of the same name (entrypoints/*.py) with every setting as",
        "# a parameter. MLflow has no integer type: integers, booleans (true/false) and comma lists are strings",
        "# checked by the CLI. Settings without a default (max_train_steps, data_root, resume_from_checkpoint,",
        "# ...) are passed the same way: -P name=value. Run here with:",
        "#   mlflow run . -e vae --env-manager local -P manifest_path=...",
        "name: ldmflow", "", "conda_env: conda.yaml", "", "entry_points:",
    ]
    for entry_point in ENTRY_POINTS:
        parameters = project_parameters(entry_point)
        lines += [f"  {entry_point}:", "    parameters:"]
        for name, (project_type, default) in parameters.items():
            value = project_type if default is None else \
                f"{{type: {project_type}, default: {_yaml_default(project_type, default)}}}"
            lines.append(f"      {name}: {value}")
        lines += ["    command: >-"] + _wrap([f"python -m entrypoints.{entry_point}"] +
                                          [f"--{name} {{{name}}}" for name in parameters])
        lines.append("")
    return "\n".join(lines[:-1]) + "\n"


def render_options() -> str:
    """docs/options.md: every option of every `ldmflow` command and subcommand, read from the click commands that
    cli.py builds from the settings, so the page says what `--help` says."""
    from ldmflow.cli import cli

    lines = ["# Every option of every command", "",
             "<!-- Generated by `make options` (python -m ldmflow.projects --options) from ldmflow/settings.py: "
             "do not edit. -->", "",
             "The same as `ldmflow <command> --help`. Every option can also come from an environment variable",
             "`LDMFLOW_<COMMAND>_<OPTION>` (e.g. `LDMFLOW_VAE_RESOLUTION=128`); MLflow Projects entry points take",
             "the settings with a default as `-P name=value` ([mlflow.md](mlflow.md#entry-points-mlproject)).", "",
             "## `ldmflow`", "", "Options before the command, e.g. `ldmflow -v vae ...`.", "",
             *_option_table(cli)]
    for name, command in _commands(cli):
        lines += [f"## `ldmflow {name}`", "", _first_paragraph(command.help), "", *_option_table(command)]
    return "\n".join(lines[:-1]) + "\n"


def _commands(group: click.Group, prefix: str = ""):
    """(name, command) of every command and, after a group, of its subcommands, in alphabetical order."""
    for name in sorted(group.commands):
        command = group.commands[name]
        yield prefix + name, command
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix}{name} ")


def _first_paragraph(text: str | None) -> str:
    return " ".join((text or "").strip().split("\n\n")[0].split())


def _option_table(command: click.Command) -> list[str]:
    lines = ["| option | default | meaning |", "|---|---|---|"]
    for param in command.params:
        if isinstance(param, click.Option) and "--help" not in param.opts:
            names = ", ".join(f"`{opt}`" for opt in (*param.opts, *param.secondary_opts))
            lines.append(f"| {names} | {_shown_default(param)} | {_cell(_meaning(param))} |")
        elif isinstance(param, click.Argument):
            lines.append(f"| `{param.name.upper()}` (argument) | {'required' if param.required else ''} | |")
    return lines + [""]


def _shown_default(param: click.Option) -> str:
    if param.required:
        return "required"
    default = param.default  # click's own "no default" marker for a flag or option declared without one
    if param.is_flag or isinstance(default, bool):
        return "on" if default is True else "off"
    if default in ("", None) or not isinstance(default, (str, int, float, list, tuple)):
        return "none"
    return f"`{param_value(tuple(default)) if isinstance(default, (list, tuple)) else default}`"


def _meaning(param: click.Option) -> str:
    text = " ".join((param.help or "").split())
    if isinstance(param.type, click.Choice):
        text += " One of: " + ", ".join(f"`{choice}`" for choice in param.type.choices) + "."
    return text.strip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


if __name__ == "__main__":
    import sys

    print(render_options() if sys.argv[1:] == ["--options"] else render_mlproject(), end="")
