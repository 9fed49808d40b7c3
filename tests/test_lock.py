"""requirements.lock: it satisfies pyproject.toml, this environment is exactly it, conda.yaml is rendered from it,
and a lock that disagrees is refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldmflow import lock
from ldmflow.errors import LdmflowError

PYPROJECT = """[project]
name = "x"
dependencies = ["diffusers>=0.31,<0.43", "numpy>=1.24"]
[project.optional-dependencies]
dev = ["pytest>=8"]
server = ["psycopg2-binary>=2.9", "tomli>=1; python_version < '3.0'"]
"""


def _files(tmp_path: Path, pins: str) -> tuple[Path, Path]:
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    (tmp_path / "requirements.lock").write_text("# python: 3.11\n" + pins)
    return tmp_path / "requirements.lock", tmp_path / "pyproject.toml"


def test_the_lock_satisfies_pyproject_and_this_environment_is_exactly_it():
    locked = lock.check()
    assert locked.versions["torch"] == "2.13.0" and locked.python == "3.11"
    assert lock.installed_mismatches(locked) == [], "run `make install`: the environment is not the lock"


def test_conda_yaml_is_rendered_from_the_lock():
    assert lock.CONDA_FILE.read_text() == lock.render_conda(lock.read_lock()), "run `make lock`"
    assert "      - torch==2.13.0\n      - accelerate==" in lock.CONDA_FILE.read_text()  # torch first


def test_a_lock_that_disagrees_with_pyproject_is_one_line_naming_each_disagreement(tmp_path):
    lock_file, pyproject = _files(tmp_path, "diffusers==0.43.0\npytest==8.4.0\npsycopg2-binary==2.9.10\n")
    with pytest.raises(LdmflowError) as caught:
        lock.check(lock_file, pyproject)
    assert str(caught.value) == ("requirements.lock does not match pyproject.toml: diffusers 0.43.0 is outside "
                                 "<0.43,>=0.31; numpy is not in the lock. Run `make lock` to resolve it again.")
    lock_file.write_text("diffusers==0.42.1\nnumpy>=2\n")
    with pytest.raises(LdmflowError, match=r"requirements.lock:2 is not an exact `name==version` pin: 'numpy>=2'"):
        lock.check(lock_file, pyproject)


def test_the_check_command_says_one_line_and_exits_1(tmp_path, monkeypatch, capsys):
    lock_file, pyproject = _files(tmp_path, "diffusers==0.42.1\n")
    monkeypatch.setattr(lock, "LOCK_FILE", lock_file)
    monkeypatch.setattr(lock, "PYPROJECT", pyproject)
    assert lock.main(["check"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("Error: requirements.lock does not match pyproject.toml: numpy")
    monkeypatch.setattr(lock, "LOCK_FILE", tmp_path / "absent.lock")
    assert lock.main(["installed"]) == 1
    assert "Cannot read the lock file" in capsys.readouterr().err


def test_a_frozen_environment_becomes_a_sorted_lock_without_build_labels_or_ldmflow():
    text = lock.render_lock("torch==2.13.0+cpu\nPillow==13.0.0\nldmflow @ file:///x\nldmflow==0.1.0\n", "3.11")
    assert text.splitlines()[2:] == ["# python: 3.11", "pillow==13.0.0", "torch==2.13.0"]


def test_an_environment_that_differs_from_the_lock_is_named(tmp_path):
    locked = lock.Lock({"numpy": "0.0.1", "no-such-package-x": "1.0"}, "3.11", "0" * 64)
    problems = lock.installed_mismatches(locked)
    assert problems[0] == "no-such-package-x missing, locked 1.0" and problems[1].startswith("numpy 2.")
