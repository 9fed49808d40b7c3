"""Fuzzing condition specs and condition values: parsed, or one line saying what is wrong."""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given, strategies as st  # noqa: E402

from fuzzing import JSON, succeeds_or_one_line  # noqa: E402
from ldmflow.data.conditions import ConditionSpec, extract_conditions  # noqa: E402

NAME = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True) | st.text(max_size=6)
DIM = st.integers(-3, 10).map(str) | st.integers().map(str) | st.text(max_size=4)
ITEM = st.builds(lambda name, dim, rule: f"{name}:{dim}{rule}", NAME, DIM,
                 st.sampled_from(["", ":flipx=0", ":flipx=none", ":flipx=0/1", ":flipx=x", ":other"])
                 | st.text(max_size=8).map(lambda text: ":" + text))
SPEC = st.lists(ITEM, max_size=4).map(",".join) | st.text(max_size=40)


@given(SPEC)
@example("wind:" + "9" * 5000)  # found: Python's int() digit limit (ValueError)
@example("wind:99999999999")  # found: a vector of 1e11 floats allocated by the first entry (MemoryError)
@example("wind:3:flipx=" + "9" * 5000)
@example("a:1,a:1")
@example("wind:٣")  # a non-ASCII digit
def test_any_condition_spec(text):
    spec = succeeds_or_one_line(ConditionSpec.parse, text)
    if spec is not None:
        assert ConditionSpec.parse(str(spec)) == spec  # what is logged and saved parses back to the same spec


@given(st.dictionaries(st.sampled_from(["temperature", "wind", "wind_mag", "other"]), JSON, max_size=4))
@example({"temperature": 10**400})  # found: OverflowError converting a huge integer
@example({"wind": "1e400,0,0"})
@example({"wind_mag": None, "wind": [10**400, 0, 0]})
def test_any_condition_values(metadata):
    succeeds_or_one_line(extract_conditions, metadata, "temperature:1,wind:3,wind_mag:1", "entry 0 (x.png)")
