"""Crash-safe checkpoints: written under a temporary name and renamed, pruned to a limit, found for resume."""

from __future__ import annotations

import errno
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator

from ldmflow.errors import LdmflowError

logger = logging.getLogger(__name__)
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
BEST_CHECKPOINT = "checkpoint-best"  # the best validated state; never pruned, never picked by `latest`


@dataclass
class TrainingState:
    """What accelerate's own state does not cover: progress counters and the best validation so far (saved
    with every checkpoint, so a resumed run keeps its best-so-far)."""

    global_step: int = 0
    nonfinite_steps: int = 0
    run_id: str = ""
    best_step: int | None = None
    best_value: float | None = None
    fingerprint: dict | None = None  # the settings and data digest the state was trained with

    def state_dict(self) -> dict:
        return {"global_step": self.global_step, "nonfinite_steps": self.nonfinite_steps, "run_id": self.run_id,
                "best_step": self.best_step, "best_value": self.best_value, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        self.global_step = int(state["global_step"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.run_id = str(state.get("run_id", ""))
        self.best_step, self.best_value = state.get("best_step"), state.get("best_value")
        self.fingerprint = state.get("fingerprint")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (never the temporary ones), oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT_NAME.match(p.name))]
    return [path for _, path in sorted(found)]


def find_resume_checkpoint(output_dir: str | Path, resume_from: str | None) -> Path | None:
    """`latest` -> newest complete checkpoint (None if there is none yet); a path must be a checkpoint."""
    if not resume_from:
        return None
    if resume_from == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s yet; starting a new run.", output_dir)
            return None
        return checkpoints[-1]
    path = Path(resume_from)
    if not path.is_dir() and (Path(output_dir) / resume_from).is_dir():
        path = Path(output_dir) / resume_from
    if not path.is_dir() or not (path / "custom_checkpoint_0.pkl").exists():
        raise LdmflowError(f"--resume_from_checkpoint {resume_from}: not a complete ldmflow checkpoint folder.")
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, total_limit: int | None,
                    name: str | None = None) -> Path:
    """Save accelerate's state (models, optimizer, scheduler, RNG, registered objects) atomically, as
    `checkpoint-<step>` or under `name`."""
    output_dir = Path(output_dir)
    final = output_dir / (name or f"checkpoint-{step}")
    temporary = output_dir / f".{final.name}.tmp"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(temporary))
    except (OSError, RuntimeError) as error:  # torch reports a full disk as RuntimeError("... iostream error")
        shutil.rmtree(temporary, ignore_errors=True)  # never leave a half-written checkpoint behind
        raise LdmflowError(f"Could not write {final.name} in {output_dir}: {_disk_problem(error, output_dir)}. "
                           "Free some space (or --checkpoints_total_limit), then resume from the last "
                           "checkpoint.") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)
        _prune(output_dir, total_limit)
        (logger.debug if name else logger.info)("Saved checkpoint %s", final)  # the best one: often, quietly
    accelerator.wait_for_everyone()
    return final


def _disk_problem(error: Exception, folder: Path) -> str:
    """What went wrong in words: a full disk is named as such (torch's own message says 'iostream error')."""
    free = shutil.disk_usage(folder).free if folder.exists() else None
    if getattr(error, "errno", None) == errno.ENOSPC or "iostream" in str(error) or free == 0:
        return f"the disk is full ({free // 2**20 if free is not None else '?'} MiB free)"
    return (str(error).splitlines() or [type(error).__name__])[0][:200]


def _prune(output_dir: Path, total_limit: int | None) -> None:
    if not total_limit:
        return
    checkpoints = list_checkpoints(output_dir)
    for stale in checkpoints[: max(0, len(checkpoints) - total_limit)]:
        shutil.rmtree(stale)
        logger.info("Removed old checkpoint %s (--checkpoints_total_limit %d)", stale, total_limit)
