"""Shared fixtures: a tiny demo dataset and helpers that write small manifests and images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ldmflow.data.demo import make_demo_dataset
from ldmflow.data.image_io import write_image


@pytest.fixture(scope="session")
def demo_manifest(tmp_path_factory) -> Path:
    """A 16-image, 32 px PNG demo dataset (4 val). Shared by the session: copy it before modifying anything."""
    root = tmp_path_factory.mktemp("demo32")
    return make_demo_dataset(root, num_images=16, resolution=32, image_format="png", seed=0, val_fraction=0.25)


@pytest.fixture
def write_manifest():
    """``write_manifest(folder, entries, key="items")`` writes folder/manifest.json (key=None: a bare list)."""

    def _write(folder: Path, entries, key: str | None = "items", name: str = "manifest.json") -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.write_text(json.dumps(entries if key is None else {key: entries}), encoding="utf-8")
        return path

    return _write


@pytest.fixture
def write_test_image():
    """``write_test_image(path, height=16, width=16, value=0.5, image_format="png")``: a flat RGB image."""

    def _write(path: Path, height: int = 16, width: int = 16, value=0.5, image_format: str = "png") -> Path:
        image = np.empty((height, width, 3), dtype=np.float32)
        image[...] = value
        write_image(path, image, image_format)
        return path

    return _write


@pytest.fixture(autouse=True, scope="module")
def _reset_mlflow_tracking_uri():
    """In-process commands set MLflow's global tracking URI; no test module inherits another's store."""
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)
