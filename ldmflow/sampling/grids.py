"""Preview grids: diffusers' make_image_grid, with an optional caption under each tile."""

from __future__ import annotations

import math

import numpy as np
from diffusers.utils import make_image_grid
from PIL import Image, ImageDraw, ImageFont

MIN_TILE = 128


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(N, H, W, 3) floats in [0, 1] -> 8-bit PIL images."""
    return [Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)) for image in images]


def image_grid(images: list[Image.Image], labels: list[str] | None = None, columns: int | None = None) -> Image.Image:
    """A grid of tiles (upscaled to at least 128 px so captions fit), each captioned when labels are given.

    Captions are sized for MLflow's 256 px thumbnails of the whole grid (readable there), up to an eighth of
    a tile's height."""
    columns = columns or min(len(images), 4)
    rows = math.ceil(len(images) / columns)
    size = max(MIN_TILE, images[0].width)
    tiles = [image.resize((size, size), Image.NEAREST) if image.width < size else image for image in images]
    if labels:
        font_size = _fitting_font_size(labels, size, int(min(max(10, columns * size / 28), size / 8)))
        tiles = [_caption(tile, label, font_size) for tile, label in zip(tiles, labels)]
    tiles += [Image.new("RGB", tiles[0].size)] * (rows * columns - len(tiles))
    return make_image_grid(tiles, rows=rows, cols=columns)


def _fitting_font_size(labels: list[str], width: int, largest: int, smallest: int = 8) -> int:
    """The largest size up to `largest` at which every caption line fits the tile's width (none is cut off)."""
    lines = [line for label in labels for line in label.split("\n")]
    for size in range(largest, smallest, -1):
        font = ImageFont.load_default(size=size)
        if max(font.getlength(line) for line in lines) <= width - 6:
            return size
    return smallest


def _caption(tile: Image.Image, label: str, font_size: int = 10) -> Image.Image:
    font = ImageFont.load_default(size=font_size)
    lines = label.split("\n")
    strip = (font_size + 2) * len(lines) + 4
    captioned = Image.new("RGB", (tile.width, tile.height + strip), "white")
    captioned.paste(tile, (0, 0))
    ImageDraw.Draw(captioned).multiline_text((3, tile.height + 2), label, fill="black", font=font, spacing=2)
    return captioned


def condition_label(condition: dict) -> str:
    """A short caption such as 'temperature 12.5 | wind 1,0,0'."""
    parts = []
    for name, value in condition.items():
        values = np.asarray(value, dtype=float).reshape(-1)
        parts.append(f"{name} " + ",".join(f"{v:.3g}" for v in values))
    return "\n".join(parts)
