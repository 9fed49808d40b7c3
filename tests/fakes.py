"""The one fake tracker: records what the training loop logs, in memory (the loop's `Tracker` protocol)."""

from __future__ import annotations


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
