"""A missing optional package is named in one line, with what to install, before anything starts."""

from __future__ import annotations

import importlib.util

import pytest

from cli_runner import invoke


@pytest.fixture
def not_installed(monkeypatch):
    """`not_installed("psycopg2", ...)`: importlib finds none of these modules."""
    def hide(*names):
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *args, **kwargs: None if name in names else find_spec(name, *args, **kwargs))
    return hide


def test_a_postgresql_uri_without_its_driver(not_installed, monkeypatch):
    not_installed("psycopg2")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://user:secret@127.0.0.1:5432/mlflow")
    result = invoke("init-store", ok=False)
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: The tracking URI postgresql://... needs psycopg2, which is not "
                                     "installed: pip install 'ldmflow[server]'.")  # and no password shown


def test_the_server_without_the_server_extra(not_installed, tmp_path):
    not_installed("flask_wtf")
    result = invoke("server", "--root", str(tmp_path / "team"), ok=False)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "flask_wtf" in result.output and "pip install 'ldmflow[server]'" in result.output
    assert not (tmp_path / "team").exists()  # nothing started
