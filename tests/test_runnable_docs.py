"""The docs' commands, run: a code block in README.md or docs/*.md marked `<!-- runnable -->` (the line just
before its fence) runs here, the page's blocks in order, in a fresh folder as a user who typed them there:
a tiny demo dataset (16 images, 32 px) at data/, and an SQLite store of its own.

Options, comma separated (`<!-- runnable: tiny, slow -->`):
- `tiny`: each `ldmflow <command>` line gets tests/tiny.py's TINY_COMMANDS[command] appended; click keeps a
  flag's last value, so the page's real sizes are replaced and its trainings take seconds.
- `slow`: the block runs only in `make test-all`; the page's other blocks still run in `make test`.
- `writes FILE`: the block is not run but saved as FILE (a space or conditions file a later block reads).
- `needs PAGE`: PAGE's `make test` blocks run first in the same folder (the model this page samples from).

`ldmflow` lines run in-process (the CLI of tests/cli_runner.py: seconds, not a process start each); lines with
shell syntax and other programs run in bash, with this checkout's `ldmflow` and `python` first on the PATH. A
line that fails names its page and line, and shows its output. A page whose blocks train is marked `train`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

from fakes import tracked_folder
from cli_runner import invoke
from tiny import TINY_COMMANDS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!-- runnable(?:: (?P<options>[^>]*?))? -->$")
SHELL_SYNTAX = re.compile(r"[|&;<>$`*]")  # a line with any of these runs in bash
TRAINING = {"vae", "latent-ddpm", "legacy-ddpm", "train-legacy-ddpm", "probe", "evaluate", "sweep", "pipeline"}


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the block's first line
    body: str
    options: tuple[str, ...]

    def option(self, name: str) -> str | None:
        """The value of `name VALUE`, '' for a bare `name`, None when absent."""
        for option in self.options:
            key, _, value = option.partition(" ")
            if key == name:
                return value.strip()
        return None

    def commands(self) -> list[tuple[int, str]]:
        """(line number, command) per command line; continuations joined, comment and blank lines skipped."""
        commands, pending, start = [], "", 0
        for number, line in enumerate(self.body.split("\n"), self.line):
            start = start if pending else number
            if line.endswith("\\"):
                pending += line[:-1].strip() + " "
                continue
            command, pending = (pending + line.strip()).strip(), ""
            if command and not command.startswith("#"):
                commands.append((start, command))
        return commands


def runnable_blocks(path: Path) -> list[Block]:
    name = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    lines = path.read_text(encoding="utf-8").split("\n")
    blocks = []
    for index, line in enumerate(lines):
        marker = MARKER.match(line)
        if not marker:
            continue
        if index + 1 >= len(lines) or not lines[index + 1].startswith("```"):
            raise AssertionError(f"{name} line {index + 1}: <!-- runnable --> must come just before a ``` block")
        end = next(i for i in range(index + 2, len(lines)) if lines[i].startswith("```"))
        options = tuple(o.strip() for o in (marker["options"] or "").split(",") if o.strip())
        blocks.append(Block(name, index + 3, "\n".join(lines[index + 2:end]), options))
    return blocks


def _in_process(command: str) -> list[str] | None:
    """The arguments of an `ldmflow ...` line the CLI runs in-process; None for a line bash runs."""
    words = shlex.split(command, comments=True)
    return words[1:] if words[0] == "ldmflow" and not any(SHELL_SYNTAX.search(word) for word in words) else None


def run_command(command: str, tiny: bool) -> tuple[int, str]:
    """(exit code, output) of one line, in the current folder and environment."""
    arguments = _in_process(command)
    assert arguments is not None or not (tiny and re.search(r"\bldmflow\b", command)), \
        f"`{command}`: tiny flags are added only to plain `ldmflow` lines, not to shell lines"
    if arguments is None:
        environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=environment,
                                timeout=600)
        return result.returncode, result.stdout + result.stderr
    if tiny and arguments:
        arguments += TINY_COMMANDS.get(arguments[0], [])
    result = invoke(*arguments, ok=False)
    crash = "" if result.exc_info is None or result.exc_info[0] is SystemExit else \
        "".join(traceback.format_exception(*result.exc_info))
    return result.exit_code, result.output + crash


def run_blocks(blocks: list[Block]) -> None:
    """Each block in order: written to its file or run line by line; the first failing line fails the test."""
    for block in blocks:
        target = block.option("writes")
        if target:
            Path(target).write_text(block.body + "\n", encoding="utf-8")
            continue
        for line, command in block.commands():
            assert "..." not in command.split(), f"{block.page} line {line}: a runnable command cannot hold `...`"
            code, output = run_command(command, tiny=block.option("tiny") is not None)
            if code != 0:
                pytest.fail(f"{block.page} line {line}: `{command}` exited {code}:\n{output[-4000:]}", pytrace=False)


def _trains(blocks: list[Block]) -> bool:
    return any((arguments := _in_process(command)) and arguments[0] in TRAINING
               for block in blocks if block.option("writes") is None for _, command in block.commands())


def _plan(slow: bool) -> list:
    """One test per page with runnable blocks: its `make test` blocks, or (slow) all of them when it has
    slow ones; `needs` pages' `make test` blocks first."""
    plans = []
    for path in PAGES:
        blocks = runnable_blocks(path)
        if slow and all(block.option("slow") is None for block in blocks):
            continue
        chosen = blocks if slow else [block for block in blocks if block.option("slow") is None]
        if not chosen:
            continue
        needs = {block.option("needs") for block in blocks} - {None}
        first = [block for page in sorted(needs) for block in runnable_blocks(ROOT / page)
                 if block.option("slow") is None]
        marks = ([pytest.mark.slow] if slow else []) + ([pytest.mark.train] if _trains(first + chosen) else [])
        plans.append(pytest.param(first + chosen, id=path.name, marks=marks))
    return plans


@pytest.fixture
def workspace(tmp_path, demo_manifest):
    """A fresh folder with the demo data at data/ and its own store, as the current folder; benchmarks/ is
    there too, as in the repository's folder, where the docs' commands are typed."""
    shutil.copytree(demo_manifest.parent, tmp_path / "data")
    (tmp_path / "benchmarks").symlink_to(ROOT / "benchmarks")
    with tracked_folder(tmp_path):
        yield tmp_path


@pytest.mark.parametrize("blocks", _plan(slow=False))
def test_runnable_blocks_run(blocks, workspace):
    run_blocks(blocks)


@pytest.mark.parametrize("blocks", _plan(slow=True))
def test_runnable_blocks_run_with_the_slow_ones(blocks, workspace):
    run_blocks(blocks)


def test_a_wrong_flag_in_a_runnable_block_fails_naming_its_line(tmp_path, workspace):
    page = tmp_path / "page.md"
    page.write_text("Check it:\n\n<!-- runnable -->\n```bash\nldmflow check-manifest \\\n"
                    "    --manifest_path data/manifest.json --no_such_flag\n```\n", encoding="utf-8")
    with pytest.raises(pytest.fail.Exception, match=r"(?s)page.md line 5: `ldmflow check-manifest .*` exited 2:"
                                                    r".*No such option '--no_such_flag'"):
        run_blocks(runnable_blocks(page))


def test_every_marker_stands_before_a_code_block_with_known_options():
    known = {"tiny", "slow", "writes", "needs"}
    for path in PAGES:
        for block in runnable_blocks(path):
            assert {option.split(" ")[0] for option in block.options} <= known, (block.page, block.options)
            needs = block.option("needs")
            assert needs is None or (ROOT / needs).is_file(), f"{block.page}: needs {needs}: no such page"

