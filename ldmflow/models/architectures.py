"""Build the three diffusers models from the user's size flags, so saved folders load with stock diffusers."""

from __future__ import annotations

import math

from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel


def vae_downsample_factor(vae_config) -> int:
    """How much an AutoencoderKL shrinks each side: x2 per level below the top (4 levels: x8)."""
    return 2 ** (len(vae_config.block_out_channels) - 1)


def norm_groups(block_out_channels: tuple[int, ...]) -> int:
    """GroupNorm groups dividing every block width, with at least 4 channels per group.

    32 for the usual sizes (128+ channels, as Stable Diffusion); fewer for small models, where one channel
    per group would be an instance norm that erases each channel's mean, i.e. the colour of flat images.
    """
    groups = 0
    for channels in block_out_channels:
        groups = math.gcd(groups, channels)
    groups = math.gcd(groups, 32)
    while groups > 1 and min(block_out_channels) // groups < 4:
        groups //= 2
    return groups


def build_vae(block_out_channels: tuple[int, ...], layers_per_block: int, resolution: int,
              latent_channels: int) -> AutoencoderKL:
    """AutoencoderKL with one level per block width: 3 widths downsample x4, 4 widths x8, 5 widths x16."""
    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_groups(block_out_channels),
        sample_size=resolution,
        scaling_factor=1.0,  # measured after training (ldmflow.training.vae_task)
    )


def _block_types(levels: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Plain ResNet blocks, with self-attention at the lowest resolution level below the top (as diffusers' DDPM)."""
    down = ["DownBlock2D"] * levels
    if levels >= 3:
        down[-2] = "AttnDownBlock2D"
    up = ["AttnUpBlock2D" if block == "AttnDownBlock2D" else "UpBlock2D" for block in reversed(down)]
    return tuple(down), tuple(up)


def build_latent_unet(block_out_channels: tuple[int, ...], layers_per_block: int, latent_size: int,
                      latent_channels: int, condition_dim: int | None,
                      attention_head_dim: int = 8, time_embedding_dim: int | None = None) -> UNet2DConditionModel:
    """UNet2DConditionModel without cross-attention; conditions enter through the projection class embedding.

    condition_dim None (spec `none`) builds an unconditional model: no class embedding at all.
    """
    down, up = _block_types(len(block_out_channels))
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2D",
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        norm_num_groups=norm_groups(block_out_channels),
        attention_head_dim=attention_head_dim,
        class_embed_type="projection" if condition_dim else None,
        projection_class_embeddings_input_dim=condition_dim or None,
        time_embedding_dim=time_embedding_dim,
    )


def build_pixel_unet(block_out_channels: tuple[int, ...], layers_per_block: int, resolution: int,
                     attention_head_dim: int = 8) -> UNet2DModel:
    """The legacy pixel-space UNet2DModel of the original scripts (unconditional)."""
    down, up = _block_types(len(block_out_channels))
    return UNet2DModel(
        sample_size=resolution,
        in_channels=3,
        out_channels=3,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        norm_num_groups=norm_groups(block_out_channels),
        attention_head_dim=attention_head_dim,
    )
