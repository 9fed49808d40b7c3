"""What the benchmarks share: a tracker that logs nothing and notes when each step's metrics arrive, so a
benchmark can time a real training's steps after warm-up (setup, compilation and saving excluded)."""

from __future__ import annotations

import time


class StepClock:
    """Pass as the trainer's tracker; `times[step]` is when the metrics of `step` were logged."""

    run_id = ""

    def __init__(self):
        self.times: dict[int, float] = {}

    def log_metrics(self, metrics, step):
        self.times.setdefault(step, time.perf_counter())

    def log_image(self, image, key, step): pass

    def set_tags(self, tags): pass

    def seconds_per_step(self, first: int, last: int | None = None) -> float:
        last = max(self.times) if last is None else last
        return (self.times[last] - self.times[first]) / (last - first)
