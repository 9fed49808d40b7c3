"""Fuzzing what users give as conditions (--condition, CSV and JSON files): read, or one line."""

from __future__ import annotations

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given, strategies as st  # noqa: E402

from fuzzing import JSON, succeeds_or_one_line  # noqa: E402
from ldmflow.data.conditions import ConditionSpec  # noqa: E402
from ldmflow.sampling.condition_input import (conditions_from_frame, parse_condition_option,  # noqa: E402
                                              read_conditions_file)

SPEC = ConditionSpec.parse("temperature:1,wind:3,wind_mag:1")
COLUMNS = st.sampled_from(["temperature", "wind", "wind_0", "wind_1", "wind_2", "wind_mag", "seed", "other"])
ROWS = st.lists(st.dictionaries(COLUMNS, JSON, max_size=4), max_size=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-conditions")


def _read(path):
    frame = read_conditions_file(path)
    return conditions_from_frame(frame, SPEC)


@given(st.lists(st.text(max_size=20), max_size=4))
@example(["temperature=1e400"])
@example(["wind=" + "9" * 5000])
def test_any_condition_option(texts):
    succeeds_or_one_line(parse_condition_option, tuple(texts))


@given(ROWS | JSON)
@example([{"temperature": 10**400}])  # found: OverflowError converting a huge integer cell
@example([{"wind": [[1, [2]], 3]}])
@example([{"wind": {"x": 1}}])
@example([1, [2]])
@example([{}, None])  # found (fuzz profile): TypeError inside pandas for a row that is not an object
@example([[], None])
def test_any_json_conditions_file(folder, document):
    path = folder / "conditions.json"
    path.write_text(json.dumps(document))
    succeeds_or_one_line(_read, path)


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
@example(b"[" * 100_000)  # found: RecursionError in Python's json
@example(b"[" * 100_000 + b"]" * 100_000)
@example(b'[{"temperature": ' + b"9" * 5000 + b"}]")  # found: the int digit limit (ValueError)
def test_any_bytes_as_json_conditions_file(folder, raw):
    path = folder / "conditions.json"
    path.write_bytes(raw)
    succeeds_or_one_line(_read, path)


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
@example(b"temperature\n" + b"9" * 400 + b"\n")
@example(b"wind\n\"[1,2,3]\"\n")
@example(b"\xff\xfe")
@example(b"")
def test_any_csv_conditions_file(folder, raw):
    path = folder / "conditions.csv"
    path.write_bytes(raw)
    succeeds_or_one_line(_read, path)
