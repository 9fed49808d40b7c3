"""Shared fixtures: a tiny demo dataset and helpers that write small manifests and images."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from ldmflow.data.demo import make_demo_dataset
from ldmflow.data.image_io import write_image


@pytest.fixture(scope="session")
def make_demo(tmp_path_factory):
    """``make_demo(num_images=12, **options)``: the manifest of a fresh 32 px demo dataset in its own folder
    (`make_demo_dataset`'s options); the one way tests make demo data, whatever their fixture's scope."""

    def _make(num_images: int = 12, **options) -> Path:
        return make_demo_dataset(tmp_path_factory.mktemp("demo"), num_images=num_images,
                                 **{"resolution": 32, **options})

    return _make


@pytest.fixture(scope="session")
def demo_manifest(make_demo) -> Path:
    """A 16-image, 32 px PNG demo dataset (4 val). Shared by the session: copy it before modifying anything."""
    return make_demo(16, image_format="png", seed=0, val_fraction=0.25)


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


@pytest.fixture
def lpips_weights(tmp_path) -> Path:
    """A folder with the published LPIPS files' key names and shapes and seeded values (the real ones cannot
    be downloaded here)."""
    import torch

    from ldmflow.models.perceptual import ALEXNET_FILE, LINEAR_FILE

    folder = tmp_path / "lpips-weights"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    convs = ((0, 64, 3, 11), (3, 192, 64, 5), (6, 384, 192, 3), (8, 256, 384, 3), (10, 256, 256, 3))
    backbone = {}
    for index, out, inp, kernel in convs:
        backbone[f"features.{index}.weight"] = torch.randn(out, inp, kernel, kernel, generator=generator) * 0.05
        backbone[f"features.{index}.bias"] = torch.zeros(out)
    torch.save(backbone, folder / ALEXNET_FILE)
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, out, 1, 1, generator=generator) / out
                for k, (_, out, _, _) in enumerate(convs)}, folder / LINEAR_FILE)
    return folder


LANE_MARKERS = ("train", "slow", "server", "processes")  # `make test-fast` (Makefile) runs tests with none of these
_ORIGINAL: dict = {}  # the loop's own _MetricWindow, kept here while an unmarked test runs with the refusing one


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """The fast lane stays fast by construction: an unmarked test that reaches the training loop, in its own
    body or in a fixture it sets up, fails and says to mark it. The loop looks `_MetricWindow` up at call time,
    however the test imported `train`."""
    from ldmflow.training import loop

    original = _ORIGINAL.setdefault("metric_window", loop._MetricWindow)
    if any(item.get_closest_marker(marker) for marker in LANE_MARKERS):
        loop._MetricWindow = original
        return

    def refuse(*args, **kwargs):
        raise AssertionError(f"{item.nodeid} trains a model (or a fixture it uses does): mark it "
                             "@pytest.mark.train")

    loop._MetricWindow = refuse


@pytest.fixture(autouse=True)
def _fresh_ui_hint():
    """Each test starts as a new process would: the local store's `mlflow ui` command not yet printed."""
    from ldmflow.tracking.run_tracker import UI_HINT_SHOWN_ENV

    os.environ.pop(UI_HINT_SHOWN_ENV, None)
    yield
    os.environ.pop(UI_HINT_SHOWN_ENV, None)


@pytest.fixture(autouse=True, scope="session")
def _private_cache_root(tmp_path_factory):
    """Image-check indexes and latent caches go to this session's temporary folder, not ~/.cache (subprocesses
    inherit it)."""
    from ldmflow.files import CACHE_ENV

    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("ldmflow-cache"))
    yield
    if previous is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = previous


@pytest.fixture(autouse=True, scope="module")
def _reset_mlflow_tracking_uri():
    """In-process commands set MLflow's global tracking URI; no test module inherits another's store."""
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)


def _register_hypothesis_profiles() -> None:
    """The fuzz suites (test_fuzz_*.py) run few examples in CI ("ci", the default) and many under `make fuzz`
    (HYPOTHESIS_PROFILE=fuzz). No deadline: a loaded 2-core CI machine would make per-example deadlines flaky;
    the suites assert their own time bound per input instead (fuzzing.py)."""
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # the dev extra is not installed: the fuzz suites skip themselves
        return
    settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("fuzz", max_examples=3000, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_register_hypothesis_profiles()
