"""Fuzzing the files ldmflow reads back from its caches: whatever a crash, a disk or a user left there, a cache
is used when intact and otherwise ignored or rebuilt, never a crash."""

from __future__ import annotations

import json

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

from fuzzing import JSON  # noqa: E402
from ldmflow.data.check_index import CheckIndex  # noqa: E402
from ldmflow.data.latent_cache import CacheKey, LatentCache, ShardWriter  # noqa: E402
from ldmflow.data.manifest import load_manifest  # noqa: E402

CONTENT = st.binary(max_size=200) | JSON.map(lambda value: json.dumps(value).encode())
INDEX_CONTENT = CONTENT | st.fixed_dictionaries({"format": st.just(1), "entries": st.dictionaries(
    st.text(max_size=40), JSON, max_size=4)}).map(lambda value: json.dumps(value).encode())


@pytest.fixture(scope="module")
def data(make_demo):
    manifest = make_demo(4)
    return manifest, load_manifest(manifest).report.to_dict()


@given(INDEX_CONTENT)
def test_any_image_check_index_gives_the_same_report(data, content):
    manifest, report = data
    file = CheckIndex.for_manifest(manifest).file
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(content)
    assert load_manifest(manifest).report.to_dict() == report


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    key = CacheKey("vae", "data", 32, "center", False, "float32", False)
    cache = LatentCache(tmp_path_factory.mktemp("latent-cache"), key)
    staging = cache.staging_folder()
    writer = ShardWriter(staging, 0, 1, 3, (8, 4, 4), key)
    import torch

    writer.append(torch.ones(3, 8, 4, 4), None, [0, 1, 2], [])
    writer.close()
    cache.publish(staging, 3, 1, (8, 4, 4))
    assert cache.problem() is None
    return cache, {p.name: p.read_bytes() for p in cache.folder.iterdir()}


@given(name=st.sampled_from(["index.json", "params-00000.npy", "sources-00000.npy"]), content=CONTENT,
       keep=st.integers(min_value=0, max_value=2000))
def test_any_damaged_latent_cache_file_is_named_never_a_crash(cache, name, content, keep):
    cache, intact = cache
    damaged = content if name == "index.json" else intact[name][:keep] + content
    (cache.folder / name).write_bytes(damaged)
    try:
        problem = cache.problem()
        assert problem is None or (isinstance(problem, str) and problem and "\n" not in problem)
        if problem is None:  # intact after all (the same bytes, or an index that says the same)
            np.testing.assert_array_equal(np.load(cache.folder / "params-00000.npy"), np.ones((3, 8, 4, 4)))
    finally:
        (cache.folder / name).write_bytes(intact[name])
