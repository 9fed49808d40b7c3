"""tracking/model_uri.py without a tracking server: the URI forms it parses, local folders it resolves, and the
one line for each bad form (tests/tracking/test_tracking_registry.py resolves against a real store)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ldmflow.errors import LdmflowError
from ldmflow.tracking.model_uri import parse_models_uri, resolve_model_source, version_model_id


@pytest.mark.parametrize("uri, parsed", [
    ("models:/ldmflow-vae/3", ("ldmflow-vae", "3", None)),
    ("models:/ldmflow-vae/latest", ("ldmflow-vae", "latest", None)),
    ("models:/ldmflow-vae@champion", ("ldmflow-vae", None, "champion")),
    ("models:/team/vae/2", ("team/vae", "2", None)),
    ("models:/m-0123abcd", ("m-0123abcd", None, None)),
])
def test_the_models_uri_forms(uri, parsed):
    assert parse_models_uri(uri) == parsed


@pytest.mark.parametrize("uri, message", [
    ("models://host/vae/1", "Malformed model URI"),
    ("models:/vae", "give a version"),
    ("models:/vae/one", "the version must be a number or 'latest'"),
    ("models:/vae@", "expected models:/<name>@<alias>"),
    ("models:/vae/1\n", "has a control character"),
])
def test_bad_models_uris_are_one_line(uri, message):
    with pytest.raises(LdmflowError, match=message):
        parse_models_uri(uri)


def test_a_local_folder_resolves_to_itself_without_mlflow_identity(tmp_path):
    source = resolve_model_source(f"file://{tmp_path}")
    assert source.local_dir == tmp_path.resolve() and source.uri == f"file://{tmp_path}"
    assert (source.model_name, source.model_version, source.run_id, source.model_id) == (None,) * 4
    assert not source.is_registered


@pytest.mark.parametrize("given, message", [
    ("", "Empty model path"),
    ("s3://bucket/vae", "Unsupported model URI 's3://bucket/vae'"),
    ("{tmp}/missing", "does not exist"),
    ("{tmp}/file.txt", "is a file; expected a model folder"),
])
def test_bad_local_paths_are_one_line(tmp_path, given, message):
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(LdmflowError, match=message):
        resolve_model_source(given.format(tmp=tmp_path))


def test_the_logged_model_behind_a_version():
    assert version_model_id(SimpleNamespace(model_id="m-1", source="")) == "m-1"
    assert version_model_id(SimpleNamespace(model_id=None, source="models:/m-0a1b/")) == "m-0a1b"
    assert version_model_id(SimpleNamespace(model_id=None, source="runs:/abc/model")) is None
