"""The property every fuzzed input surface keeps: it succeeds, or raises LdmflowError with one line, quickly."""

from __future__ import annotations

import time

from hypothesis import strategies as st

from ldmflow.errors import LdmflowError

TIME_BOUND_S = 5.0  # per input; generous for a loaded 2-core CI machine, far below a hang or a huge allocation


def succeeds_or_one_line(function, *args, **kwargs):
    """Call `function`; an LdmflowError must be one non-empty line, any other exception fails the test (by
    propagating, so Hypothesis shrinks it). Returns the result, or None after an LdmflowError."""
    start = time.monotonic()
    try:
        return function(*args, **kwargs)
    except LdmflowError as error:
        message = str(error)
        assert message.strip() and "\n" not in message, f"not one line: {message!r}"
        return None
    finally:
        assert time.monotonic() - start < TIME_BOUND_S, f"took {time.monotonic() - start:.1f} s"


SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-10**400, max_value=10**400)
           | st.floats() | st.text(max_size=20))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4), max_leaves=20)
