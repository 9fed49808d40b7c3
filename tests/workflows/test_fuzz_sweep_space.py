"""Fuzzing a sweep's space file (YAML and JSON): a checked space, or one line."""

from __future__ import annotations

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given, settings as hypothesis_settings, strategies as st  # noqa: E402

from fuzzing import JSON, succeeds_or_one_line  # noqa: E402
from ldmflow.settings import VaeSettings  # noqa: E402
from ldmflow.workflows.sweep_space import load_space  # noqa: E402

NAMES = st.sampled_from(["learning_rate", "train_batch_size", "block_out_channels", "kl_weight", "seed", "nope"])
ENTRY = st.dictionaries(st.sampled_from(["low", "high", "log", "int", "choices", "step"]), JSON, max_size=4)


@given(st.dictionaries(NAMES, ENTRY | JSON, max_size=3), st.sampled_from([".json", ".yaml"]))
@example({"learning_rate": {"low": 1e-2, "high": 1e-4}}, ".yaml")
@example({"learning_rate": {"choices": [10**500]}}, ".json")
@example({"learning_rate": {"choices": [10**300]}}, ".yaml")  # found: OverflowError turning it into a float
@example({"learning_rate": {"\n": None}}, ".json")  # found: a line break in a key split the error line
@hypothesis_settings(deadline=None)
def test_any_space_file(tmp_path_factory, entries, suffix):
    path = tmp_path_factory.mktemp("space") / f"space{suffix}"
    path.write_text(json.dumps(entries))  # JSON is YAML too
    base = VaeSettings(manifest_path="m.json", output_dir="out")
    succeeds_or_one_line(load_space, str(path), base)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_deeply_nested_space_is_one_line(tmp_path, suffix):
    path = tmp_path / f"space{suffix}"
    path.write_text('{"learning_rate": ' + "[" * 5000 + "]" * 5000 + "}")
    assert succeeds_or_one_line(load_space, str(path), VaeSettings(manifest_path="m.json", output_dir="out")) is None
