"""The one way tests call the `ldmflow` CLI in-process (pytest puts tests/ on sys.path)."""

from __future__ import annotations

from click.testing import CliRunner

from ldmflow.cli import cli


def invoke(*args, ok: bool = True):
    """Run `ldmflow <args>` (paths and numbers are turned into strings); with ok, assert it succeeded."""
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result
