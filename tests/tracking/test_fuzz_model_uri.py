"""Fuzzing model URIs and paths against an empty store: resolved, or one line saying what is wrong."""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given, strategies as st  # noqa: E402

from fakes import tracked_folder  # noqa: E402
from fuzzing import succeeds_or_one_line  # noqa: E402
from ldmflow.tracking.model_uri import parse_models_uri, resolve_model_source  # noqa: E402

NAME = st.text(max_size=12) | st.sampled_from(["a'b", 'a"b', "a b", "a/b", "é", "a`b", "%", "a\\b", "a\nb"])
URI = (st.builds(lambda name, tail: f"models:/{name}{tail}", NAME,
                 st.sampled_from(["", "/1", "/latest", "@champion", "/0", "/99999999999999999999999"])
                 | st.text(max_size=6))
       | st.builds(lambda run, path: f"runs:/{run}/{path}", NAME, NAME)
       | st.text(max_size=30))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-uri")
    with tracked_folder(root):
        from ldmflow.tracking.store import use_tracking_store

        use_tracking_store()
        yield root


@given(URI)
@example("models:/a'b/1")  # a quote in a registered name (MLflow's filter parser)
@example("models:/a/99999999999999999999999")
@example("a\x00b")  # found: a NUL in a path (ValueError)
@example("x" * 5000)  # found: a name too long for the OS (OSError)
@example("runs:/a\x00b/model")
def test_any_model_uri(store, uri):
    succeeds_or_one_line(resolve_model_source, uri, store / "download")


@given(st.text(max_size=30).map(lambda text: "models:/" + text) | st.text(max_size=30))
def test_any_models_uri_parses_or_says_why(uri):
    succeeds_or_one_line(parse_models_uri, uri)
