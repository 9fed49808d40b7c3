"""A synthetic, condition-controlled dataset, and an estimate of the conditions read back from an image.

Each image is a background whose colour encodes temperature (blue when cold, red when hot) overlaid with a grey
pattern that runs along the wind direction, with a contrast proportional to the wind speed. Two styles:

- ``stripes``: two soft sinusoidal stripes per image, smooth enough for a tiny VAE at 32 px.
- ``textured``: fine streaks (periods of 4 to 8 px) along the wind plus multi-octave value-noise clouds, detail
  that a blurry VAE visibly loses. The clouds live on the colour axis (1, -2, 1), which changes neither the
  luminance nor red - blue, so ``estimate_conditions`` reads the same conditions as for stripes.

A second family, ``plumes``, carries the conditions in small features at random positions instead: on a smooth
value-noise background of random brightness and tint, PLUME_SOURCES small sources whose colour encodes the
temperature, each trailing a thin green plume downwind whose length encodes the wind speed. Sources and plumes
lie on the colour axis (1, -2, 1), at +0.8 and -0.8 times their opacity; the background has none of it.

``estimate_conditions`` reads every style back (plumes when told the style), which lets tests measure whether a
trained model obeys its conditions. Numpy and Pillow only.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from ldmflow.data.image_io import extension_for, write_image
from ldmflow.errors import LdmflowError
from ldmflow.files import publish_files, temporary_folder
from ldmflow.settings import DEMO_STYLES, DemoDataSettings

logger = logging.getLogger(__name__)

STYLES = DEMO_STYLES
TEMPERATURE_RANGE = (-20.0, 40.0)  # degrees C, sampled uniformly
WIND_MAG_RANGE = (0.0, 10.0)  # m/s, sampled uniformly; the direction is uniform over the circle
STRIPES_PER_IMAGE = 2  # stripe period = resolution / 2: 4 latent cells of an x8 VAE, and resolution-free
AMPLITUDE_PER_MS = 0.02  # stripe amplitude per m/s of wind (0.2 at 10 m/s)
NOISE_STD = 0.01  # per-channel pixel noise, so images are not perfectly clean
STREAK_PERIODS = (4.0, 8.0)  # px; textured style: finer than a latent cell of an x8 VAE, coarser than aliasing
STREAK_TONES = 6  # sinusoids of random period and phase summed into one streak profile
CLOUD_STD = 0.04  # textured style: standard deviation of the clouds on the red and blue channels (green: twice)
CLOUD_AXIS = np.array([1.0, -2.0, 1.0])  # orthogonal to grey (luminance) and to red - blue (temperature)
DERIVATIVE_SIGMA = 1.0  # px; Gaussian derivatives keep the orientation of fine streaks, central differences skew it
PLUME_SOURCES = 3  # plumes style: sources per image, each with its plume
SOURCE_SIGMA = 0.03  # of the resolution: a source's Gaussian radius (1.9 px at 64 px), opaque to about 1.2 of it
PLUME_SIGMA = 0.02  # of the resolution: a plume's Gaussian half-width (1.3 px at 64 px)
PLUME_GAP = 0.12  # of the resolution: a plume starts this far downwind of its source's centre, clear of the source
PLUME_LENGTH_PER_MS = 0.025  # of the resolution per m/s: a plume is a quarter of the image long at 10 m/s
PLUME_OPACITY = 0.9
SMOKE = np.array([0.5, 0.9, 0.5])  # the plumes' colour: -0.8 on the (1, -2, 1) axis; a source's is +0.8
PLUME_THRESHOLD = 0.1  # plume reader: (1, -2, 1) levels within this of 0 are background (4 sd of the pixel noise)
_DESCRIPTIONS = {  # the manifest's description, per style
    "stripes": "Synthetic images: background colour = temperature, stripe direction/contrast = wind.",
    "textured": "Synthetic images: background colour = temperature, fine streak direction/contrast = wind, "
                "colour clouds = noise.",
    "plumes": "Synthetic images: colour of small sources at random positions = temperature, direction/length of "
              "their plumes = wind, value-noise background = noise.",
}
_MISSING_TEMPERATURE_EVERY = (12, 7)  # entries with index % 12 == 7 omit temperature
_MISSING_WIND_MAG_EVERY = (4, 2)  # entries with index % 4 == 2 omit wind_mag (the loader computes it)


def _unit_temperature(temperature: float) -> float:
    """u in [0, 1] across TEMPERATURE_RANGE (clipped)."""
    low, high = TEMPERATURE_RANGE
    return min(max((temperature - low) / (high - low), 0.0), 1.0)


def _background(temperature: float) -> np.ndarray:
    """RGB colour for a temperature: red - blue = u - 0.5 where u in [0, 1] spans TEMPERATURE_RANGE."""
    u = _unit_temperature(temperature)
    return np.array([0.25 + 0.5 * u, 0.45, 0.75 - 0.5 * u])


def _across_wind(angle: float, resolution: int) -> np.ndarray:
    """(H, W) pixel-centre coordinate along the normal of the wind: patterns of it alone run along the wind."""
    centres = np.arange(resolution) + 0.5
    x = centres[None, :]  # (1, W)
    y = -centres[:, None]  # (H, 1), y grows upwards
    return x * -math.sin(angle) + y * math.cos(angle)


def _stripes(across: np.ndarray, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """A sine of amplitude 1 (variance 1/2) with STRIPES_PER_IMAGE periods across the image, random phase."""
    period = resolution / STRIPES_PER_IMAGE
    phase = rng.uniform(0.0, 2.0 * math.pi)
    return np.sin(2.0 * math.pi * across / period + phase)


def _streaks(across: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fine streaks: random-phase sinusoids with periods in STREAK_PERIODS, rescaled to mean 0, variance 1/2.

    The variance of a unit sine, so ``estimate_conditions`` reads the wind speed from the contrast as for stripes; every
    period stays above 2 px, so no aliased component runs across the wind.
    """
    frequencies = rng.uniform(1.0 / STREAK_PERIODS[1], 1.0 / STREAK_PERIODS[0], size=(STREAK_TONES, 1, 1))
    phases = rng.uniform(0.0, 2.0 * math.pi, size=(STREAK_TONES, 1, 1))
    profile = np.sin(2.0 * math.pi * frequencies * across[None] + phases).sum(axis=0)  # (H, W)
    profile = profile - profile.mean()
    return profile * math.sqrt(0.5) / max(float(profile.std()), 1e-12)


def _value_noise(resolution: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W) Gaussian values on a (cells + 1)^2 lattice, smoothstep-interpolated between lattice points."""
    lattice = rng.standard_normal((cells + 1, cells + 1))
    position = (np.arange(resolution) + 0.5) * cells / resolution
    index = np.minimum(position.astype(int), cells - 1)
    t = position - index
    weight = t * t * (3.0 - 2.0 * t)
    rows = lattice[index] * (1.0 - weight)[:, None] + lattice[index + 1] * weight[:, None]  # (H, cells + 1)
    return rows[:, index] * (1.0 - weight)[None, :] + rows[:, index + 1] * weight[None, :]


def _clouds(resolution: int, rng: np.random.Generator, persistence: float = 0.7) -> np.ndarray:
    """(H, W) fractal noise, mean 0 and std 1: octaves from 2 cells per side down to 2 px cells."""
    clouds, cells, weight = np.zeros((resolution, resolution)), 2, 1.0
    while cells <= max(resolution // 2, 2):
        clouds += weight * _value_noise(resolution, cells, rng)
        cells, weight = cells * 2, weight * persistence
    clouds -= clouds.mean()
    return clouds / max(float(clouds.std()), 1e-12)


def _plume_background(resolution: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) smooth value noise of random brightness and red - blue tint: 0 on the (1, -2, 1) axis."""
    def smooth() -> np.ndarray:
        return _value_noise(resolution, 4, rng) + 0.5 * _value_noise(resolution, 8, rng)

    luminance = rng.uniform(0.3, 0.55) + 0.06 * smooth()  # (H, W)
    tint = rng.uniform(-0.08, 0.08) + 0.04 * smooth()
    return np.stack([luminance + tint, luminance, luminance - tint], axis=-1)


def _source_positions(resolution: int, reach: np.ndarray, margin: float, direction: np.ndarray,
                      rng: np.random.Generator, tries: int = 50) -> list[tuple[float, float]]:
    """PLUME_SOURCES (x, y) where source and plume (`reach` from it) lie `margin` inside the image; a position
    within 2 * margin across the wind of an earlier one (their plumes would overlap) is drawn again, up to
    `tries` times."""
    positions: list[tuple[float, float]] = []
    while len(positions) < PLUME_SOURCES:
        for _ in range(tries):
            x0, y0 = (rng.uniform(margin + max(0.0, -r), resolution - margin - max(0.0, r)) for r in reach)
            if all(abs((x0 - x) * direction[1] - (y0 - y) * direction[0]) >= 2.0 * margin for x, y in positions):
                break
        positions.append((x0, y0))
    return positions


def _plumes(temperature: float, angle: float, magnitude: float, resolution: int,
            rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3): PLUME_SOURCES sources of the temperature's colour at random positions, each trailing a plume
    downwind of length PLUME_LENGTH_PER_MS * speed, on `_plume_background`. Every plume stays inside the image."""
    image = _plume_background(resolution, rng)
    centres = np.arange(resolution) + 0.5
    x, y = centres[None, :], resolution - centres[:, None]  # (1, W), (H, 1); y grows upwards
    direction = np.array([math.cos(angle), math.sin(angle)])
    gap, length = PLUME_GAP * resolution, PLUME_LENGTH_PER_MS * magnitude * resolution
    reach, margin = (gap + length) * direction, 3.0 * SOURCE_SIGMA * resolution
    clear_smoke, clear_source = np.ones((resolution, resolution)), np.ones((resolution, resolution))
    for x0, y0 in _source_positions(resolution, reach, margin, direction, rng):
        start_x, start_y = x0 + gap * direction[0], y0 + gap * direction[1]
        along = np.clip((x - start_x) * direction[0] + (y - start_y) * direction[1], 0.0, length)  # (H, W)
        distance2 = (x - start_x - along * direction[0]) ** 2 + (y - start_y - along * direction[1]) ** 2
        clear_smoke *= 1.0 - PLUME_OPACITY * np.exp(-0.5 * distance2 / (PLUME_SIGMA * resolution) ** 2)
        source = 1.5 * np.exp(-0.5 * ((x - x0) ** 2 + (y - y0) ** 2) / (SOURCE_SIGMA * resolution) ** 2)
        clear_source *= 1.0 - np.minimum(source, 1.0)
    u = _unit_temperature(temperature)
    colour = np.array([0.1 + 0.8 * u, 0.1, 0.9 - 0.8 * u])  # +0.8 on the (1, -2, 1) axis, red - blue = 1.6 u - 0.8
    image = image * clear_smoke[..., None] + SMOKE * (1.0 - clear_smoke[..., None])  # sources over plumes
    return image * clear_source[..., None] + colour * (1.0 - clear_source[..., None])


def render_demo_image(
    temperature: float, wind_xy: tuple[float, float], resolution: int, rng: np.random.Generator,
    style: str = DemoDataSettings.style,
) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]: colour from temperature, a grey pattern along the wind, contrast from its speed.

    Angles follow maths convention: x to the right, y up, counter-clockwise. The pattern's randomness and the
    pixel noise come from ``rng``; ``style`` is "stripes", "textured" or "plumes" (see the module docstring).
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    wind_x, wind_y = float(wind_xy[0]), float(wind_xy[1])
    magnitude = min(math.hypot(wind_x, wind_y), WIND_MAG_RANGE[1])
    if style == "plumes":
        image = _plumes(temperature, math.atan2(wind_y, wind_x), magnitude, resolution, rng)
    else:
        across = _across_wind(math.atan2(wind_y, wind_x), resolution)
        pattern = _stripes(across, resolution, rng) if style == "stripes" else _streaks(across, rng)
        image = _background(temperature)[None, None, :] + AMPLITUDE_PER_MS * magnitude * pattern[..., None]
    if style == "textured":
        image = image + CLOUD_STD * _clouds(resolution, rng)[..., None] * CLOUD_AXIS
    image = image + rng.normal(0.0, NOISE_STD, size=image.shape)  # (H, W, 3)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _as_unit_array(image) -> np.ndarray:
    """(H, W, 3) float64 in [0, 1] from a PIL image or an array (uint8, uint16 or float)."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB") if image.mode not in ("RGB", "I;16", "F") else image
    array = np.asarray(image)
    if array.dtype == np.uint8:
        array = array / 255.0
    elif array.dtype == np.uint16:
        array = array / 65535.0
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 3 or array.shape[-1] < 3:
        raise ValueError(f"estimate_conditions expects an (H, W, 3) image, got shape {array.shape}")
    return array[..., :3]


def estimate_conditions(image, style: str | None = None) -> dict[str, float]:
    """Estimate ``temperature``, ``wind_angle`` and ``wind_mag`` from a demo image.

    ``style`` "plumes" reads that family (``estimate_plume_conditions``); any other style, or None, is read as
    stripes or textured, without being told which. temperature: from the mean red - blue difference.
    wind_angle: pattern orientation in radians in [0, pi) from the luminance structure tensor; the patterns are
    symmetric, so the wind direction is only recovered modulo 180 degrees, and it is meaningless when the wind is
    near 0. wind_mag: from the luminance standard deviation less the demo noise, i.e. pattern contrast; any
    other grey texture in the image reads as wind (the textured style's clouds are colour only).
    """
    if style == "plumes":
        return estimate_plume_conditions(image)
    array = _as_unit_array(image)  # (H, W, 3)
    low, high = TEMPERATURE_RANGE
    red_minus_blue = float(array[..., 0].mean() - array[..., 2].mean())
    temperature = low + (high - low) * (red_minus_blue + 0.5)

    luminance = array.mean(axis=-1)  # (H, W)
    wind_angle = _pattern_orientation(luminance)
    signal_var = max(float(luminance.var()) - NOISE_STD**2 / 3.0, 0.0)
    wind_mag = math.sqrt(2.0 * signal_var) / AMPLITUDE_PER_MS  # a sine of amplitude A has variance A^2 / 2
    return {"temperature": temperature, "wind_angle": wind_angle, "wind_mag": wind_mag}


def estimate_plume_conditions(image) -> dict[str, float]:
    """``estimate_conditions`` for the plumes style, from the (1, -2, 1) colour axis, where the background is 0.

    temperature: the sources' colour, red - green over the axis level on their opaque cores (level > 0.6), which
    mixing with any grey leaves unchanged. wind_angle: the plumes' orientation in [0, pi) from the structure
    tensor of their opacity (the level below -PLUME_THRESHOLD); wind_mag: their total opacity, less what the
    ends and the threshold add, per plume and per unit of length (a Gaussian line's closed form).
    """
    array = _as_unit_array(image)  # (H, W, 3)
    level = array @ CLOUD_AXIS  # (H, W): sources +0.8, plumes -0.8 times their opacity, background 0
    core = level > 0.6
    red_minus_green = float((array[..., 0] - array[..., 1])[core].sum())
    u = red_minus_green / float(level[core].sum()) if core.any() else 0.5
    low, high = TEMPERATURE_RANGE
    smoke = np.maximum(-level - PLUME_THRESHOLD, 0.0)  # (H, W)
    resolution = float(np.sqrt(smoke.size))
    sigma, peak = PLUME_SIGMA * resolution, 0.8 * PLUME_OPACITY
    half_width = sigma * math.sqrt(2.0 * math.log(peak / PLUME_THRESHOLD))  # where a plume's profile meets it
    per_length = peak * sigma * math.sqrt(2.0 * math.pi) * math.erf(half_width / (sigma * math.sqrt(2.0))) \
        - 2.0 * PLUME_THRESHOLD * half_width  # the thresholded profile's area across a plume
    ends = 2.0 * math.pi * sigma**2 * (peak - PLUME_THRESHOLD) - math.pi * PLUME_THRESHOLD * half_width**2
    length = max(float(smoke.sum()) / PLUME_SOURCES - ends, 0.0) / per_length  # px
    return {"temperature": low + (high - low) * u, "wind_angle": _pattern_orientation(smoke),
            "wind_mag": length / (PLUME_LENGTH_PER_MS * resolution)}


def _gaussian_derivative(image: np.ndarray, axis: int) -> np.ndarray:
    """d image / d axis smoothed by a Gaussian of DERIVATIVE_SIGMA, on the pixels the kernels fit in ('valid').

    Unlike central differences, its response is proportional to the frequency vector (times an isotropic
    gain) up to the finest streaks, so a structure tensor built on it keeps their orientation.
    """
    radius = max(1, min(4, (min(image.shape) - 1) // 2))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    smooth = np.exp(-0.5 * (offsets / DERIVATIVE_SIGMA) ** 2)
    smooth /= smooth.sum()
    derivative = offsets * smooth / (offsets**2 * smooth).sum()  # slope 1 on a ramp
    window = np.lib.stride_tricks.sliding_window_view
    differentiated = window(image, len(offsets), axis=axis) @ derivative
    return window(differentiated, len(offsets), axis=1 - axis) @ smooth


def _pattern_orientation(luminance: np.ndarray) -> float:
    """Orientation in [0, pi) of the lines in ``luminance``: across the dominant gradient of the structure tensor."""
    grad_x = _gaussian_derivative(luminance, axis=1)
    grad_y = -_gaussian_derivative(luminance, axis=0)  # y up: rows grow downwards
    jxx, jyy, jxy = (grad_x**2).sum(), (grad_y**2).sum(), (grad_x * grad_y).sum()
    gradient_angle = 0.5 * math.atan2(2.0 * jxy, jxx - jyy)
    return (gradient_angle + math.pi / 2.0) % math.pi


def angle_error(a, b):
    """Smallest difference between orientations modulo pi (radians, in [0, pi/2]); arrays broadcast."""
    diff = np.mod(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), np.pi)
    result = np.minimum(diff, np.pi - diff)
    return float(result) if np.ndim(result) == 0 else result


def _demo_entry(index: int, split: str, rng: np.random.Generator) -> tuple[dict, float, tuple[float, float]]:
    """Metadata for one image and the (true) temperature and wind it is rendered from."""
    temperature = round(float(rng.uniform(*TEMPERATURE_RANGE)), 3)
    direction = float(rng.uniform(0.0, 2.0 * math.pi))
    speed = float(rng.uniform(*WIND_MAG_RANGE))
    wind_xy = (round(speed * math.cos(direction), 4), round(speed * math.sin(direction), 4))
    metadata: dict = {"split": split}
    if index % _MISSING_TEMPERATURE_EVERY[0] != _MISSING_TEMPERATURE_EVERY[1]:
        metadata["temperature"] = temperature
    metadata["wind"] = [wind_xy[0], wind_xy[1], 0.0]
    if index % _MISSING_WIND_MAG_EVERY[0] != _MISSING_WIND_MAG_EVERY[1]:
        metadata["wind_mag"] = round(math.hypot(*wind_xy), 4)
    return metadata, temperature, wind_xy


def make_demo_dataset(
    output_dir: str | Path,
    num_images: int = DemoDataSettings.num_images,
    resolution: int = DemoDataSettings.resolution,
    image_format: str = DemoDataSettings.image_format,
    style: str = DemoDataSettings.style,
    seed: int = DemoDataSettings.seed,
    val_fraction: float = DemoDataSettings.val_fraction,
    overwrite: bool = DemoDataSettings.overwrite,
) -> Path:
    """Write ``output_dir/images/NNNNN.<ext>`` and ``output_dir/manifest.json``; returns the manifest path.

    Deterministic from ``seed``; ``style`` picks the pattern (module docstring) and is recorded in the manifest.
    ``round(num_images * val_fraction)`` randomly chosen entries get split "val" (at least one entry stays
    "train"), the rest "train". Entries with index % 12 == 7 omit temperature (the image still shows the true
    one) and entries with index % 4 == 2 omit wind_mag. A folder that is not empty is refused unless
    ``overwrite``; the files are built aside and moved in at the end.
    """
    DemoDataSettings(output_dir=str(output_dir), num_images=num_images, resolution=resolution,  # the checks
                     image_format=image_format, style=style, seed=seed, val_fraction=val_fraction, overwrite=overwrite)
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, overwrite)
    final_dir, output_dir = output_dir, temporary_folder(output_dir, "demo-data")
    try:
        _write_dataset(output_dir, num_images, resolution, image_format, style, seed, val_fraction)
    except BaseException:
        shutil.rmtree(output_dir, ignore_errors=True)  # no half-written dataset left behind
        raise
    publish_files(output_dir, final_dir)
    return final_dir / "manifest.json"


def _write_dataset(output_dir: Path, num_images: int, resolution: int, image_format: str, style: str, seed: int,
                   val_fraction: float) -> None:
    rng = np.random.default_rng(seed)
    num_val = min(int(round(num_images * val_fraction)), num_images - 1)
    val_indices = set(rng.permutation(num_images)[:num_val].tolist())
    items = []
    for index in range(num_images):
        metadata, temperature, wind_xy = _demo_entry(index, "val" if index in val_indices else "train", rng)
        output_rel = f"images/{index:05d}{extension_for(image_format)}"
        image = render_demo_image(temperature, wind_xy, resolution, rng, style)
        write_image(output_dir / output_rel, image, image_format)
        items.append({"output_rel": output_rel, "metadata": metadata})
    manifest = {
        "name": "ldmflow-demo",
        "description": _DESCRIPTIONS[style],
        "seed": seed,
        "resolution": resolution,
        "image_format": image_format,
        "style": style,
        "items": items,
    }
    (output_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    logger.debug("Wrote %d demo images (%d val).", num_images, num_val)  # demo-data prints the manifest's path


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Never write over a user's data: a file, or a folder with anything in it, is refused (unless overwrite)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise LdmflowError(f"--output_dir {output_dir} is a file; give a folder for the demo dataset.")
    entries = sorted(p.name for p in output_dir.iterdir() if not p.name.startswith(".")) if output_dir.is_dir() \
        else []
    if entries and not overwrite:
        raise LdmflowError(f"--output_dir {output_dir} is not empty ({len(entries)} entries, e.g. {entries[0]}); "
                           "pass --overwrite to replace its manifest.json and images/.")
