"""The latent and legacy samplers share one `generate` signature; tiny untrained models, a few steps."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from diffusers import DDPMScheduler, UNet2DModel

from ldmflow.errors import LdmflowError
from ldmflow.progress import Progress
from ldmflow.sampling.latent import LatentSampler
from ldmflow.sampling.legacy import LegacySampler
from ldmflow.sampling.sampler import Sampler

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
