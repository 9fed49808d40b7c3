"""The PatchGAN discriminator of pix2pix and latent diffusion's first stage, and its losses.

The VAE's reconstruction loss alone gives blurry images; a discriminator that judges overlapping patches
pushes the decoder towards sharp, plausible texture (CompVis latent-diffusion, `LPIPSWithDiscriminator`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """pix2pix's N-layer discriminator: (B, 3, H, W) in [-1, 1] -> (B, 1, h, w) real/fake logits per patch.

    Each of the `num_layers` strided convolutions halves the image and doubles the width (up to 8x `channels`);
    two stride-1 convolutions follow. Weights start from N(0, 0.02) and BatchNorm from N(1, 0.02), as there.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for level in range(1, num_layers + 1):
            stride = 2 if level < num_layers else 1
            wider = channels * min(2 ** level, 8)
            layers += [nn.Conv2d(width, wider, 4, stride, 1, bias=False), nn.BatchNorm2d(wider),
                       nn.LeakyReLU(0.2, True)]
            width = wider
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_initialise)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def _initialise(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def discriminator_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """What the discriminator minimises: hinge, max(0, 1 - real) + max(0, 1 + fake), or the logistic loss."""
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())
    return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())


def generator_loss(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """What the generator minimises to fool the discriminator (LDM's -mean(logits) with hinge)."""
    if kind == "hinge":
        return -fake_logits.mean()
    return F.softplus(-fake_logits).mean()


def adaptive_weight(reconstruction_loss: torch.Tensor, adversarial_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """LDM's balance: |grad of the reconstruction loss| / |grad of the adversarial loss| at the decoder's last
    layer, clamped to [0, max_weight] and detached, so neither term swamps the other whatever their scales."""
    reconstruction_grad, = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)
    adversarial_grad, = torch.autograd.grad(adversarial_loss, last_layer, retain_graph=True)
    weight = reconstruction_grad.norm() / (adversarial_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
