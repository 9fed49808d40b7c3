"""Fuzzing the seed column of a conditions file: integers in numpy's range, or one line."""

from __future__ import annotations

import pandas as pd
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given, strategies as st  # noqa: E402

from fuzzing import SCALARS, succeeds_or_one_line  # noqa: E402
from ldmflow.settings import MAX_SEED  # noqa: E402
from ldmflow.workflows.sample import _seeds_column  # noqa: E402


@given(st.lists(SCALARS, max_size=5))
@example([float("inf")])  # found: OverflowError from int(inf)
@example([2**64])
@example([-1])
@example(["1e400"])
def test_any_seed_column(cells):
    seeds = succeeds_or_one_line(_seeds_column, pd.Series(cells, dtype=object), 0)
    assert seeds is None or all(0 <= seed <= MAX_SEED for seed in seeds)
