"""Every upper bound, at the bound and one past it; and settings built from arbitrary numbers either work or
say what is wrong in one line (fuzzed with Hypothesis, in-process: no command runs)."""

from __future__ import annotations

import re
import types
import typing

import pytest

from ldmflow.errors import LdmflowError
from ldmflow.settings import (MAX_DIFFUSION_STEPS, MAX_FID_SAMPLES, MAX_GENERATED_IMAGES, MAX_REPLICATES,
                              MAX_RESOLUTION, MAX_SAMPLING_BATCH, MAX_SEED, MAX_WORKERS, CacheLatentsSettings,
                              CompareSettings, DemoDataSettings, EvaluateSettings, LatentDdpmSettings,
                              LegacyDdpmSettings, PipelineSettings, ProbeSettings, SampleSettings, ServerSettings,
                              VaeSettings, setting_fields)

REQUIRED = {VaeSettings: {"manifest_path": "m.json", "output_dir": "out"},
            LatentDdpmSettings: {"manifest_path": "m.json", "output_dir": "out", "vae_uri": "models:/vae/1"},
            LegacyDdpmSettings: {"manifest_path": "m.json", "output_dir": "out"},
            ProbeSettings: {"manifest_path": "m.json", "output_dir": "out"},
            SampleSettings: {"model_uri": "models:/latent/1"},
            EvaluateSettings: {"model_uri": "models:/latent/1", "manifest_path": "m.json"},
            CompareSettings: {"manifest_path": "m.json"},
            PipelineSettings: {"manifest_path": "m.json"},
            ServerSettings: {},
            DemoDataSettings: {"output_dir": "out"},
            CacheLatentsSettings: {"manifest_path": "m.json", "vae_uri": "models:/vae/1"}}

LARGEST_BATCH_AT_4096 = (2**31 - 1) // (3 * 4096**2)  # 42: torch's 32-bit index math
BOUNDS = [  # (settings, the value at its bound, one past it, fragment of the error)
    (CacheLatentsSettings, {"resolution": 4096, "eval_batch_size": LARGEST_BATCH_AT_4096},
     {"resolution": 4096, "eval_batch_size": LARGEST_BATCH_AT_4096 + 1}, "32-bit integers"),
    (CacheLatentsSettings, {"dataloader_num_workers": MAX_WORKERS}, {"dataloader_num_workers": MAX_WORKERS + 1},
     "each worker is a process"),
    (VaeSettings, {"resolution": MAX_RESOLUTION}, {"resolution": MAX_RESOLUTION + 8}, "200 MB of float32"),
    (VaeSettings, {"resolution": 4096, "train_batch_size": LARGEST_BATCH_AT_4096},
     {"resolution": 4096, "train_batch_size": LARGEST_BATCH_AT_4096 + 1}, "32-bit integers"),
    (LegacyDdpmSettings, {"resolution": 4096, "eval_batch_size": LARGEST_BATCH_AT_4096},
     {"resolution": 4096, "eval_batch_size": LARGEST_BATCH_AT_4096 + 1}, "--eval_batch_size 43 at --resolution"),
    (VaeSettings, {"dataloader_num_workers": MAX_WORKERS}, {"dataloader_num_workers": MAX_WORKERS + 1},
     "own copy of the dataset"),
    (VaeSettings, {"seed": MAX_SEED}, {"seed": MAX_SEED + 1}, "[0, 2**32 - 1]"),
    (VaeSettings, {"seed": 0}, {"seed": -1}, "--seed must be at least 0"),
    (LatentDdpmSettings, {"ddpm_num_steps": MAX_DIFFUSION_STEPS}, {"ddpm_num_steps": MAX_DIFFUSION_STEPS + 1},
     "tabulated per step"),
    (SampleSettings, {"num_images": MAX_GENERATED_IMAGES}, {"num_images": MAX_GENERATED_IMAGES + 1},
     "split larger jobs"),
    (SampleSettings, {"batch_size": MAX_SAMPLING_BATCH}, {"batch_size": MAX_SAMPLING_BATCH + 1}, "denoised together"),
    (SampleSettings, {"num_inference_steps": MAX_DIFFUSION_STEPS},
     {"num_inference_steps": MAX_DIFFUSION_STEPS + 1}, "no noise schedule"),
    (SampleSettings, {"seed": MAX_SEED - 7, "num_images": 8}, {"seed": MAX_SEED - 6, "num_images": 8},
     "the last image's seed"),
    (EvaluateSettings, {"num_samples": MAX_FID_SAMPLES}, {"num_samples": MAX_FID_SAMPLES + 1}, "standard FID"),
    (EvaluateSettings, {"seed": MAX_SEED - 255}, {"seed": MAX_SEED - 254}, "[0, 2**32 - 1]"),
    (PipelineSettings, {"seed": MAX_SEED - 255}, {"seed": MAX_SEED - 254}, "Pipeline step"),
    (VaeSettings, {"replicates": MAX_REPLICATES}, {"replicates": MAX_REPLICATES + 1}, "a whole training"),
    (VaeSettings, {"seed": MAX_SEED - 2, "replicates": 3}, {"seed": MAX_SEED - 1, "replicates": 3}, "[0, 2**32 - 1]"),
    (PipelineSettings, {"replicates": MAX_REPLICATES}, {"replicates": MAX_REPLICATES + 1}, "a whole pipeline"),
]


@pytest.mark.parametrize("settings_class, at, past, fragment", BOUNDS,
                         ids=[f"{case[0].__name__}-{'-'.join(case[2])}" for case in BOUNDS])
def test_each_bound_at_and_one_past(settings_class, at, past, fragment):
    settings_class(**REQUIRED[settings_class], **at)
    with pytest.raises(LdmflowError) as caught:
        settings_class(**REQUIRED[settings_class], **past)
    message = str(caught.value)
    assert fragment in message and "\n" not in message
    assert any(str(value) in message for value in past.values())  # it names the value


@pytest.mark.parametrize("name", ["a/b", "a:b", "a@b", "a\nb", "", " ", "..", " padded"])
def test_a_registered_name_mlflow_or_a_models_uri_cannot_hold_is_refused_before_training(name):
    with pytest.raises(LdmflowError, match="--registered_model_name"):
        VaeSettings(**REQUIRED[VaeSettings], registered_model_name=name)


@pytest.mark.parametrize("name", ["it's", 'say "hi"', "with spaces", "température", "ldmflow-vae.v2"])
def test_quotes_spaces_and_unicode_are_fine(name):
    VaeSettings(**REQUIRED[VaeSettings], registered_model_name=name)


def _numeric_fields(settings_class):
    """(name, int or float) of every numeric setting (optional ones included)."""
    for item, kind, _ in setting_fields(settings_class):
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        if kind in (int, float):
            yield item.name, kind


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

from fuzzing import succeeds_or_one_line  # noqa: E402

FIELDS = [(cls, name, kind) for cls in REQUIRED for name, kind in _numeric_fields(cls)]
INTS = st.integers() | st.integers(-10**30, 10**30) | st.sampled_from([0, 1, -1, 2**31, 2**32, 2**63, 2**64])
FLOATS = st.floats() | st.sampled_from([0.0, -0.0, 1e-300, 1e300])


@given(st.sampled_from(FIELDS).flatmap(lambda field: st.tuples(st.just(field),
                                                              INTS if field[2] is int else FLOATS)))
def test_settings_from_arbitrary_numbers(case):
    (settings_class, name, _), value = case
    succeeds_or_one_line(settings_class, **REQUIRED[settings_class], **{name: value})


@pytest.mark.parametrize("at, past, fragment", [
    ({"resolution": MAX_RESOLUTION}, {"resolution": MAX_RESOLUTION + 1}, "drawn in memory"),
    ({"num_images": MAX_GENERATED_IMAGES}, {"num_images": MAX_GENERATED_IMAGES + 1}, "take hours"),
    ({"seed": MAX_SEED}, {"seed": MAX_SEED + 1}, "[0, 2**32 - 1]"),
    ({"seed": 0}, {"seed": -1}, "--seed must be at least 0"),  # numpy's default_rng raised ValueError
], ids=["resolution", "num_images", "seed", "negative seed"])
def test_demo_data_bounds(at, past, fragment):
    DemoDataSettings(output_dir="out", **at)
    with pytest.raises(LdmflowError, match=re.escape(fragment)):
        DemoDataSettings(output_dir="out", **past)


def test_sampled_images_must_fit_in_the_memory_available():
    """At the bound and one past it, with the memory available given (the default asks psutil)."""
    from ldmflow.workflows.sample import BYTES_PER_IMAGE_PIXEL, check_images_fit

    available = 10 * 64 * 64 * BYTES_PER_IMAGE_PIXEL
    check_images_fit(10, 64, available)
    with pytest.raises(LdmflowError, match=r"11 images of 64x64 px need about .* ask for at most 10 "):
        check_images_fit(11, 64, available)
    check_images_fit(8, 64)  # the machine's own memory holds a few small images


def test_the_image_size_of_a_sampler():
    from types import SimpleNamespace

    from ldmflow.sampling.latent import LatentSampler
    from ldmflow.sampling.legacy import LegacySampler

    unet = SimpleNamespace(config=SimpleNamespace(sample_size=16))
    assert LegacySampler(unet, {}).image_size == 16  # a pixel-space model
    vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=(8, 8, 8, 8)))
    assert LatentSampler(unet, vae, {}, None).image_size == 128  # latents x8
