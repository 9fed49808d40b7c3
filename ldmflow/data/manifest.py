"""Load an image manifest (JSON) into records: resolved image paths, condition vectors and a report.

Every rule that can reject user input raises LdmflowError with one message naming the offending entry or path;
files that are merely missing or unreadable are skipped with one warning each, and counted in the report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from stat import S_ISLNK, S_ISREG

import numpy as np

from ldmflow.data import bounded_json
from ldmflow.data.check_index import CheckIndex
from ldmflow.data.conditions import (
    ConditionSpec,
    ConditionStats,
    ConditionValues,
    compute_condition_stats,
    extract_conditions,
)
from ldmflow.data.image_io import UnreadableImageError, header_problem, read_image
from ldmflow.errors import LdmflowError
from ldmflow.files import MAX_MANIFEST_BYTES, read_user_file
from ldmflow.settings import DEFAULT_CONDITION_SPEC, MAX_IMAGE_PIXELS

logger = logging.getLogger(__name__)

LIST_KEYS = ("items", "entries", "samples", "records", "frames", "data")
VERIFY_MODES = ("none", "header", "full")
_EXAMPLES = 5  # how many offending files a warning or report names
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f]")
_PARALLEL_CHECKS = 2000  # fewer unchecked files than this are checked in this process (a pool costs ~0.2 s)


@dataclass(frozen=True, eq=False)
class ManifestRecord:
    """One usable entry: where its image is and its condition vector."""

    entry_index: int
    output_rel: str
    image_path: Path
    conditions: np.ndarray  # (value_dim,) float32, zero where absent
    present: np.ndarray  # (K,) bool


@dataclass
class ManifestReport:
    """What loading found; ``to_dict()`` is the check-manifest JSON."""

    split: str
    condition_spec: str
    total: int = 0
    in_split: int = 0
    usable: int = 0
    missing_files: int = 0
    unreadable_files: int = 0
    zero_filled: dict[str, int] = field(default_factory=dict)
    computed: dict[str, int] = field(default_factory=dict)
    condition_stats: dict = field(default_factory=dict)
    missing_examples: list[str] = field(default_factory=list)
    unreadable_examples: list[str] = field(default_factory=list)
    split_values: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Manifest:
    """A loaded split: its usable records, the condition statistics over them, and the file's digest."""

    path: Path
    data_root: Path
    spec: ConditionSpec
    records: list[ManifestRecord]
    stats: ConditionStats
    report: ManifestReport
    digest: str  # sha256 hex of the manifest file's bytes
    files_digest: str = ""  # also of the split's usable image files (path, size, mtime): what a latent cache keys on


class NothingUsableError(LdmflowError):
    """No entry of the requested split can be used; ``report`` (a ManifestReport) says why."""

    def __init__(self, message: str, report: ManifestReport):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class _Candidate:
    """An entry of the requested split before its file is checked."""

    index: int
    output_rel: str
    image_path: Path
    values: ConditionValues


def load_manifest(
    manifest_path: str | Path,
    split: str | None = "train",
    condition_spec: str | ConditionSpec = DEFAULT_CONDITION_SPEC,
    data_root: str | Path | None = None,
    allow_outside_root: bool = False,
    verify_images: str = "header",
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> Manifest:
    """Load the entries of ``split`` (None or "all": every entry) whose images exist and can be read.

    ``verify_images``: "none" checks existence only, "header" also checks file headers (fast, for training),
    "full" decodes every image (for check-manifest). Raises NothingUsableError when no entry is usable.
    """
    if verify_images not in VERIFY_MODES:
        raise LdmflowError(f"verify_images must be one of {', '.join(VERIFY_MODES)}, got {verify_images!r}.")
    path = Path(manifest_path)
    spec = ConditionSpec.parse(condition_spec)
    raw = _read_manifest_bytes(path)
    entries = _entries_of(_parse_json(raw, path), path)
    root = _resolve_root(path, data_root)
    split_name = None if split is None or str(split) == "all" else str(split)

    candidates: list[_Candidate] = []
    real_folders: dict[str, str] = {}
    split_values: Counter[str] = Counter()
    for index, entry in enumerate(entries):
        output_rel, metadata = _parse_entry(index, entry, path)
        entry_split = metadata.get("split")
        split_values["<none>" if entry_split is None else str(entry_split)] += 1
        if split_name is not None and (entry_split is None or str(entry_split) != split_name):
            continue
        label = f"entry {index} ({output_rel})"
        image_path = _resolve_image_path(root, output_rel, label, allow_outside_root, real_folders)
        candidates.append(_Candidate(index, output_rel, image_path, extract_conditions(metadata, spec, label)))

    index = CheckIndex.for_manifest(path)
    usable, missing, unreadable, files_digest = _verify_files(candidates, verify_images, split_name,
                                                               max_image_pixels, index)
    report = _build_report(spec, split_name, len(entries), candidates, usable, missing, unreadable, split_values)
    if not usable:
        raise NothingUsableError(_nothing_usable_message(report, path, root), report)
    records = [
        ManifestRecord(c.index, c.output_rel, c.image_path, c.values.values, c.values.present) for c in usable
    ]
    stats = ConditionStats.from_dict(report.condition_stats, spec)
    logger.debug("Loaded %d of %d entries (split %s) from %s", len(records), len(entries), report.split, path)
    digest = hashlib.sha256(raw).hexdigest()
    files_digest = hashlib.sha256(f"{digest}\0{files_digest}".encode()).hexdigest()
    return Manifest(path, root, spec, records, stats, report, digest, files_digest)


def _read_manifest_bytes(path: Path) -> bytes:
    return read_user_file(path, "Manifest", MAX_MANIFEST_BYTES)


def _parse_json(raw: bytes, path: Path) -> object:
    try:
        return bounded_json.loads(raw.decode("utf-8-sig"), f"Manifest {path}")
    except UnicodeDecodeError as exc:
        raise LdmflowError(f"Manifest {path} is not UTF-8 text (byte {exc.start}).") from None
    except json.JSONDecodeError as exc:
        raise LdmflowError(
            f"Manifest {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}."
        ) from None


def _describe(value: object) -> str:
    """A short English name for a JSON value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _entries_of(data: object, path: Path) -> list:
    """The list of entries: the top level, a well-known key, or the object's only list-valued key."""
    if isinstance(data, list):
        return data
    expected = f"expected a list of entries, or an object with the list under {', '.join(repr(k) for k in LIST_KEYS)}"
    if not isinstance(data, dict):
        raise LdmflowError(f"Manifest {path}: {expected}; found {_describe(data)}.")
    for key in LIST_KEYS:
        if isinstance(data.get(key), list):
            return data[key]
    list_keys = [key for key, value in data.items() if isinstance(value, list)]
    if len(list_keys) == 1:
        return data[list_keys[0]]
    keys = ", ".join(repr(k) for k in list(data)[:20])
    if list_keys:
        found = f"an object with several lists ({', '.join(repr(k) for k in list_keys)}) and none of those names"
    else:
        found = f"an object with keys [{keys}] and no list of entries"
    raise LdmflowError(f"Manifest {path}: {expected}; found {found}.")


def _parse_entry(index: int, entry: object, path: Path) -> tuple[str, dict]:
    """(output_rel, metadata) of one entry; a missing or null metadata counts as empty."""
    if not isinstance(entry, dict):
        raise LdmflowError(
            f"Manifest {path}: entry {index} is {_describe(entry)}; expected an object with 'output_rel'."
        )
    if "output_rel" not in entry:
        keys = ", ".join(repr(k) for k in list(entry)[:10])
        raise LdmflowError(f"Manifest {path}: entry {index} has no 'output_rel' (its keys: [{keys}]).")
    output_rel = entry["output_rel"]
    if not isinstance(output_rel, str) or not output_rel.strip():
        raise LdmflowError(
            f"Manifest {path}: entry {index} has 'output_rel' {output_rel!r}; expected a non-empty path string."
        )
    if _CONTROL_CHARACTER.search(output_rel):
        raise LdmflowError(
            f"Manifest {path}: entry {index} has 'output_rel' {output_rel[:200]!r} with a control character "
            "(a NUL, a line break, ...); no image path has one.")
    metadata = entry.get("metadata")
    if metadata is None:
        return output_rel, {}
    if not isinstance(metadata, dict):
        raise LdmflowError(
            f"Manifest {path}: entry {index} ({output_rel}) has 'metadata' that is {_describe(metadata)}; "
            "expected an object."
        )
    return output_rel, metadata


def _resolve_root(manifest_path: Path, data_root: str | Path | None) -> Path:
    """The folder output_rel paths are relative to: data_root, else the manifest's folder (resolved)."""
    if data_root is None:
        if not _is_regular_file(manifest_path):  # a pipe (`<(jq ...)`) or a device has no folder of its images
            raise LdmflowError(f"Manifest {manifest_path} is not a regular file (a pipe or a device), so its images' "
                               "folder is unknown: give it as --data_root.")
        return manifest_path.parent.resolve()
    root = Path(data_root)
    if not root.is_dir():
        raise LdmflowError(f"Data root {root} is not a directory.")
    return root.resolve()


def _resolve_image_path(root: Path, output_rel: str, label: str, allow_outside_root: bool,
                        real_folders: dict[str, str]) -> Path:
    """``root / output_rel``; refuses paths that resolve (symlinks included) outside root unless allowed.

    Folders are resolved once each (``real_folders`` remembers them): resolving every path in full cost
    seconds per 100k entries; a file that is itself a symlink is still resolved in full.
    """
    candidate = os.path.join(root, output_rel)  # an absolute output_rel stays as it is
    try:
        folder, name = os.path.split(candidate)
        if name in ("", ".", "..") or _is_symlink(candidate):
            resolved = os.path.realpath(candidate)
        else:
            if folder not in real_folders:
                real_folders[folder] = os.path.realpath(folder)
            resolved = os.path.join(real_folders[folder], name)
    except (OSError, ValueError) as exc:  # a name the OS refuses (too long) fails here, not later in the loader
        raise LdmflowError(f"{label[:250]}: the image path is not usable here: "
                           f"{getattr(exc, 'strerror', None) or exc}.") from None
    inside = str(root).rstrip(os.sep) + os.sep
    if not allow_outside_root:
        if not (resolved + os.sep).startswith(inside):
            raise LdmflowError(
                f"{label}: the image path resolves to {resolved}, outside the data root {root}. "
                "Fix output_rel, set --data_root, or pass --allow_outside_root to permit it."
            )
    return Path(candidate)


def _is_regular_file(path: Path) -> bool:
    try:
        return S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _is_symlink(path: Path) -> bool:
    try:
        return S_ISLNK(os.lstat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False  # missing: counted as such later


def _verify_files(
    candidates: list[_Candidate], verify_images: str, split_name: str | None, max_pixels: int, index: CheckIndex
) -> tuple[list[_Candidate], list[_Candidate], list[tuple[_Candidate, str]], str]:
    """Split candidates into usable, missing and unreadable (with reason), and digest the usable files; one
    warning per kind of problem.

    Files unchanged since an earlier check take its verdict from `index` (a stat each); the others are read.
    """
    stats = [_stat(candidate.image_path) for candidate in candidates]
    missing = [c for c, stat in zip(candidates, stats) if stat is None]
    present = [(c, stat) for c, stat in zip(candidates, stats) if stat is not None]
    reasons: dict[int, str | None] = {}
    unknown = []
    for position, (candidate, stat) in enumerate(present):
        known, reason = index.verdict(str(candidate.image_path), stat, verify_images, max_pixels)
        if known:
            reasons[position] = reason
        else:
            unknown.append(position)
    if unknown and verify_images != "none":
        paths = [present[position][0].image_path for position in unknown]
        for position, reason in zip(unknown, _check_images(paths, verify_images, max_pixels)):
            reasons[position] = reason
            index.remember(str(present[position][0].image_path), present[position][1], verify_images, max_pixels,
                           reason)
        index.save()
    usable, unreadable = [], []
    files = hashlib.sha256()  # what the usable images are: path, size and mtime (their contents, cheaply)
    for position, (candidate, stat) in enumerate(present):
        reason = reasons.get(position)  # none when nothing was checked (verify_images "none")
        if reason is None:
            usable.append(candidate)
            files.update(f"{candidate.image_path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        else:
            unreadable.append((candidate, reason))
    where = "all entries" if split_name is None else f"split {split_name!r}"
    if missing:
        names = ", ".join(c.output_rel for c in missing[:_EXAMPLES])
        more = f" and {len(missing) - _EXAMPLES} more" if len(missing) > _EXAMPLES else ""
        logger.warning("Skipping %d of %d entries in %s whose image file is missing: %s%s",
                       len(missing), len(candidates), where, names, more)
    if unreadable:
        names = "; ".join(f"{c.image_path} ({reason})" for c, reason in unreadable[:_EXAMPLES])
        more = f" and {len(unreadable) - _EXAMPLES} more" if len(unreadable) > _EXAMPLES else ""
        logger.warning("Skipping %d of %d entries in %s whose image cannot be read: %s%s",
                       len(unreadable), len(candidates), where, names, more)
    return usable, missing, unreadable, files.hexdigest()


def _stat(path: Path) -> os.stat_result | None:
    """The file's stat, or None when it is missing or not a regular file."""
    try:
        stat = os.stat(path)
    except (OSError, ValueError):
        return None
    return stat if S_ISREG(stat.st_mode) else None


def _check_images(paths: list[Path], verify_images: str, max_pixels: int) -> list[str | None]:
    """Each file's problem or None, on every core when there are many: decoding and header parsing are
    CPU-bound Python (threads did not help), and a check of 100k files took a minute on one core."""
    check = partial(_unreadable_reason, verify_images=verify_images, max_pixels=max_pixels)
    workers = _check_workers()
    if len(paths) < _PARALLEL_CHECKS or workers == 1:
        return [check(path) for path in paths]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(check, paths, chunksize=256))


def _check_workers() -> int:
    """The cores this process may check on: a training's processes on one machine share them (accelerate and
    torchrun set LOCAL_WORLD_SIZE); at most 8."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    sharing = int(local) if local.isdigit() and int(local) > 0 else 1
    return min(max(1, (os.cpu_count() or 1) // sharing), 8)


def _unreadable_reason(image_path: Path, verify_images: str, max_pixels: int) -> str | None:
    if verify_images == "header":
        return header_problem(image_path, max_pixels)
    if verify_images == "full":
        try:
            read_image(image_path, preserve_precision=True, max_pixels=max_pixels)
        except UnreadableImageError as exc:
            return exc.reason
    return None


def _build_report(
    spec: ConditionSpec,
    split_name: str | None,
    total: int,
    candidates: list[_Candidate],
    usable: list[_Candidate],
    missing: list[_Candidate],
    unreadable: list[tuple[_Candidate, str]],
    split_values: Counter,
) -> ManifestReport:
    """Counts over the split, condition bookkeeping and statistics over the usable entries."""
    zero_filled = Counter(name for c in usable for name in c.values.zero_filled)
    computed = Counter(name for c in usable for name in c.values.computed)
    values = np.stack([c.values.values for c in usable]) if usable else np.zeros((0, spec.value_dim))
    present = np.stack([c.values.present for c in usable]) if usable else np.zeros((0, spec.num_conditions), bool)
    stats = compute_condition_stats(values, present, spec)  # (N, value_dim), (N, K)
    return ManifestReport(
        split="all" if split_name is None else split_name,
        condition_spec=str(spec),
        total=total,
        in_split=len(candidates),
        usable=len(usable),
        missing_files=len(missing),
        unreadable_files=len(unreadable),
        zero_filled={name: zero_filled[name] for name in spec.names},
        computed={name: computed[name] for name in spec.names},
        condition_stats=stats.to_dict(spec),
        missing_examples=[c.output_rel for c in missing[:_EXAMPLES]],
        unreadable_examples=[f"{c.output_rel}: {reason}" for c, reason in unreadable[:_EXAMPLES]],
        split_values=dict(sorted(split_values.items())),
    )


def _nothing_usable_message(report: ManifestReport, path: Path, root: Path) -> str:
    """Why no entry is usable: an empty manifest, a split that matches nothing, or files that all failed."""
    if report.total == 0:
        return f"Manifest {path} has no entries."
    if report.in_split == 0:
        found = ", ".join(f"{name!r} ({count})" for name, count in report.split_values.items())
        return (
            f"No entries with split {report.split!r} in manifest {path} ({report.total} entries; "
            f"split values found: {found}). Choose one of those with --split, or 'all'."
        )
    parts = []
    if report.missing_files:
        parts.append(f"{report.missing_files} missing (e.g. {', '.join(report.missing_examples[:3])})")
    if report.unreadable_files:
        parts.append(f"{report.unreadable_files} unreadable (e.g. {report.unreadable_examples[0]})")
    return (
        f"None of the {report.in_split} entries with split {report.split!r} in manifest {path} is usable: "
        f"{'; '.join(parts)}. Image paths are resolved relative to {root}."
    )
