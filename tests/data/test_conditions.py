import math
import re

import numpy as np
import pytest

from ldmflow.data.conditions import (
    ConditionSpec,
    ConditionStats,
    compute_condition_stats,
    extract_conditions,
)
from ldmflow.errors import LdmflowError
from ldmflow.settings import DEFAULT_CONDITION_SPEC

LABEL = "entry 7 (renders/a.png)"


def test_parse_default_spec():
    spec = ConditionSpec.parse(DEFAULT_CONDITION_SPEC)
    assert spec.items == (("temperature", 1), ("wind", 3), ("wind_mag", 1))
    assert spec.names == ("temperature", "wind", "wind_mag")
    assert spec.dims == (1, 3, 1)
    assert spec.value_dim == 5
    assert spec.num_conditions == 3
    assert not spec.is_empty
    assert spec.slices() == {"temperature": slice(0, 1), "wind": slice(1, 4), "wind_mag": slice(4, 5)}
    assert str(spec) == DEFAULT_CONDITION_SPEC


@pytest.mark.parametrize("text", ["none", "None", "", "  ", None])
def test_parse_none(text):
    spec = ConditionSpec.parse(text)
    assert spec.is_empty and spec.value_dim == 0 and spec.num_conditions == 0
    assert str(spec) == "none"


def test_parse_tolerates_spaces_and_accepts_a_spec():
    spec = ConditionSpec.parse(" temperature : 1 , wind:3 ")
    assert str(spec) == "temperature:1,wind:3"
    assert ConditionSpec.parse(spec) is spec


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("temperature:1,temperature:2", "duplicate"),
        ("temperature", "no ':dim'"),
        ("temperature:", "must be an integer"),
        ("temperature:0", "at least 1"),
        ("wind:-3", "at least 1"),
        ("wind:1.5", "must be an integer"),
        ("wind:three", "must be an integer"),
        ("1wind:3", "bad name"),
        ("wi-nd:3", "bad name"),
        (":3", "bad name"),
        ("temperature:1,", "empty item"),
    ],
)
def test_malformed_specs_quote_the_spec(text, fragment):
    with pytest.raises(LdmflowError) as info:
        ConditionSpec.parse(text)
    assert repr(text) in str(info.value)
    assert fragment in str(info.value)


def test_extract_full_metadata():
    result = extract_conditions({"temperature": 12.5, "wind": [1, 2, 2], "wind_mag": 3}, DEFAULT_CONDITION_SPEC, LABEL)
    assert result.values.dtype == np.float32 and result.values.shape == (5,)
    np.testing.assert_allclose(result.values, [12.5, 1, 2, 2, 3])
    assert result.present.tolist() == [True, True, True]
    assert result.zero_filled == () and result.computed == ()


def test_extract_numeric_strings_and_vector_strings():
    metadata = {"temperature": " -3.5 ", "wind": "1,0,0", "wind_mag": "1"}
    np.testing.assert_allclose(extract_conditions(metadata, DEFAULT_CONDITION_SPEC, LABEL).values, [-3.5, 1, 0, 0, 1])
    metadata = {"temperature": "4", "wind": "[0.5 2 0]", "wind_mag": ["2"]}
    np.testing.assert_allclose(extract_conditions(metadata, DEFAULT_CONDITION_SPEC, LABEL).values, [4, 0.5, 2, 0, 2])


def test_wind_mag_computed_from_wind():
    result = extract_conditions({"temperature": 1, "wind": [3, 4, 0]}, DEFAULT_CONDITION_SPEC, LABEL)
    assert result.values[4] == pytest.approx(5.0)
    assert result.present.tolist() == [True, True, True]
    assert result.computed == ("wind_mag",) and result.zero_filled == ()


def test_wind_mag_computed_even_when_wind_not_in_spec():
    result = extract_conditions({"wind": "3,4"}, "wind_mag:1", LABEL)
    assert result.values.tolist() == [5.0] and result.computed == ("wind_mag",)


def test_missing_values_are_zero_filled_and_absent():
    result = extract_conditions({"wind": [1, 0, 0]}, DEFAULT_CONDITION_SPEC, LABEL)
    assert result.values[0] == 0.0
    assert result.present.tolist() == [False, True, True]
    assert result.zero_filled == ("temperature",)
    empty = extract_conditions({}, DEFAULT_CONDITION_SPEC, LABEL)
    assert not empty.present.any() and not empty.values.any()
    assert empty.zero_filled == ("temperature", "wind", "wind_mag")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "nan", "-inf", None, "", [1.0, None, 0.0]])
def test_non_finite_or_null_values_are_zero_filled(bad):
    spec = "temperature:1" if not isinstance(bad, list) else "wind:3"
    name = spec.split(":")[0]
    result = extract_conditions({name: bad}, spec, LABEL)
    assert not result.values.any() and result.present.tolist() == [False]
    assert result.zero_filled == (name,)


def test_nan_wind_is_not_used_for_wind_mag():
    result = extract_conditions({"wind": [math.nan, 1, 0]}, DEFAULT_CONDITION_SPEC, LABEL)
    assert result.zero_filled == ("temperature", "wind", "wind_mag") and result.computed == ()


def test_wrong_number_of_components_names_entry_and_condition():
    with pytest.raises(LdmflowError) as info:
        extract_conditions({"wind": [1, 2]}, DEFAULT_CONDITION_SPEC, LABEL)
    assert str(info.value) == "entry 7 (renders/a.png): condition 'wind' has 2 values, the spec says 3."
    with pytest.raises(LdmflowError, match="condition 'temperature' has 3 values, the spec says 1"):
        extract_conditions({"temperature": "1,2,3"}, DEFAULT_CONDITION_SPEC, LABEL)
    with pytest.raises(LdmflowError, match="condition 'wind' has 1 value, the spec says 3"):
        extract_conditions({"wind": 4.0}, DEFAULT_CONDITION_SPEC, LABEL)


@pytest.mark.parametrize("garbage", ["warm", {"c": 3}, [1, "x", 2], ["a"]])
def test_non_numeric_values_are_errors(garbage):
    spec = "wind:3" if isinstance(garbage, list) and len(garbage) == 3 else "temperature:1"
    name = spec.split(":")[0]
    with pytest.raises(LdmflowError) as info:
        extract_conditions({name: garbage}, spec, LABEL)
    assert LABEL in str(info.value) and f"condition {name!r}" in str(info.value) and "non-numeric" in str(info.value)


def test_empty_spec_gives_empty_vectors():
    result = extract_conditions({"temperature": 3}, "none", LABEL)
    assert result.values.shape == (0,) and result.present.shape == (0,)


def test_stats_ignore_missing_values():
    spec = ConditionSpec.parse("temperature:1,wind:2")
    values = np.array([[10, 1, 2], [0, 3, 4], [20, 0, 0]], dtype=np.float32)  # (N, value_dim)
    present = np.array([[True, True], [False, True], [True, False]])  # (N, K)
    stats = compute_condition_stats(values, present, spec)
    assert stats.mean == pytest.approx((15.0, 2.0, 3.0))
    assert stats.std == pytest.approx((5.0, 1.0, 1.0))


def test_stats_std_zero_and_nothing_present_become_safe():
    spec = ConditionSpec.parse("a:1,b:1")
    values = np.array([[2.0, 7.0], [2.0, 0.0]])
    present = np.array([[True, False], [True, False]])
    stats = compute_condition_stats(values, present, spec)
    assert stats.mean == (2.0, 0.0)  # b is present nowhere: mean 0
    assert stats.std == (1.0, 1.0)  # a is constant, b absent: std 1
    assert compute_condition_stats(np.zeros((0, 2)), np.zeros((0, 2), bool), spec).std == (1.0, 1.0)


def test_stats_dict_round_trip_and_validation():
    spec = ConditionSpec.parse(DEFAULT_CONDITION_SPEC)
    stats = ConditionStats(mean=(1.0, 2.0, 3.0, 4.0, 5.0), std=(1.0, 0.5, 0.5, 0.5, 2.0))
    as_dict = stats.to_dict(spec)
    assert as_dict["wind"] == {"mean": [2.0, 3.0, 4.0], "std": [0.5, 0.5, 0.5]}
    assert ConditionStats.from_dict(as_dict, spec) == stats
    with pytest.raises(LdmflowError, match="'wind_mag'"):
        ConditionStats.from_dict({k: v for k, v in as_dict.items() if k != "wind_mag"}, spec)
    with pytest.raises(LdmflowError, match="'wind' have 1/1 values, the spec says 3"):
        ConditionStats.from_dict({**as_dict, "wind": {"mean": [0.0], "std": [1.0]}}, spec)
    with pytest.raises(LdmflowError, match="needs 2"):
        stats.to_dict("a:1,b:1")


def test_encoder_normalises_and_keeps_absent_conditions_at_zero():
    import torch

    from ldmflow.models.conditioning import ConditionEncoder

    encoder = ConditionEncoder(ConditionSpec.parse("temperature:1,wind:2"),
                               ConditionStats(mean=(10.0, 0.0, 1.0), std=(5.0, 2.0, 2.0)))
    values = torch.tensor([[20.0, 0.0, 0.0], [0.0, 4.0, 5.0]])
    present = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    encoded = encoder.encode(values, present)  # normalised values, then one presence flag per condition
    np.testing.assert_allclose(encoded.numpy(), [[2.0, 0.0, 0.0, 1.0, 0.0], [0.0, 2.0, 2.0, 0.0, 1.0]])
    assert encoded.dtype == torch.float32


@pytest.mark.parametrize("value", [1e39, -3.5e38, [0.0, 1e300, 0.0]])
def test_finite_values_beyond_float32_are_errors_not_inf(value):
    name = "wind" if isinstance(value, list) else "temperature"
    with pytest.raises(LdmflowError, match=re.escape(f"{LABEL}: condition {name!r} has the value") + ".* beyond the float32"):
        extract_conditions({name: value}, "temperature:1,wind:3", LABEL)
    largest = extract_conditions({"temperature": 3.0e38}, "temperature:1", LABEL)  # still representable
    assert np.isfinite(largest.values).all()


def test_flip_rules_parse_round_trip_and_give_signs():
    spec = ConditionSpec.parse("temperature:1, wind:3:flipx=0, colour:3:flipx=none, tilt:2:flipx=0/1")
    assert spec.items == (("temperature", 1), ("wind", 3), ("colour", 3), ("tilt", 2))
    assert str(spec) == "temperature:1,wind:3:flipx=0,colour:3:flipx=none,tilt:2:flipx=0/1"
    assert ConditionSpec.parse(str(spec)) == spec
    np.testing.assert_array_equal(spec.flip_signs(), [1, -1, 1, 1, 1, 1, 1, -1, -1])
    assert ConditionSpec.parse("temperature:1").flip_signs().tolist() == [1.0]  # scalars need no rule


@pytest.mark.parametrize("text, fragment", [
    ("wind:3:flipx=3", "names components (3,), but it has 3 (0 to 2)"),
    ("wind:3:flipx=x", "must list component numbers"),
    ("wind:3:mirror=0", "the one option is flipx="),
    ("wind:3:flipx=", "the one option is flipx="),
])
def test_bad_flip_rules_are_errors(text, fragment):
    with pytest.raises(LdmflowError, match=re.escape(fragment)):
        ConditionSpec.parse(text)
