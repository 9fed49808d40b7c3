"""The one way tests call the `ldmflow` CLI in-process (pyproject.toml puts tests/ on sys.path): a new test
imports `invoke` from here rather than making its own click CliRunner."""

from __future__ import annotations

from click.testing import CliRunner

from ldmflow.cli import cli


def invoke(*args, ok: bool = True, input: str | None = None):
    """Run `ldmflow <args>` (paths and numbers are turned into strings) with `input` as its stdin; with ok, assert
    it succeeded. An exception that escapes the command's one-line handling is raised, not kept in the result."""
    result = CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result
