import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from ldmflow.data.dataset import ManifestImageDataset, crop_square, resize_shorter_side
from ldmflow.data.image_io import encode_png16, write_image
from ldmflow.data.manifest import ManifestRecord, load_manifest
from ldmflow.errors import LdmflowError

pytestmark = pytest.mark.portable  # compares computed tensors (make test-portable)


def _record(index: int, path: Path, conditions=(1.0, 2.0), present=(True, False)) -> ManifestRecord:
    return ManifestRecord(index, path.name, path, np.array(conditions, np.float32), np.array(present))


def _left_right_image(path: Path, height: int, width: int) -> Path:
    """Left half black, right half white: a flip is easy to see."""
    image = np.zeros((height, width, 3), np.float32)
    image[:, width // 2 :] = 1.0
    write_image(path, image, "png")
    return path


def test_items_from_demo_manifest(demo_manifest):
    manifest = load_manifest(demo_manifest)
    dataset = ManifestImageDataset(manifest.records, resolution=16)
    assert len(dataset) == len(manifest.records) == 12
    item = dataset[3]
    assert item["pixel_values"].shape == (3, 16, 16) and item["pixel_values"].dtype == torch.float32
    assert item["pixel_values"].min() >= -1.0 and item["pixel_values"].max() <= 1.0
    assert item["conditions"].shape == (5,) and item["conditions"].dtype == torch.float32
    assert item["present"].shape == (3,) and item["present"].dtype == torch.float32
    torch.testing.assert_close(item["conditions"], torch.from_numpy(manifest.records[3].conditions))
    assert item["index"] == 3
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["index"].tolist() == [0, 1, 2, 3]


def test_center_crop_of_a_wide_image(tmp_path):
    path = _left_right_image(tmp_path / "wide.png", 16, 48)
    item = ManifestImageDataset([_record(0, path)], resolution=8)[0]
    pixels = item["pixel_values"]  # (3, 8, 8): the centre of a (8, 24) resize straddles the edge
    assert pixels.shape == (3, 8, 8)
    assert torch.all(pixels[:, :, 0] < 0) and torch.all(pixels[:, :, -1] > 0)


def test_random_crop_and_flip_follow_torch_seed(tmp_path):
    path = _left_right_image(tmp_path / "wide.png", 16, 64)
    dataset = ManifestImageDataset([_record(0, path)], resolution=16, random_crop=True, random_flip=True)
    torch.manual_seed(0)
    first = [dataset[0]["pixel_values"] for _ in range(12)]
    torch.manual_seed(0)
    second = [dataset[0]["pixel_values"] for _ in range(12)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(p.shape == (3, 16, 16) and p.min() >= -1 and p.max() <= 1 for p in first)
    assert len({tuple(p[0, 0].tolist()) for p in first}) > 1  # crops and flips actually vary


def test_flip_mirrors_the_image(tmp_path):
    path = _left_right_image(tmp_path / "square.png", 8, 8)
    dataset = ManifestImageDataset([_record(0, path)], resolution=8, random_flip=True)
    torch.manual_seed(1)
    items = [dataset[0]["pixel_values"] for _ in range(16)]
    plain = ManifestImageDataset([_record(0, path)], resolution=8)[0]["pixel_values"]
    flipped = [p for p in items if not torch.equal(p, plain)]
    assert 0 < len(flipped) < 16
    assert all(torch.equal(p, plain.flip(-1)) for p in flipped)


def test_preserve_input_precision_keeps_16bit_steps(tmp_path):
    values = (np.arange(8 * 8 * 3, dtype=np.uint16) + 20000).reshape(8, 8, 3)
    path = tmp_path / "ramp.png"
    path.write_bytes(encode_png16(values))
    precise = ManifestImageDataset([_record(0, path)], resolution=8, preserve_input_precision=True)[0]
    expected = torch.from_numpy(values.transpose(2, 0, 1) / 65535.0 * 2 - 1).float()
    torch.testing.assert_close(precise["pixel_values"], expected, atol=1e-6, rtol=0)
    coarse = ManifestImageDataset([_record(0, path)], resolution=8)[0]["pixel_values"]
    assert len(torch.unique(coarse)) <= 3


def test_resize_keeps_float_precision():
    image = torch.linspace(0.3, 0.3001, 32 * 32).reshape(1, 32, 32).repeat(3, 1, 1)
    resized = resize_shorter_side(image, 16)
    assert resized.shape == (3, 16, 16) and len(torch.unique(resized)) > 200
    assert resize_shorter_side(torch.zeros(3, 10, 30), 5).shape == (3, 5, 15)
    assert crop_square(torch.zeros(3, 5, 15), 5, random=False).shape == (3, 5, 5)


def test_file_corrupted_after_loading_is_substituted(tmp_path, caplog):
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for i, path in enumerate(paths):
        write_image(path, np.full((8, 8, 3), i / 4, np.float32), "png")
    records = [_record(i, p, conditions=(float(i), 0.0)) for i, p in enumerate(paths)]
    dataset = ManifestImageDataset(records, resolution=8)
    paths[1].write_bytes(b"corrupted later")
    with caplog.at_level(logging.WARNING, logger="ldmflow.data.dataset"):
        items = [dataset[1], dataset[1], dataset[0]]
    assert [item["index"] for item in items] == [2, 2, 0]
    assert items[0]["conditions"][0] == 2.0
    assert [(item["substituted"], item["unreadable"]) for item in items] == [(1, str(paths[1]))] * 2 + [(0, "")]
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]  # the training loop reports them
    assert len(dataset.unreadable_paths) == 1


def test_every_file_unreadable_raises(tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(2)]
    for path in paths:
        path.write_bytes(b"junk")
    dataset = ManifestImageDataset([_record(i, p) for i, p in enumerate(paths)], resolution=8)
    with pytest.raises(LdmflowError, match="None of the 2 images"):
        dataset[0]
    assert len(dataset.unreadable_paths) == 2


def test_empty_records_rejected():
    with pytest.raises(LdmflowError, match="no records"):
        ManifestImageDataset([], resolution=8)


@pytest.mark.parametrize("style", ["stripes", "textured"])
def test_flipped_samples_keep_labels_the_demo_estimate_agrees_with(tmp_path, style):
    """A horizontal flip mirrors the wind's x component with the stripes: the label follows the image."""
    import math

    from ldmflow.data.demo import angle_error, estimate_conditions, make_demo_dataset
    from ldmflow.data.manifest import load_manifest

    manifest = load_manifest(make_demo_dataset(tmp_path / "demo", num_images=16, resolution=32, style=style),
                             condition_spec="temperature:1,wind:3:flipx=0,wind_mag:1")
    flipping = ManifestImageDataset(manifest.records, 32, random_flip=True, flip_signs=manifest.spec.flip_signs())
    plain = ManifestImageDataset(manifest.records, 32)
    torch.manual_seed(0)
    flips = 0
    for index in range(len(manifest.records)):
        item, reference = flipping[index], plain[index]
        flipped = not torch.equal(item["pixel_values"], reference["pixel_values"])
        flips += flipped
        wind = item["conditions"][1:4].numpy()
        expected_x = -reference["conditions"][1].item() if flipped else reference["conditions"][1].item()
        assert wind[0] == pytest.approx(expected_x) and wind[1] == reference["conditions"][2].item()
        if np.hypot(wind[0], wind[1]) > 3:  # the estimate reads stripe directions of clear stripes
            estimated = estimate_conditions(((item["pixel_values"].permute(1, 2, 0).numpy() + 1) / 2))
            assert math.degrees(angle_error(math.atan2(wind[1], wind[0]) % math.pi, estimated["wind_angle"])) < 10
    assert 0 < flips < len(manifest.records)


def test_random_flip_needs_a_rule_for_every_vector_condition(tmp_path):
    from types import SimpleNamespace

    from ldmflow.data.dataset import image_dataset
    from ldmflow.data.demo import make_demo_dataset
    from ldmflow.data.manifest import load_manifest
    from ldmflow.errors import LdmflowError

    manifest = load_manifest(make_demo_dataset(tmp_path / "demo", num_images=4, resolution=16))
    settings = SimpleNamespace(resolution=16, random_crop=False, random_flip=True, preserve_input_precision=False)
    with pytest.raises(LdmflowError, match=r"vector condition 'wind' has no flip rule.*'wind:3:flipx=0'"):
        image_dataset(manifest, settings, training=True)
    assert image_dataset(manifest, settings, training=False).random_flip is False  # evaluation never flips


def test_non_finite_pixels_are_named_on_the_item_and_an_all_nan_image_is_substituted(tmp_path):
    import tifffile

    partial = np.full((8, 8, 3), 0.5, np.float32)
    partial[0, 0] = np.nan
    paths = [tmp_path / "partial.tiff", tmp_path / "all_nan.tiff"]
    tifffile.imwrite(paths[0], partial)
    tifffile.imwrite(paths[1], np.full((8, 8, 3), np.nan, np.float32))
    dataset = ManifestImageDataset([_record(i, p) for i, p in enumerate(paths)], resolution=8)
    first, second = dataset[0], dataset[1]
    assert first["non_finite"] == str(paths[0]) and torch.isfinite(first["pixel_values"]).all()
    assert second["index"] == 0 and second["unreadable"] == str(paths[1])
