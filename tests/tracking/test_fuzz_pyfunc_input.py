"""Fuzzing what a REST client sends the pyfunc models (params, seeds, condition rows, images): accepted, or
one line as INVALID_PARAMETER_VALUE."""

from __future__ import annotations

import pandas as pd
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given, strategies as st  # noqa: E402

from fuzzing import JSON, SCALARS, succeeds_or_one_line  # noqa: E402
from ldmflow.data.conditions import ConditionSpec  # noqa: E402
from ldmflow.sampling.condition_input import conditions_from_frame  # noqa: E402
from ldmflow.tracking import pyfunc_models  # noqa: E402

PARAM_NAMES = st.sampled_from(["num_inference_steps", "batch_size", "guidance_scale", "scheduler", "dtype",
                               "num_images", "mode", "other"])


def _request(params, seeds, rows):
    """The checks every predict makes before any model runs."""
    merged = pyfunc_models._params(params, {**pyfunc_models.LATENT_DEFAULTS, "num_images": 0})
    frame = pd.DataFrame(rows) if rows else pd.DataFrame({"seed": seeds})
    if seeds and len(seeds) == len(frame):
        frame["seed"] = pd.Series(seeds, dtype=object)
    pyfunc_models._seeds(frame, len(frame))
    conditions_from_frame(frame.drop(columns=[c for c in frame.columns if c == "seed"]),
                          ConditionSpec.parse("temperature:1,wind:3"))
    return merged


@given(st.dictionaries(PARAM_NAMES, SCALARS, max_size=3), st.lists(SCALARS, max_size=3),
       st.lists(st.dictionaries(st.sampled_from(["temperature", "wind", "wind_0", "wind_1", "wind_2"]), JSON,
                                max_size=3), max_size=3))
@example({"num_inference_steps": "many"}, [], [])  # found: ValueError from int()
@example({"batch_size": float("inf")}, [], [])  # found: OverflowError from int()
@example({"guidance_scale": [1]}, [], [])  # found: TypeError from float()
@example({}, ["x"], [])  # found: ValueError from int() of a seed
@example({}, [2**64], [])  # a seed torch's generators refuse
@example({}, [-1], [])
@example({}, [], [{"temperature": 10**400}])
def test_any_request(params, seeds, rows):
    succeeds_or_one_line(_request, params, seeds, rows)


@given(st.text(max_size=60) | st.binary(max_size=60).map(lambda raw: __import__("base64").b64encode(raw).decode()))
def test_any_image_cell(text):
    succeeds_or_one_line(pyfunc_models.base64_to_image, text, 0)
