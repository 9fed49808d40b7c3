"""Image checks remembered between runs: one verdict per file, valid while its size and mtime are unchanged.

Checking the headers of 100k images took tens of seconds, and every process of every run paid it again on
unchanged files. The index is a small JSON file per manifest in the cache folder (files.cache_root()); a
missing, unreadable or foreign index is simply rebuilt, so it can never make a load fail.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from ldmflow.files import cache_root, write_atomically

logger = logging.getLogger(__name__)

LEVELS = {"none": 0, "header": 1, "full": 2}  # how thoroughly a verdict was reached
_FORMAT = 1


class CheckIndex:
    """Verdicts by image path: [size, mtime_ns, level, max_pixels, reason or None]."""

    def __init__(self, file: Path | None, entries: dict[str, list]):
        self.file, self.entries, self.changed = file, entries, False

    @classmethod
    def for_manifest(cls, manifest_path: Path) -> CheckIndex:
        """The index of this manifest's images (keyed by the manifest's absolute path)."""
        name = hashlib.sha256(str(Path(manifest_path).absolute()).encode()).hexdigest()[:24]
        file = cache_root() / "checks" / f"{name}.json"
        try:
            data = json.loads(file.read_bytes())
            entries = data["entries"] if data.get("format") == _FORMAT else {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            entries = {}  # absent or unusable: start afresh
        return cls(file, entries if isinstance(entries, dict) else {})

    def verdict(self, path: str, stat: os.stat_result, level: str, max_pixels: int) -> tuple[bool, str | None]:
        """(known, reason): known when the file is unchanged and was checked as thoroughly, passed a more thorough
        check, or failed a quicker one (a file that fails a quick check fails a thorough one too)."""
        entry = self.entries.get(path)
        if not isinstance(entry, list) or len(entry) != 5:
            return False, None
        size, mtime, checked, pixels, reason = entry
        if size != stat.st_size or mtime != stat.st_mtime_ns or pixels != max_pixels:
            return False, None
        checked, wanted = LEVELS.get(checked, -1), LEVELS[level]
        if checked == wanted or (checked > wanted and reason is None) or (0 <= checked < wanted and reason):
            return True, reason
        return False, None

    def remember(self, path: str, stat: os.stat_result, level: str, max_pixels: int, reason: str | None) -> None:
        self.entries[path] = [stat.st_size, stat.st_mtime_ns, level, max_pixels, reason]
        self.changed = True

    def save(self) -> None:
        """Write the index if anything was learned; a cache folder that cannot be written only costs speed."""
        if not self.changed or self.file is None:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.file, json.dumps({"format": _FORMAT, "entries": self.entries}).encode())
        except OSError as error:
            logger.debug("Not saving the image-check index %s: %s", self.file, error)
        self.changed = False
