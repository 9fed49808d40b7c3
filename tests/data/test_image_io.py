import numpy as np
import pytest
import tifffile
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from ldmflow.data.image_io import (
    UnreadableImageError,
    decode_image,
    encode_png16,
    extension_for,
    header_problem,
    read_image,
    write_image,
)
from ldmflow.errors import LdmflowError
from ldmflow.settings import IMAGE_FORMATS

pytestmark = pytest.mark.portable  # compares computed tensors (make test-portable)


def _random_image(height=12, width=20, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((height, width, 3)).astype(np.float32)


def _is_8bit(image: np.ndarray) -> bool:
    return np.allclose(image * 255.0, np.round(image * 255.0), atol=1e-3)


@pytest.mark.parametrize("image_format, tolerance", [("png", 0.5 / 255), ("png16", 0.5 / 65535 + 1e-7),
                                                     ("tiff16", 0.5 / 65535 + 1e-7), ("tiff32", 1e-7)])
def test_round_trip_every_format(tmp_path, image_format, tolerance):
    image = _random_image()
    path = tmp_path / f"a{extension_for(image_format)}"
    write_image(path, image, image_format)
    precise = read_image(path, preserve_precision=True)
    assert precise.shape == (12, 20, 3) and precise.dtype == np.float32
    assert np.abs(precise - image).max() <= tolerance
    quantised = read_image(path, preserve_precision=False)
    assert _is_8bit(quantised)
    assert np.abs(quantised - image).max() <= 0.5 / 255 + 1e-6
    assert header_problem(path) is None
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left behind


def test_formats_and_extensions():
    assert IMAGE_FORMATS == ("png", "png16", "tiff16", "tiff32")
    assert extension_for("png16") == ".png" and extension_for("tiff32") == ".tiff"
    with pytest.raises(LdmflowError, match="Unknown image format 'jpeg'"):
        extension_for("jpeg")


def test_16bit_png_precision_kept_or_quantised(tmp_path):
    steps = (np.arange(10 * 10 * 3, dtype=np.uint16) + 30000).reshape(10, 10, 3)  # 1/65535 apart
    path = tmp_path / "ramp.png"
    path.write_bytes(encode_png16(steps))
    precise = read_image(path, preserve_precision=True)
    np.testing.assert_allclose(precise, steps / 65535.0, atol=1e-7)
    assert len(np.unique(precise)) == steps.size  # every 16-bit step survives
    quantised = read_image(path, preserve_precision=False)
    assert _is_8bit(quantised) and len(np.unique(quantised)) <= 3


@pytest.mark.parametrize("filter_type", [0, 4])
def test_16bit_rgba_png_composites_alpha_on_black(tmp_path, filter_type):
    values = np.random.default_rng(1).integers(0, 65536, (9, 7, 4), dtype=np.uint16)
    path = tmp_path / "rgba16.png"
    path.write_bytes(encode_png16(values, filter_type=filter_type))
    expected = values[..., :3] / 65535.0 * (values[..., 3:] / 65535.0)
    np.testing.assert_allclose(read_image(path, True), expected, atol=1e-6)


def test_16bit_grayscale_png(tmp_path):
    gray = (np.arange(64, dtype=np.uint16) * 7 + 1000).reshape(8, 8)
    path = tmp_path / "gray16.png"
    Image.fromarray(gray).save(path)
    image = read_image(path, preserve_precision=True)
    assert image.shape == (8, 8, 3)
    np.testing.assert_allclose(image[..., 0], gray / 65535.0, atol=1e-7)
    np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_8bit_grayscale_rgba_palette_and_jpeg(tmp_path):
    rgb = (np.random.default_rng(2).random((10, 10, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "l.png")
    gray = read_image(tmp_path / "l.png")
    np.testing.assert_allclose(gray[..., 1], rgb[..., 0] / 255.0, atol=1e-6)

    rgba = np.concatenate([rgb, np.zeros((10, 10, 1), np.uint8)], axis=-1)  # fully transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "rgba.png").max() == 0.0  # composited on black, never the hidden colour
    rgba[..., 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "opaque.png")
    np.testing.assert_allclose(read_image(tmp_path / "opaque.png"), rgb / 255.0, atol=1e-6)

    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (10, 10, 3)
    Image.new("RGB", (12, 10), (200, 100, 50)).save(tmp_path / "a.jpg", quality=95)
    jpeg = read_image(tmp_path / "a.jpg")
    assert jpeg.shape == (10, 12, 3) and np.abs(jpeg - np.array([200, 100, 50]) / 255.0).max() < 0.02


def test_float_tiff_is_clipped_and_grayscale_replicated(tmp_path):
    hdr = np.array([[-0.5, 0.25], [0.75, 3.0]], dtype=np.float32)
    tifffile.imwrite(tmp_path / "hdr.tiff", hdr)
    image = read_image(tmp_path / "hdr.tiff", preserve_precision=True)
    assert image.shape == (2, 2, 3)
    np.testing.assert_allclose(image[..., 0], [[0.0, 0.25], [0.75, 1.0]])
    assert read_image(tmp_path / "hdr.tiff")[1, 1, 0] == 1.0


def test_planar_tiff(tmp_path):
    image = _random_image(6, 5)
    planar = np.round(image.transpose(2, 0, 1) * 65535).astype(np.uint16)  # (3, H, W)
    tifffile.imwrite(tmp_path / "planar.tiff", planar, photometric="rgb", planarconfig="separate")
    np.testing.assert_allclose(read_image(tmp_path / "planar.tiff", True), image, atol=1e-5)


def test_write_image_rejects_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        write_image(tmp_path / "x.png", np.zeros((4, 4)), "png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("image_format", ["png", "png16", "tiff16"])
def test_truncated_files_are_unreadable_and_fail_the_header_check(tmp_path, image_format):
    path = tmp_path / f"t{extension_for(image_format)}"
    write_image(path, _random_image(32, 32), image_format)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert header_problem(path) is not None
    with pytest.raises(UnreadableImageError) as info:
        read_image(path)
    assert str(path) in str(info.value) and info.value.reason
    assert isinstance(info.value, LdmflowError)


def test_garbage_and_empty_files(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image" * 10)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert "cannot identify" in header_problem(garbage)
    assert header_problem(empty) == "empty file"
    with pytest.raises(UnreadableImageError, match="garbage.png"):
        read_image(garbage)
    with pytest.raises(UnreadableImageError, match="empty.png: empty file"):
        read_image(empty)
    with pytest.raises(UnreadableImageError, match="FileNotFoundError"):
        read_image(tmp_path / "missing.png")


def test_png_with_damaged_pixel_data_is_unreadable(tmp_path):
    path = tmp_path / "damaged.png"
    write_image(path, _random_image(32, 32), "png")
    data = bytearray(path.read_bytes())
    data[60] ^= 0xFF  # inside IDAT; Pillow alone would not notice
    path.write_bytes(bytes(data))
    assert header_problem(path) is None  # the header and ending look fine
    with pytest.raises(UnreadableImageError, match="IDAT chunk at byte 33 fails its CRC check"):
        read_image(path)


def test_half_transparent_pixels_are_composited_on_black(tmp_path):
    Image.new("RGBA", (4, 4), (255, 255, 255, 128)).save(tmp_path / "half.png")
    np.testing.assert_allclose(read_image(tmp_path / "half.png", True), 128 / 255.0, atol=1e-6)
    Image.new("LA", (4, 4), (200, 0)).save(tmp_path / "gray_alpha.png")
    assert read_image(tmp_path / "gray_alpha.png").max() == 0.0


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("suffix", [".jpg", ".png", ".tiff"])
def test_exif_orientation_is_applied_as_viewers_do(tmp_path, orientation, suffix):
    stored = np.zeros((6, 10, 3), np.uint8)
    stored[:2, :3] = 255  # a white block at the top left, so every orientation differs
    path = tmp_path / f"oriented{suffix}"
    if suffix == ".tiff":
        tifffile.imwrite(path, stored, photometric="rgb", extratags=[(274, "H", 1, orientation, False)])
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(stored).save(path, exif=exif, **({"quality": 100} if suffix == ".jpg" else {}))
    shown = np.asarray(_with_orientation(stored, orientation)) / 255.0  # what a viewer shows
    image = read_image(path)
    assert image.shape == shown.shape
    assert np.abs(image - shown).max() < 0.1  # JPEG rounding around the block's edges


def _with_orientation(array: np.ndarray, orientation: int) -> Image.Image:
    """Pillow's own reading of an orientation tag (ImageOps.exif_transpose), the reference."""
    from PIL import ImageOps

    image = Image.fromarray(array)
    image.getexif()[0x0112] = orientation
    return ImageOps.exif_transpose(image)


@pytest.mark.parametrize("suffix", [".png", ".tiff"])
def test_images_over_the_pixel_limit_are_refused_from_their_header(tmp_path, suffix):
    from ldmflow.data.image_io import header_problem

    path = tmp_path / f"large{suffix}"
    if suffix == ".tiff":  # a 20000 x 20000 TIFF (a sparse file): its pixels are never read
        tifffile.imwrite(path, shape=(20000, 20000), dtype=np.uint8)
    else:
        Image.new("RGB", (300, 200)).save(path)
    limit = 100 * 100 if suffix == ".png" else 16384 * 16384
    with pytest.raises(UnreadableImageError, match=r"over --max_image_pixels"):
        read_image(path, max_pixels=limit)
    assert "over --max_image_pixels" in header_problem(path, limit)
    if suffix == ".png":
        assert read_image(path).shape == (200, 300, 3)  # under the default limit


@settings(max_examples=40, deadline=None)
@given(mask=hnp.arrays(np.int8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
                       elements=st.integers(0, 3)), channels=st.sampled_from([1, 3]))
def test_non_finite_pixels_are_counted_and_an_image_of_nothing_else_is_refused(tmp_path_factory, mask, channels):
    """0: a value, 1: NaN, 2: +inf, 3: -inf, in the first channel of a float TIFF."""
    image = np.full((*mask.shape, channels), 0.25, np.float32)
    image[..., 0] = np.choose(mask, [0.25, np.nan, np.inf, -np.inf]).astype(np.float32)
    path = tmp_path_factory.mktemp("nan") / "a.tiff"
    tifffile.imwrite(path, image if channels == 3 else image[..., 0])
    bad = int((mask > 0).sum())
    if bad == mask.size:
        with pytest.raises(UnreadableImageError, match=f"all {bad} pixels are NaN or infinite"):
            decode_image(path, preserve_precision=True)
        return
    pixels, count = decode_image(path, preserve_precision=True)
    assert count == bad and np.isfinite(pixels).all()
