"""Docs that cannot drift: every command, flag, entry point, `-P` parameter, metric and tag that README.md and
docs/*.md name must exist in the code. Nothing here trains; the whole file runs in a few seconds.

- Commands: each `ldmflow <command> ...` and `mlflow run . -e <entry point> ...` in a code block or an inline
  code span. The command must exist, each `--flag` must be one of its options (aliases and `--no_...`
  included), each `-P name=` must reach one of its options, and a command written out with flags and no
  `...` must give every required option; `ldmflow sample --condition` must give every condition of the
  default spec.
- Flags named alone in prose (`--disc_start`) must belong to some ldmflow command, a benchmark script, or a
  tool listed in OTHER_TOOLS_FLAGS.
- Metrics: every `val/...` and `eval/...` name must be one the code can log, for the default condition spec
  (`<name>` stands for any condition, `(_pct)` for an optional suffix, a trailing `...` for any name).
- Tags: every `ldmflow.<name>` that is not a module of the package must be a tag of ldmflow/tags.py.
- Python: every `from ldmflow... import name` in a code block must import.
- docs/options.md is what `python -m ldmflow.projects --options` renders from the settings.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import click
import numpy as np
import pytest

from ldmflow import tags
from ldmflow.cli import cli
from ldmflow.data.conditions import ConditionSpec
from ldmflow.evaluation.adherence import adherence_metric_names, only_prefix, spread_ratios
from ldmflow.evaluation.intervals import CI_SUFFIX
from ldmflow.evaluation.report import COLUMNS
from ldmflow.projects import ENTRY_POINTS, render_options
from ldmflow.settings import DEFAULT_CONDITION_SPEC

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Flags of other tools the docs show next to ldmflow's: mlflow, accelerate, pip, SLURM.
OTHER_TOOLS_FLAGS = {"--env-manager", "--experiment-name", "--run-name", "--backend-store-uri", "--port", "--host",
                     "--serve-artifacts", "--artifacts-destination", "--app-name", "--multi_gpu", "--num_processes",
                     "--cpu", "--index-url", "--signal", "--machine_rank", "--num_machines", "--main_process_ip",
                     "--main_process_port", "--config_file", "--rdzv_backend", "--same_network", "--nnodes",
                     "--nproc_per_node", "--ntasks-per-node", "--gres", "--nodes", "--gpus-per-node",
                     "--cpus-per-task", "--time", "--rdzv_endpoint", "--rdzv_id", "--requeue"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")
END_OF_COMMAND = {"|", "&&", ";", "||", ">", "2>&1"}


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block."""
    return [(match.group(1), match.group(2)) for match in FENCE.finditer(text)]


def _shell_lines(text: str) -> list[str]:
    """Shell lines of code blocks (continuations joined) and inline code spans outside code blocks."""
    lines = []
    for language, body in _blocks(text):
        if language in ("bash", "sh", "shell", "console"):
            lines += body.replace("\\\n", " ").splitlines()
    lines += [span.replace("\n", " ") for span in INLINE.findall(FENCE.sub("", text))]
    return lines


def _options(command: click.Command) -> set[str]:
    return {opt for param in command.params if isinstance(param, click.Option)
            for opt in (*param.opts, *param.secondary_opts)}


def _commands(line: str, program: str) -> list[list[str]]:
    """The tokens after each `<program>` (or `.../<program>`) word, up to the end of that command."""
    try:  # quotes keep `-P stage_options="--manifest_path ..."` one token
        words = shlex.split(line, comments=False)
    except ValueError:
        words = line.split()
    tokens = [token.strip("[]") for token in words]
    found = []
    for index, token in enumerate(tokens):
        if token == program or token.endswith(f"/{program}"):
            rest = []
            for following in tokens[index + 1:]:
                if following in END_OF_COMMAND or following.startswith("#"):
                    break
                rest.append(following)
            found.append(rest)
    return found


def _is_placeholder(token: str) -> bool:
    return not token or token.startswith(("<", "$", "-")) or token in ("...", "…")


def _flag(token: str) -> str | None:
    """`--name` of a `--name`, `--name=value` or `[--name` token; None for anything else."""
    match = re.match(r"^(--[A-Za-z0-9][\w-]*)", token)
    return match.group(1) if match else None


def ldmflow_problems(text: str) -> list[str]:
    """What an `ldmflow ...` command in `text` gets wrong: unknown command or flag, a missing required option."""
    problems = []
    for line in _shell_lines(text):
        for tokens in _commands(line, "ldmflow"):
            if not tokens or _is_placeholder(tokens[0]) or "=" in tokens[0] or tokens[0].startswith(("models:", "runs:")):
                continue
            name = tokens[0]
            if name not in cli.commands:
                problems.append(f"`ldmflow {name}`: no such command ({line.strip()})")
                continue
            command = cli.commands[name]
            if isinstance(command, click.Group) and len(tokens) > 1 and tokens[1] in command.commands:
                command, name, tokens = command.commands[tokens[1]], f"{name} {tokens[1]}", tokens[1:]  # a subcommand
            options = _options(command) | {"--help", "-h"} | _swept_stage_options(name, tokens)
            given = {_flag(token) for token in tokens[1:]} - {None}
            problems += [f"`ldmflow {name} {flag}`: no such option ({line.strip()})" for flag in sorted(given - options)]
            problems += _condition_problems(name, tokens, line)
            if given and "..." not in tokens and "--help" not in given:  # a command as one would type it
                for param in command.params:
                    if isinstance(param, click.Option) and param.required and not set(param.opts) & given:
                        problems.append(f"`ldmflow {name}` lacks its required {param.opts[0]} ({line.strip()})")
    return problems


def _swept_stage_options(name: str, tokens: list[str]) -> set[str]:
    """`ldmflow sweep --stage vae ... --resolution 64`: the stage's own options follow the sweep's."""
    if name != "sweep" or "--stage" not in tokens[:-1]:
        return set()
    stage = cli.commands.get(tokens[tokens.index("--stage") + 1])
    return _options(stage) if stage else set()


def _condition_problems(name: str, tokens: list[str], line: str) -> list[str]:
    """`ldmflow sample --condition ...` must name conditions of the default spec: the docs' models use it. A
    partial request (some of them) is for a model trained with --cond_dropout_per_condition, which the docs'
    `-partial` models are; the others need every condition (or none)."""
    given = {tokens[i + 1].split("=")[0] for i, token in enumerate(tokens[:-1]) if token == "--condition"}
    expected = set(_condition_names())
    partial = any(token.startswith("models:/") and "-partial/" in token for token in tokens)
    if name != "sample" or not given or given == expected or (partial and given < expected) or "..." in tokens:
        return []
    return [f"`ldmflow sample`: --condition gives {sorted(given)}, the model needs {sorted(expected)} ({line.strip()})"]


def mlflow_run_problems(text: str) -> list[str]:
    """What an `mlflow run . -e <entry point> -P name=value` in `text` gets wrong."""
    problems = []
    for line in _shell_lines(text):
        for tokens in _commands(line, "mlflow"):
            if not tokens or tokens[0] != "run" or "-e" not in tokens:
                continue
            entry_point = tokens[tokens.index("-e") + 1]
            if _is_placeholder(entry_point):
                continue
            if entry_point not in ENTRY_POINTS:
                problems.append(f"`mlflow run -e {entry_point}`: no such entry point ({line.strip()})")
                continue
            command = cli.commands[ENTRY_POINTS[entry_point][0]]
            names = {tokens[i + 1].split("=")[0] for i, token in enumerate(tokens[:-1]) if token == "-P"}
            names.discard("name")  # `-P name=value`, the syntax itself
            problems += [f"`mlflow run -e {entry_point} -P {name}=`: `ldmflow {command.name}` has no --{name} "
                         f"({line.strip()})" for name in sorted(names) if f"--{name}" not in _options(command)]
            flags = {_flag(token) for token in tokens} - {None}
            problems += [f"`mlflow run {flag}`: not an option of mlflow run ({line.strip()})"
                         for flag in sorted(flags - OTHER_TOOLS_FLAGS)]
    return problems


def _benchmark_flags() -> set[str]:
    return {flag for script in (ROOT / "benchmarks").glob("*.py")
            for flag in re.findall(r"[\"'](--[\w-]+)[\"']", _read(script))}


def prose_flag_problems(text: str, known: set[str]) -> list[str]:
    """Flags in inline code spans (`--name`, `--name value`) that nothing the docs talk about takes."""
    spans = INLINE.findall(FENCE.sub("", text))
    flags = {_flag(span) for span in spans if span.startswith("--")} - {None, "--name"}  # `--name value`: syntax
    return [f"`{flag}`: no ldmflow command, benchmark or listed tool takes it" for flag in sorted(flags - known)]


def _condition_names() -> list[str]:
    return [name for name, _ in ConditionSpec.parse(DEFAULT_CONDITION_SPEC).items]


def loggable_metrics() -> set[str]:
    """Every `val/...` and `eval/...` name the code can log for the default condition spec.

    Literal names come from the source (string constants); names built per condition come from the functions
    the code builds them with (adherence_metric_names, the report's column prefixes, the interval suffix).
    """
    constants = _string_constants()
    adherence = set(adherence_metric_names(ConditionSpec.parse(DEFAULT_CONDITION_SPEC)))
    val = {c for c in constants if re.fullmatch(r"val/[a-z_]+", c)}
    val |= {f"val/{name}" for name in adherence} | {f"val/recon/{name}" for name in adherence}
    evaluation = _string_constants(ROOT / "ldmflow" / "evaluation", ROOT / "ldmflow" / "workflows" / "evaluate.py")
    scores = {c for c in evaluation if re.fullmatch(r"[a-z][a-z0-9_]*", c) and c.startswith(
        ("fid", "kid", "psnr", "ssim", "lpips", "diversity"))}
    scores |= {f"r{name}" for name in scores if name.startswith(("fid", "kid"))}
    eval_names = {f"eval/{prefix}{name}" for prefix in COLUMNS for name in adherence}
    first, *others = _condition_names()  # requests giving the first condition alone (evaluate's "<name> only")
    eval_names |= {f"eval/{only_prefix(first)}{name}" for name in adherence}
    eval_names |= {f"eval/{only_prefix(first)}{name}" for name in spread_ratios(
        ConditionSpec.parse(DEFAULT_CONDITION_SPEC), np.ones((2, 5)), np.arange(10.0).reshape(2, 5), tuple(others))}
    eval_names |= {f"eval/{name}" for name in scores}
    eval_names |= {f"{name}{CI_SUFFIX}" for name in eval_names}
    return val | eval_names


def _string_constants(*paths: Path) -> set[str]:
    import ast

    files = [f for p in (paths or (ROOT / "ldmflow",)) for f in ([p] if p.is_file() else p.rglob("*.py"))]
    return {node.value for f in files for node in ast.walk(ast.parse(_read(f)))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def _expansions(name: str) -> list[str]:
    """`val/<name>_mae(_pct)` -> every concrete spelling; `<metric>` stands for any name."""
    names = [name]
    if "(_pct)" in name:
        names = [n.replace("(_pct)", suffix) for n in names for suffix in ("", "_pct")]
    if "<name>" in name:
        names = [n.replace("<name>", condition) for n in names for condition in _condition_names()]
    return names


def metric_problems(text: str, known: set[str]) -> list[str]:
    problems = []
    for span in INLINE.findall(FENCE.sub("", text)) + [body for _, body in _blocks(text)]:
        for name in re.findall(r"(?<![\w/.])((?:e?val)/[\w<>()./]*)", span):
            while name.endswith(")") and name.count(")") > name.count("("):
                name = name[:-1]
            if not name.endswith("..."):
                name = name.rstrip(".,")
            if name.endswith(("...", "/")):
                prefix = name.removesuffix("...")
                if not any(k.startswith(prefix) for k in known):
                    problems.append(f"`{name}`: no metric starts with {prefix}")
            elif "<metric>" in name:
                suffix = name.split("<metric>")[1]
                if not any(k.endswith(suffix) for k in known):
                    problems.append(f"`{name}`: no metric ends with {suffix}")
            elif not any(n in known for n in _expansions(name)):
                problems.append(f"`{name}`: no code logs this metric")
    return problems


def tag_problems(text: str) -> list[str]:
    """`ldmflow.<name>` that is neither a module of the package nor a tag of ldmflow/tags.py."""
    tag_names = {value for value in vars(tags).values() if isinstance(value, str)}
    problems = []
    for name in set(re.findall(r"(?<![\w/.-])ldmflow\.[a-z_]+(?:\.[a-z_]+)*", text)):
        top = name.split(".")[1]
        if importlib.util.find_spec(f"ldmflow.{top}") is not None:
            continue  # a module path (ldmflow.sampling.latent...), checked by the import test
        prefixes = (tags.PIPELINE_TAG_PREFIX, tags.ENV_TAG_PREFIX)
        if name.startswith(prefixes) or name + "." in prefixes or name in tag_names:
            continue
        problems.append(f"`{name}`: not a tag in ldmflow/tags.py")
    return problems


def import_problems(text: str) -> list[str]:
    problems = []
    for language, body in _blocks(text):
        if language != "python":
            continue
        for module, names in re.findall(r"^\s*from (ldmflow[\w.]*) import ([\w, ]+)", body, re.M):
            try:
                loaded = importlib.import_module(module)
            except ImportError as error:
                problems.append(f"`from {module} import ...`: {error}")
                continue
            problems += [f"`from {module} import {name}`: no such name" for name in
                         (n.strip() for n in names.split(",")) if not hasattr(loaded, name)]
    return problems


@pytest.fixture(scope="module")
def known_flags() -> set[str]:
    commands = [cli, *cli.commands.values()]  # cli: the group's own options (--verbose)
    commands += [sub for command in commands[1:] if isinstance(command, click.Group) for sub in command.commands.values()]
    return {flag for command in commands for flag in _options(command)} | _benchmark_flags() | OTHER_TOOLS_FLAGS | \
        {"--help"}


@pytest.fixture(scope="module")
def known_metrics() -> set[str]:
    return loggable_metrics()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_ldmflow_commands_and_flags_exist(doc):
    assert ldmflow_problems(_read(doc)) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_mlflow_entry_points_and_parameters_exist(doc):
    assert mlflow_run_problems(_read(doc)) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_flags_named_in_prose_exist(doc, known_flags):
    assert prose_flag_problems(_read(doc), known_flags) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_metrics_named_exist(doc, known_metrics):
    assert metric_problems(_read(doc), known_metrics) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_tags_named_exist(doc):
    assert tag_problems(_read(doc)) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_python_imports_resolve(doc):
    assert import_problems(_read(doc)) == []


def test_the_checks_catch_wrong_names(known_flags, known_metrics):
    """Each check fails on a planted mistake, so an empty problem list means something."""
    assert ldmflow_problems("```bash\nldmflow vae --manifest_path m.json --output_dir o --no_such_flag 1\n```\n")
    assert ldmflow_problems("`ldmflow probe --manifest_path data/manifest.json`")  # --output_dir is required
    assert ldmflow_problems("```bash\nldmflow no-such-command --help\n```\n")
    assert ldmflow_problems("`ldmflow sample --model_uri m --condition temperature=1 --condition wind=1,0,0`")
    assert not ldmflow_problems("```bash\nldmflow vae ... --resolution 64 \\\n    --no_allow_tf32\n```\n")
    assert mlflow_run_problems("```bash\nmlflow run . -e vae --env-manager local -P no_such_param=1\n```\n")
    assert mlflow_run_problems("```bash\nmlflow run . -e no_such_entry --env-manager local\n```\n")
    assert prose_flag_problems("the `--no_such_flag` option", known_flags)
    assert metric_problems("`val/no_such_metric`", known_metrics)
    assert metric_problems("`eval/<name>_no_such_mae`", known_metrics)
    assert not metric_problems("`eval/<name>_length_mae(_pct)` and `val/recon/...`", known_metrics)
    assert tag_problems("`ldmflow.no_such_tag`")
    assert not tag_problems("`ldmflow.sampling.latent.LatentSampler` and `ldmflow.stage`")
    assert import_problems("```python\nfrom ldmflow.tracking.run_tracker import no_such_name\n```\n")


def test_options_page_is_generated_from_the_settings():
    assert (ROOT / "docs" / "options.md").read_text(encoding="utf-8") == render_options(), \
        "docs/options.md is out of date: run `make options`"


def test_the_sweeps_postgresql_block_is_what_the_team_server_prints():
    """docs/sweeps.md's storage on the team server: the URL `ldmflow server` prints, the password file it writes."""
    from ldmflow.server.postgres import PASSWORD_FILE, sweep_storage_uri
    from ldmflow.settings import ServerSettings

    block = next(body for _, body in _blocks(_read(ROOT / "docs" / "sweeps.md")) if "PGPASSFILE" in body)
    assert f"export PGPASSFILE=$PWD/{ServerSettings.root}/{PASSWORD_FILE}" in block
    assert f"--storage {sweep_storage_uri('<pg port>')} " in block
    assert ":" not in sweep_storage_uri("<pg port>").split("@")[0].split("//")[1]  # no password in the URL


def test_the_readme_chain_takes_each_model_by_its_alias():
    """README's own-data chain: the probe first, then each step takes the model just trained by its alias, never
    a version number (after `make demo`, version 1 is the demo's model)."""
    readme = _read(ROOT / "README.md")
    chain = next(body for _, body in _blocks(readme.split("## Using it on your data")[1]))
    assert chain.index("ldmflow probe") < chain.index("ldmflow vae") < chain.index("ldmflow latent-ddpm")
    assert chain.count("--register_alias candidate") == 2
    assert not re.search(r"models:/[\w-]+/\d", chain), "a version number in the chain"
    assert "models:/ldmflow-vae@candidate" in chain and "models:/ldmflow-latent-ddpm@candidate" in chain


LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.+)$", re.M)
PLAIN_PAGE = re.compile(r"(?<![\w/\[`.-])(?:docs/)?[a-z][a-z-]*\.md\b")
GENERATED = {"options.md"}  # from the settings' help texts, which --help shows in a terminal


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _prose(text: str) -> str:
    """The page without its code blocks, inline code and links' targets."""
    text = FENCE.sub("", text)
    return LINK.sub("]", re.sub(r"`[^`\n]*`", "", text))


def link_problems(doc: Path) -> list[str]:
    """Links to a page or heading that does not exist; pages named in plain text instead of linked."""
    text, problems = _read(doc), []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        page = (doc.parent / path).resolve() if path else doc
        if not page.exists():
            problems.append(f"{target}: no such file")
        elif anchor and page.suffix == ".md" and anchor not in {_slug(h) for h in HEADING.findall(
                FENCE.sub("", _read(page)))}:
            problems.append(f"{target}: no such heading")
    if doc.name not in GENERATED:
        problems += [f"{name}: named in plain text, not linked" for name in PLAIN_PAGE.findall(_prose(text))]
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_point_to_pages_and_headings_that_exist(doc):
    assert link_problems(doc) == []


def test_the_link_check_catches_broken_and_plain_references(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n## A heading: `--flag` too\n\n[ok](#a-heading---flag-too) [self](page.md#top)\n")
    assert link_problems(page) == []
    page.write_text("# Top\n\n[gone](other.md) [nowhere](#nowhere) and see docs/training.md or mlflow.md.\n")
    assert link_problems(page) == ["other.md: no such file", "#nowhere: no such heading",
                                   "docs/training.md: named in plain text, not linked",
                                   "mlflow.md: named in plain text, not linked"]
