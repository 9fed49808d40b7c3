"""The latent and legacy samplers share one `generate` signature; tiny untrained models, a few steps."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from hypothesis import given, settings, strategies as st

from ldmflow.errors import LdmflowError
from ldmflow.progress import Progress
from ldmflow.sampling.latent import LatentSampler
from ldmflow.sampling.legacy import LegacySampler
from ldmflow.sampling.sampler import Sampler, check_generated

pytestmark = pytest.mark.portable  # compares computed tensors (make test-portable)


def tiny_legacy() -> LegacySampler:
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), block_out_channels=(8, 8), layers_per_block=1,
                       norm_num_groups=4).eval()
    return LegacySampler(unet, DDPMScheduler(num_train_timesteps=10).config)


def test_both_samplers_have_the_protocols_generate_signature():
    expected = inspect.signature(Sampler.generate)
    assert inspect.signature(LatentSampler.generate) == expected
    assert inspect.signature(LegacySampler.generate) == expected


def test_a_legacy_sampler_refuses_conditions_in_one_line_and_takes_blank_ones():
    sampler = tiny_legacy()
    assert sampler.condition_spec is None
    with pytest.raises(LdmflowError, match=r"^This model is unconditional \(a legacy pixel DDPM\); got conditions "
                                           r"\['temperature'\]\.$"):
        sampler.generate([{"temperature": 1.0}], num_inference_steps=2)
    assert sampler.generate([{}, {}], num_inference_steps=2).shape == (2, 8, 8, 3)


def test_the_progress_counts_batches_and_guidance_does_not_change_unconditional_images():
    sampler = tiny_legacy()
    progress = Progress("test", 2, enabled=True, unit="batch")
    images = sampler.generate(num_images=3, num_inference_steps=2, seeds=[1, 2, 3], batch_size=2, progress=progress)
    assert images.shape == (3, 8, 8, 3) and (progress.done, progress.images) == (2, 3)
    unguided = sampler.generate(num_images=3, guidance_scale=1.0, num_inference_steps=2, seeds=[1, 2, 3],
                                batch_size=2)
    np.testing.assert_array_equal(images, unguided)
    with pytest.raises(LdmflowError, match="Got 2 seeds for 3 images"):
        sampler.generate(num_images=3, seeds=[1, 2])


IMAGE_KINDS = st.sampled_from(["varied", "flat", "nan", "inf"])


def _image(kind: str, seed: int) -> np.ndarray:
    image = np.random.default_rng(seed).random((4, 4, 3)).astype(np.float32)
    if kind == "flat":
        image[:] = 0.25
    elif kind != "varied":
        image[seed % 4, 0, 0] = np.nan if kind == "nan" else np.inf
    return image


@settings(max_examples=40, deadline=None)
@given(kinds=st.lists(IMAGE_KINDS, min_size=1, max_size=6), guidance=st.sampled_from([1.0, 3.0, 90.0]))
def test_generated_images_without_information_are_refused_if_all_and_counted_if_some(kinds, guidance):
    images = np.stack([_image(kind, seed) for seed, kind in enumerate(kinds)])
    bad = sum(kind != "varied" for kind in kinds)
    if bad == len(kinds):
        with pytest.raises(LdmflowError, match=r"generated images are NaN or infinite .*carry no information"):
            check_generated(images, guidance)
        return
    checked = check_generated(images, guidance)
    assert checked.shape == images.shape and np.isfinite(checked).all()
    assert (checked == images).all() if bad == 0 else True


def test_sample_refuses_a_model_that_generates_nan(monkeypatch):
    from ldmflow.settings import SampleSettings
    from ldmflow.workflows.sample import generate

    sampler = tiny_legacy()
    monkeypatch.setattr(sampler.unet, "forward", lambda sample, *args, **kwargs: type("Out", (), {
        "sample": torch.full_like(sample, float("nan"))})())
    settings = SampleSettings(model_uri="unused", num_inference_steps=2, guidance_scale=1.0)
    with pytest.raises(LdmflowError, match="^2 of 2 generated images are NaN or infinite and 0 a single flat colour: "
                                           "they carry no information"):
        generate(settings, sampler, None, [0, 1])


@settings(max_examples=40, deadline=None)
@given(value=st.floats(-1e9, 1e9), mean=st.floats(-100, 100), std=st.floats(0.1, 10))
def test_a_condition_far_outside_the_training_data_is_said_with_the_trained_range(value, mean, std):
    from ldmflow.data.conditions import ConditionSpec, ConditionStats
    from ldmflow.models.conditioning import FAR_FROM_TRAINING_STDS, ConditionEncoder

    encoder = ConditionEncoder(ConditionSpec.parse("temperature:1"), ConditionStats((mean,), (std,)))
    text = encoder.far_from_training(np.array([value]))
    if abs(value - mean) / std > FAR_FROM_TRAINING_STDS * 1.0001:
        assert text.startswith(f"temperature = {value:.4g} is ") and "trained on about" in text
    elif abs(value - mean) / std < FAR_FROM_TRAINING_STDS * 0.9999:
        assert text is None


@settings(max_examples=25, deadline=None)
@given(values=st.lists(st.floats(-100, 100), min_size=2, max_size=8), far=st.floats(1e4, 1e9))
def test_the_range_a_model_was_trained_on_is_recorded_and_said(tmp_path_factory, values, far):
    from ldmflow.data.conditions import ConditionSpec, compute_condition_stats
    from ldmflow.data.manifest import ManifestRecord
    from ldmflow.models.conditioning import ConditionEncoder

    spec = ConditionSpec.parse("temperature:1")
    records = [ManifestRecord(i, "x.png", tmp_path_factory.getbasetemp(), np.array([v], np.float32),
                              np.array([True])) for i, v in enumerate(values)]
    stats = compute_condition_stats(np.array([[v] for v in values]), np.ones((len(values), 1), bool), spec)
    folder = tmp_path_factory.mktemp("encoder")
    ConditionEncoder.for_records(spec, stats, records).save(folder)
    encoder = ConditionEncoder.load(folder / "conditioning.json")
    low, high = float(np.float32(min(values))), float(np.float32(max(values)))
    assert encoder.trained_range == {"temperature": ([low], [high])}
    assert encoder.far_from_training(np.array([max(values)])) is None
    assert encoder.far_from_training(np.array([far]))[-len(f"trained on {low:.4g} to {high:.4g})"):] == \
        f"trained on {low:.4g} to {high:.4g})"
