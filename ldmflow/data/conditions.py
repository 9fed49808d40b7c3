"""Condition specs (``name:dim,...``), per-entry condition vectors and their normalisation statistics.

Numpy only: the manifest loader and the check-manifest command use this without importing torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ldmflow.errors import LdmflowError


_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VECTOR_SPLIT_RE = re.compile(r"[,\s;]+")
# A std below this is treated as zero (a constant condition), so normalisation never divides by ~0.
_MIN_STD = 1e-8
MAX_CONDITION_DIM = 4096  # per condition, and for the whole vector


@dataclass(frozen=True)
class ConditionSpec:
    """Ordered condition names and their dimensions; the value vector is their concatenation.

    A vector condition may say what a horizontal flip does to it: `wind:3:flipx=0` (the flip negates
    component 0, as it mirrors an x direction), `flipx=0/2` (several components) or `flipx=none` (unchanged).
    """

    items: tuple[tuple[str, int], ...] = ()
    flipx: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (name, negated components) of conditions with a rule

    @classmethod
    def parse(cls, text: str | ConditionSpec | None) -> ConditionSpec:
        """Parse ``"temperature:1,wind:3"``; ``"none"`` or an empty string means no conditions."""
        if isinstance(text, ConditionSpec):
            return text
        stripped = (text or "").strip()
        if stripped.lower() in ("", "none"):
            return cls(())
        items: list[tuple[str, int]] = []
        rules: list[tuple[str, tuple[int, ...]]] = []
        for part in stripped.split(","):
            name, dim, rule = _parse_item(part.strip(), text)
            items.append((name, dim))
            if rule is not None:
                rules.append((name, rule))
        names = [name for name, _ in items]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise LdmflowError(f"Invalid condition spec {text!r}: duplicate name(s) {', '.join(duplicates)}.")
        if sum(dim for _, dim in items) > MAX_CONDITION_DIM:
            raise LdmflowError(f"Invalid condition spec {text!r}: {sum(dim for _, dim in items)} values in all, "
                               f"over the bound of {MAX_CONDITION_DIM}.")
        return cls(tuple(items), tuple(rules))

    def flip_signs(self) -> np.ndarray:
        """(value_dim,) +1/-1 factors a horizontal flip applies to the value vector; a vector condition without
        a flipx rule cannot be flipped safely (its label would contradict the mirrored image)."""
        rules = dict(self.flipx)
        signs = np.ones(self.value_dim, dtype=np.float32)
        for (name, dim), where in zip(self.items, self.slices().values()):
            if name in rules:
                signs[where][list(rules[name])] = -1.0
            elif dim > 1:
                raise LdmflowError(
                    f"--random_flip mirrors images, but the vector condition {name!r} has no flip rule: say which "
                    f"components a horizontal flip negates, e.g. --condition_spec '{name}:{dim}:flipx=0' "
                    f"(or '{name}:{dim}:flipx=none' when a flip leaves it unchanged), or train without --random_flip.")
        return signs

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.items)

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(dim for _, dim in self.items)

    @property
    def value_dim(self) -> int:
        """Length of the concatenated value vector (what the model's condition input receives)."""
        return sum(self.dims)

    @property
    def num_conditions(self) -> int:
        return len(self.items)

    @property
    def is_empty(self) -> bool:
        return not self.items

    def slices(self) -> dict[str, slice]:
        """Where each condition lives in the value vector."""
        out, start = {}, 0
        for name, dim in self.items:
            out[name] = slice(start, start + dim)
            start += dim
        return out

    def __str__(self) -> str:
        if self.is_empty:
            return "none"
        rules = dict(self.flipx)

        def item(name: str, dim: int) -> str:
            if name not in rules:
                return f"{name}:{dim}"
            return f"{name}:{dim}:flipx={'/'.join(str(i) for i in rules[name]) or 'none'}"

        return ",".join(item(name, dim) for name, dim in self.items)


def _parse_item(part: str, text: str | None) -> tuple[str, int, tuple[int, ...] | None]:
    """One ``name:dim[:flipx=...]`` item; every problem names the whole spec so the user can find it."""
    if not part:
        raise LdmflowError(f"Invalid condition spec {text!r}: empty item (stray comma?). Use 'name:dim,...' or 'none'.")
    if ":" not in part:
        raise LdmflowError(f"Invalid condition spec {text!r}: item {part!r} has no ':dim' (e.g. 'temperature:1').")
    name, _, rest = (s.strip() for s in part.partition(":"))
    dim_text, _, option = (s.strip() for s in rest.partition(":"))
    if not _NAME_RE.match(name):
        raise LdmflowError(
            f"Invalid condition spec {text!r}: bad name {name!r} (letters, digits and '_', not starting with a digit)."
        )
    if not re.fullmatch(r"[+-]?\d+", dim_text):
        raise LdmflowError(
            f"Invalid condition spec {text!r}: dimension of {name!r} must be an integer, got {dim_text!r}."
        )
    digits = dim_text.lstrip("+-").lstrip("0") or "0"
    dim = (int(digits) if len(digits) <= 9 else MAX_CONDITION_DIM + 1) * (-1 if dim_text.startswith("-") else 1)
    if dim < 1:
        raise LdmflowError(f"Invalid condition spec {text!r}: dimension of {name!r} must be at least 1, got {dim}.")
    if dim > MAX_CONDITION_DIM:
        raise LdmflowError(f"Invalid condition spec {text!r}: dimension of {name!r} is {dim_text[:20]}, over the "
                           f"bound of {MAX_CONDITION_DIM} (every image stores its vector, and the model's condition "
                           "input grows with it; a longer vector is data, not a condition).")
    return name, dim, _parse_flip_rule(option, name, dim, text) if option else None


def _parse_flip_rule(option: str, name: str, dim: int, text: str | None) -> tuple[int, ...]:
    """`flipx=0`, `flipx=0/2` or `flipx=none` -> the components a horizontal flip negates."""
    key, _, value = (s.strip() for s in option.partition("="))
    if key != "flipx" or not value:
        raise LdmflowError(f"Invalid condition spec {text!r}: {name!r} has option {option!r}; the one option is "
                           f"flipx=<component>[/<component>...] or flipx=none.")
    if value.lower() == "none":
        return ()
    try:
        components = tuple(sorted({int(v) for v in value.split("/")}))
    except ValueError:
        raise LdmflowError(f"Invalid condition spec {text!r}: flipx of {name!r} must list component numbers "
                           f"(e.g. flipx=0), got {value!r}.") from None
    if any(not 0 <= c < dim for c in components):
        raise LdmflowError(f"Invalid condition spec {text!r}: flipx of {name!r} names components {components}, "
                           f"but it has {dim} (0 to {dim - 1}).")
    return components


@dataclass(frozen=True, eq=False)
class ConditionValues:
    """One entry's condition vector plus what was missing (zero-filled) or derived (computed)."""

    values: np.ndarray  # (value_dim,) float32, zeros where a condition is absent
    present: np.ndarray  # (num_conditions,) bool
    zero_filled: tuple[str, ...]
    computed: tuple[str, ...]


def _parse_scalar(value: object) -> float:
    """A JSON number, bool or numeric string as a float (NaN/inf allowed; the caller checks)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return float(value.strip())  # ValueError for garbage
    raise TypeError(type(value).__name__)


def _parse_components(value: object) -> list[float] | None:
    """Components of a metadata value, or None when the value is absent (null or an empty string)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().strip("[]()").strip()
        if not text:
            return None
        return [_parse_scalar(piece) for piece in _VECTOR_SPLIT_RE.split(text) if piece]
    if isinstance(value, (list, tuple)):
        return [math.nan if item is None else _parse_scalar(item) for item in value]  # null component = unknown
    return [_parse_scalar(value)]


def _read_condition(metadata: dict, name: str, dim: int, entry_label: str) -> list[float] | None:
    """The condition's values (dim floats), or None when absent or non-finite. Plain Python floats: numpy's
    per-call overhead on 1-3 values was most of a 100k-entry manifest's load time."""
    raw = metadata.get(name)
    try:
        components = _parse_components(raw)
    except OverflowError:
        raise LdmflowError(f"{entry_label}: condition {name!r} has a value beyond the float32 range "
                           f"(+-{FLOAT32_MAX:.3g}) that training uses.") from None
    except (TypeError, ValueError):
        raise LdmflowError(
            f"{entry_label}: condition {name!r} has a non-numeric value {raw!r} "
            "(expected a number, a list of numbers or a numeric string)."
        ) from None
    if components is None:
        return None
    if len(components) != dim:
        plural = "value" if len(components) == 1 else "values"
        raise LdmflowError(f"{entry_label}: condition {name!r} has {len(components)} {plural}, the spec says {dim}.")
    if not all(math.isfinite(c) for c in components):
        return None
    if any(abs(c) > FLOAT32_MAX for c in components):  # finite in JSON, but inf once stored as float32
        raise LdmflowError(f"{entry_label}: condition {name!r} has the value {raw!r}, beyond the float32 range "
                           f"(+-{FLOAT32_MAX:.3g}) that training uses.")
    return components


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _wind_magnitude(metadata: dict) -> float | None:
    """Norm of ``metadata['wind']`` (any length), or None when it is absent, non-numeric or non-finite."""
    try:
        components = _parse_components(metadata.get("wind"))
    except (TypeError, ValueError, OverflowError):
        return None
    if not components:
        return None
    magnitude = math.sqrt(sum(c * c for c in components))
    return magnitude if math.isfinite(magnitude) else None


def extract_conditions(metadata: dict, spec: ConditionSpec | str, entry_label: str) -> ConditionValues:
    """Build an entry's condition vector: absent or non-finite values are zero-filled and flagged absent.

    ``wind_mag`` (when the spec gives it one dimension) is computed as the norm of ``wind`` if it has no
    usable value of its own; it then counts as present and is listed in ``computed``.
    """
    spec = ConditionSpec.parse(spec)
    values: list[float] = []
    present: list[bool] = []
    zero_filled: list[str] = []
    computed: list[str] = []
    for name, dim in spec.items:
        components = _read_condition(metadata, name, dim, entry_label)
        if components is None and name == "wind_mag" and dim == 1:
            magnitude = _wind_magnitude(metadata)
            if magnitude is not None:
                components = [magnitude]
                computed.append(name)
        if components is None:
            zero_filled.append(name)
        values.extend(components or [0.0] * dim)
        present.append(components is not None)
    return ConditionValues(np.array(values, dtype=np.float32), np.array(present, dtype=bool),  # (value_dim,), (K,)
                           tuple(zero_filled), tuple(computed))


@dataclass(frozen=True)
class ConditionStats:
    """Per value-dimension mean and std over the present training values, used to normalise conditions."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self, spec: ConditionSpec | str) -> dict[str, dict[str, list[float]]]:
        """``{name: {"mean": [...], "std": [...]}}`` (JSON-friendly; saved with the model)."""
        spec = ConditionSpec.parse(spec)
        self._check_length(spec)
        return {
            name: {"mean": list(self.mean[where]), "std": list(self.std[where])}
            for name, where in spec.slices().items()
        }

    @classmethod
    def from_dict(cls, data: dict, spec: ConditionSpec | str) -> ConditionStats:
        """Inverse of ``to_dict``; the names and sizes must match the spec."""
        spec = ConditionSpec.parse(spec)
        mean: list[float] = []
        std: list[float] = []
        for name, dim in spec.items:
            entry = data.get(name) if isinstance(data, dict) else None
            if not isinstance(entry, dict) or "mean" not in entry or "std" not in entry:
                raise LdmflowError(f"Condition statistics have no mean/std for {name!r} (spec {spec}).")
            m, s = list(entry["mean"]), list(entry["std"])
            if len(m) != dim or len(s) != dim:
                raise LdmflowError(
                    f"Condition statistics for {name!r} have {len(m)}/{len(s)} values, the spec says {dim}."
                )
            mean.extend(float(v) for v in m)
            std.extend(float(v) for v in s)
        return cls(tuple(mean), tuple(std))

    def _check_length(self, spec: ConditionSpec) -> None:
        if len(self.mean) != spec.value_dim or len(self.std) != spec.value_dim:
            raise LdmflowError(
                f"Condition statistics have {len(self.mean)} values, the spec {spec} needs {spec.value_dim}."
            )


def compute_condition_stats(values: np.ndarray, present: np.ndarray, spec: ConditionSpec | str) -> ConditionStats:
    """Mean/std of each value dimension over the entries where that condition is present.

    Zero-filled (absent) values are ignored. A condition present nowhere gets mean 0 and std 1; a constant
    one (std 0) gets std 1, so normalising never divides by zero.
    """
    spec = ConditionSpec.parse(spec)
    present = np.asarray(present, dtype=bool)
    count = len(present)
    values = np.asarray(values, dtype=np.float64).reshape(count, spec.value_dim)  # (N, value_dim)
    present = present.reshape(count, spec.num_conditions)  # (N, K)
    mean = np.zeros(spec.value_dim)
    std = np.ones(spec.value_dim)
    for k, where in enumerate(spec.slices().values()):
        rows = values[present[:, k], where]  # (n_present, dim)
        if len(rows) == 0:
            continue
        mean[where] = rows.mean(axis=0)
        spread = rows.std(axis=0)
        std[where] = np.where(spread > _MIN_STD, spread, 1.0)
    return ConditionStats(tuple(float(v) for v in mean), tuple(float(v) for v in std))
