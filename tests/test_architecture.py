"""Imports only point down the layers written in docs/architecture.md, and that page names every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ldmflow"

# Bottom to top. A module may import its own component and any lower layer; components of one layer
# (training and tracking) do not import each other.
LAYERS = (
    ("ldmflow", "ldmflow.errors"),
    ("ldmflow.settings", "ldmflow.files", "ldmflow.progress", "ldmflow.tags"),
    ("ldmflow.data",),
    ("ldmflow.models",),
    ("ldmflow.sampling", "ldmflow.evaluation"),
    ("ldmflow.training", "ldmflow.tracking"),
    ("ldmflow.workflows",),
    ("ldmflow.cli",),
    ("ldmflow.projects", "ldmflow.__main__"),
)
RANK = {component: rank for rank, layer in enumerate(LAYERS) for component in layer}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def component(module: str) -> str:
    """The longest LAYERS entry that is `module` or a package above it."""
    matches = [name for name in RANK if module == name or module.startswith(name + ".")]
    return max(matches, key=len)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, ldmflow module) for every import in the source, lazy ones inside functions included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from ldmflow.tracking import pyfunc_models` imports a module
                candidate = f"{base}.{alias.name}"
                as_path = ROOT / Path(*candidate.split("."))
                is_module = as_path.with_suffix(".py").is_file() or (as_path / "__init__.py").is_file()
                found.append((node.lineno, candidate if is_module else base))
    return [(line, name) for line, name in found if name == "ldmflow" or name.startswith("ldmflow.")]


def upward_imports(path: Path, source: str | None = None) -> list[str]:
    module = module_name(path)
    mine = component(module)
    source = path.read_text() if source is None else source
    problems = []
    for line, target in imported_modules(source, module, path.name == "__init__.py"):
        theirs = component(target)
        if theirs != mine and RANK[theirs] >= RANK[mine]:
            problems.append(f"{path.relative_to(ROOT)}:{line} ({mine}, layer {RANK[mine]}) imports {target} "
                            f"({theirs}, layer {RANK[theirs]})")
    return problems


def test_every_module_belongs_to_a_layer():
    for path in PACKAGE.rglob("*.py"):
        assert component(module_name(path)) in RANK


def test_imports_only_point_down():
    problems = [problem for path in sorted(PACKAGE.rglob("*.py")) for problem in upward_imports(path)]
    assert not problems, "Upward or sideways imports (see docs/architecture.md):\n" + "\n".join(problems)


def test_the_check_catches_upward_sideways_and_relative_imports():
    data_module = PACKAGE / "data" / "manifest.py"
    assert upward_imports(data_module, "def f():\n    from ldmflow.cli import cli\n")
    assert upward_imports(PACKAGE / "training" / "loop.py", "from ldmflow.tracking import registry\n")
    assert upward_imports(PACKAGE / "sampling" / "latent.py", "from ..workflows import sample\n")
    assert not upward_imports(PACKAGE / "workflows" / "train.py", "from ldmflow.training.loop import train\n")
    assert not upward_imports(data_module, "from ldmflow.settings import IMAGE_FORMATS\n")


def test_the_architecture_page_names_every_module_and_no_other():
    page = (ROOT / "docs" / "architecture.md").read_text()
    tree = page.split("```")[1]  # the layout block
    listed, folder = set(), ""
    for line in tree.splitlines():
        entry = line.strip().split("  ")[0]
        if entry.endswith("/"):
            folder = entry if line.startswith("  ") and not line.startswith("    ") else folder
            continue
        for name in re.findall(r"[\w]+\.py", entry):
            listed.add(f"ldmflow/{name}" if line.startswith("  ") and not line.startswith("    ")
                       else f"ldmflow/{folder}{name}")
    actual = {str(path.relative_to(ROOT)) for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"}
    assert listed == actual, f"missing from the page: {sorted(actual - listed)}; stale: {sorted(listed - actual)}"
