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


@given(st.lists(SCALARS, min_size=1, max_size=5))
@example([3.7])  # found: the served model truncated it to 3
@example([10**400])
def test_the_served_model_reads_seeds_by_the_conditions_files_rule(cells):
    """One rule for both: a seed the served model takes is the one a conditions file's row would get."""
    from ldmflow.errors import LdmflowError
    from ldmflow.tracking.pyfunc_models import _seed

    for row, cell in enumerate(cells):
        if pd.isna(cell) if not isinstance(cell, str) else not cell.strip():
            continue  # blank: a file's row takes the default seed, the served model refuses the whole column
        try:
            served = _seed(cell, row)
        except LdmflowError as error:
            assert "\n" not in str(error) and str(error).startswith(f"Row {row}: seed ")
            with pytest.raises(Exception, match="seed must be an integer"):
                _seeds_column(pd.Series([cell], dtype=object), 0)
            continue
        assert [served] == _seeds_column(pd.Series([cell], dtype=object), 0)
