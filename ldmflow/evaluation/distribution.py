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


class _Precomputed(torch.nn.Module):
    """Features already extracted, passed through: torchmetrics then scores resamples without re-extracting."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


FID_ROUNDS = 50  # bootstrap resamples of FID/KID (each one a matrix square root)


def min_fid_images(feature_dim: int) -> int:
    """Real images below which FID is not comparable: its covariance of `feature_dim` features has rank at most
    N - 1, so with fewer images than feature_dim + 1 it is singular and FID mostly measures the count."""
    return feature_dim + 1


@torch.no_grad()
def fid_kid_of_features(real: np.ndarray, generated: np.ndarray, seed: int = 0, subsets: int = 100) -> dict[str, float]:
    """`fid`, `kid` and `kid_std` of (N, C) generated against (M, C) real features; KID's random subsets are
    drawn from `seed`, so the same features always score the same."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    features = _Precomputed(real.shape[1])
    fid = FrechetInceptionDistance(feature=features, reset_real_features=True)
    subset = min(len(real), len(generated), 1000)
    with warnings.catch_warnings():  # "will save all extracted features": at most a few thousand vectors here
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=features, subset_size=max(2, subset), subsets=subsets)
    for rows, is_real in ((real, True), (generated, False)):
        tensor = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float64))
        fid.update(tensor, real=is_real)
        kid.update(tensor, real=is_real)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


def fid_kid(features: torch.nn.Module, real: np.ndarray, generated: np.ndarray, batch_size: int = 64,
            seed: int = 0, rounds: int = FID_ROUNDS) -> dict[str, float]:
    """`fid`, `kid`, `kid_std`, their bootstrap `fid_ci95` and `kid_ci95`, and `fid_num_real` /
    `fid_min_real` (below which FID is not comparable) of generated against real images (N, H, W, 3) in [0, 1]."""
    from ldmflow.evaluation.intervals import bootstrap_ci95

    real_features, generated_features = (extract(features, images, batch_size) for images in (real, generated))
    scores = fid_kid_of_features(real_features, generated_features, seed)
    if rounds:
        scores.update(bootstrap_ci95(
            lambda fake, true: {key: value for key, value in fid_kid_of_features(
                real_features[true], generated_features[fake], seed, subsets=10).items() if key != "kid_std"},
            (len(generated_features), len(real_features)), rounds=rounds, seed=seed))
    return scores | {"fid_num_real": float(len(real)), "fid_min_real": float(min_fid_images(real_features.shape[1]))}
