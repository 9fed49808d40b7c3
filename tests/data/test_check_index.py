"""Image checks remembered between loads: unchanged files are not read again, changed ones are."""

from __future__ import annotations

import os

import pytest

from ldmflow.data import manifest as manifest_module
from ldmflow.data.check_index import CheckIndex
from ldmflow.data.manifest import load_manifest


@pytest.fixture
def data(make_demo):
    return make_demo(10, val_fraction=0.0)


@pytest.fixture
def reads(monkeypatch) -> list:
    """The files whose header or pixels are read."""
    calls = []
    original = manifest_module._unreadable_reason
    monkeypatch.setattr(manifest_module, "_unreadable_reason",
                        lambda path, verify_images, max_pixels: calls.append(path.name) or
                        original(path, verify_images, max_pixels))
    return calls


def test_a_second_load_reads_no_image_and_a_changed_file_is_read_again(data, reads):
    first = load_manifest(data)
    assert len(reads) == 10
    reads.clear()
    second = load_manifest(data)
    assert reads == [] and second.files_digest == first.files_digest
    assert [r.image_path for r in second.records] == [r.image_path for r in first.records]

    image = first.records[4].image_path
    image.write_bytes(image.read_bytes()[:-20])  # truncated in place: another size
    third = load_manifest(data)
    assert reads == [image.name] and third.report.unreadable_files == 1 and third.files_digest != first.files_digest
    reads.clear()
    assert load_manifest(data).report.unreadable_files == 1 and reads == []  # a broken file's verdict is kept too


def test_verdicts_are_reused_only_as_thorough_as_asked(data, reads):
    load_manifest(data, verify_images="header")
    reads.clear()
    load_manifest(data, verify_images="full")  # a header check says nothing of the pixels
    assert len(reads) == 10
    reads.clear()
    load_manifest(data, verify_images="header")  # a full decode that passed covers the header
    assert reads == []
    load_manifest(data, verify_images="header", max_image_pixels=10**6)  # another bound: checked again
    assert len(reads) == 10


def test_a_damaged_or_foreign_index_is_ignored_and_rewritten(data, reads):
    load_manifest(data)
    index = CheckIndex.for_manifest(data).file
    for damage in (b"{not json", b'{"format": 99, "entries": {}}', b'{"format": 1, "entries": []}', b"[1, 2]"):
        index.write_bytes(damage)
        reads.clear()
        assert load_manifest(data).report.usable == 10 and len(reads) == 10
    reads.clear()
    load_manifest(data)
    assert reads == []


def test_an_unwritable_cache_folder_only_costs_speed(data, tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("LDMFLOW_CACHE", str(blocked))
    assert load_manifest(data).report.usable == 10


def test_many_files_are_checked_in_parallel_with_the_same_verdicts(data, monkeypatch):
    image = load_manifest(data).records[2].image_path
    image.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    os.utime(image, ns=(1, 1))
    sequential = load_manifest(data, verify_images="full").report
    monkeypatch.setattr(manifest_module, "_PARALLEL_CHECKS", 1)
    monkeypatch.setenv("LDMFLOW_CACHE", str(data.parent / "fresh-cache"))
    parallel = load_manifest(data, verify_images="full").report
    assert parallel.to_dict() == sequential.to_dict() and parallel.unreadable_files == 1
