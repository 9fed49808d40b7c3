"""Atomic file publishing for every layer: build outputs in a temporary folder, then rename them into place."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path

from ldmflow.errors import LdmflowError

MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin")

# The most ldmflow reads of a file a user hands in, by kind: far above any real one (a manifest of a million
# images is about 200 MB), far below what a stream (a device, a pipe) could feed into memory.
MAX_MANIFEST_BYTES = 1 << 30
MAX_CONDITIONS_BYTES = 256 << 20
MAX_SPACE_BYTES = 1 << 20
_READ_BLOCK = 1 << 20


def temporary_folder(output_dir: str | Path, name: str) -> Path:
    """A fresh hidden folder inside output_dir (same filesystem, so the final rename is atomic)."""
    folder = Path(output_dir) / f".{name}.tmp"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def publish_folder(temporary: Path, target: Path) -> None:
    """Replace `target` by `temporary` so readers see the old or the new folder, never a half-written one."""
    previous = target.with_name(f".{target.name}.old")
    if previous.exists():
        shutil.rmtree(previous)
    if target.exists():
        target.rename(previous)
    temporary.rename(target)
    if previous.exists():
        shutil.rmtree(previous)


def publish_files(temporary: Path, target_dir: Path) -> None:
    """Move every entry of `temporary` into `target_dir` (each file replaced atomically), then drop it."""
    target_dir.mkdir(parents=True, exist_ok=True)
    for entry in sorted(temporary.iterdir()):
        if entry.is_dir():
            publish_folder(entry, target_dir / entry.name)
        else:
            os.replace(entry, target_dir / entry.name)
    temporary.rmdir()


def disk_problem(error: Exception, folder: Path) -> str:
    """What went wrong in words: a full disk is named as such (torch says 'iostream error', safetensors
    'StorageFull')."""
    folder = Path(folder)
    free = shutil.disk_usage(folder).free if folder.exists() else None
    text = str(error)
    if getattr(error, "errno", None) == errno.ENOSPC or "iostream" in text or "StorageFull" in text or free == 0:
        return f"the disk is full ({free // 2**20 if free is not None else '?'} MiB free)"
    return (text.splitlines() or [type(error).__name__])[0][:200]


def model_digest(folder: str | Path) -> str:
    """sha256 of a diffusers model folder's config and weights (top-level .json, .safetensors and .bin files):
    what identifies a VAE whatever path it is found at, and changes when the folder is trained over."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and path.suffix in MODEL_FILE_SUFFIXES:
            digest.update(path.name.encode() + b"\0")
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


LOCK_FILE = ".ldmflow.lock"


@contextlib.contextmanager
def folder_lock(folder: str | Path, holder: str):
    """Hold `folder`'s lock while writing into it, or fail at once naming who holds it (two trainings on one
    output folder would overwrite each other's checkpoints). The OS releases it if the process dies."""
    import fcntl

    path = Path(folder) / LOCK_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+")
    except OSError as error:  # read-only, a file in the way, no space
        raise LdmflowError(f"Cannot write to the output folder {folder}: {error.strerror or error}.") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        other = handle.read().strip() or "another process"
        handle.close()
        raise LdmflowError(f"{folder} is in use by {other}: wait for it to finish, or give another --output_dir.")
    handle.seek(0)
    handle.truncate()
    handle.write(f"{holder} (pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})")
    handle.flush()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held: the folder is left as it would be without ldmflow
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def write_private(path: Path, text: str) -> None:
    """A file only its owner may read (passwords, server state), created so: never readable for a moment."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)


CACHE_ENV = "LDMFLOW_CACHE"


def cache_root() -> Path:
    """Where ldmflow keeps what it can recompute (image-check indexes, latent caches): $LDMFLOW_CACHE, else
    $XDG_CACHE_HOME/ldmflow, else ~/.cache/ldmflow. On several nodes, point LDMFLOW_CACHE at a shared folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ldmflow"


def write_atomically(path: Path, data: bytes) -> None:
    """Write `path` through a temporary sibling (a unique name) and a rename: readers see the old file or the new
    one, and a killed writer leaves no half-written file behind."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_user_file(path: str | Path, what: str, limit: int) -> bytes:
    """The bytes of a file a user hands in (`what` names it in errors: "--space", "Manifest"), read with a bound:
    a regular file by its size, a pipe or process substitution (`<(jq ...)`) as a stream up to `limit` bytes, a
    device refused beyond it. Errors say what the path is in true words, and the limit."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if stat.S_ISREG(mode) and os.fstat(handle.fileno()).st_size > limit:
                raise _too_large(path, what, limit, mode)
            blocks, size = [], 0
            while size <= limit and (block := handle.read(min(_READ_BLOCK, limit + 1 - size))):
                blocks.append(block)
                size += len(block)
    except FileNotFoundError:
        raise LdmflowError(f"{what} {path} does not exist.") from None
    except IsADirectoryError:
        raise LdmflowError(f"{what} {path} is a folder; expected a file.") from None
    except OSError as error:
        raise LdmflowError(f"Cannot read {what} {path}: {error.strerror or error}.") from None
    if size > limit:
        raise _too_large(path, what, limit, mode)
    return b"".join(blocks)


def _too_large(path: Path, what: str, limit: int, mode: int) -> LdmflowError:
    kind = ("a file" if stat.S_ISREG(mode) else "a pipe" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a stream")
    return LdmflowError(f"{what} {path} is {kind} of more than {_size_text(limit)}, the most ldmflow reads for "
                        f"it; check that it is the file you meant.")


def _size_text(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:g} {unit}"
    return f"{size} bytes"
