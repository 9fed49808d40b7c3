"""Benchmark figures in the docs are the sections their scripts write (benchmarks/doc_figures.py): every section
parses, names a script that can write it, and reads exactly as the writer would write it; a write replaces
its section and nothing else, and refuses a page whose markers are missing or unbalanced. Nothing here
trains; the benchmarks' smoke runs write into copies of the pages (tests/test_benchmarks.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import it as `doc_figures`, run from there

import doc_figures  # noqa: E402
from doc_figures import FiguresError, find_sections, parse_figures, render, write_section  # noqa: E402

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SECTIONS = [(page, section) for page in PAGES for section in find_sections(page.read_text(encoding="utf-8"),
                                                                            page.name)]
PAGE = """# Title

<!-- figures: benchmarks/gpu.py -->
Measured 2026-01-02 on a 2-core CPU (`python benchmarks/gpu.py --smoke`):

| figure | value |
|---|---:|
| old | 1.0 |

<!-- /figures -->

Prose after.

```markdown
<!-- figures: benchmarks/gpu.py -->
in a code block: an example, not a section
```
"""


def test_the_docs_have_figures_sections():
    names = {section.name for _, section in SECTIONS}
    assert {"benchmarks/trainer_overhead.py", "benchmarks/recipe.py", "benchmarks/recipe.py largest-budget",
            "benchmarks/vae_quality.py x4", "benchmarks/condition_following.py"} <= names


@pytest.mark.parametrize("page, section", SECTIONS, ids=[f"{page.name}:{section.name}" for page, section in SECTIONS])
def test_each_section_parses_as_its_script_would_write_it(page, section):
    script = ROOT / section.name.split(" ")[0]
    assert script.is_file(), f"{page.name}: {section.name}: no such script"
    assert "add_write_docs_option(" in script.read_text(encoding="utf-8"), f"{script.name} has no --write_docs"
    figures = parse_figures(section.body, f"{page.name}: {section.name}")
    if figures is None:
        return  # not measured yet: `--write_docs` fills it
    assert figures.machine and figures.command.startswith("`") and figures.rows
    assert render(figures) == section.body, f"{page.name}: {section.name} is not in the form write_section writes"


def test_a_write_replaces_only_its_section(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE, encoding="utf-8")
    write_section(page, "benchmarks/gpu.py", "python benchmarks/gpu.py", [{"figure": "new", "value": "2.5 ms"}],
                  machine="an H200 (16-core CPU)", date="2026-12-04", notes=["target met"])
    text = page.read_text(encoding="utf-8")
    [section] = find_sections(text)
    figures = parse_figures(section.body)
    assert (figures.date, figures.machine, figures.command) == ("2026-12-04", "an H200 (16-core CPU)",
                                                                "`python benchmarks/gpu.py`")
    assert (figures.header, figures.rows, figures.notes) == (["figure", "value"], [["new", "2.5 ms"]], ["target met"])
    before, after = PAGE.split("<!-- figures: benchmarks/gpu.py -->\n", 1)[0], PAGE.split("<!-- /figures -->", 1)[1]
    assert text.startswith(before + "<!-- figures: benchmarks/gpu.py -->\n") and text.endswith(after)
    write_section(page, "benchmarks/gpu.py", "python benchmarks/gpu.py --smoke",
                  (["figure", "value"], [["old", "1.0"]]), machine="a 2-core CPU", date="2026-01-02")
    assert page.read_text(encoding="utf-8") == PAGE  # the round trip restores the page byte for byte
    assert [p.name for p in tmp_path.iterdir()] == ["page.md"]  # no temporary file left behind


@pytest.mark.parametrize("text, message", [
    ("no markers\n", "has no section <!-- figures: benchmarks/gpu.py -->"),
    ("<!-- figures: benchmarks/gpu.py -->\nopen\n", "line 1: the section 'benchmarks/gpu.py' is never closed"),
    ("text\n<!-- /figures -->\n", "line 2: <!-- /figures --> closes no section"),
    ("<!-- figures: benchmarks/gpu.py -->\n<!-- figures: benchmarks/recipe.py -->\n<!-- /figures -->\n",
     "line 2: a figures section opens inside the one opened on line 1"),
    ("<!-- figures: benchmarks/gpu.py -->\n<!-- /figures -->\n<!-- figures: benchmarks/gpu.py -->\n"
     "<!-- /figures -->\n", "two sections named 'benchmarks/gpu.py'"),
    ("<!-- figures benchmarks/gpu.py -->\n<!-- /figures -->\n", "line 1: not a figures marker"),
])
def test_a_write_refuses_missing_or_unbalanced_markers_and_leaves_the_page(tmp_path, text, message):
    page = tmp_path / "page.md"
    page.write_text(text, encoding="utf-8")
    with pytest.raises(FiguresError, match=message.replace("(", r"\(").replace("[", r"\[")) as refused:
        write_section(page, "benchmarks/gpu.py", "python benchmarks/gpu.py", [{"a": "1"}])
    assert "\n" not in str(refused.value) and page.read_text(encoding="utf-8") == text


@pytest.mark.parametrize("body, message", [
    (["Measured yesterday on a CPU (`x`):", "", "| a |", "|---|", "| 1 |"], "the first line must read"),
    (["Measured 2026-13-04 on a CPU (`x`):", "", "| a |", "|---|", "| 1 |"], "2026-13-04 is not a date"),
    (["Measured 2026-12-04 on a CPU (`x`):", "", "| a |", "|---|"], "needs a markdown table"),
    (["Measured 2026-12-04 on a CPU (`x`):", "", "| a | b |", "|---|---|", "| 1 |"], "different number of cells"),
    (["Measured 2026-12-04 on a CPU (`x`):", "", "| a |", "|---|", "| 1 |", "", "free text"], "bullet lines"),
])
def test_a_malformed_section_is_refused(body, message):
    with pytest.raises(FiguresError, match=message):
        parse_figures(body)


def test_write_docs_checks_its_target_before_the_benchmark_runs(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    doc_figures.add_write_docs_option(parser, ROOT / "benchmarks" / "gpu.py", "docs/benchmarks.md")
    assert parser.parse_args([]).write_docs is None
    assert parser.parse_args(["--write_docs"]).write_docs == [(ROOT / "docs" / "benchmarks.md", None)]
    page = tmp_path / "page.md"
    page.write_text("nothing marked\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        parser.parse_args(["--write_docs", f"{page}#smoke"])
    assert "has no section <!-- figures: benchmarks/gpu.py smoke -->" in capsys.readouterr().err


def test_the_command_line_leaves_out_write_docs():
    command = doc_figures.this_command([str(ROOT / "benchmarks" / "vae_quality.py"), "--seconds", "10",
                                        "--write_docs", "a.md#x4", "b.md", "--disc_weights", "0.5"])
    assert command == "python benchmarks/vae_quality.py --seconds 10 --disc_weights 0.5"

