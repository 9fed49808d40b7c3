"""Imports only point down the layers written in docs/architecture.md and never go round in a circle (inside a
package too), that page names every module, and model kinds and tag names are spelt only in their home modules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from ldmflow import tags as tag_home
from ldmflow.models.kinds import KINDS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ldmflow"

# Bottom to top. A module may import its own component and any lower layer; components of one layer
# (training and tracking, workflows and server) do not import each other.
LAYERS = (
    ("ldmflow", "ldmflow.errors"),
    ("ldmflow.settings", "ldmflow.files", "ldmflow.progress", "ldmflow.tags", "ldmflow.lock"),
    ("ldmflow.environment",),
    ("ldmflow.data",),
    ("ldmflow.models",),
    ("ldmflow.sampling", "ldmflow.evaluation"),
    ("ldmflow.training", "ldmflow.tracking"),
    ("ldmflow.workflows", "ldmflow.server"),
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


def assert_no_problems(check, heading: str) -> None:
    """`check(path)` finds nothing in any module of the package."""
    problems = [problem for path in sorted(PACKAGE.rglob("*.py")) for problem in check(path)]
    assert not problems, heading + "\n" + "\n".join(problems)


def test_every_module_belongs_to_a_layer():
    for path in PACKAGE.rglob("*.py"):
        assert component(module_name(path)) in RANK


def test_imports_only_point_down():
    assert_no_problems(upward_imports, "Upward or sideways imports (see docs/architecture.md):")


def test_the_check_catches_upward_sideways_and_relative_imports():
    data_module = PACKAGE / "data" / "manifest.py"
    assert upward_imports(data_module, "def f():\n    from ldmflow.cli import cli\n")
    assert upward_imports(PACKAGE / "training" / "loop.py", "from ldmflow.tracking import registry\n")
    assert upward_imports(PACKAGE / "sampling" / "latent.py", "from ..workflows import sample\n")
    assert not upward_imports(PACKAGE / "workflows" / "train.py", "from ldmflow.training.loop import train\n")
    assert not upward_imports(data_module, "from ldmflow.settings import IMAGE_FORMATS\n")


def import_graph(sources: dict[Path, str] | None = None) -> dict[str, set[str]]:
    """module -> the ldmflow modules it imports (lazy ones too); `sources` replaces some files' text."""
    sources = sources or {}
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        source = sources.get(path, path.read_text())
        graph[module] = {target for _, target in imported_modules(source, module, path.name == "__init__.py")
                         if target != module}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each cycle as one path back to its start, one per group of modules that reach each other (Tarjan)."""
    order, low, stack, cycles = {}, {}, [], []

    def visit(module: str) -> None:
        order[module] = low[module] = len(order)
        stack.append(module)
        for target in sorted(graph[module] & graph.keys()):
            if target not in order:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], order[target])
        if low[module] == order[module]:
            group = stack[stack.index(module):]
            del stack[stack.index(module):]
            if len(group) > 1:
                cycles.append(_path_back(graph, set(group), module))

    for module in sorted(graph):
        if module not in order:
            visit(module)
    return cycles


def _path_back(graph: dict[str, set[str]], group: set[str], start: str) -> list[str]:
    """The shortest import path from `start` back to itself inside `group` (breadth first)."""
    paths = [[start]]
    while paths:
        path = paths.pop(0)
        for target in sorted(graph[path[-1]] & group):
            if target == start:
                return path + [start]
            if target not in path:
                paths.append(path + [target])
    return [start]


def test_no_import_cycles():
    cycles = import_cycles(import_graph())
    assert not cycles, "Import cycles (two modules that need each other share a third):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles)


def test_the_cycle_check_catches_a_cycle_inside_a_package():
    kinds = PACKAGE / "models" / "kinds.py"
    source = kinds.read_text() + "\ndef f():\n    from ldmflow.models import probe\n"
    cycles = import_cycles(import_graph({kinds: source}))  # probe.py imports kinds already
    assert ["ldmflow.models.kinds", "ldmflow.models.probe", "ldmflow.models.kinds"] in cycles


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


# A model kind and an MLflow tag name each have one home; everywhere else they are spelt through it.
KIND_HOME, TAG_HOME = "ldmflow/models/kinds.py", "ldmflow/tags.py"
KIND_NAMES = {kind.name for kind in KINDS}
TAG_NAMES = {value for name, value in vars(tag_home).items() if name.isupper()}
ALLOWED_KIND_LITERALS = {  # (module, literal): why that spelling stays there
    ("ldmflow/settings.py", "vae"): "settings.py is below models/: the pipeline's steps, named after what they train",
    ("ldmflow/settings.py", "latent_ddpm"): "the same",
    ("ldmflow/settings.py", "probe"): "a --feature_extractor choice (the probe's features)",
    ("ldmflow/workflows/evaluate.py", "probe"): "that --feature_extractor choice",
    ("ldmflow/tracking/lineage.py", "vae"): "the `vae` field of lineage() and list_models() rows (their --json)",
}
TAG_SETTERS = {"set_tag", "set_model_version_tag", "RunTag", "InputTag"}  # (..., name, value)
SPELT_FILTER = re.compile(r"\btags\.`?[\w.]")  # `tags.stage = ...` in a search filter, not `tags.{NAME}`


def _is_tags(node) -> bool:
    """`tags`, `run.data.tags`, `version.tags`: a dict of tags."""
    return getattr(node, "id", None) == "tags" or getattr(node, "attr", None) == "tags"


def _keys(node) -> list:
    return [key for key in node.keys if key is not None] if isinstance(node, ast.Dict) else []


def tag_name_places(tree) -> list:
    """The nodes where a tag's name goes: set_tag(..., name, value), set_tags({name: ...}), tags={name: ...},
    tags[name], tags.get(name), `tags = {name: ...}` and the dicts of a function named *_tag(s)."""
    places = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            called = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if called in TAG_SETTERS and len(node.args) >= 2:
                places.append(node.args[-2])
            if called == "set_tags" and node.args:
                places += _keys(node.args[0])
            if called == "get" and _is_tags(node.func.value) and node.args:
                places.append(node.args[0])
            places += [key for keyword in node.keywords if keyword.arg == "tags" for key in _keys(keyword.value)]
        elif isinstance(node, ast.Subscript) and _is_tags(node.value):
            places.append(node.slice)
        elif isinstance(node, ast.Assign) and any(_is_tags(target) for target in node.targets):
            places += _keys(node.value)
        elif isinstance(node, ast.FunctionDef) and node.name.endswith(("_tag", "_tags")):
            places += [key for inner in ast.walk(node) for key in _keys(inner)]
    return places


def _new_ldmflow_tag(text: str) -> bool:
    """`ldmflow.something` that is no ldmflow module: a tag name, even one tags.py does not have yet."""
    path = ROOT / text.replace(".", "/")
    return bool(re.fullmatch(r"ldmflow\.[\w.]+", text)) and not (path.exists() or path.with_suffix(".py").exists())


def _docstrings(tree) -> set[int]:
    bodies = [node.body for node in ast.walk(tree)
              if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return {id(body[0].value) for body in bodies
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)}


def spelt_elsewhere(path: Path, source: str | None = None) -> list[str]:
    """Kind names and tag names written as string literals outside their home module."""
    module = str(path.relative_to(ROOT))
    tree = ast.parse(path.read_text() if source is None else source)
    docstrings = _docstrings(tree)
    in_tag_place = {id(node) for node in tag_name_places(tree)}
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in docstrings:
            continue
        text, where = node.value, f"{module}:{node.lineno} {node.value!r}"
        if module != KIND_HOME and text in KIND_NAMES and (module, text) not in ALLOWED_KIND_LITERALS:
            problems.append(f"{where}: a model kind (use ldmflow.models.kinds)")
        if module == TAG_HOME:
            continue
        is_tag = text in TAG_NAMES and ("." in text or id(node) in in_tag_place)  # a dotted one is a tag anywhere
        if is_tag or _new_ldmflow_tag(text) or SPELT_FILTER.search(text):
            problems.append(f"{where}: a tag name (use ldmflow.tags)")
    return problems


def test_kind_and_tag_names_are_spelt_only_in_their_home():
    assert_no_problems(spelt_elsewhere, "Spell these through their home module:")


def test_the_spelling_check_catches_kind_and_tag_literals():
    lineage = PACKAGE / "tracking" / "lineage.py"
    assert spelt_elsewhere(lineage, 'if stage == "latent_ddpm":\n    pass\n')
    assert spelt_elsewhere(lineage, 'client.set_tag(run_id, "ldmflow.new_tag", "1")\n')
    assert spelt_elsewhere(lineage, 'digest = version.tags.get("dataset_digest")\n')
    assert spelt_elsewhere(lineage, 'tags = {"condition_spec": spec}\n')
    assert spelt_elsewhere(lineage, 'query = f"tags.vae_run_id = {run_id}"\n')
    assert not spelt_elsewhere(lineage, 'row = {"dataset_digest": tags.get(DATASET_DIGEST_TAG)}\n')
    assert not spelt_elsewhere(lineage, 'query = f"tags.`{STAGE_TAG}` = {filter_value(kind.name)}"\n')
    assert not spelt_elsewhere(lineage, 'logger = logging.getLogger("ldmflow.tracking.lineage")\n')
    assert not spelt_elsewhere(PACKAGE / "settings.py", 'steps = {"vae": {}}\n')
    assert spelt_elsewhere(PACKAGE / "settings.py", 'steps = {"legacy_ddpm": {}}\n')
