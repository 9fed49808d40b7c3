"""The on-disk latent cache: what it holds, when it is reused or rebuilt, its key, and several builders at once."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from launch import launch_two_processes
from numerics import assert_computed_alike
from ldmflow.data.dataset import ManifestImageDataset
from ldmflow.data.latent_cache import INDEX_FILE, CacheIndex, CacheKey, LatentCache
from ldmflow.data.manifest import load_manifest
from ldmflow.settings import CacheLatentsSettings
from ldmflow.training import latent_encoding
from ldmflow.workflows.cache_latents import run_cache_latents

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.portable
BATCH = 2  # one batch size everywhere
# The cache is encoded along another path than the reference (a DataLoader, other processes, OMP_NUM_THREADS=1):
# equal within the rounding of the VAE's largest reduction (3x3 convolutions over 8 channels), not bit for bit.
ALIKE = dict(reduction=9 * 8, layers=4)


@pytest.fixture(scope="module")
def data(make_demo) -> Path:
    return make_demo(12, val_fraction=0.0)


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> Path:
    """An untrained x8 VAE: the cache stores whatever it encodes, trained or not."""
    folder = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4).save_pretrained(folder)
    return folder


def _settings(data: Path, vae: Path, cache: Path, **changes) -> CacheLatentsSettings:
    options = dict(manifest_path=str(data), vae_uri=str(vae), resolution=32, random_flip=True,
                   eval_batch_size=BATCH, latent_cache_dir=str(cache))
    return CacheLatentsSettings(**{**options, **changes})


def _posteriors(data: Path, vae_folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The in-memory path: every training image's posterior (and its mirror's), encoded in batches of BATCH."""
    vae = AutoencoderKL.from_pretrained(vae_folder).eval()
    images = ManifestImageDataset(load_manifest(data).records, 32)
    pixels = torch.stack([images[i]["pixel_values"] for i in range(len(images))])
    encode = lambda x: torch.cat([latent_encoding.encode_posteriors(vae, x[i:i + BATCH])  # noqa: E731
                                  for i in range(0, len(x), BATCH)])
    return encode(pixels), encode(pixels.flip(-1))


def _open(settings: CacheLatentsSettings):
    manifest = load_manifest(settings.manifest_path, condition_spec="temperature:1,wind:3:flipx=0,wind_mag:1")
    cache = LatentCache(Path(settings.latent_cache_dir), latent_encoding.cache_key(settings, manifest,
                                                                                   Path(settings.vae_uri)))
    assert cache.problem() is None
    return cache, cache.open(torch.from_numpy(manifest.spec.flip_signs()), manifest.records), manifest


def _count_encodes(monkeypatch) -> list:
    calls = []
    original = latent_encoding.encode_posteriors
    monkeypatch.setattr(latent_encoding, "encode_posteriors", lambda *a: calls.append(1) or original(*a))
    return calls


def test_the_cache_holds_the_posteriors_and_a_second_run_encodes_nothing(data, vae, tmp_path,
                                                                                     monkeypatch, caplog):
    settings = _settings(data, vae, tmp_path / "cache")
    calls = _count_encodes(monkeypatch)
    caplog.set_level("INFO")
    folder = run_cache_latents(settings)
    assert len(calls) == 2 * 6  # 12 images in batches of 2, plain and mirrored
    cache, dataset, manifest = _open(settings)
    assert folder == cache.folder and folder.parent == tmp_path / "cache"
    params, flipped = _posteriors(data, vae)
    rows = [dataset.rows(i) for i in range(len(dataset))]
    assert_computed_alike(torch.stack([r[0] for r in rows]), params, **ALIKE)
    assert_computed_alike(torch.stack([r[1] for r in rows]), flipped, **ALIKE)
    assert dataset.conditions.shape == (12, 5) and torch.equal(
        dataset.conditions[3], torch.from_numpy(manifest.records[3].conditions))
    assert len(pickle.dumps(dataset)) < 20_000  # DataLoader workers map the files themselves: no copy travels

    calls.clear()
    assert run_cache_latents(settings) == folder
    assert calls == [] and "(12 images, and their flips): nothing to encode" in caplog.text


def test_float16_storage_is_the_rounded_posteriors(data, vae, tmp_path):
    settings = _settings(data, vae, tmp_path / "cache", latent_cache_dtype="float16", random_flip=False)
    run_cache_latents(settings)
    _, dataset, _ = _open(settings)
    stored = torch.stack([dataset.rows(i)[0] for i in range(len(dataset))])
    assert stored.dtype == torch.float32 and dataset.rows(0)[1] is None
    assert torch.equal(stored, stored.half().float())  # float16 values
    assert_computed_alike(stored, _posteriors(data, vae)[0].half().float(), **ALIKE, rounded_to=torch.float16)


def test_a_truncated_shard_or_a_killed_builder_is_detected_and_rebuilt(data, vae, tmp_path, monkeypatch, caplog):
    settings = _settings(data, vae, tmp_path / "cache")
    folder = run_cache_latents(settings)
    reference = (folder / "params-00000.npy").read_bytes()
    with open(folder / "params-00000.npy", "r+b") as shard:
        shard.truncate(len(reference) - 100)
    leftover = folder.parent / f".{folder.name}.partial-99999-0"  # what a killed builder leaves
    leftover.mkdir()
    calls = _count_encodes(monkeypatch)
    caplog.set_level("INFO")
    assert run_cache_latents(settings) == folder
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning == [f"The latent cache {folder} is unusable (params-00000.npy is {len(reference) - 100} bytes, "
                       f"expected {len(reference)}): rebuilding it."]
    assert calls and (folder / "params-00000.npy").read_bytes() == reference and not leftover.exists()

    (folder / "index.json").unlink()  # a writer killed before publishing its index: the cache does not exist
    assert LatentCache(folder.parent, _open_key(settings)).problem() == "absent"


def _open_key(settings) -> CacheKey:
    manifest = load_manifest(settings.manifest_path, condition_spec="none")
    return latent_encoding.cache_key(settings, manifest, Path(settings.vae_uri))


def test_flips_crops_size_dtype_weights_and_images_change_the_key(data, vae, tmp_path):
    settings = _settings(data, vae, tmp_path / "cache")
    key = _open_key(settings)
    others = [dataclasses.replace(key, crop="random"), dataclasses.replace(key, preserve_input_precision=True),
              _open_key(_settings(data, vae, tmp_path / "cache", resolution=64)),
              _open_key(_settings(data, vae, tmp_path / "cache", random_flip=False)),
              _open_key(_settings(data, vae, tmp_path / "cache", latent_cache_dtype="float16"))]
    assert len({key.digest, *(other.digest for other in others)}) == 1 + len(others)

    image = data.parent / load_manifest(data).records[0].output_rel
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # an image re-rendered in place
    assert _open_key(settings).dataset_digest != key.dataset_digest
    weights = AutoencoderKL.from_pretrained(vae)
    with torch.no_grad():
        weights.encoder.conv_in.bias.add_(1.0)
    weights.save_pretrained(tmp_path / "retrained")
    assert _open_key(dataclasses.replace(settings, vae_uri=str(tmp_path / "retrained"))).vae_digest != key.vae_digest


def _cache_latents_command(data: Path, vae: Path, cache: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ldmflow", "cache-latents", "--manifest_path", str(data),
                             "--vae_uri", str(vae), "--resolution", "32", "--random_flip", "--eval_batch_size",
                             str(BATCH), "--latent_cache_dir", str(cache)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.processes
def test_two_runs_building_one_key_at_once_leave_one_valid_cache(data, vae, tmp_path):
    runs = [_cache_latents_command(data, vae, tmp_path / "cache") for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    stderr = "".join(err for _, err in outputs)
    assert stderr.count("Encoding 12 images") == 1 and stderr.count("nothing to encode") == 1  # one waited
    assert outputs[0][0] == outputs[1][0]  # the same folder
    _, dataset, _ = _open(_settings(data, vae, tmp_path / "cache"))
    params, _ = _posteriors(data, vae)
    assert_computed_alike(torch.stack([dataset.rows(i)[0] for i in range(12)]), params, **ALIKE)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")) == [
        dataset.folder.name]  # no staging folder left


@pytest.mark.processes
def test_two_processes_build_one_cache_equal_to_one_process(data, vae, tmp_path):
    result = launch_two_processes(tmp_path, "-m", "ldmflow", "cache-latents", "--manifest_path", str(data),
                                  "--vae_uri", str(vae), "--resolution", "32", "--random_flip", "--eval_batch_size",
                                  str(BATCH), "--latent_cache_dir", str(tmp_path / "cache"))
    assert "on 2 process(es)" in result.stderr and len(result.stdout.split()) == 1  # the main process prints
    cache, dataset, _ = _open(_settings(data, vae, tmp_path / "cache"))
    assert dataset.index.num_shards == 2 and result.stdout.strip() == str(cache.folder)
    params, flipped = _posteriors(data, vae)
    assert_computed_alike(torch.stack([dataset.rows(i)[0] for i in range(12)]), params, **ALIKE)
    assert_computed_alike(torch.stack([dataset.rows(i)[1] for i in range(12)]), flipped, **ALIKE)
    np.testing.assert_array_equal(dataset.sources, np.arange(12))


def test_the_tolerance_still_tells_another_encoding_apart(data, vae):
    params, flipped = _posteriors(data, vae)
    assert_computed_alike(params, params.clone(), **ALIKE)
    with pytest.raises(AssertionError):
        assert_computed_alike(flipped, params, **ALIKE)  # the mirrored images' posteriors
    with pytest.raises(AssertionError):
        assert_computed_alike(params * (1 + 1e-4), params, **ALIKE)  # a thousand times the rounding bound


def test_images_with_non_finite_pixels_encoded_into_the_cache_are_counted_in_one_warning(data, vae, tmp_path, caplog):
    import tifffile

    copy = tmp_path / "data"
    shutil.copytree(data.parent, copy)
    manifest = load_manifest(copy / "manifest.json", condition_spec="none")
    partly_nan = np.full((32, 32, 3), 0.5, np.float32)
    partly_nan[:4] = np.nan
    tifffile.imwrite(manifest.records[2].image_path, partly_nan)  # a float TIFF under the PNG's name
    caplog.set_level("WARNING")
    run_cache_latents(_settings(copy / "manifest.json", vae, tmp_path / "cache"))
    [warning] = [r.getMessage() for r in caplog.records if "NaN or infinite" in r.getMessage()]
    assert warning.startswith("1 image(s) encoded into the latent cache had NaN or infinite pixels")
    assert str(manifest.records[2].image_path) in warning
    [index_file] = (tmp_path / "cache").rglob(INDEX_FILE)
    assert CacheIndex.read(index_file.parent).non_finite == (str(manifest.records[2].image_path),)


@pytest.mark.train
def test_a_training_from_the_cache_counts_the_non_finite_images_it_was_encoded_from(data, vae, tmp_path, monkeypatch):
    import tifffile
    from mlflow import MlflowClient

    from cli_runner import invoke
    from tiny import TINY_COMMANDS

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    copy = tmp_path / "data"
    shutil.copytree(data.parent, copy)
    manifest = load_manifest(copy / "manifest.json", condition_spec="none")
    partly_inf = np.full((32, 32, 3), 0.5, np.float32)
    partly_inf[:, :3] = np.inf
    tifffile.imwrite(manifest.records[1].image_path, partly_inf)
    run_cache_latents(_settings(copy / "manifest.json", vae, tmp_path / "cache"))
    invoke("latent-ddpm", "--manifest_path", copy / "manifest.json", "--vae_uri", vae, "--output_dir", "ddpm",
           "--condition_spec", "none", "--cache_latents", "--latent_cache_dir", tmp_path / "cache",
           "--random_flip", "--eval_batch_size", BATCH, *TINY_COMMANDS["latent-ddpm"])
    [run] = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("ldmflow").experiment_id])
    assert run.data.metrics["non_finite_images"] == 1
