"""requirements.lock: the exact versions every install path uses (`make install`, CI, conda.yaml).

`make lock` resolves pyproject.toml's dependencies (and the locked extras) in a fresh virtual environment and
writes them here; `make install` installs exactly this file. The checks below keep the lock, pyproject.toml
and an installed environment honest with each other, each problem said in one line.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ldmflow.errors import LdmflowError

ROOT = Path(__file__).resolve().parents[1]
LOCK_FILE = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"
CONDA_FILE = ROOT / "conda.yaml"
# The extras `make install` installs and the lock holds. Not locked: `eval` and `xformers`, whose torchvision /
# xformers wheels are built against one torch build each, which the user picks (TORCH_SPEC).
LOCKED_EXTRAS = ("dev", "server", "sweep", "gpu")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)\s*$")


@dataclass(frozen=True)
class Lock:
    versions: dict[str, str]  # normalised name -> exact version
    python: str  # the Python version it was resolved for, "3.11"
    digest: str  # sha256 of the file's bytes: what runs and registered versions record

    @property
    def short_digest(self) -> str:
        return self.digest[:12]


def normalise(name: str) -> str:
    """PEP 503: `Pillow`, `pillow` and `PILLOW` are one project; `_` and `.` read as `-`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path | None = None) -> Lock:
    """The lock's pins; a line that is no `name==version` pin is refused with its line number."""
    path = path or LOCK_FILE
    try:
        data = path.read_bytes()
    except OSError as error:
        raise LdmflowError(f"Cannot read the lock file {path}: {error.strerror or error}. "
                           "Run `make lock` in a checkout of ldmflow to write it.") from None
    versions, python = {}, ""
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        found = re.match(r"#\s*python:\s*(\S+)", line)
        if found:
            python = found.group(1)
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        pin = _PIN.match(text)
        if pin is None:
            raise LdmflowError(f"{path}:{number} is not an exact `name==version` pin: {text[:120]!r}. "
                               "Run `make lock` to write the lock again.")
        versions[normalise(pin.group(1))] = pin.group(2)
    return Lock(versions, python, hashlib.sha256(data).hexdigest())


def render_lock(frozen: str, python: str) -> str:
    """The lock file from `pip freeze` output: sorted, local build labels dropped (`torch==2.13.0+cpu` is
    `torch==2.13.0`, so a CUDA build installed first by TORCH_SPEC satisfies it too), ldmflow itself left out."""
    pins = {}
    for line in frozen.splitlines():
        pin = _PIN.match(line.strip())
        if pin and normalise(pin.group(1)) != "ldmflow":
            pins[normalise(pin.group(1))] = pin.group(2).split("+", 1)[0]
    header = ("# ldmflow's locked environment: written by `make lock` from pyproject.toml's dependencies and the\n"
              f"# extras {', '.join(LOCKED_EXTRAS)}; `make install`, CI and conda.yaml install exactly these. "
              "Do not edit.\n"
              f"# python: {python}\n")
    return header + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def project_requirements(pyproject: Path | None = None) -> list:
    """pyproject.toml's dependencies and those of the locked extras, as packaging Requirements."""
    pyproject = pyproject or PYPROJECT
    from packaging.requirements import Requirement

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    texts = list(project["dependencies"])
    for extra in LOCKED_EXTRAS:
        texts += project.get("optional-dependencies", {}).get(extra, [])
    return [Requirement(text) for text in texts]


def lock_mismatches(lock: Lock, requirements: list) -> list[str]:
    """What pyproject asks for that the lock does not satisfy: a missing package or a version out of range."""
    problems = []
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        locked = lock.versions.get(normalise(requirement.name))
        if locked is None:
            problems.append(f"{requirement.name} is not in the lock")
        elif not requirement.specifier.contains(locked, prereleases=True):
            problems.append(f"{requirement.name} {locked} is outside {requirement.specifier}")
    return problems


def installed_mismatches(lock: Lock) -> list[str]:
    """Locked packages this environment has in another version or lacks (`numpy 2.3.1, locked 2.4.6`)."""
    from importlib import metadata

    installed = {}
    for distribution in metadata.distributions():
        name = distribution.metadata["Name"]
        if name:
            installed.setdefault(normalise(name), distribution.version)
    problems = []
    for name, version in sorted(lock.versions.items()):
        have = installed.get(name)
        if have is None:
            problems.append(f"{name} missing, locked {version}")
        elif have.split("+", 1)[0] != version:
            problems.append(f"{name} {have}, locked {version}")
    return problems


def render_conda(lock: Lock) -> str:
    """conda.yaml for `mlflow run` with conda: the lock's Python and every pin, torch first."""
    order = sorted(lock.versions, key=lambda name: (name != "torch", name))
    pins = "".join(f"      - {name}=={lock.versions[name]}\n" for name in order)
    return ("# Environment for `mlflow run .` with conda (the default env manager). Written by `make lock` from\n"
            "# requirements.lock (do not edit): the same exact versions as `make install`.\n"
            "name: ldmflow\nchannels:\n  - conda-forge\ndependencies:\n"
            f"  - python={lock.python or '3.11'}\n  - pip\n  - pip:\n{pins}")


def check(lock_path: Path | None = None, pyproject: Path | None = None) -> Lock:
    """The lock, after checking it satisfies pyproject.toml: else one line naming each disagreement."""
    lock_path, pyproject = lock_path or LOCK_FILE, pyproject or PYPROJECT
    lock = read_lock(lock_path)
    problems = lock_mismatches(lock, project_requirements(pyproject))
    if problems:
        raise LdmflowError(f"{lock_path.name} does not match {pyproject.name}: {'; '.join(problems)}. "
                           "Run `make lock` to resolve it again.")
    return lock


def main(argv: list[str]) -> int:
    """`python -m ldmflow.lock check | installed | write PYTHON | conda` (the Makefile's lock targets)."""
    try:
        command = argv[0] if argv else "check"
        if command == "check":
            check()
        elif command == "installed":
            problems = installed_mismatches(check())
            if problems:
                raise LdmflowError(f"This environment differs from {LOCK_FILE.name}: {'; '.join(problems)}. "
                                   "Run `make install` again.")
        elif command == "write":  # pip freeze on stdin
            LOCK_FILE.write_text(render_lock(sys.stdin.read(), argv[1]), encoding="utf-8")
            CONDA_FILE.write_text(render_conda(check()), encoding="utf-8")
        elif command == "conda":
            sys.stdout.write(render_conda(read_lock()))
        else:
            raise LdmflowError(f"Unknown command {command!r}: use check, installed, write PYTHON or conda.")
    except LdmflowError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
