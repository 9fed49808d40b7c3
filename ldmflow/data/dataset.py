"""The torch dataset over manifest records: decode, resize, crop, flip, scale to [-1, 1].

Resizing runs on float tensors (torch interpolate, antialiased) so 16/32-bit inputs keep their precision. All
randomness comes from torch's global RNG, which accelerate seeds and checkpoints, so epochs are reproducible.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ldmflow.data.image_io import UnreadableImageError, decode_image
from ldmflow.data.manifest import ManifestRecord
from ldmflow.errors import LdmflowError
from ldmflow.settings import MAX_IMAGE_PIXELS

logger = logging.getLogger(__name__)


def resize_shorter_side(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize of (3, H, W) so that min(H, W) == size, keeping the aspect ratio."""
    height, width = image.shape[-2:]
    if min(height, width) == size:
        return image
    scale = size / min(height, width)
    new_size = (max(size, round(height * scale)), max(size, round(width * scale)))
    resized = F.interpolate(image[None], size=new_size, mode="bilinear", antialias=True, align_corners=False)
    return resized[0]  # (3, H', W')


def crop_square(image: torch.Tensor, size: int, random: bool) -> torch.Tensor:
    """A size x size crop of (3, H, W): centred, or at a position drawn from torch's global RNG."""
    height, width = image.shape[-2:]
    if random:
        top = int(torch.randint(0, height - size + 1, (1,)).item())
        left = int(torch.randint(0, width - size + 1, (1,)).item())
    else:
        top, left = (height - size) // 2, (width - size) // 2
    return image[:, top : top + size, left : left + size]  # (3, size, size)


class ManifestImageDataset(torch.utils.data.Dataset):
    """Images and condition vectors of manifest records, as training batches expect them.

    A file that fails to decode is warned about once (by path), remembered in ``unreadable_paths`` (per
    process: each DataLoader worker keeps its own set) and replaced by the next readable record in
    index order, so an epoch never crashes on one bad file. The returned ``index`` is the record actually used.
    """

    def __init__(
        self,
        records: Sequence[ManifestRecord],
        resolution: int,
        random_crop: bool = False,
        random_flip: bool = False,
        preserve_input_precision: bool = False,
        flip_signs: np.ndarray | None = None,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ):
        if not records:
            raise LdmflowError("The dataset has no records to train on.")
        if resolution < 1:
            raise LdmflowError(f"Resolution must be positive, got {resolution}.")
        self.records = list(records)
        self.resolution = resolution
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.flip_signs = flip_signs  # (value_dim,) factors a flip applies to the conditions (ConditionSpec)
        self.max_image_pixels = max_image_pixels
        self.preserve_input_precision = preserve_input_precision
        self.unreadable_paths: set[str] = set()
        self.non_finite_paths: set[str] = set()  # read with NaN or infinite pixels replaced (warned once each)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        count = len(self.records)
        for offset in range(count):
            candidate = (index + offset) % count
            image = self._load(candidate)
            if image is not None:
                record = self.records[candidate]
                pixels, flipped = self._transform(image)
                conditions = np.array(record.conditions, dtype=np.float32)  # (value_dim,)
                if flipped and self.flip_signs is not None:
                    conditions = conditions * self.flip_signs  # a mirrored wind points the mirrored way
                return {
                    "pixel_values": pixels,  # (3, R, R) in [-1, 1]
                    "substituted": int(candidate != index),  # the training loop counts and reports these
                    "unreadable": "" if candidate == index else str(self.records[index].image_path),
                    "non_finite": str(record.image_path) if str(record.image_path) in self.non_finite_paths else "",
                    "conditions": torch.from_numpy(conditions),
                    "present": torch.from_numpy(np.array(record.present, dtype=np.float32)),  # (K,)
                    "index": candidate,
                }
        raise LdmflowError(
            f"None of the {count} images in the dataset could be read (e.g. {self.records[index % count].image_path})."
        )

    def _load(self, index: int) -> np.ndarray | None:
        """The decoded (H, W, 3) image, or None (warned once per path) when it cannot be decoded."""
        path = str(self.records[index].image_path)
        if path in self.unreadable_paths:
            return None
        try:
            image, non_finite = decode_image(path, preserve_precision=self.preserve_input_precision,
                                             max_pixels=self.max_image_pixels)
        except UnreadableImageError as exc:
            self.unreadable_paths.add(path)  # the training loop warns once, with the count, and names the files
            logger.debug("Skipping unreadable image %s (%s); using the next readable one instead.", path, exc.reason)
            return None
        if non_finite and path not in self.non_finite_paths:
            self.non_finite_paths.add(path)
            logger.debug("Image %s has %d NaN or infinite pixel(s) of %d, read as 0 (1 for +inf).", path,
                         non_finite, image.shape[0] * image.shape[1])  # the training loop reports them
        return image

    def _transform(self, image: np.ndarray) -> tuple[torch.Tensor, bool]:
        """(3, R, R) pixels in [-1, 1], and whether they were mirrored."""
        pixels = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))  # (3, H, W) in [0, 1]
        pixels = resize_shorter_side(pixels, self.resolution)
        pixels = crop_square(pixels, self.resolution, random=self.random_crop)
        flipped = self.random_flip and torch.rand(1).item() < 0.5
        if flipped:
            pixels = pixels.flip(-1)
        return (pixels.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous(), flipped


def image_dataset(manifest, settings, training: bool) -> ManifestImageDataset:
    """A manifest's images with a trainer's transform flags; random augmentation only when training. Flips
    need a flip rule for every vector condition (ConditionSpec.flip_signs says which way they turn)."""
    flip = training and settings.random_flip
    return ManifestImageDataset(
        manifest.records, settings.resolution, random_crop=training and settings.random_crop, random_flip=flip,
        preserve_input_precision=settings.preserve_input_precision,
        flip_signs=manifest.spec.flip_signs() if flip else None,
        max_image_pixels=getattr(settings, "max_image_pixels", MAX_IMAGE_PIXELS))


def pixel_batches(dataset: ManifestImageDataset, indices: list[int], batch_size: int):
    """(B, 3, H, W) batches of the given items in order (validation, previews, latent encoding)."""
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start:start + batch_size]]
        yield torch.stack([item["pixel_values"] for item in items])
