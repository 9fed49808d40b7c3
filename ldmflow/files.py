"""Atomic file publishing for every layer: build outputs in a temporary folder, then rename them into place."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin")


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
