"""Decode and encode training images as (H, W, 3) float32 in [0, 1], keeping 16/32-bit precision on request.

PNG/JPEG and most formats go through Pillow, TIFF through tifffile (Pillow as fallback). Pillow turns 16-bit RGB
PNGs into 8-bit on load, so those are decoded twice with its own C decoder (high bytes, then low bytes).
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from ldmflow.errors import LdmflowError
from ldmflow.files import write_atomically
from ldmflow.settings import IMAGE_FORMATS, MAX_IMAGE_PIXELS

logger = logging.getLogger(__name__)

_EXTENSIONS = {"png": ".png", "png16": ".png", "tiff16": ".tiff", "tiff32": ".tiff"}
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_warned_16bit_fallback = False


class UnreadableImageError(LdmflowError):
    """An image file that exists but cannot be decoded; the message names the path and the reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"Cannot read image {path}: {reason}")
        self.path = str(path)
        self.reason = reason


def extension_for(image_format: str) -> str:
    """File extension (with the dot) that ``write_image`` uses for a format."""
    if image_format not in _EXTENSIONS:
        raise LdmflowError(f"Unknown image format {image_format!r}; choose one of {', '.join(IMAGE_FORMATS)}.")
    return _EXTENSIONS[image_format]


# --------------------------------------------------------------------------------------------- reading


def read_image(path: str | Path, preserve_precision: bool = False, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """`decode_image`'s pixels (its count of non-finite pixels dropped)."""
    return decode_image(path, preserve_precision, max_pixels)[0]


def decode_image(path: str | Path, preserve_precision: bool = False,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[np.ndarray, int]:
    """Decode an image to (H, W, 3) float32 in [0, 1], and how many of its pixels were NaN or infinite (float
    TIFFs: read as 0, or 1 for +inf). An image whose every pixel is non-finite is refused (UnreadableImageError).

    EXIF orientation is applied, so the pixels stand as the image is shown. Grayscale is replicated to three
    channels; alpha is composited on black (colour x alpha, as premultiplied renders store it). Without
    ``preserve_precision`` values are
    quantised to 8-bit steps (what the original ToTensor-on-8-bit pipeline saw); with it, 16-bit data keeps its
    65535 steps and float data its values. Everything is clipped to [0, 1] (HDR values above 1 are lost).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        if not data:
            raise UnreadableImageError(path, "empty file")
        too_large = _oversize(path, data[:4] in _TIFF_MAGIC, max_pixels)
        if too_large:
            raise UnreadableImageError(path, too_large)
        if data[:4] in _TIFF_MAGIC:
            array, orientation = _read_tiff(path), _tiff_orientation(path)
        else:
            is_png = data[:8] == _PNG_MAGIC
            problem = _png_chunk_problem(data) if is_png else None
            if problem:  # Pillow does not check IDAT checksums, so damaged pixels would pass silently
                raise UnreadableImageError(path, problem)
            array, orientation = _read_pillow(io.BytesIO(data), is_png=is_png)
        non_finite = _non_finite_pixels(array, path)
        image = _to_unit_rgb(_orient(array, orientation), path)
    except UnreadableImageError:
        raise
    except Exception as exc:  # decoders raise many types (OSError, ValueError, SyntaxError, zlib.error ...)
        raise UnreadableImageError(path, f"{type(exc).__name__}: {exc}") from exc
    if not preserve_precision:
        image = np.round(image * 255.0) / 255.0
    return image.astype(np.float32, copy=False), non_finite


def _non_finite_pixels(array: np.ndarray, path: Path) -> int:
    """How many pixels have a NaN or infinite sample; none may be all of them (nothing would be left to learn)."""
    if array.ndim not in (2, 3) or not np.issubdtype(array.dtype, np.floating):
        return 0
    bad = ~np.isfinite(array)
    count = int((bad.reshape(*array.shape[:2], -1).any(axis=-1) if array.ndim == 3 else bad).sum())
    if count and count == array.shape[0] * array.shape[1]:
        raise UnreadableImageError(path, f"all {count} pixels are NaN or infinite")
    return count


def _png_chunk_problem(data: bytes) -> str | None:
    """Why a PNG's chunk structure is broken (truncated, failed CRC), or None."""
    position = len(_PNG_MAGIC)
    while position + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        end = position + 12 + length
        name = kind.decode("latin-1")
        if end > len(data):
            return f"truncated PNG ({name} chunk at byte {position} runs past the end of the file)"
        (expected,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(data[position + 4 : end - 4]) & 0xFFFFFFFF != expected:
            return f"corrupt PNG ({name} chunk at byte {position} fails its CRC check)"
        if kind == b"IEND":
            return None
        position = end
    return "truncated PNG (no IEND chunk)"


def _oversize(path: Path, is_tiff: bool, max_pixels: int) -> str | None:
    """Why an image is too large to decode (from its header alone), or None: a 20k x 20k TIFF must not
    exhaust memory."""
    try:
        width, height, _ = image_header(path, is_tiff)
    except Image.DecompressionBombError as error:  # Pillow's own, larger limit
        return f"over --max_image_pixels {max_pixels} ({error})"
    if width * height > max_pixels:
        return f"{width}x{height} pixels, over --max_image_pixels {max_pixels}"
    return None


def image_header(path: str | Path, is_tiff: bool | None = None) -> tuple[int, int, bool]:
    """(width, height, whether its samples are floats) from the file's header, without decoding the pixels."""
    path = Path(path)
    if is_tiff is None:
        with open(path, "rb") as handle:
            is_tiff = handle.read(4) in _TIFF_MAGIC
    if is_tiff:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            shape = page.shape
            height, width = (shape[1], shape[2]) if page.axes.startswith("S") else (shape[0], shape[1])
            return width, height, np.issubdtype(page.dtype, np.floating)
    with Image.open(path) as img:
        return img.size[0], img.size[1], img.mode == "F"


def _exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation of an opened image, read after its pixels (a PNG's eXIf chunk may follow them:
    asking before the load made Pillow decode the whole image a second time)."""
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - no readable EXIF: as stored
        return 1


def _tiff_orientation(path: Path) -> int:
    try:
        with tifffile.TiffFile(path) as tif:
            tag = tif.pages[0].tags.get("Orientation")
            return int(tag.value) if tag is not None else 1
    except Exception:  # noqa: BLE001
        return 1


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF/TIFF orientation (2-8) to (H, W[, C]) samples, as viewers (and PIL's exif_transpose) do."""
    transforms = {
        2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, k=-1), 7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, k=1)}
    return np.ascontiguousarray(transforms[orientation](array)) if orientation in transforms else array


def _read_tiff(path: Path) -> np.ndarray:
    """First page of a TIFF with samples last; falls back to Pillow for codecs tifffile lacks."""
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            array, axes = page.asarray(), page.axes
    except Exception as tiff_exc:
        if "imagecodecs" not in str(tiff_exc):  # only a missing codec is worth a second decoder
            raise
        try:
            return _read_pillow(path, is_png=False)[0]
        except Exception:
            raise tiff_exc from None
    if "S" in axes and array.ndim == len(axes):
        array = np.moveaxis(array, axes.index("S"), -1)
    return np.squeeze(array) if array.ndim > 3 else array


def _read_pillow(source: Path | io.BytesIO, is_png: bool) -> tuple[np.ndarray, int]:
    """Pillow decode to a numpy array in the file's own depth (uint8, uint16 or float32), and its EXIF
    orientation."""
    with Image.open(source) as img:
        rawmode = img.tile[0].args if is_png and img.tile else None
        img.load()
        return _samples(img, source, rawmode), _exif_orientation(img)


def _samples(img: Image.Image, source: Path | io.BytesIO, rawmode) -> np.ndarray:
    """A loaded image's samples in the file's own depth."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(img).astype(np.uint16)
    if img.mode == "I":  # 32-bit int container; Pillow uses it for 16-bit data, so scale as 16-bit
        return np.clip(np.asarray(img), 0, 65535).astype(np.uint16)
    if img.mode == "F":
        return np.asarray(img)
    if isinstance(rawmode, str) and rawmode in ("RGB;16B", "RGBA;16B"):
        return _png_16bit_rgb(source, np.asarray(img))
    if img.mode in ("L", "RGB", "RGBA", "LA"):
        return np.asarray(img)
    return np.asarray(img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB"))


def _png_16bit_rgb(source: Path | io.BytesIO, high: np.ndarray) -> np.ndarray:
    """Full 16-bit samples of an RGB(A) PNG: decode again with the little-endian unpacker, which reads the
    low byte of each big-endian sample. Falls back to the high bytes (8-bit precision) if Pillow refuses."""
    global _warned_16bit_fallback
    if isinstance(source, io.BytesIO):
        source.seek(0)
    try:
        with Image.open(source) as img:
            tile = img.tile[0]
            low_args = tile[3].replace("16B", "16L")
            img.tile = [tile._replace(args=low_args) if hasattr(tile, "_replace") else (*tile[:3], low_args)]
            img.load()
            low = np.asarray(img)
    except (ValueError, OSError, KeyError) as exc:
        if not _warned_16bit_fallback:
            logger.warning("This Pillow cannot read the low bytes of 16-bit RGB PNGs (%s); using 8-bit precision.", exc)
            _warned_16bit_fallback = True
        return high.astype(np.uint16) * 257
    return high.astype(np.uint16) * 256 + low.astype(np.uint16)  # (H, W, C)


def _to_unit_rgb(array: np.ndarray, path: Path) -> np.ndarray:
    """Scale by the integer type's range (floats as-is), composite alpha on black, make 3 channels, clip."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] > 4):
        raise UnreadableImageError(path, f"unsupported array shape {array.shape}")
    scaled = _scaled(array, path)
    if scaled.ndim == 2:
        scaled = scaled[..., None]
    colour, alpha = (scaled[..., :1], scaled[..., 1:2]) if scaled.shape[-1] == 2 else \
        (scaled[..., :3], scaled[..., 3:4] if scaled.shape[-1] == 4 else None)
    if alpha is not None:
        colour = colour * np.clip(alpha, 0.0, 1.0)
    if colour.shape[-1] == 1:
        colour = np.repeat(colour, 3, axis=-1)
    return np.clip(colour, 0.0, 1.0).astype(np.float32)  # (H, W, 3)


def _scaled(array: np.ndarray, path: Path) -> np.ndarray:
    """Samples as floats in the file's [0, 1] (integer types by their range, floats as they are)."""
    if array.dtype == np.bool_:
        scaled = array.astype(np.float32)
    elif array.dtype == np.uint8:
        scaled = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        scaled = array.astype(np.float32) / 65535.0
    elif np.issubdtype(array.dtype, np.integer):
        scaled = array.astype(np.float64) / float(np.iinfo(array.dtype).max)
    elif np.issubdtype(array.dtype, np.floating):
        scaled = array.astype(np.float32)
    else:
        raise UnreadableImageError(path, f"unsupported sample type {array.dtype}")
    return np.nan_to_num(scaled, nan=0.0, posinf=1.0, neginf=0.0)


def header_problem(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> str | None:
    """Cheap header-level check: the reason a file is clearly broken, or None if it looks decodable.

    Reads the header (and for PNG the trailing IEND chunk, for TIFF the strip table against the file size), so
    truncated files are usually caught without decoding the pixels.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file"
        with open(path, "rb") as handle:
            head = handle.read(8)
            if head == _PNG_MAGIC:
                handle.seek(max(size - 12, 0))
                if handle.read(12)[4:8] != b"IEND":
                    return "truncated PNG (no IEND chunk at the end)"
        too_large = _oversize(path, head[:4] in _TIFF_MAGIC, max_pixels)
        if too_large:
            return too_large
        if head[:4] in _TIFF_MAGIC:
            return _tiff_problem(path, size)
        with Image.open(path) as img:
            if img.width < 1 or img.height < 1:
                return f"empty image size {img.size}"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _tiff_problem(path: Path, size: int) -> str | None:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        ends = [off + count for off, count in zip(page.dataoffsets, page.databytecounts)]
        if ends and max(ends) > size:
            return f"truncated TIFF (image data ends at byte {max(ends)}, file has {size})"
    return None


# --------------------------------------------------------------------------------------------- writing


def write_image(path: str | Path, image: np.ndarray, image_format: str) -> None:
    """Write (H, W, 3) floats in [0, 1] as png (8-bit), png16, tiff16 or tiff32, atomically.

    The file appears under its final name only once complete (temporary name in the same folder, then rename).
    """
    extension_for(image_format)
    image = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"write_image expects (H, W, 3), got {image.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, _encode(image, image_format))


def _encode(image: np.ndarray, image_format: str) -> bytes:
    """The encoded file bytes of (H, W, 3) floats in [0, 1]."""
    if image_format == "png16":
        return encode_png16(np.round(image * 65535.0).astype(np.uint16))
    buffer = io.BytesIO()
    if image_format == "png":
        Image.fromarray(np.round(image * 255.0).astype(np.uint8), mode="RGB").save(buffer, format="PNG")
    elif image_format == "tiff16":
        tifffile.imwrite(buffer, np.round(image * 65535.0).astype(np.uint16), photometric="rgb", compression="zlib")
    else:  # tiff32
        tifffile.imwrite(buffer, image.astype(np.float32), photometric="rgb", compression="zlib")
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _paeth_filter(raw: np.ndarray, bpp: int) -> np.ndarray:
    """PNG Paeth filter of (H, row_bytes) uint8 rows (vectorised: encoding only uses original bytes)."""
    raw = raw.astype(np.int16)
    left = np.zeros_like(raw)
    left[:, bpp:] = raw[:, :-bpp]
    up = np.zeros_like(raw)
    up[1:] = raw[:-1]
    up_left = np.zeros_like(raw)
    up_left[1:, bpp:] = raw[:-1, :-bpp]
    estimate = left + up - up_left
    dist_left, dist_up, dist_ul = abs(estimate - left), abs(estimate - up), abs(estimate - up_left)
    use_left = (dist_left <= dist_up) & (dist_left <= dist_ul)
    predictor = np.where(use_left, left, np.where(dist_up <= dist_ul, up, up_left))
    return ((raw - predictor) & 0xFF).astype(np.uint8)


def encode_png16(image: np.ndarray, filter_type: int = 4) -> bytes:
    """A 16-bit RGB/RGBA PNG from (H, W, 3|4) uint16 (Pillow cannot write these); filter 0 (none) or 4 (Paeth)."""
    height, width, channels = image.shape
    color_type = {3: 2, 4: 6}[channels]
    raw = np.ascontiguousarray(image.astype(">u2")).view(np.uint8).reshape(height, width * channels * 2)
    rows = _paeth_filter(raw, channels * 2) if filter_type == 4 else raw
    scanlines = np.concatenate([np.full((height, 1), filter_type, np.uint8), rows], axis=1)  # (H, 1 + row_bytes)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        _PNG_MAGIC
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6))
        + _png_chunk(b"IEND", b"")
    )
