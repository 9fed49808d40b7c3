"""Fuzzing the manifest loader with arbitrary JSON and bytes: it loads, or says what is wrong in one line."""

from __future__ import annotations

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given, strategies as st  # noqa: E402

from fuzzing import JSON, succeeds_or_one_line  # noqa: E402
from ldmflow.data.manifest import load_manifest  # noqa: E402
from ldmflow.settings import DEFAULT_CONDITION_SPEC  # noqa: E402

CONDITION_NAMES = st.sampled_from(["temperature", "wind", "wind_mag", "split", "other"])
METADATA = st.dictionaries(CONDITION_NAMES, JSON, max_size=5) | JSON
ENTRY = st.fixed_dictionaries({"output_rel": st.text(max_size=30) | JSON}, optional={"metadata": METADATA}) | JSON
MANIFEST = st.lists(ENTRY, max_size=5).map(lambda items: {"items": items}) | JSON


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-manifest")


def _load(folder, raw: bytes):
    path = folder / "manifest.json"
    path.write_bytes(raw)
    return succeeds_or_one_line(load_manifest, path, split="all", condition_spec=DEFAULT_CONDITION_SPEC)


@given(MANIFEST)
@example({"items": [{"output_rel": "a\x00b"}]})  # found: a NUL in a path (ValueError from the OS layer)
@example({"items": [{"output_rel": "a" * 5000}]})  # found: a name too long for the OS (OSError)
@example({"items": [{"output_rel": "x.png", "metadata": {"temperature": 10**400}}]})  # found: OverflowError
@example({"items": [{"output_rel": "x.png", "metadata": {"wind": [1, 2, 10**400]}}]})  # found: OverflowError
@example({"items": [{"output_rel": "x.png", "metadata": {"wind_mag": None, "wind": [10**400]}}]})
def test_any_json_manifest(folder, document):
    _load(folder, json.dumps(document).encode())


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
@example(b"\xef\xbb\xbf[]")  # a BOM
@example(b"[" * 100_000 + b"]" * 100_000)  # found: RecursionError in Python's json
@example(b'[{"output_rel": "x", "metadata": {"temperature": ' + b"9" * 5000 + b"}}]")  # found: int digit limit
@example(b'{"items": [], "items": [{"output_rel": "x"}]}')  # a duplicate key: the last one counts
@example(b"[NaN, Infinity]")
def test_any_bytes_as_manifest(folder, raw):
    _load(folder, raw)
