"""The one bounded reader of the files users hand in: a regular file, a pipe or a device is read up to its kind's
limit and never further, and each refusal says in true words what the path is."""

from __future__ import annotations

import os
import threading

import pytest
from hypothesis import given, settings, strategies as st

from cli_runner import invoke
from ldmflow.errors import LdmflowError
from ldmflow.files import read_user_file


def _pipe_path(tmp_path, data: bytes):
    """A named pipe that a thread fills with `data` (as `<(jq ...)` does); the thread ends when the reader stops."""
    path = tmp_path / f"pipe-{threading.get_ident()}-{len(data)}-{os.urandom(4).hex()}"
    os.mkfifo(path)

    def write():
        try:
            with open(path, "wb") as handle:
                handle.write(data)
        except BrokenPipeError:  # the reader stopped at its bound
            pass

    threading.Thread(target=write, daemon=True).start()
    return path


@settings(max_examples=20, deadline=None)
@given(size=st.integers(0, 3000), limit=st.integers(1, 2000), stream=st.booleans())
def test_a_file_or_pipe_is_read_whole_within_its_bound_and_refused_beyond(tmp_path_factory, size, limit, stream):
    folder = tmp_path_factory.mktemp("bounded")
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    if stream:
        path = _pipe_path(folder, data)
    else:
        path = folder / "file"
        path.write_bytes(data)
    if size <= limit:
        assert read_user_file(path, "--space", limit) == data
    else:
        kind = "a pipe" if stream else "a file"
        with pytest.raises(LdmflowError, match=f"--space .* is {kind} of more than {limit} bytes"):
            read_user_file(path, "--space", limit)


def test_a_device_is_read_no_further_than_the_bound():
    with pytest.raises(LdmflowError, match="/dev/zero is a device of more than 1 KiB"):
        read_user_file("/dev/zero", "Manifest", 1024)


@pytest.mark.parametrize("path, message", [("{tmp}/missing.json", "does not exist"), ("{tmp}", "is a folder")])
def test_a_path_that_is_not_a_readable_file_is_named_for_what_it_is(tmp_path, path, message):
    with pytest.raises(LdmflowError, match=message):
        read_user_file(path.format(tmp=tmp_path), "Manifest", 1024)


def test_check_manifest_reads_a_process_substitution_and_refuses_an_endless_stream(demo_manifest, tmp_path,
                                                                                   monkeypatch):
    pipe = _pipe_path(tmp_path, demo_manifest.read_bytes())
    result = invoke("check-manifest", "--manifest_path", str(pipe), "--data_root",
                    str(demo_manifest.parent), ok=False)
    assert result.exit_code == 0, result.output
    monkeypatch.setattr("ldmflow.data.manifest.MAX_MANIFEST_BYTES", 1 << 20)
    result = invoke("check-manifest", "--manifest_path", "/dev/zero", ok=False)
    assert result.exit_code == 1
    assert "Error: Manifest /dev/zero is a device of more than 1 MiB" in result.output


def test_a_manifest_from_a_pipe_needs_its_data_root(demo_manifest, tmp_path):
    pipe = _pipe_path(tmp_path, demo_manifest.read_bytes())
    result = invoke("check-manifest", "--manifest_path", str(pipe), ok=False)
    assert result.exit_code == 1
    assert f"Error: Manifest {pipe} is not a regular file (a pipe or a device), so its images' folder is unknown: " \
           "give it as --data_root." in result.output
