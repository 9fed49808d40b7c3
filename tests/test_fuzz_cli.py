"""Fuzzing a whole command through the CLI (check-manifest: no training, no run): it succeeds, or exits 1 with
one `Error:` line; never an unexpected error (exit 2) and never a traceback."""

from __future__ import annotations

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given, strategies as st  # noqa: E402

from cli_runner import invoke  # noqa: E402
from data.test_fuzz_manifest import MANIFEST  # noqa: E402

OPTION_TEXT = st.text(max_size=12) | st.integers().map(str) | st.sampled_from(["none", "all", "-1", "nan", "1e400"])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-cli")


@given(MANIFEST, st.dictionaries(st.sampled_from(["--split", "--condition_spec", "--max_image_pixels",
                                                  "--data_root"]), OPTION_TEXT, max_size=3))
@example({"items": []}, {"--max_image_pixels": "9" * 5000})
@example({"items": [{"output_rel": "x.png"}]}, {"--condition_spec": "wind:" + "9" * 5000})
def test_check_manifest_from_the_command_line(folder, document, options):
    path = folder / "manifest.json"
    path.write_text(json.dumps(document))
    arguments = ["check-manifest", "--manifest_path", str(path)]
    for name, value in options.items():
        arguments += [name, value]
    result = invoke(*arguments, ok=False)
    assert result.exit_code in (0, 1, 2), result.output
    assert "Traceback" not in result.output and "unexpected" not in result.output, result.output
    if result.exit_code:
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert len(errors) == 1, result.output
