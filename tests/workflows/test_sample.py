"""Writing samples: a new folder per call, and never one that is already there."""

from __future__ import annotations

import numpy as np

from ldmflow.tracking import run_tracker
from ldmflow.tracking.run_tracker import NullTracker
from ldmflow.workflows.sample import write_samples


def test_a_sample_folder_name_already_taken_is_skipped_not_replaced(tmp_path, monkeypatch):
    taken = tmp_path / "samples-aaaa"
    taken.mkdir()
    (taken / "sample_0000.png").write_bytes(b"someone else's")
    names = iter(["samples-aaaa", "samples-bbbb"])
    monkeypatch.setattr(run_tracker, "default_run_name", lambda stage, settings=None: next(names))
    grid = write_samples(tmp_path, np.zeros((2, 8, 8, 3), dtype=np.float32), None, "png", NullTracker())
    assert grid == tmp_path / "samples-bbbb" / "grid.png" and grid.is_file()
    assert (taken / "sample_0000.png").read_bytes() == b"someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples-aaaa", "samples-bbbb"]
