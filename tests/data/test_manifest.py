import hashlib
import logging
import os

import numpy as np
import pytest

from ldmflow.data.manifest import NothingUsableError, load_manifest
from ldmflow.errors import LdmflowError


def _entry(name: str, split: str | None = "train", **conditions) -> dict:
    metadata = dict(conditions)
    if split is not None:
        metadata["split"] = split
    return {"output_rel": f"images/{name}.png", "metadata": metadata}


@pytest.fixture
def dataset(tmp_path, write_manifest, write_test_image):
    """Three train images, one val image, all present."""
    entries = [
        _entry("a", temperature=10.0, wind=[3, 4, 0]),
        _entry("b", temperature=20.0, wind=[0, 1, 0], wind_mag=1.0),
        _entry("c", wind="1,0,0"),
        _entry("d", split="val", temperature=-5.0),
    ]
    for name in "abcd":
        write_test_image(tmp_path / "images" / f"{name}.png")
    return write_manifest(tmp_path, entries)


def test_load_train_split(dataset):
    manifest = load_manifest(dataset)
    assert [r.output_rel for r in manifest.records] == ["images/a.png", "images/b.png", "images/c.png"]
    assert [r.entry_index for r in manifest.records] == [0, 1, 2]
    record = manifest.records[0]
    assert record.image_path == dataset.parent.resolve() / "images" / "a.png"
    np.testing.assert_allclose(record.conditions, [10, 3, 4, 0, 5])
    assert record.present.tolist() == [True, True, True]
    assert manifest.records[2].present.tolist() == [False, True, True]
    assert manifest.data_root == dataset.parent.resolve()
    assert manifest.digest == hashlib.sha256(dataset.read_bytes()).hexdigest()
    report = manifest.report
    counts = (report.total, report.in_split, report.usable, report.missing_files, report.unreadable_files)
    assert counts == (4, 3, 3, 0, 0)
    assert report.zero_filled == {"temperature": 1, "wind": 0, "wind_mag": 0}
    assert report.computed == {"temperature": 0, "wind": 0, "wind_mag": 2}
    assert report.split == "train" and report.condition_spec == "temperature:1,wind:3,wind_mag:1"
    assert report.split_values == {"train": 3, "val": 1}


def test_condition_stats_cover_usable_train_records_only(dataset):
    manifest = load_manifest(dataset)
    temperature = manifest.report.condition_stats["temperature"]
    assert temperature == {"mean": [15.0], "std": [5.0]}  # c is absent, d is val
    assert manifest.stats.mean[0] == 15.0 and manifest.stats.std[0] == 5.0
    assert manifest.report.condition_stats["wind_mag"]["mean"] == pytest.approx([(5 + 1 + 1) / 3])


@pytest.mark.parametrize("split, expected", [("val", 1), (None, 4), ("all", 4)])
def test_split_filtering(dataset, split, expected):
    manifest = load_manifest(dataset, split=split)
    assert len(manifest.records) == expected
    assert manifest.report.split == (split or "all")


def test_custom_and_empty_spec(dataset):
    manifest = load_manifest(dataset, condition_spec="temperature:1")
    assert manifest.records[0].conditions.tolist() == [10.0]
    unconditional = load_manifest(dataset, condition_spec="none")
    assert unconditional.records[0].conditions.shape == (0,) and unconditional.report.condition_stats == {}


@pytest.mark.parametrize("key", ["items", "entries", "samples", "records", "frames", "data", "renders", None])
def test_where_the_list_may_live(tmp_path, write_manifest, write_test_image, key):
    write_test_image(tmp_path / "images" / "a.png")
    path = write_manifest(tmp_path, [_entry("a")], key=key)
    assert len(load_manifest(path).records) == 1


def test_known_key_wins_over_other_lists(tmp_path, write_manifest, write_test_image):
    write_test_image(tmp_path / "images" / "a.png")
    path = tmp_path / "manifest.json"
    path.write_text('{"tags": [1, 2], "items": [{"output_rel": "images/a.png", "metadata": {"split": "train"}}]}')
    assert len(load_manifest(path).records) == 1


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("42", "found a number"),
        ('"images"', "found a string"),
        ("null", "found null"),
        ('{"name": "x", "count": 3}', "found an object with keys ['name', 'count'] and no list of entries"),
        ('{"a": [], "b": []}', "found an object with several lists ('a', 'b')"),
    ],
)
def test_wrong_top_level_shape(tmp_path, text, fragment):
    path = tmp_path / "manifest.json"
    path.write_text(text)
    with pytest.raises(LdmflowError) as info:
        load_manifest(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_broken_json_names_line_and_column(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text('{"items": [\n  {"output_rel": "a.png",}\n]}')
    with pytest.raises(LdmflowError) as info:
        load_manifest(path)
    message = str(info.value)
    assert str(path) in message and "not valid JSON" in message and "line 2, column 26" in message


def test_missing_manifest_and_bad_options(tmp_path, dataset):
    with pytest.raises(LdmflowError, match="Manifest .*nope.json does not exist"):
        load_manifest(tmp_path / "nope.json")
    with pytest.raises(LdmflowError, match="is a folder"):
        load_manifest(tmp_path)
    with pytest.raises(LdmflowError, match="Data root .*elsewhere is not a directory"):
        load_manifest(dataset, data_root=tmp_path / "elsewhere")
    with pytest.raises(LdmflowError, match="verify_images must be one of none, header, full"):
        load_manifest(dataset, verify_images="deep")


@pytest.mark.parametrize(
    "entry, fragment",
    [
        ("images/a.png", "entry 1 is a string; expected an object with 'output_rel'"),
        ({"path": "a.png", "metadata": {}}, "entry 1 has no 'output_rel' (its keys: ['path', 'metadata'])"),
        ({"output_rel": 5}, "entry 1 has 'output_rel' 5; expected a non-empty path string"),
        ({"output_rel": ""}, "entry 1 has 'output_rel' ''"),
        ({"output_rel": "b.png", "metadata": [1]}, "entry 1 (b.png) has 'metadata' that is a list"),
    ],
)
def test_bad_entries_name_their_index(tmp_path, write_manifest, entry, fragment):
    path = write_manifest(tmp_path, [_entry("a"), entry])
    with pytest.raises(LdmflowError) as info:
        load_manifest(path)
    assert fragment in str(info.value)


def test_wrong_condition_size_names_entry(tmp_path, write_manifest, write_test_image):
    write_test_image(tmp_path / "images" / "a.png")
    path = write_manifest(tmp_path, [_entry("x", split="val"), _entry("a", wind=[1, 2])])
    with pytest.raises(LdmflowError) as info:
        load_manifest(path)
    assert str(info.value) == "entry 1 (images/a.png): condition 'wind' has 2 values, the spec says 3."


def test_nan_values_zero_filled_and_counted(tmp_path, write_test_image):
    write_test_image(tmp_path / "images" / "a.png")
    write_test_image(tmp_path / "images" / "b.png")
    path = tmp_path / "manifest.json"
    path.write_text(
        '[{"output_rel": "images/a.png", "metadata": {"split": "train", "temperature": NaN, "wind": [1, 0, 0]}},'
        ' {"output_rel": "images/b.png", "metadata": {"split": "train", "temperature": "4.5", "wind": "0,2,0"}}]'
    )
    manifest = load_manifest(path)
    assert manifest.records[0].conditions[0] == 0.0 and not manifest.records[0].present[0]
    assert manifest.records[1].conditions.tolist() == [4.5, 0.0, 2.0, 0.0, 2.0]
    assert manifest.report.zero_filled["temperature"] == 1
    assert manifest.report.computed["wind_mag"] == 2
    assert manifest.report.condition_stats["temperature"] == {"mean": [4.5], "std": [1.0]}


def test_entries_without_metadata_are_in_no_named_split(tmp_path, write_manifest, write_test_image):
    write_test_image(tmp_path / "images" / "a.png")
    write_test_image(tmp_path / "images" / "b.png")
    path = write_manifest(tmp_path, [{"output_rel": "images/a.png"}, _entry("b")])
    assert [r.output_rel for r in load_manifest(path).records] == ["images/b.png"]
    everything = load_manifest(path, split="all")
    assert len(everything.records) == 2 and not everything.records[0].present.any()
    assert everything.report.split_values == {"<none>": 1, "train": 1}


def test_missing_files_one_warning_naming_first_few(tmp_path, write_manifest, write_test_image, caplog):
    write_test_image(tmp_path / "images" / "a.png")
    entries = [_entry("a")] + [_entry(f"gone{i}") for i in range(7)]
    path = write_manifest(tmp_path, entries)
    with caplog.at_level(logging.WARNING, logger="ldmflow.data.manifest"):
        manifest = load_manifest(path)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "Skipping 7 of 8 entries in split 'train' whose image file is missing" in message
    assert "images/gone0.png" in message and "images/gone4.png" in message and "and 2 more" in message
    assert "gone6" not in message
    assert manifest.report.missing_files == 7 and manifest.report.usable == 1
    assert manifest.report.missing_examples == [f"images/gone{i}.png" for i in range(5)]


def test_corrupt_images_reported_by_path_and_counted(tmp_path, write_manifest, write_test_image, caplog):
    write_test_image(tmp_path / "images" / "a.png")
    (tmp_path / "images" / "junk.png").write_bytes(b"\x00garbage" * 20)
    truncated = write_test_image(tmp_path / "images" / "cut.png", 32, 32)
    truncated.write_bytes(truncated.read_bytes()[:60])
    path = write_manifest(tmp_path, [_entry("a"), _entry("junk"), _entry("cut")])
    with caplog.at_level(logging.WARNING, logger="ldmflow.data.manifest"):
        manifest = load_manifest(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Skipping 2 of 3 entries" in warnings[0]
    assert str(tmp_path / "images" / "junk.png") in warnings[0] and "cut.png" in warnings[0]
    assert manifest.report.unreadable_files == 2 and manifest.report.usable == 1
    assert manifest.report.unreadable_examples[0].startswith("images/junk.png: ")


def test_verify_modes(tmp_path, write_manifest, write_test_image):
    write_test_image(tmp_path / "images" / "a.png")
    jpeg = tmp_path / "images" / "b.png"
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(jpeg, format="JPEG")
    jpeg.write_bytes(jpeg.read_bytes()[:2000])  # header intact, pixels cut off
    (tmp_path / "images" / "c.png").write_bytes(b"nope")
    path = write_manifest(tmp_path, [_entry("a"), _entry("b"), _entry("c")])
    assert load_manifest(path, verify_images="none").report.usable == 3
    assert load_manifest(path, verify_images="header").report.usable == 2
    assert load_manifest(path, verify_images="full").report.usable == 1


def test_paths_outside_root_are_refused_unless_allowed(tmp_path, write_manifest, write_test_image):
    outside = write_test_image(tmp_path / "outside.png")
    write_test_image(tmp_path / "data" / "images" / "a.png")
    for rel in ("../outside.png", str(outside)):
        path = write_manifest(tmp_path / "data", [_entry("a"), {"output_rel": rel, "metadata": {"split": "train"}}])
        with pytest.raises(LdmflowError) as info:
            load_manifest(path)
        message = str(info.value)
        assert f"entry 1 ({rel})" in message and "outside the data root" in message
        assert "--allow_outside_root" in message
        assert len(load_manifest(path, allow_outside_root=True).records) == 2


def test_symlink_escape_is_refused(tmp_path, write_manifest, write_test_image):
    outside = write_test_image(tmp_path / "secret" / "x.png")
    (tmp_path / "data" / "images").mkdir(parents=True)
    os.symlink(outside.parent, tmp_path / "data" / "images" / "link")
    path = write_manifest(tmp_path / "data", [{"output_rel": "images/link/x.png", "metadata": {"split": "train"}}])
    with pytest.raises(LdmflowError, match=r"entry 0 \(images/link/x.png\).*outside the data root"):
        load_manifest(path)
    assert load_manifest(path, allow_outside_root=True).records[0].image_path.is_file()


def test_data_root_option(tmp_path, write_manifest, write_test_image):
    write_test_image(tmp_path / "pixels" / "images" / "a.png")
    path = write_manifest(tmp_path / "meta", [_entry("a")])
    with pytest.raises(NothingUsableError):
        load_manifest(path)
    manifest = load_manifest(path, data_root=tmp_path / "pixels")
    assert manifest.records[0].image_path == (tmp_path / "pixels").resolve() / "images" / "a.png"
    with pytest.raises(LdmflowError, match="outside the data root"):
        load_manifest(write_manifest(tmp_path / "meta", [_entry("a"), {"output_rel": "../meta/manifest.json"}],
                                     name="m2.json"), split="all", data_root=tmp_path / "pixels")


def test_nothing_usable_split_mismatch_lists_split_values(dataset):
    with pytest.raises(NothingUsableError) as info:
        load_manifest(dataset, split="test")
    message = str(info.value)
    assert "No entries with split 'test'" in message and "'train' (3), 'val' (1)" in message
    assert info.value.report.in_split == 0 and info.value.report.usable == 0 and info.value.report.total == 4


def test_nothing_usable_all_missing_explains(tmp_path, write_manifest):
    path = write_manifest(tmp_path, [_entry("a"), _entry("b")])
    with pytest.raises(NothingUsableError) as info:
        load_manifest(path)
    message = str(info.value)
    assert "None of the 2 entries with split 'train'" in message
    assert "2 missing (e.g. images/a.png, images/b.png)" in message
    assert str(tmp_path.resolve()) in message
    assert info.value.report.to_dict()["missing_files"] == 2


def test_empty_manifest(tmp_path, write_manifest):
    with pytest.raises(NothingUsableError, match="has no entries"):
        load_manifest(write_manifest(tmp_path, []))
