"""Progress a user can watch: a tqdm bar on a terminal, a compact line every so often in a log file.

Only the main process reports. Non-terminal output (CI, `mlflow run` logs, SLURM) gets one plain line every
LDMFLOW_PROGRESS_SECONDS (default 60) instead of carriage-return bar updates, and a last one at the end of
work that printed any: work shorter than that prints no progress line at all.
"""

from __future__ import annotations

import logging
import os
import sys
import time

logger = logging.getLogger(__name__)
PROGRESS_SECONDS_ENV = "LDMFLOW_PROGRESS_SECONDS"


def _interval() -> float:
    try:
        return float(os.environ.get(PROGRESS_SECONDS_ENV, "60"))
    except ValueError:
        return 60.0


class Progress:
    """`update(steps, images)` after each optimizer step; `note(loss=..., saved="checkpoint-500")` to show more."""

    def __init__(self, what: str, total: int, done: int = 0, enabled: bool = True, unit: str = "step"):
        self.what, self.total, self.done, self.first, self.unit = what, total, done, done, unit
        self.enabled = enabled
        self.started, self.last_line = time.monotonic(), time.monotonic()
        self.images, self.postfix, self.lines = 0, {}, 0
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, desc=what, unit=unit, dynamic_ncols=True, leave=False)

    def update(self, steps: int = 1, images: int = 0) -> None:
        if not self.enabled:
            return
        self.done += steps
        self.images += images
        elapsed = max(time.monotonic() - self.started, 1e-9)
        self.postfix["img/s"] = f"{self.images / elapsed:.1f}"
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(steps)
        elif self._line_due():
            self.last_line, self.lines = time.monotonic(), self.lines + 1
            logger.info("%s", self.line())

    def _line_due(self) -> bool:
        """Every interval; at the end too, unless nothing was said yet or the last line is under half an
        interval old (it already said nearly the same)."""
        since, interval = time.monotonic() - self.last_line, _interval()
        return since >= interval or (self.done == self.total and self.lines > 0 and since >= interval / 2)

    def note(self, **values: float | str) -> None:
        self.postfix.update({key: value if isinstance(value, str) else f"{value:.4g}" for key, value in values.items()})

    def line(self) -> str:
        """`vae: step 120/350 (34%), loss 0.0123, 45.2 img/s, 5m 10s left`."""
        elapsed = time.monotonic() - self.started
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        parts = [f"{self.unit} {self.done}/{self.total} ({100 * self.done // max(self.total, 1)}%)",
                 *(f"{key} {value}" for key, value in self.postfix.items()),
                 f"{int(left // 60)}m {int(left % 60)}s left" if left == left else "? left"]
        return f"{self.what}: {', '.join(parts)}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
