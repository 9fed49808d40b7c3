"""A sweep's search space: a YAML or JSON file over one stage's own settings, checked before any run exists.

Each entry is `setting: {low, high[, log][, int]}` (a number range) or `setting: {choices: [...]}`. Values are
checked as the stage's settings check them (each bound and each choice builds the settings once), so a space
that can only fail is refused in one line instead of as a study of failed trials.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from ldmflow.data.bounded_json import loads
from ldmflow.errors import LdmflowError
from ldmflow.files import MAX_SPACE_BYTES, read_user_file
from ldmflow.settings import TrainSettings, param_value, setting_fields

# Settings that say where a trial's data, outputs and runs go rather than what is trained: fixed for a sweep.
NOT_SEARCHABLE = ("manifest_path", "output_dir", "data_root", "allow_outside_root", "split", "val_split",
                  "resume_from_checkpoint", "allow_changed_settings", "checkpoint_metric", "register",
                  "registered_model_name", "register_alias", "experiment_name", "run_name", "no_mlflow")


@dataclass(frozen=True)
class Dimension:
    """One searched setting: a number range (low, high, log, integer) or a list of choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple | None = None

    def suggest(self, trial):
        """The trial's value, as Optuna suggests it (choices as the file wrote them)."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def to_dict(self) -> dict:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log, "int": self.integer}


@dataclass(frozen=True)
class SearchSpace:
    """The searched settings, in the order of the file (Optuna suggests them in this order)."""

    dimensions: tuple[Dimension, ...]

    def suggest(self, trial) -> dict[str, object]:
        """{setting: raw value} for one trial; `settings_values` turns them into the settings' types."""
        return {dimension.name: dimension.suggest(trial) for dimension in self.dimensions}

    def to_dict(self) -> dict:
        """The canonical form a study records, to refuse the same study name with another space."""
        return {dimension.name: dimension.to_dict() for dimension in self.dimensions}


def load_space(path: str, base: TrainSettings) -> SearchSpace:
    """Read and check the space file against `base`, the stage's settings with the fixed values."""
    entries = _read(Path(path))
    if not entries:
        raise LdmflowError(f"The space in {path} is empty: give at least one setting, e.g. "
                           "learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}.")
    fields = {item.name: kind for item, kind, _ in setting_fields(type(base))}
    dimensions = []
    for name, entry in entries.items():
        if name not in fields or name in NOT_SEARCHABLE:
            known = ", ".join(sorted(set(fields) - set(NOT_SEARCHABLE)))
            why = "is fixed for a sweep" if name in fields else \
                f"is not a setting of this stage (its settings: {known})"
            raise LdmflowError(f"Space {path}: {name!r} {why}.")
        dimension = _dimension(name, entry, fields[name], path)
        _check_values(dimension, base, path)
        dimensions.append(dimension)
    return SearchSpace(tuple(dimensions))


def settings_values(space_values: dict, base: TrainSettings) -> dict:
    """Suggested raw values in the settings' types (a comma string for a tuple setting, ints for int ones)."""
    fields = {item.name: kind for item, kind, _ in setting_fields(type(base))}
    return {name: _typed(value, fields[name]) for name, value in space_values.items()}


def _read(path: Path) -> dict:
    import yaml  # MLflow's dependency; JSON is read by json for its clearer messages

    try:
        text = read_user_file(path, "--space", MAX_SPACE_BYTES).decode("utf-8-sig")
        entries = loads(text, f"--space {path}") if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except RecursionError:  # YAML's parser recurses per nesting level
        raise LdmflowError(f"--space {path} is nested too deeply to be a search space.") from None
    except (ValueError, yaml.YAMLError) as error:
        raise LdmflowError(f"--space {path} is not valid YAML or JSON: {str(error).splitlines()[0]}") from None
    if entries is None:
        return {}
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise LdmflowError(f"--space {path} must map each setting to {{low, high}} or {{choices: [...]}}.")
    return entries


def _base_type(kind):
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `int | None`: int
        return next(arg for arg in typing.get_args(kind) if arg is not type(None))
    return kind


def _dimension(name: str, entry: dict, kind, path) -> Dimension:
    optional = type(None) in typing.get_args(kind)  # `snr_gamma: {choices: [null, 5.0]}`: null is its default
    kind = _base_type(kind)
    unknown = set(entry) - {"low", "high", "log", "int", "choices"}
    if unknown:
        raise LdmflowError(f"Space {path}: {name} has unknown key(s) {', '.join(sorted(map(repr, unknown)))}; "
                           "use low, high, log, int or choices.")
    if "choices" in entry:
        choices = entry["choices"]
        if not isinstance(choices, list) or not choices:
            raise LdmflowError(f"Space {path}: {name}: choices must be a non-empty list.")
        return Dimension(name, choices=tuple(None if value is None and optional else _choice(name, value, kind, path)
                                             for value in choices))
    if "low" not in entry or "high" not in entry:
        raise LdmflowError(f"Space {path}: {name} needs low and high, or choices.")
    if kind not in (int, float):
        raise LdmflowError(f"Space {path}: {name} is not a number setting: give it choices instead of low/high.")
    low, high = _number(name, entry["low"], path), _number(name, entry["high"], path)
    integer = bool(entry.get("int", kind is int))
    if kind is int and not integer:
        raise LdmflowError(f"Space {path}: {name} is an integer setting; leave out int: false.")
    if low > high:
        raise LdmflowError(f"Space {path}: {name} has low {low:g} > high {high:g}.")
    if integer and (low != int(low) or high != int(high)):
        raise LdmflowError(f"Space {path}: {name} is searched over integers: low and high must be integers.")
    if entry.get("log") and low <= 0:
        raise LdmflowError(f"Space {path}: {name} has log: true, which needs low > 0 (got {low:g}).")
    return Dimension(name, low, high, bool(entry.get("log", False)), integer)


def _number(name: str, value, path) -> float:
    """YAML 1.1 reads 1e-5 (no dot) as a string: accept it as the number it means."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise LdmflowError(f"Space {path}: {name}: {value!r} is not a finite number.")
    return number


def _choice(name: str, value, kind, path):
    """A choice as Optuna stores it (None, bool, int, float or str), checked against the setting's type."""
    origin = typing.get_origin(kind)
    if origin is tuple:
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return ",".join(map(str, value))  # Optuna's choices are scalars: a list becomes "32,64"
        if isinstance(value, str) and all(part.strip().isdigit() for part in value.split(",")):
            return value
        ok = False
    elif kind is bool:
        ok = isinstance(value, bool)
        value = param_value(value) if ok else value  # "true": the spelling the trial's run logs for its params
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        number = _finite_float(value)
        ok, value = number is not None, value if number is None else number
    else:
        ok = isinstance(value, str)
    if not ok:
        raise LdmflowError(f"Space {path}: {name} takes {_type_name(kind)} values; choice {value!r} is not one.")
    return value


def _finite_float(value) -> float | None:
    """A number (or number text) as a finite float; None for anything else, huge integers included."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _type_name(kind) -> str:
    if typing.get_origin(kind) is tuple:
        return "integer list (such as [32, 64] or '32,64')"
    return {bool: "true/false", int: "integer", float: "number", str: "text"}.get(kind, str(kind))


def _typed(value, kind):
    if value is None:
        return None
    kind = _base_type(kind)
    if typing.get_origin(kind) is tuple:
        return tuple(int(part) for part in str(value).split(",") if part.strip())
    if kind is bool:
        return value is True or str(value).lower() == "true"
    if kind is int:
        return int(value)
    if kind is float:
        return float(value)
    return value


def _check_values(dimension: Dimension, base: TrainSettings, path) -> None:
    """Build the settings with each bound or choice, so the settings' own checks speak now."""
    values = dimension.choices if dimension.choices is not None else (dimension.low, dimension.high)
    for value in values:
        typed = settings_values({dimension.name: value}, base)
        try:
            dataclasses.replace(base, **typed)
        except LdmflowError as error:
            raise LdmflowError(f"Space {path}: {dimension.name} = {param_value(typed[dimension.name])} is refused "
                               f"by the stage: {error}") from None
