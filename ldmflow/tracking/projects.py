"""MLflow Projects glue: run an `ldmflow` click command from an entry point's command line.

MLflow appends every `-P` value that MLproject does not declare as `--name value`. Boolean click flags take
no value, so `--use_ema true` / `--use_ema false` are turned into `--use_ema` / nothing here, and empty
values of declared optional parameters (`--run_name ""`) are dropped so the CLI default applies.
"""

from __future__ import annotations

import click

TRUE_WORDS = {"true", "1", "yes", "on"}
FALSE_WORDS = {"false", "0", "no", "off", ""}


def normalise_arguments(command: click.Command, argv: list[str]) -> list[str]:
    """Rewrite MLflow-style `--flag value` pairs for click boolean flags; drop `--option ''` pairs."""
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
        if argument.startswith("--") and not has_equals and following == "":
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
