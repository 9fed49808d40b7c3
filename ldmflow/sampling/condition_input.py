"""Conditions as users give them (CLI `name=value`, CSV/JSON files, DataFrames) -> per-image dicts.

A DataFrame has one column per condition component: `temperature`, `wind_0`, `wind_1`, `wind_2`, `wind_mag`
for the default spec (a vector condition may also be one column holding a list or "1,0,0"), plus an
optional `seed` column.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ldmflow.data import bounded_json
from ldmflow.data.conditions import ConditionSpec
from ldmflow.errors import LdmflowError
from ldmflow.files import MAX_CONDITIONS_BYTES, read_user_file
from ldmflow.settings import MAX_SEED

SEED_COLUMN = "seed"


def component_columns(spec: ConditionSpec) -> list[str]:
    """DataFrame column names, one per condition component."""
    columns = []
    for name, dim in spec.items:
        columns += [name] if dim == 1 else [f"{name}_{i}" for i in range(dim)]
    return columns


def parse_condition_option(texts: tuple[str, ...]) -> dict[str, list[float]]:
    """`--condition temperature=12.5 --condition wind=1,0,0` -> {"temperature": [12.5], "wind": [1, 0, 0]}."""
    conditions = {}
    for text in texts:
        name, sep, value = text.partition("=")
        if not sep or not name.strip():
            raise LdmflowError(f"--condition {text!r}: expected name=value, e.g. temperature=12.5 or wind=1,0,0.")
        try:
            conditions[name.strip()] = [float(part) for part in value.split(",")]
        except ValueError:
            raise LdmflowError(f"--condition {text!r}: {value!r} is not a number or comma list of numbers.") from None
    return conditions


def _cell_values(cell) -> list[float] | None:
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return None
    if isinstance(cell, str):
        cell = [part for part in cell.strip("[]() ").split(",") if part.strip()]
    return [float(v) for v in np.asarray(cell, dtype=object).reshape(-1)]


def conditions_from_frame(frame: pd.DataFrame, spec: ConditionSpec) -> list[dict[str, list[float]]]:
    """One dict per row (name -> values); blank cells are left out. Unknown columns are an error."""
    known = set(component_columns(spec)) | set(spec.names) | {SEED_COLUMN}
    unknown = [column for column in frame.columns if column not in known]
    if unknown:
        raise LdmflowError(f"Unknown condition column(s) {unknown}; the model's condition spec is {spec} "
                           f"(columns: {', '.join(component_columns(spec)) or 'none'}, plus optional seed).")
    return [_row_conditions(frame, row, spec, number) for number, (_, row) in enumerate(frame.iterrows())]


def _row_conditions(frame: pd.DataFrame, row, spec: ConditionSpec, number: int) -> dict[str, list[float]]:
    condition = {}
    for name, dim in spec.items:
        parts = [f"{name}_{i}" for i in range(dim)] if dim > 1 else [name]
        try:
            if dim > 1 and name in frame.columns:
                value = _cell_values(row[name])
            elif all(part in frame.columns for part in parts):
                cells = [_cell_values(row[part]) for part in parts]
                value = None if any(c is None for c in cells) else [v for c in cells for v in c]
            else:
                value = None
        except (TypeError, ValueError, OverflowError):
            raise LdmflowError(f"Row {number}: condition {name!r} is not a number "
                               f"({', '.join(repr(row[p]) for p in parts if p in frame.columns)}).") from None
        if value is not None:
            condition[name] = value
    return condition


def seed_cell(raw) -> int | None:
    """One row's seed from a conditions file or a served request: None when blank; an integer in numpy's and
    torch's range (3, 3.0 and "3" alike); anything else raises ValueError saying why."""
    if raw is None or (not isinstance(raw, str) and pd.isna(raw)) or (isinstance(raw, str) and not raw.strip()):
        return None
    try:
        number = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"seed {str(raw)[:50]!r} is not an integer") from None
    except OverflowError:  # an integer beyond any float
        number = math.inf
    if math.isinf(number):
        raise ValueError(f"seed {str(raw)[:50]} is outside [0, {MAX_SEED}], the seeds numpy and torch accept")
    if not (math.isfinite(number) and number == int(number)):
        raise ValueError(f"seed {str(raw)[:50]!r} is not an integer")
    if not 0 <= number <= MAX_SEED:
        raise ValueError(f"seed {int(number)} is outside [0, {MAX_SEED}], the seeds numpy and torch accept")
    return int(number)


def read_conditions_file(path: str | Path) -> pd.DataFrame:
    """A CSV, or a JSON list of objects, of conditions (one row per image)."""
    path = Path(path)
    raw = read_user_file(path, "--conditions_file", MAX_CONDITIONS_BYTES)
    try:
        if path.suffix.lower() == ".json":
            data = bounded_json.loads(raw.decode("utf-8-sig"), f"--conditions_file {path}")
            rows = data if isinstance(data, list) else [data]
            not_objects = [i for i, row in enumerate(rows) if not isinstance(row, dict)]
            if not_objects:
                raise LdmflowError(f"--conditions_file {path}: expected a JSON list of objects (one per image, "
                                   f"condition name -> value); rows {not_objects[:5]} are not objects.")
            return pd.DataFrame(rows)
        return pd.read_csv(io.BytesIO(raw))
    except (ValueError, pd.errors.ParserError) as error:
        raise LdmflowError(f"--conditions_file {path}: cannot read it ({error}).") from None


def spanning_conditions(manifest, count: int) -> list[dict[str, list[float]]]:
    """`count` real training conditions spanning the range of the first condition (for previews and demos).

    Fully labelled entries are preferred; a condition an entry lacks is filled with the training mean.
    """
    spec, slices = manifest.spec, manifest.spec.slices()
    if spec.is_empty or not manifest.records:
        return []
    records = [r for r in manifest.records if r.present.all()] or manifest.records
    first = slices[spec.names[0]]
    records = sorted(records, key=lambda r: float(r.conditions[first][0]))
    count = min(count, len(records))
    picks = [records[round(i * (len(records) - 1) / max(count - 1, 1))] for i in range(count)]
    return [{name: (r.conditions[sl] if r.present[k] else np.asarray(manifest.stats.mean[sl])).tolist()
             for k, (name, sl) in enumerate(slices.items())} for r in picks]


def write_conditions_file(conditions: list[dict[str, list[float]]], spec: ConditionSpec, path: str | Path) -> Path:
    """A CSV with one row per image and one column per condition component (what --conditions_file reads)."""
    rows = [[v for name in spec.names for v in condition[name]] for condition in conditions]
    pd.DataFrame(rows, columns=component_columns(spec)).to_csv(path, index=False)
    return Path(path)