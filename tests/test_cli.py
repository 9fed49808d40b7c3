"""The CLI surface: every command's --help works, and importing the CLI loads no heavy library."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cli_runner import invoke
from ldmflow.cli import cli

COMMANDS = sorted(cli.commands)


def test_every_command_is_there():
    assert {"vae", "latent-ddpm", "legacy-ddpm", "sample", "pipeline", "check-manifest", "demo-data", "lineage",
            "models", "init-store"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(command):
    result = invoke(command, "--help", ok=False)
    assert result.exit_code == 0 and "Usage:" in result.output


def test_help_imports_no_torch_diffusers_or_mlflow():
    code = ("import sys\nfrom ldmflow.cli import cli\n"
            "try:\n    cli(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'mlflow', 'accelerate') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_python_dash_m_and_the_console_script_agree():
    result = subprocess.run([sys.executable, "-m", "ldmflow", "--help"], capture_output=True, text=True, check=True)
    assert "latent-ddpm" in result.stdout
