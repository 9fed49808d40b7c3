"""Test doubles and scaffolding: the one fake tracker (the loop's `Tracker` protocol, in memory), a task whose
loss turns NaN on cue, and a folder with its own SQLite tracking store."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest


class RecordingTracker:
    """Keeps metrics as (step, values), tags merged, images as (key, step) and dicts by file name."""

    run_id = ""

    def __init__(self):
        self.metrics: list[tuple[int, dict]] = []
        self.tags: dict[str, str] = {}
        self.images: list[tuple[str, int]] = []
        self.dicts: dict[str, object] = {}

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_image(self, image, key, step):
        self.images.append((key, step))

    def log_dict(self, obj, artifact_file):
        self.dicts[artifact_file] = obj
        return True

    def set_tags(self, tags):
        self.tags.update(tags)

    def history(self, name: str) -> list[tuple[int, float]]:
        """(step, value) of one metric, in logging order."""
        return [(step, values[name]) for step, values in self.metrics if name in values]


def with_nan_losses(task_class, is_bad):
    """A subclass of a task whose loss turns NaN on the calls where `is_bad(n)` holds (n counts from 1 per
    subclass), to drive the loop's non-finite handling."""

    class NanInjected(task_class):
        calls = 0

        def loss(self, model, batch, step):
            loss, parts = super().loss(model, batch, step)
            NanInjected.calls += 1
            return (loss * float("nan") if is_bad(NanInjected.calls) else loss), parts

    return NanInjected


@contextlib.contextmanager
def tracked_folder(root: Path):
    """Work in `root` with a fresh SQLite store there (as `cd root` with the default store), outside any run an
    enclosing `mlflow run` set; for module fixtures, which cannot use the function-scoped monkeypatch."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        yield patch
