"""json.loads with bounds, for the JSON users hand in (manifests, conditions files).

Python's json recurses per nesting level (a RecursionError on `[[[[...`) and int() refuses 4,300 digits (a
ValueError): neither is a message a user can act on. Here both are bounded well below those limits and reported
as the file's own error.
"""

from __future__ import annotations

import json

from ldmflow.errors import LdmflowError

MAX_DEPTH = 32  # a manifest needs 4 levels, a conditions file 3
MAX_INT_DIGITS = 400  # beyond any float (1.8e308)


def loads(text: str, what: str) -> object:
    """The document in `text`; `what` names it in errors (e.g. "Manifest data/manifest.json").
    A syntax error stays json.JSONDecodeError, for the caller to word."""
    try:
        data = json.loads(text, parse_int=lambda digits: _bounded_int(digits, what))
    except RecursionError:
        raise _too_deep(what) from None
    _check_depth(data, what)
    return data


def _too_deep(what: str) -> LdmflowError:
    return LdmflowError(f"{what} nests lists or objects deeper than {MAX_DEPTH} levels.")


def _bounded_int(digits: str, what: str) -> int:
    count = len(digits.lstrip("-"))
    if count > MAX_INT_DIGITS:
        raise LdmflowError(f"{what} has an integer of {count} digits; at most {MAX_INT_DIGITS} are read (no "
                           "image entry or condition value needs more).")
    return int(digits)


def _check_depth(data: object, what: str) -> None:
    """Level by level, without recursion, so a deep document cannot exhaust the stack here either."""
    level = [data]
    for _ in range(MAX_DEPTH + 1):
        level = [child for value in level if isinstance(value, (list, dict))
                 for child in (value.values() if isinstance(value, dict) else value)]
        if not level:
            return
    raise _too_deep(what)
