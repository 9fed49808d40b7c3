"""Crash-safe checkpoints: written under a temporary name and renamed, pruned to a limit, found for resume.

Nothing in a checkpoint is unpickled with code execution allowed: accelerate loads weights, optimizer, schedule
and RNG with `weights_only=True`, and the loop's own state (counters, EMA) is JSON plus safetensors, never
accelerate's pickled custom state."""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import load as accelerate_load
from safetensors.torch import load_file, save_file

from ldmflow.errors import LdmflowError
from ldmflow.files import disk_problem, publish_folder

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
        for checkpoint in reversed(checkpoints):
            problem = damage(checkpoint)
            if problem is None:
                return checkpoint
            logger.warning("--resume_from_checkpoint latest: %s is damaged (%s); trying the one before it.",
                           checkpoint, problem)
        raise LdmflowError(f"--resume_from_checkpoint latest: every checkpoint in {output_dir} is damaged (the "
                           f"newest: {damage(checkpoints[-1])}). Remove them to start a new run.")
    path = Path(resume_from)
    if not path.is_dir() and (Path(output_dir) / resume_from).is_dir():
        path = Path(output_dir) / resume_from
    if path.is_dir() and not (path / f"{STATE_NAME}.json").exists() and (path / "custom_checkpoint_0.pkl").exists():
        raise LdmflowError(f"--resume_from_checkpoint {resume_from}: written by an older ldmflow, which stored its "
                           "state as a pickle; ldmflow no longer unpickles checkpoints. Start a new run.")
    if (path / SEAL_NAME).is_file() and (problem := damage(path)):
        raise LdmflowError(f"--resume_from_checkpoint {resume_from}: checkpoint {path} is damaged ({problem}); "
                           "resume from an earlier one, or `latest`, which skips damaged ones.")
    if not path.is_dir() or not (path / f"{STATE_NAME}.json").exists():
        raise LdmflowError(f"--resume_from_checkpoint {resume_from}: not a complete ldmflow checkpoint folder.")
    return path


SEAL_NAME = "checkpoint_files.json"  # written last: each file's size, so a save cut short never looks complete


def _seal(folder: Path) -> None:
    sizes = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / SEAL_NAME).write_text(json.dumps(sizes))


def damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder (a file missing or of another size than written), or None. A folder
    without the seal is taken as written by an earlier ldmflow when it has its training state."""
    try:
        sizes = json.loads((folder / SEAL_NAME).read_text())
    except FileNotFoundError:
        return None if (folder / f"{STATE_NAME}.json").is_file() else f"no {STATE_NAME}.json"
    except (OSError, ValueError) as error:
        return f"its {SEAL_NAME} is unreadable: {error}"
    if not isinstance(sizes, dict):
        return f"its {SEAL_NAME} is not a file list"
    for name, size in sizes.items():
        path = folder / name
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            return f"{name} is {'missing' if actual is None else f'{actual} bytes, written as {size}'}"
    return None


STATE_NAME = "training_state"  # the loop's own state, <name>.json (+ <name>.safetensors when it holds tensors)


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, total_limit: int | None,
                    states: dict[str, object], name: str | None = None) -> Path:
    """Save accelerate's state (models, optimizer, scheduler, RNG) and `states` (objects with `state_dict`)
    atomically, as `checkpoint-<step>` or under `name`."""
    output_dir = Path(output_dir)
    final = output_dir / (name or f"checkpoint-{step}")
    temporary = output_dir / f".{final.name}.tmp"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(temporary))
        if accelerator.is_main_process:
            for state_name, obj in states.items():
                _save_plain_state(obj.state_dict(), temporary / state_name)
        accelerator.wait_for_everyone()  # every process's files written: the seal lists them all
        if accelerator.is_main_process:
            _seal(temporary)
    except (OSError, RuntimeError) as error:  # torch reports a full disk as RuntimeError("... iostream error")
        shutil.rmtree(temporary, ignore_errors=True)  # never leave a half-written checkpoint behind
        raise LdmflowError(f"Could not write {final.name} in {output_dir}: {disk_problem(error, output_dir)}. "
                           "Free some space (or --checkpoints_total_limit), then resume from the last "
                           "checkpoint.") from None
    except BaseException:  # Ctrl-C or SIGTERM mid-save: no half-written checkpoint left either
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        publish_folder(temporary, final)  # a save killed while replacing `final` leaves the old or the new one
        _prune(output_dir, total_limit)
        logger.debug("Saved checkpoint %s", final)  # the progress line names the newest; the best one changes often
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, folder: Path, states: dict[str, object]) -> None:
    """Load what `save_checkpoint` wrote; a file that only unpickling arbitrary code could read is refused."""
    rng_file = folder / f"random_states_{accelerator.process_index}.pkl"
    if strays := sorted(path.name for path in folder.glob("custom_checkpoint_*")):
        raise LdmflowError(f"Cannot resume from {folder}: it holds {strays[0]}, a pickle that ldmflow never writes "
                           "and will not load. Use a checkpoint this ldmflow wrote.")
    try:
        if rng_file.exists():  # accelerate refuses it too, but only logs that and resumes with other RNG
            accelerate_load(rng_file)
        accelerator.load_state(str(folder))
    except pickle.UnpicklingError as error:
        raise LdmflowError(f"Cannot resume from {folder}: it holds a pickle that only code execution could load "
                           f"({str(error).splitlines()[0][:160]}). Use a checkpoint this ldmflow wrote.") from None
    for state_name, obj in states.items():
        obj.load_state_dict(_load_plain_state(folder / state_name))


def _save_plain_state(state: dict, stem: Path) -> None:
    """A state dict as JSON, with its tensors (at any depth) moved to a safetensors file beside it."""
    tensors: dict[str, torch.Tensor] = {}

    def plain(value):
        if isinstance(value, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = value.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    stem.with_suffix(".json").write_text(json.dumps(plain(state)))
    if tensors:
        save_file(tensors, str(stem.with_suffix(".safetensors")))


def _load_plain_state(stem: Path) -> dict:
    tensor_file = stem.with_suffix(".safetensors")
    tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}

    def restore(value):
        if isinstance(value, dict):
            if set(value) == {"__tensor__"}:
                return tensors[value["__tensor__"]]
            return {key: restore(item) for key, item in value.items()}
        if isinstance(value, list):
            return [restore(v) for v in value]
        return value

    try:
        return restore(json.loads(stem.with_suffix(".json").read_text()))
    except FileNotFoundError:
        raise LdmflowError(f"Cannot resume from {stem.parent}: it has no {stem.name} state. Use the same --use_ema "
                           "as the run that wrote it.") from None
    except (OSError, ValueError, KeyError) as error:
        raise LdmflowError(f"Cannot resume from {stem.parent}: its {stem.name} state is damaged ({error}).") from None


def _prune(output_dir: Path, total_limit: int | None) -> None:
    if not total_limit:
        return
    checkpoints = list_checkpoints(output_dir)
    for stale in checkpoints[: max(0, len(checkpoints) - total_limit)]:
        shutil.rmtree(stale)
        logger.info("Removed old checkpoint %s (--checkpoints_total_limit %d)", stale, total_limit)
