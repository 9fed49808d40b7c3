"""Everything before the first training step: the accelerator, model, data, optimizer and LR schedule, and the
resume from a checkpoint with its checks, so bad input fails before a run is tracked (the loop is loop.py)."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from safetensors import SafetensorError

from ldmflow.errors import LdmflowError, error_summary
from ldmflow.evaluation.metric_names import is_condition_metric
from ldmflow.settings import TrainSettings, param_value, resumable_changes
from ldmflow.tags import RESUMED_FROM_CHECKPOINT_TAG, RESUMED_FROM_RUN_TAG, RESUMED_FROM_STEP_TAG
from ldmflow.training.checkpoints import STATE_NAME, TrainingState, find_resume_checkpoint, load_checkpoint
from ldmflow.training.skipped_steps import fused_adamw_available
from ldmflow.training.task import Task, TrainingPlan

logger = logging.getLogger(__name__)


def build_accelerator(settings: TrainSettings) -> Accelerator:
    """Accelerator with seedable shuffling (exact resume); fp16 without CUDA falls back to fp32 with a warning."""
    precision = settings.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        logger.warning("--mixed_precision fp16 needs CUDA; running in fp32 on this machine.")
        precision = "no"
    if torch.cuda.is_available():  # TF32: fp32 ranges with 10-bit mantissas on tensor cores
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = settings.allow_tf32
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=settings.output_dir, automatic_checkpoint_naming=False),
        # One shuffle for all processes (data_seed): each image is seen once per epoch, and resume is exact.
        # non_blocking: pinned batches are copied to the GPU while the previous step still runs.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=settings.seed,
                                                  non_blocking=torch.cuda.is_available()),
    )


@dataclass(frozen=True)
class Prepared:
    """What `prepare` builds once and every step uses, fixed from the first step on. The one part that changes
    is `state`: the counters saved with every checkpoint (step, skipped steps, best validation so far)."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    dataloader: torch.utils.data.DataLoader
    dataset: EpochSeededData
    steps_per_epoch: int  # optimizer steps, on this process
    max_steps: int
    eval_every: int  # epochs between validations; 0: never
    checkpoint_metric: str | None  # the validation metric that picks checkpoint-best
    fused_optimizer: bool  # fused AdamW: a non-finite step is skipped on the device
    state: TrainingState
    checkpoint_states: dict  # saved with every checkpoint beside accelerate's state: `state` and the task's
    resumed_tags: dict | None = None  # where a resumed run continues from (None: a new run)


def prepare(settings: TrainSettings, task: Task, accelerator: Accelerator, dataset_digest: str = "") -> Prepared:
    """Everything before the first step, resume included, so a bad checkpoint fails before a run is tracked."""
    prepared = _prepare(settings, task, accelerator)
    fingerprint = training_fingerprint(settings, dataset_digest)
    prepared = dataclasses.replace(prepared, resumed_tags=_resume(settings, accelerator, prepared))
    if prepared.resumed_tags:
        _check_fingerprint(settings, prepared.state.fingerprint, fingerprint)
    prepared.state.fingerprint = fingerprint  # saved with every checkpoint from now on
    task.after_resume(accelerator)
    return prepared


def _prepare(settings: TrainSettings, task: Task, accelerator: Accelerator) -> Prepared:
    """Model, data, optimizer and LR schedule prepared by accelerate; the step count is per process."""
    set_seed(settings.seed, device_specific=True)
    model, dataset = task.setup(accelerator)
    if len(dataset) == 0:
        raise LdmflowError("The training dataset is empty.")
    dataset = EpochSeededData(dataset, settings.seed)
    fused = fused_adamw_available(accelerator.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate,
                                  weight_decay=settings.adam_weight_decay, fused=fused or None)
    workers = settings.dataloader_num_workers
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=settings.train_batch_size, shuffle=True, num_workers=workers,
        pin_memory=accelerator.device.type == "cuda", persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        drop_last=len(dataset) >= settings.train_batch_size * accelerator.num_processes)
    model = _fast_layout(settings, model)
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    steps_per_epoch = max(1, math.ceil(len(dataloader) / settings.gradient_accumulation_steps))  # this process's
    max_steps = settings.max_train_steps or settings.num_epochs * steps_per_epoch
    plan = TrainingPlan(max_steps, settings.lr_scheduler, settings.lr_warmup_steps, accelerator.num_processes)
    lr_scheduler = plan.schedule(accelerator, optimizer, max_steps)
    state = TrainingState()
    task.after_prepare(accelerator, model, plan)
    return Prepared(accelerator, model, optimizer, lr_scheduler, dataloader, dataset, steps_per_epoch, max_steps,
                    eval_every=validation_interval(settings, math.ceil(max_steps / steps_per_epoch)),
                    checkpoint_metric=_checkpoint_metric(settings, task), fused_optimizer=fused, state=state,
                    checkpoint_states={STATE_NAME: state, **task.checkpoint_states()})


class EpochSeededData(torch.utils.data.Dataset):
    """Makes each item's augmentation a function of (seed, epoch, index), whatever process or worker loads it.

    Together with the per-step reseeding in `loop.train`, this is what makes a resumed run continue exactly:
    nothing depends on how much of the global RNG earlier, possibly skipped, batches consumed.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(derive_seed(self.seed, self.epoch, index))
            return self.dataset[index]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python runs, unlike hash())."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) + 0x632BE59BD9B4E019 + (value << 6) + (value >> 2))) & (2**63 - 1)
    return value


def _fast_layout(settings: TrainSettings, model: torch.nn.Module) -> torch.nn.Module:
    """--channels_last and --torch_compile. `Module.compile` compiles in place: parameter names, saving, EMA,
    DDP and checkpoints see the plain module, so a compiled run resumes with or without compiling."""
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if settings.torch_compile:
        model.compile(backend=settings.compile_backend,
                      mode=None if settings.compile_mode == "default" else settings.compile_mode)
    return model


def validation_interval(settings: TrainSettings, num_epochs: int) -> int:
    """Epochs between validations: --eval_epochs, else about --num_validations evenly spaced ones (a validation
    every epoch doubled the demo's latent DDPM time); 0: never."""
    if settings.eval_epochs is not None:
        return settings.eval_epochs
    return max(1, round(num_epochs / settings.num_validations))


def _checkpoint_metric(settings: TrainSettings, task: Task) -> str | None:
    """--checkpoint_metric, checked against what this run validates; by default the task's first metric."""
    available = task.validation_metrics if settings.eval_epochs != 0 else ()
    if settings.checkpoint_metric is None:
        return available[0] if available else None
    if settings.checkpoint_metric not in available:
        offered = ", ".join(available) or "nothing (no val split, or --eval_epochs 0)"
        hint = ""
        if is_condition_metric(settings.checkpoint_metric):
            hint = (" Condition metrics need this dataset's registered condition probe and MLflow tracking: train "
                    "one first with `ldmflow probe --manifest_path ...`.")
        raise LdmflowError(f"--checkpoint_metric {settings.checkpoint_metric}: this run validates {offered}.{hint}")
    return settings.checkpoint_metric


def training_fingerprint(settings: TrainSettings, dataset_digest: str) -> dict:
    """What a checkpoint's state was trained with: the settings that shape it, and the data's digest."""
    resumable = resumable_changes(type(settings))
    params = {k: v for k, v in settings.to_params().items() if k not in resumable}
    return {"settings": params, "dataset_digest": dataset_digest}


def _resume(settings: TrainSettings, accelerator: Accelerator, prepared: Prepared) -> dict | None:
    """Load the checkpoint to resume from, if any; returns the tags that say where the run continues from."""
    checkpoint = find_resume_checkpoint(settings.output_dir, settings.resume_from_checkpoint)
    if checkpoint is None:
        return None
    try:
        load_checkpoint(accelerator, checkpoint, prepared.checkpoint_states)
    except (RuntimeError, KeyError, ValueError, FileNotFoundError) as error:
        lines = str(error).splitlines()
        detail = next((line.strip() for line in lines if "size mismatch" in line or "Missing key" in line),
                      lines[0] if lines else type(error).__name__)
        raise LdmflowError(f"Cannot resume from {checkpoint}: it does not match this model and settings "
                           f"({detail[:300]}). Use the same model size and --use_ema as the run that wrote "
                           "it.") from None
    except (OSError, EOFError, SafetensorError) as error:  # a file damaged in place (same size, other bytes)
        raise LdmflowError(f"Cannot resume from {checkpoint}: the checkpoint is damaged ({error_summary(error)}). "
                           "Resume from an earlier one.") from None
    state = prepared.state
    logger.info("Resumed from %s at step %d.", checkpoint, state.global_step)
    return {RESUMED_FROM_CHECKPOINT_TAG: str(checkpoint), RESUMED_FROM_STEP_TAG: str(state.global_step),
            RESUMED_FROM_RUN_TAG: state.run_id}


def _check_fingerprint(settings: TrainSettings, recorded: dict | None, current: dict) -> None:
    """A resume continues the same training: other settings or other data are refused, unless allowed."""
    if not recorded or settings.allow_changed_settings:
        return
    old, new = recorded.get("settings", {}), current["settings"]
    defaults = {item.name: param_value(item.default) for item in dataclasses.fields(settings)
                if item.default is not dataclasses.MISSING}
    old = {**{key: defaults[key] for key in new if key in defaults and key not in old}, **old}  # added since
    changed = [f"--{key} {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
               if old.get(key) != new.get(key)]
    if recorded.get("dataset_digest") and current["dataset_digest"] and \
            recorded["dataset_digest"] != current["dataset_digest"]:
        changed.append(f"the manifest's content (digest {recorded['dataset_digest'][:12]} -> "
                       f"{current['dataset_digest'][:12]})")
    if changed:
        raise LdmflowError(f"Cannot resume from {settings.resume_from_checkpoint}: it was trained with other "
                           f"settings or data ({'; '.join(changed[:6])}). Use the same ones, or pass "
                           "--allow_changed_settings to continue anyway.")
