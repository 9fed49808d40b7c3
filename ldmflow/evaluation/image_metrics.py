"""Image quality metrics for the VAE's validation: PSNR and SSIM (Gaussian window, per image)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of images (B, C, H, W) in [0, 1]."""
    mse = ((reference - test) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return 10.0 * torch.log10(1.0 / mse)


def _gaussian_window(size: int, sigma: float, channels: int, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    kernel_1d = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel_1d /= kernel_1d.sum()
    kernel = kernel_1d[:, None] * kernel_1d[None, :]  # (size, size)
    return kernel.expand(channels, 1, size, size).contiguous()


def ssim(reference: torch.Tensor, test: torch.Tensor, window_size: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """(B,) mean SSIM (Wang et al. 2004) of images (B, C, H, W) in [0, 1]; 7 px window suits small images."""
    channels = reference.shape[1]
    window = _gaussian_window(min(window_size, reference.shape[-1]), sigma, channels, reference.device)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(reference), blur(test)
    var_x = blur(reference * reference) - mu_x**2
    var_y = blur(test * test) - mu_y**2
    cov = blur(reference * test) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))
