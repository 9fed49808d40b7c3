"""The one exception type for bad user input, and the report of an error that is not one.

A user error (LdmflowError) is one `Error:` line and exit code 1. Anything else is a bug or an environment
problem nobody foresaw: it is still one line, but exit code 2 and with its full traceback kept in a file, so
the user sees one clear line and the report keeps everything needed to fix it.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

USER_ERROR_EXIT_CODE = 1
UNEXPECTED_EXIT_CODE = 2
_TRACEBACK_ATTRIBUTE = "ldmflow_traceback_file"  # set on the exception once its traceback is written


class LdmflowError(Exception):
    """A problem with the user's input or environment, explained in the message (no traceback needed)."""


class Stopped(Exception):
    """A run stopped on purpose (a sweep's pruned trial): not a failure, so no error tag or traceback file."""


def require_modules(modules: tuple[str, ...], needed_for: str, install: str) -> None:
    """Refuse, before anything starts, when an optional package `needed_for` something is not installed: one line
    naming what to install (else it ends later in a ModuleNotFoundError, or a server that exits at start)."""
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise LdmflowError(f"{needed_for} needs {', '.join(missing)}, which is not installed: {install}.")


def traceback_file(error: BaseException, folder: str | os.PathLike | None = None) -> Path | None:
    """The file holding `error`'s full traceback, written on the first call (in `folder` when it is an existing,
    writable folder, else the temporary folder); later calls (the run that logged it, then the CLI) reuse it.
    None only when nothing could be written."""
    written = getattr(error, _TRACEBACK_ATTRIBUTE, None)
    if written is not None:
        return written
    name = f"ldmflow-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    for place in (folder, tempfile.gettempdir()):
        if place is None or not Path(place).is_dir():
            continue
        try:
            path = Path(place, name).absolute()
            path.write_text(text, encoding="utf-8")
        except OSError:
            continue
        try:
            setattr(error, _TRACEBACK_ATTRIBUTE, path)
        except AttributeError:  # an exception type without a __dict__
            pass
        return path
    return None


def error_summary(error: BaseException, limit: int = 500) -> str:
    """`<Type>: <first line of the message>`, short enough for a tag or one line of output."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else repr(error)}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def missing_package_line(error: ModuleNotFoundError) -> str:
    """A package ldmflow needs that this Python cannot import: ldmflow started by another Python than the one it
    is installed in (a system `python` found on PATH)."""
    return (f"{sys.executable} cannot import {error.name or error}, which ldmflow needs: run ldmflow with the "
            "Python it is installed in (e.g. .venv/bin/ldmflow), or install ldmflow into this one.")


MAX_LISTED = 20  # what a one-line message lists of a longer list


def listing(items: list[str]) -> str:
    """Up to MAX_LISTED items for a one-line message, and how many there are when there are more."""
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f", ... ({len(items)} in all)" if len(items) > MAX_LISTED else "")


def cause_line(error: BaseException, limit: int = 300) -> str:
    """Why `error` happened, in one line: the OS's words (errno text and file) of the first OSError in its chain or
    quoted in its text (MLflow lists a download's failures after "...:"), else its whole message on one line."""
    link: BaseException | None = error
    while link is not None:
        if isinstance(link, OSError) and link.strerror:
            return link.strerror + (f": {link.filename}" if link.filename else "")
        link = link.__cause__ or link.__context__
    text = " ".join(str(error).split())
    found = re.search(r"\[Errno \d+\] [^'\"}]+(?:'[^']*')?", text)
    return found.group(0) if found else (text[:limit] or type(error).__name__)


def unexpected_error_line(error: BaseException, path: Path | None) -> str:
    """What the CLI prints (after `Error: `) for an error that is not an LdmflowError."""
    where = (f"full traceback in {path}" if path is not None
             else "no traceback file could be written; rerun with --verbose")
    return f"unexpected {error_summary(error)} ({where}; please report it)"
