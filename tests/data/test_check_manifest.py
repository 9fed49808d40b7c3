import json
import shutil

import numpy as np
import pytest

from cli_runner import invoke
from ldmflow.data.check import check_manifest, format_report
from ldmflow.data.conditions import extract_conditions
from ldmflow.data.manifest import NothingUsableError
from ldmflow.errors import LdmflowError


def _expected_counts(manifest_path, split="train") -> dict:
    """What the demo generator wrote for a split, counted straight from the JSON."""
    items = json.loads(manifest_path.read_text())["items"]
    chosen = [item["metadata"] for item in items if split == "all" or item["metadata"]["split"] == split]
    temperatures = [m["temperature"] for m in chosen if "temperature" in m]
    return {
        "total": len(items),
        "in_split": len(chosen),
        "no_temperature": sum("temperature" not in m for m in chosen),
        "no_wind_mag": sum("wind_mag" not in m for m in chosen),
        "temperature_mean": float(np.mean(temperatures)),
        "temperature_std": float(np.std(temperatures)),
        "wind_mag_mean": float(np.mean([np.hypot(*m["wind"][:2]) for m in chosen])),
    }


@pytest.mark.parametrize("split", ["train", "val", "all"])
def test_counts_match_what_the_generator_wrote(demo_manifest, split):
    report = check_manifest(demo_manifest, split=split)
    expected = _expected_counts(demo_manifest, split)
    assert report["total"] == expected["total"] == 16
    assert report["in_split"] == report["usable"] == expected["in_split"]
    assert report["missing_files"] == report["unreadable_files"] == 0
    assert report["zero_filled"] == {"temperature": expected["no_temperature"], "wind": 0, "wind_mag": 0}
    assert report["computed"] == {"temperature": 0, "wind": 0, "wind_mag": expected["no_wind_mag"]}
    stats = report["condition_stats"]
    assert stats["temperature"]["mean"][0] == pytest.approx(expected["temperature_mean"])
    assert stats["temperature"]["std"][0] == pytest.approx(expected["temperature_std"])
    assert stats["wind_mag"]["mean"][0] == pytest.approx(expected["wind_mag_mean"], abs=1e-3)
    assert stats["wind"]["std"][2] == 1.0  # z is always 0: a zero std becomes 1
    json.dumps(report)  # JSON-ready


def test_train_split_of_demo_has_the_planned_gaps(demo_manifest):
    expected = _expected_counts(demo_manifest)
    assert expected["in_split"] == 12 and expected["no_wind_mag"] >= 1


def test_full_check_finds_corruption_that_headers_hide(demo_manifest, tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(demo_manifest.parent, copy)
    items = json.loads((copy / "manifest.json").read_text())["items"]
    train = [item["output_rel"] for item in items if item["metadata"]["split"] == "train"]
    damaged = copy / train[0]
    data = damaged.read_bytes()
    iend = data.rindex(b"IEND") - 4
    damaged.write_bytes(data[:100] + b"\x00" * (iend - 100) + data[iend:])  # zeroed pixel data, intact ending
    (copy / train[1]).unlink()
    report = check_manifest(copy / "manifest.json")
    assert report["unreadable_files"] == 1 and report["unreadable_examples"][0].startswith(f"{train[0]}: ")
    assert report["missing_files"] == 1 and report["missing_examples"] == [train[1]]
    assert report["usable"] == 10
    from ldmflow.data.manifest import load_manifest

    assert load_manifest(copy / "manifest.json", verify_images="header").report.unreadable_files == 0


def test_nothing_usable_still_has_a_report(demo_manifest):
    with pytest.raises(NothingUsableError) as info:
        check_manifest(demo_manifest, split="holdout")
    report = info.value.report.to_dict()
    assert report["usable"] == 0 and report["total"] == 16 and report["split_values"] == {"train": 12, "val": 4}
    assert "Split 'holdout': 0 usable of 0 entries" in format_report(info.value.report)


def test_format_report(demo_manifest):
    text = format_report(check_manifest(demo_manifest))
    lines = text.splitlines()
    assert lines[0].startswith("Split 'train': 12 usable of 12 entries in the split (16 in the manifest)")
    assert "Conditions temperature:1,wind:3,wind_mag:1: zero-filled temperature 1; computed wind_mag" in lines[1]
    assert any(line.strip().startswith("wind: mean [") for line in lines)
    assert "Conditions: none" in format_report(check_manifest(demo_manifest, condition_spec="none"))


def test_bad_spec_is_an_error(demo_manifest):
    with pytest.raises(LdmflowError, match="Invalid condition spec 'wind:0'"):
        check_manifest(demo_manifest, condition_spec="wind:0")


# ------------------------------------------------------------------------ CLI (ldmflow check-manifest / demo-data)


@pytest.fixture
def cli():
    from ldmflow.cli import cli as group  # a broken build fails here; it never skips

    return group


def test_cli_check_manifest_text_and_json(cli, demo_manifest):
    text = invoke("check-manifest", "--manifest_path", str(demo_manifest), ok=False)
    assert text.exit_code == 0, text.output
    assert "12 usable of 12" in text.output
    as_json = invoke("check-manifest", "--manifest_path", str(demo_manifest), "--split", "all", "--json", ok=False)
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    assert report["usable"] == 16
    assert report["computed"]["wind_mag"] == _expected_counts(demo_manifest, "all")["no_wind_mag"]


def test_cli_check_manifest_nothing_usable(cli, demo_manifest):
    result = invoke("check-manifest", "--manifest_path", str(demo_manifest), "--split", "holdout",
                    "--json", ok=False)
    assert result.exit_code == 1
    assert json.loads(result.stdout)["usable"] == 0


def test_cli_check_manifest_bad_input(cli, tmp_path):
    broken = tmp_path / "manifest.json"
    broken.write_text("[{")
    result = invoke("check-manifest", "--manifest_path", str(broken), ok=False)
    assert result.exit_code != 0
    assert "Error:" in result.stderr and "not valid JSON" in result.stderr and "line 1" in result.stderr


def test_cli_demo_data(cli, tmp_path):
    result = invoke("demo-data", "--output_dir", str(tmp_path / "d"), "--num_images", "5",
                    "--resolution", "16", "--image_format", "tiff16", "--val_fraction", "0.2", ok=False)
    assert result.exit_code == 0, result.output
    manifest = tmp_path / "d" / "manifest.json"
    assert result.stdout.strip().splitlines()[-1] == str(manifest)
    items = json.loads(manifest.read_text())["items"]
    assert len(items) == 5 and items[0]["output_rel"] == "images/00000.tiff"
    assert sum(item["metadata"]["split"] == "val" for item in items) == 1


def test_extract_matches_loader_on_demo(demo_manifest):
    """The loader's vectors are exactly extract_conditions on the entry's metadata."""
    from ldmflow.data.manifest import load_manifest

    manifest = load_manifest(demo_manifest, split="all")
    items = json.loads(demo_manifest.read_text())["items"]
    for record in manifest.records:
        expected = extract_conditions(items[record.entry_index]["metadata"], manifest.spec, "x")
        np.testing.assert_array_equal(record.conditions, expected.values)


def test_check_manifest_flags_non_finite_and_sliver_images_and_refuses_all_nan_ones(tmp_path, write_manifest):
    import tifffile

    from ldmflow.data.image_io import write_image

    partial = np.full((8, 8, 3), 0.5, np.float32)
    partial[0, :3] = np.nan
    partial[1, 0] = np.inf
    tifffile.imwrite(tmp_path / "partial.tiff", partial)
    tifffile.imwrite(tmp_path / "all_nan.tiff", np.full((8, 8, 3), np.nan, np.float32))
    write_image(tmp_path / "sliver.png", np.full((1, 2000, 3), 0.5, np.float32), "png")
    write_image(tmp_path / "fine.png", np.full((8, 12, 3), 0.5, np.float32), "png")
    entries = [{"output_rel": name, "metadata": {"split": "train"}}
               for name in ("partial.tiff", "all_nan.tiff", "sliver.png", "fine.png")]
    report = check_manifest(write_manifest(tmp_path, entries), condition_spec="none")
    assert report["usable"] == 3 and report["unreadable_files"] == 1
    assert "all_nan.tiff: all 64 pixels are NaN or infinite" in report["unreadable_examples"][0]
    assert report["flagged_images"] == 2
    assert report["flagged_examples"][0].startswith("partial.tiff: 4 of 64 pixels are NaN or infinite")
    assert report["flagged_examples"][1].startswith("sliver.png: 2000x1 pixels, aspect ratio 2e+03:1")
    assert "2 usable image(s) flagged:" in format_report(report)
