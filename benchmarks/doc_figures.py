"""Benchmark figures in the docs, written by the script that measured them, so a quoted figure always says
when, where and how it was measured, and a rerun replaces it instead of someone retyping it.

A page marks the section a script owns; the script replaces what lies between the markers, nothing else:

    <!-- figures: benchmarks/trainer_overhead.py -->
    Measured 2026-11-26 on a 2-core CPU (`python benchmarks/trainer_overhead.py --steps 30 --repeats 3`):

    | sizes | bare loop | ldmflow | ratio |
    |---|---:|---:|---:|
    | UNet 32,64 at 32 px, batch 8 | 76.9 ms/step | 78.3 ms/step | 1.019 |

    <!-- /figures -->

A label after the script's path tells several sections of one script apart (`<!-- figures:
benchmarks/vae_quality.py x8-3min -->`). Bullet lines may follow the table (a script's verdicts). A section
may be empty until its script first runs. Markers inside code blocks are text, not markers.

A script with one table for all its targets (run as `python benchmarks/x.py`, so this imports as `doc_figures`):

    add_write_docs_option(parser, __file__, "docs/benchmarks.md")  # --write_docs [DOC[#LABEL] ...]
    args = parser.parse_args()                                       # a missing section fails here, not later
    ...
    write_figures(args.write_docs, __file__, rows)                  # each target; None: nothing

The general call (recipe.py uses it to write a different table into each of its two sections):
write_section(doc_path, script_name, command, rows, machine=None, *, label=None, notes=(), date=None);
rows is a list of dicts (the first one's keys are the header) or a (header, rows-of-cells) pair; machine
defaults to describe_machine(), date to today. The page is written atomically (a temporary file renamed
over it); missing, unbalanced or duplicate markers raise FiguresError and leave the page untouched.
tests/test_doc_figures.py checks that every section in README.md and docs/ parses as this module writes it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPEN = re.compile(r"^<!-- figures: (?P<script>\S+\.py)(?: (?P<label>[\w.-]+))? -->$")
CLOSE = "<!-- /figures -->"
MEASURED = re.compile(r"^Measured (?P<date>\d{4}-\d{2}-\d{2}) on (?P<machine>.+) \((?P<command>`[^`]+`.*)\):$")
NUMBER = re.compile(r"^[-+]?\.?\d")  # a cell that starts like a number: its column is right-aligned


class FiguresError(ValueError):
    """A page's figures markers are missing, unbalanced or malformed (one line, naming the page and line)."""


@dataclass(frozen=True)
class Section:
    name: str  # "benchmarks/x.py" or "benchmarks/x.py label"
    start: int  # index of the opening marker's line
    end: int  # index of the closing marker's line
    body: list[str]


@dataclass(frozen=True)
class Figures:
    date: str
    machine: str
    command: str  # what follows the machine, in brackets: `the command`, maybe a remark after it
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def section_name(script: str, label: str | None = None) -> str:
    return f"{script} {label}" if label else script


def script_name(script_file: str | Path) -> str:
    """`benchmarks/x.py`, as sections name their scripts."""
    return Path(script_file).resolve().relative_to(ROOT).as_posix()


def find_sections(text: str, where: str = "the page") -> list[Section]:
    """Every figures section of a page, in order; refuses unbalanced or duplicate markers."""
    lines, sections, opened, fenced = text.split("\n"), [], None, False
    for index, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        if fenced:
            continue
        match = OPEN.match(line.rstrip())  # at the line's start: an indented one is a code example
        if match and opened is not None:
            raise FiguresError(f"{where} line {index + 1}: a figures section opens inside the one opened on line "
                               f"{opened[0] + 1}; close that one first with {CLOSE}")
        if match:
            opened = (index, section_name(match["script"], match["label"]))
        elif line.rstrip() == CLOSE:
            if opened is None:
                raise FiguresError(f"{where} line {index + 1}: {CLOSE} closes no section")
            sections.append(Section(opened[1], opened[0], index, lines[opened[0] + 1:index]))
            opened = None
        elif line.startswith("<!-- figures"):
            raise FiguresError(f"{where} line {index + 1}: not a figures marker: {line.strip()} (expected "
                               "<!-- figures: benchmarks/<script>.py [label] -->)")
    if opened is not None:
        raise FiguresError(f"{where} line {opened[0] + 1}: the section {opened[1]!r} is never closed ({CLOSE})")
    names = [section.name for section in sections]
    for name in names:
        if names.count(name) > 1:
            raise FiguresError(f"{where}: two sections named {name!r}; give each a label")
    return sections


def parse_figures(body: list[str], where: str = "the section") -> Figures | None:
    """The figures of a section's lines, None for an empty section; refuses anything else."""
    lines = [line for line in body if line.strip()]
    if not lines:
        return None
    measured = MEASURED.match(lines[0])
    if not measured:
        raise FiguresError(f"{where}: the first line must read 'Measured <YYYY-MM-DD> on <machine> (`<command>`):', "
                           f"not {lines[0]!r}")
    try:
        datetime.date.fromisoformat(measured["date"])
    except ValueError:
        raise FiguresError(f"{where}: {measured['date']} is not a date") from None
    table = [line for line in lines[1:] if line.startswith("|")]
    notes = [line for line in lines[1:] if not line.startswith("|")]
    if len(table) < 3 or not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", table[1]):
        raise FiguresError(f"{where}: needs a markdown table with a header, a |---| line and at least one row")
    header, *rows = [_cells(line) for line in [table[0], *table[2:]]]
    if any(len(row) != len(header) for row in rows):
        raise FiguresError(f"{where}: a table row has a different number of cells than the header")
    if any(not note.startswith("- ") for note in notes):
        raise FiguresError(f"{where}: after the table only '- ' bullet lines may follow")
    return Figures(measured["date"], measured["machine"], measured["command"], header, rows,
                   [note[2:] for note in notes])


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a markdown table; a column whose cells all start like a number is right-aligned."""
    right = [bool(rows) and all(NUMBER.match(row[i]) for row in rows) for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "|" + "".join("---:|" if r else "---|" for r in right),
            *("| " + " | ".join(row) + " |" for row in rows)]


def render(figures: Figures) -> list[str]:
    """A section's lines: the Measured line, a blank line, the table, its notes, a blank line."""
    notes = ["", *(f"- {note}" for note in figures.notes)] if figures.notes else []
    return [f"Measured {figures.date} on {figures.machine} ({figures.command}):", "",
            *markdown_table(figures.header, figures.rows), *notes, ""]


def describe_machine(device: str = "cuda") -> str:
    """`a 2-core AMD EPYC CPU (AVX512), lock 5f5242d20e36`, or the GPU's name when torch sees one and the benchmark
    used it (with the CPU): a figure is one machine's, and the lock names the packages that made it."""
    from ldmflow.environment import cpu_model, lock_tags

    import torch  # its capability says which vector unit its kernels use: another one rounds otherwise

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    capability = f" ({torch.backends.cpu.get_cpu_capability()})"
    cpu = f"{cores}-core {cpu_model()} CPU{capability}"
    lock = f", lock {lock_tags()['lock'].split(' ')[0]}"
    if device != "cpu" and torch is not None and torch.cuda.is_available():
        return f"an {torch.cuda.get_device_name()} ({cpu}){lock}"
    return f"a {cpu}{lock}"


def this_command(argv: list[str] | None = None) -> str:
    """The command line that ran this script, as `python benchmarks/x.py ...`, without --write_docs (which
    changes no figure)."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0])
    script = script_name(script) if script.resolve().is_relative_to(ROOT) else script.as_posix()
    kept, skipping = [], False
    for arg in argv[1:]:
        if arg == "--write_docs" or arg.startswith("--write_docs="):
            skipping = arg == "--write_docs"
            continue
        if skipping and not arg.startswith("-"):
            continue
        skipping = False
        kept.append(arg)
    return shlex.join(["python", script, *kept])


def _rows(rows) -> tuple[list[str], list[list[str]]]:
    if isinstance(rows, tuple):
        header, cells = rows
        return [str(h) for h in header], [[str(c) for c in row] for row in cells]
    if not rows:
        raise FiguresError("no rows to write")
    header = list(rows[0])
    return header, [[str(row.get(key, "")) for key in header] for row in rows]


def write_section(doc_path, script_name: str, command: str, rows, machine: str | None = None, *,
                  label: str | None = None, notes=(), date: str | None = None) -> None:
    """Replace the section `<!-- figures: script_name [label] -->` of `doc_path` by the Measured line and a
    table of `rows` (and `notes` as bullets); the rest of the page stays byte for byte."""
    doc = Path(doc_path)
    text = doc.read_text(encoding="utf-8")
    name = section_name(script_name, label)
    found = [section for section in find_sections(text, str(doc)) if section.name == name]
    if not found:
        raise FiguresError(f"{doc} has no section <!-- figures: {name} -->: add it, and {CLOSE} after it, "
                           "where these figures belong")
    header, cells = _rows(rows)
    figures = Figures(date or datetime.date.today().isoformat(), machine or describe_machine(), f"`{command}`",
                      header, cells, list(notes))
    lines = text.split("\n")
    lines[found[0].start + 1:found[0].end] = render(figures)
    _replace_atomically(doc, "\n".join(lines))


def write_figures(targets, script_file: str | Path, rows, *, notes=(), machine: str | None = None) -> None:
    """What a script calls after its run: the same figures into each --write_docs target (None: nowhere)."""
    for doc, label in targets or ():
        write_section(doc, script_name(script_file), this_command(), rows, machine, label=label, notes=notes)


def _replace_atomically(path: Path, text: str) -> None:
    """Readers see the old page or the new one, never half of it (a temporary file renamed over it)."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(temporary, path.stat().st_mode & 0o777)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def check_target(doc_path, script: str, label: str | None) -> None:
    """Refuse a --write_docs target before the benchmark runs: the page and its section must be there."""
    doc = Path(doc_path)
    if not doc.is_file():
        raise FiguresError(f"--write_docs: no such page {doc}")
    name = section_name(script, label)
    if name not in {s.name for s in find_sections(doc.read_text(encoding="utf-8"), str(doc))}:
        raise FiguresError(f"--write_docs: {doc} has no section <!-- figures: {name} -->: add it, and {CLOSE} "
                           "after it, where these figures belong")


def add_write_docs_option(parser: argparse.ArgumentParser, script_file: str | Path, *sections: str) -> None:
    """--write_docs [DOC[#LABEL] ...]: write the figures into these sections after the run; with no value
    into the script's own `sections` (paths relative to the repository). args.write_docs is then a list of
    (path, label), None without the option. Each target is checked while the arguments are parsed, so a
    wrong one fails before a long benchmark, not after it."""
    script = script_name(script_file)

    class WriteDocs(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            targets = [_target(value, Path.cwd()) for value in values] or \
                [_target(value, ROOT) for value in sections]
            for doc, label in targets:
                try:
                    check_target(doc, script, label)
                except FiguresError as error:
                    parser.error(str(error))
            setattr(namespace, self.dest, targets)

    default = ", ".join(sections) or "none"
    parser.add_argument("--write_docs", nargs="*", action=WriteDocs, metavar="DOC[#LABEL]",
                        help=f"write the figures into these pages' sections for this script (default: {default})")


def _target(value: str, base: Path) -> tuple[Path, str | None]:
    path, _, label = value.partition("#")
    return base / path, label or None
