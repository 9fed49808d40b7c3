"""FID and KID between real and generated images with torchmetrics, on a chosen feature extractor.

torchmetrics accepts any feature `nn.Module`, which keeps ldmflow's core free of torchvision: the standard
Inception-v3 features come from the optional extra `ldmflow[eval]` (torch-fidelity), whose weights download
on first use or load from a local file; the condition probe's features need nothing. The extractor used is
recorded with the scores, since FID depends on it and on the number of images.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

INCEPTION = "inception-v3"
INCEPTION_WEIGHTS_ENV = "LDMFLOW_INCEPTION_WEIGHTS"
ENABLE = (f"install ldmflow[eval] (torch-fidelity; torchvision matching your torch) and allow the first-use "
          f"download, or give --inception_weights PATH (or {INCEPTION_WEIGHTS_ENV}) with "
          "pt_inception-2015-12-05-6726825d.pth")


class Unavailable(Exception):
    """A pretrained network that cannot be had here; the message says why."""


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0][:160]


def inception_features(weights_path: str | None = None) -> torch.nn.Module:
    """torchmetrics' Inception-v3 FID feature extractor (2048-d), or Unavailable."""
    weights_path = weights_path or os.environ.get(INCEPTION_WEIGHTS_ENV) or None
    if weights_path and not os.path.isfile(weights_path):
        raise Unavailable(f"the Inception weights file {weights_path} does not exist")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                  feature_extractor_weights_path=weights_path)
    except (ModuleNotFoundError, ImportError):
        raise Unavailable("torch-fidelity is not installed") from None
    except (OSError, RuntimeError, ValueError) as error:  # download refused, offline, corrupt file
        raise Unavailable(f"the Inception weights could not be loaded: {_first_line(error)}") from None


def lpips_metric(weights_dir: str | None = None) -> torch.nn.Module:
    """ldmflow's LPIPS (AlexNet; (B, 3, H, W) pairs in [-1, 1] -> (B,)) from local weights only, or Unavailable:
    an optional metric never downloads."""
    from ldmflow.models.perceptual import WHERE_TO_PUT_THEM, PerceptualWeightsUnavailable, load_lpips

    try:
        return load_lpips(weights_dir, download=False)
    except PerceptualWeightsUnavailable as error:
        raise Unavailable(f"no LPIPS weights here ({error.problem}). {WHERE_TO_PUT_THEM}") from None


@torch.no_grad()
def lpips(real: np.ndarray, generated: np.ndarray, batch_size: int = 32, weights_dir: str | None = None) -> float:
    """Mean LPIPS (AlexNet) between image pairs (N, H, W, 3) in [0, 1], or Unavailable."""
    from ldmflow.models.perceptual import MIN_IMAGE_SIZE

    if min(real.shape[1:3]) < MIN_IMAGE_SIZE:
        raise Unavailable(f"AlexNet needs {MIN_IMAGE_SIZE} px or more")
    metric, total = lpips_metric(weights_dir), 0.0
    for start in range(0, len(real), batch_size):
        first, second = (torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
                         .float() * 2 - 1 for images in (generated, real))
        total += float(metric(first, second).sum())
    return total / max(len(real), 1)


def _uint8(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) floats in [0, 1] -> (N, 3, H, W) uint8, what Inception extractors expect."""
    return torch.from_numpy(np.clip(np.asarray(images) * 255.0 + 0.5, 0, 255).astype(np.uint8)).permute(0, 3, 1, 2)


@torch.no_grad()
def extract(features: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N, C) features of (N, H, W, 3) images in [0, 1]."""
    rows = [features(_uint8(images[start:start + batch_size])).reshape(min(batch_size, len(images) - start), -1)
            for start in range(0, len(images), batch_size)]
    return torch.cat(rows).double().numpy() if rows else np.zeros((0, 0))


@torch.no_grad()
def fid_kid(features: torch.nn.Module, real: np.ndarray, generated: np.ndarray,
            batch_size: int = 64) -> dict[str, float]:
    """`fid`, `kid` and `kid_std` of generated against real images (N, H, W, 3) in [0, 1]."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    fid = FrechetInceptionDistance(feature=features, reset_real_features=True)
    subset = min(len(real), len(generated), 1000)
    with warnings.catch_warnings():  # "will save all extracted features": at most a few thousand vectors here
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=features, subset_size=max(2, subset), subsets=100)
    for images, is_real in ((real, True), (generated, False)):
        for start in range(0, len(images), batch_size):
            batch = _uint8(images[start:start + batch_size])
            fid.update(batch, real=is_real)
            kid.update(batch, real=is_real)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}
