"""The pipeline's steps run with the Python the pipeline runs with, whatever `python` the shell's PATH finds first;
an entry point or command started by a Python that lacks ldmflow's packages says so in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


from cli_runner import invoke
from ldmflow.workflows.pipeline import this_python_first_on_path

PROJECT = Path(__file__).resolve().parents[2]


def test_a_step_finds_this_python_before_the_one_first_on_path(tmp_path, monkeypatch):
    decoy = tmp_path / "python"  # a system Python without ldmflow's packages, first on the shell's PATH
    decoy.write_text("#!/bin/sh\necho decoy\nexit 3\n")
    decoy.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with this_python_first_on_path():
        step = subprocess.run(["python", "-c", "import sys, tifffile; print(sys.prefix)"], capture_output=True,
                              text=True)
    assert step.returncode == 0 and step.stdout.strip() == sys.prefix, step.stdout + step.stderr
    assert os.environ["PATH"].startswith(str(tmp_path))  # as it was
    assert subprocess.run(["python"], capture_output=True, text=True).stdout == "decoy\n"


def test_an_entry_point_started_by_a_python_without_ldmflows_packages_says_so(tmp_path):
    step = subprocess.run([sys.executable, "-S", "-m", "entrypoints.vae"], cwd=PROJECT, capture_output=True,
                          text=True)  # -S: no site-packages, as a system Python without them
    assert step.returncode == 1
    [line] = step.stderr.strip().splitlines()
    assert line.startswith(f"Error: {sys.executable} lacks ldmflow's packages (click") and "ldmflow" in line


def test_a_command_that_cannot_import_a_package_is_one_line(monkeypatch, tmp_path):
    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'tifffile'", name="tifffile")

    monkeypatch.setattr("ldmflow.data.check.check_manifest", missing)
    result = invoke("check-manifest", "--manifest_path", str(tmp_path / "m.json"), ok=False)
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: {sys.executable} cannot import tifffile, which ldmflow needs: run "
                                     "ldmflow with the Python it is installed in (e.g. .venv/bin/ldmflow), or "
                                     "install ldmflow into this one.")
