"""The one training loop shared by every task: accelerate for devices, precision, distribution and state.

A task (vae_task, latent_task, legacy_task) supplies the model, data and loss; the loop owns the order of a
step, which reads top to bottom: forward/backward, clip, skip non-finite, optimizer/LR/EMA step, log,
checkpoint, and previews at epoch ends. Metrics stay on the device and are read once per `logging_steps`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import (DataLoaderConfiguration, ProjectConfiguration, broadcast_object_list, gather_object,
                               set_seed)
from PIL import Image
from safetensors import SafetensorError

from ldmflow.errors import LdmflowError
from ldmflow.files import disk_problem
from ldmflow.training.checkpoints import (BEST_CHECKPOINT, STATE_NAME, TrainingState, find_resume_checkpoint,
                                          list_checkpoints, load_checkpoint, save_checkpoint)
from ldmflow.settings import RESUMABLE_CHANGES, TrainSettings
from ldmflow.progress import Progress
from ldmflow.training.skipped_steps import SkippedSteps, fused_adamw_available
from ldmflow.training.task import Task, TrainingPlan

logger = logging.getLogger(__name__)


class Tracker(Protocol):
    """What the loop needs from tracking (ldmflow.tracking.run_tracker.RunTracker or NullTracker)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image: Image.Image, key: str, step: int) -> None: ...
    def log_dict(self, obj, artifact_file: str) -> bool: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...


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


class EpochSeededData(torch.utils.data.Dataset):
    """Makes each item's augmentation a function of (seed, epoch, index), whatever process or worker loads it.

    Together with the per-step reseeding in `train`, this is what makes a resumed run continue exactly:
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


class _MetricWindow:
    """Sums of loss parts on the device between log points, so logging costs one host sync per window."""

    def __init__(self, names: tuple[str, ...], device: torch.device):
        self.names = ("loss",) + names
        self.sums = torch.zeros(len(self.names), device=device)
        self.substituted = torch.zeros(1, device=device)  # unreadable images replaced so far (not reset)
        self.micro_steps = 0
        self.samples = 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, parts: torch.Tensor, batch_size: int, substituted=None) -> None:
        self.sums += torch.cat([loss.detach().float().reshape(1), parts.detach().float()])
        if substituted is not None:
            self.substituted += torch.as_tensor(substituted, device=self.sums.device).sum()
        self.micro_steps += 1
        self.samples += batch_size

    def read(self, accelerator: Accelerator) -> dict[str, float]:
        means = accelerator.reduce(torch.cat([self.sums / max(self.micro_steps, 1), self.substituted]),
                                   reduction="mean").tolist()
        elapsed = time.perf_counter() - self.started
        metrics = dict(zip(self.names, means))
        metrics["unreadable_substitutions"] = means[-1] * accelerator.num_processes
        metrics["images_per_second"] = self.samples * accelerator.num_processes / max(elapsed, 1e-9)
        self.sums.zero_()
        self.micro_steps, self.samples, self.started = 0, 0, time.perf_counter()
        return metrics


@dataclass
class PreparedRun:
    """What `train` prepares once and every step uses."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    dataloader: torch.utils.data.DataLoader
    dataset: EpochSeededData
    lr_scheduler: object
    state: TrainingState
    steps_per_epoch: int
    max_steps: int
    checkpoint_metric: str | None = None  # the validation metric that picks checkpoint-best
    eval_every: int = 1  # epochs between validations; 0: never
    checkpoint_after_epoch: bool = False
    stop_requested: bool = False  # set by SIGTERM
    unreadable_paths: set = field(default_factory=set)  # images replaced by a neighbour (this process)
    fused_optimizer: bool = False  # fused AdamW: a non-finite step is skipped on the device
    skipped: SkippedSteps | None = None  # set by `train`
    resumed_tags: dict | None = None  # set by `prepare` when it resumed from a checkpoint
    checkpoint_states: dict = field(default_factory=dict)  # saved with every checkpoint beside accelerate's state
    progress: Progress | None = None  # set by `train`


@dataclass
class TrainingOutcome:
    """What a training produced: its final metrics and the model folder to register (best or last)."""

    metrics: dict[str, float]
    model_dir: Path
    checkpoint: str  # "best" or "last"
    step: int
    metric: str | None = None
    metric_value: float | None = None

    def version_tags(self) -> dict[str, str]:
        """Recorded on the registered version: which weights these are."""
        tags = {"checkpoint": self.checkpoint, "checkpoint_step": str(self.step)}
        if self.metric is not None:
            tags.update(checkpoint_metric=self.metric, checkpoint_metric_value=f"{self.metric_value:.6g}")
        return tags


_HIGHER_IS_BETTER = ("psnr", "ssim")
CONDITION_METRIC_MARKS = ("recon/", "condition_error", "_mae", "_angle_error")  # read back by the probe  # every other validation metric is a loss or a distance


def _is_better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return math.isfinite(value)
    return value > best if any(word in metric for word in _HIGHER_IS_BETTER) else value < best


def _checkpoint_metric(settings: TrainSettings, task: Task) -> str | None:
    """--checkpoint_metric, checked against what this run validates; by default the task's first metric."""
    available = task.validation_metrics if settings.eval_epochs != 0 else ()
    if settings.checkpoint_metric is None:
        return available[0] if available else None
    if settings.checkpoint_metric not in available:
        offered = ", ".join(available) or "nothing (no val split, or --eval_epochs 0)"
        hint = ""
        if any(part in settings.checkpoint_metric for part in CONDITION_METRIC_MARKS):
            hint = (" Condition metrics need this dataset's registered condition probe and MLflow tracking: train "
                    "one first with `ldmflow probe --manifest_path ...`.")
        raise LdmflowError(f"--checkpoint_metric {settings.checkpoint_metric}: this run validates {offered}.{hint}")
    return settings.checkpoint_metric


def prepare(settings: TrainSettings, task: Task, accelerator: Accelerator, dataset_digest: str = "") -> PreparedRun:
    """Everything before the first step, resume included, so a bad checkpoint fails before a run is tracked."""
    run = _prepare(settings, task, accelerator)
    fingerprint = training_fingerprint(settings, dataset_digest)
    run.resumed_tags = _resume(settings, accelerator, run)
    if run.resumed_tags:
        _check_fingerprint(settings, run.state.fingerprint, fingerprint)
    run.state.fingerprint = fingerprint  # saved with every checkpoint from now on
    task.after_resume(accelerator)
    return run


def training_fingerprint(settings: TrainSettings, dataset_digest: str) -> dict:
    """What a checkpoint's state was trained with: the settings that shape it, and the data's digest."""
    params = {k: v for k, v in settings.to_params().items() if k not in RESUMABLE_CHANGES}
    return {"settings": params, "dataset_digest": dataset_digest}


def _check_fingerprint(settings: TrainSettings, recorded: dict | None, current: dict) -> None:
    """A resume continues the same training: other settings or other data are refused, unless allowed."""
    if not recorded or settings.allow_changed_settings:
        return
    old, new = recorded.get("settings", {}), current["settings"]
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


def _prepare(settings: TrainSettings, task: Task, accelerator: Accelerator) -> PreparedRun:
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
    return PreparedRun(accelerator, model, optimizer, dataloader, dataset, lr_scheduler, state, steps_per_epoch,
                       max_steps, _checkpoint_metric(settings, task),
                       validation_interval(settings, math.ceil(max_steps / steps_per_epoch)), fused_optimizer=fused,
                       checkpoint_states={STATE_NAME: state, **task.checkpoint_states()})


def validation_interval(settings: TrainSettings, num_epochs: int) -> int:
    """Epochs between validations: --eval_epochs, else about --num_validations evenly spaced ones (a validation
    every epoch doubled the demo's latent DDPM time); 0: never."""
    if settings.eval_epochs is not None:
        return settings.eval_epochs
    return max(1, round(num_epochs / settings.num_validations))


def _fast_layout(settings: TrainSettings, model: torch.nn.Module) -> torch.nn.Module:
    """--channels_last and --torch_compile. `Module.compile` compiles in place: parameter names, saving, EMA,
    DDP and checkpoints see the plain module, so a compiled run resumes with or without compiling."""
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if settings.torch_compile:
        model.compile(mode=None if settings.compile_mode == "default" else settings.compile_mode)
    return model


def train(settings: TrainSettings, task: Task, tracker: Tracker, run: PreparedRun) -> TrainingOutcome:
    """Run the whole training from what `prepare` made; save the last weights (and the best ones)."""
    accelerator, state = run.accelerator, run.state
    state.run_id = getattr(tracker, "run_id", "") or ""
    if run.resumed_tags and accelerator.is_main_process:
        tracker.set_tags(run.resumed_tags)
    num_epochs = math.ceil(run.max_steps / run.steps_per_epoch)
    first_epoch, skip_batches = divmod(state.global_step, run.steps_per_epoch)
    window = _MetricWindow(task.metric_names, accelerator.device)
    with _sigterm_requests_stop(run):
        logger.info("Training %d steps (%d epochs of %d steps) on %d process(es), %d images; checkpoints every %d "
                    "steps in %s.", run.max_steps, num_epochs, run.steps_per_epoch, accelerator.num_processes,
                    len(run.dataset), settings.checkpointing_steps, settings.output_dir)
        if state.global_step == 0:
            _preview_before_training(task, run, tracker)
        run.progress = Progress(task.name, run.max_steps, state.global_step, enabled=accelerator.is_main_process)
        run.skipped = SkippedSteps(accelerator.device, state.nonfinite_steps)
        try:
            _train_epochs(settings, task, tracker, run, window, first_epoch, skip_batches, num_epochs)
        finally:
            run.progress.close()
    outcome = _finish(settings, task, tracker, run)
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # drop the DDP wrapper before any process-group teardown (gloo deadlocks otherwise)
    return outcome


def _preview_before_training(task: Task, run: PreparedRun, tracker: Tracker) -> None:
    """Previews of the untrained model at step 0, so MLflow's image slider starts from noise."""
    run.model.eval()
    _, images = task.end_of_epoch(run.accelerator, run.model, 0, previews=True, validate=False)
    run.model.train()
    if run.accelerator.is_main_process:
        for key, image in images.items():
            tracker.log_image(image, key, 0)


class Preempted(KeyboardInterrupt):
    """SIGTERM (how clusters preempt): the state was checkpointed, and the run ends KILLED."""


@contextlib.contextmanager
def _sigterm_requests_stop(run: PreparedRun):
    """SIGTERM sets a flag the loop checks after each step, so it can checkpoint before it stops."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, frame):
        run.stop_requested = True

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_now(run: PreparedRun, at_log_point: bool) -> bool:
    """Whether a SIGTERM asks to stop: every step alone; with several processes, agreed at log points."""
    if run.accelerator.num_processes == 1:
        return run.stop_requested
    if not at_log_point:
        return False
    flag = torch.tensor([float(run.stop_requested)], device=run.accelerator.device)
    return run.accelerator.reduce(flag, reduction="sum").item() > 0


def _train_epochs(settings, task, tracker, run: PreparedRun, window, first_epoch: int, skip_batches: int,
                  num_epochs: int) -> None:
    accelerator, state = run.accelerator, run.state
    for epoch in range(first_epoch, num_epochs):
        if state.global_step >= run.max_steps:
            break
        run.model.train()
        run.dataloader.set_epoch(epoch)
        run.dataset.set_epoch(epoch)
        batches = run.dataloader
        if epoch == first_epoch and skip_batches:
            batches = accelerator.skip_first_batches(batches, skip_batches * settings.gradient_accumulation_steps)
        _train_epoch(settings, task, tracker, run, window, batches, epoch)
        last_epoch = epoch == num_epochs - 1 or state.global_step >= run.max_steps
        _end_of_epoch(settings, task, run, tracker, epoch, last_epoch)
        if run.checkpoint_after_epoch:
            _checkpoint(settings, run, tracker)
            run.checkpoint_after_epoch = False


def _finish(settings, task, tracker, run: PreparedRun) -> TrainingOutcome:
    """After the last step: report unreadable images, save the last (and best) weights."""
    accelerator, state = run.accelerator, run.state
    accelerator.wait_for_everyone()
    _report_unreadable(run, task, tracker)
    output_dir = Path(settings.output_dir)
    _check_weights_finite(settings, run, "the model")
    final_metrics = _save_model(settings, task, run, output_dir)
    if accelerator.is_main_process and final_metrics:
        tracker.log_metrics(final_metrics, state.global_step)
    return _registered_weights(settings, task, run, TrainingOutcome(final_metrics, output_dir, "last",
                                                                    state.global_step))


def _save_model(settings, task: Task, run: PreparedRun, target: Path) -> dict[str, float]:
    """task.save, with a full disk (or another write error) said in one line and no temporary folder left."""
    try:
        return task.save(run.accelerator, run.model, target)
    except (OSError, RuntimeError, SafetensorError) as error:
        if type(error) is RuntimeError and "iostream" not in str(error):
            raise  # not a write error (out of memory, a collective): let it speak for itself
        for temporary in Path(target).glob(".*.tmp"):
            shutil.rmtree(temporary, ignore_errors=True)
        checkpoints = list_checkpoints(settings.output_dir)
        last = (f"resume from {checkpoints[-1]} (--resume_from_checkpoint latest) to save it again" if checkpoints
                else "no checkpoint was written")
        raise LdmflowError(f"Could not write the model in {target}: {disk_problem(error, Path(target))}. Free some "
                           f"space, then {last}.") from None


def _report_unreadable(run: PreparedRun, task: Task, tracker: Tracker) -> None:
    """One warning with the count, and the files named in the run's unreadable_images.json."""
    paths = run.unreadable_paths | task.unreadable_before_training
    if run.accelerator.num_processes > 1:
        paths = {path for part in gather_object([sorted(paths)]) for path in part}
    if paths and run.accelerator.is_main_process:
        logger.warning("%d image(s) could not be read during training and were replaced by their neighbours "
                       "(metric unreadable_substitutions; the files are listed in unreadable_images.json), e.g. %s.",
                       len(paths), sorted(paths)[0])
        tracker.log_dict({"unreadable_images": sorted(paths)}, "unreadable_images.json")


def _registered_weights(settings, task, run: PreparedRun, last: TrainingOutcome) -> TrainingOutcome:
    """The outcome to register: the last weights, or (--register best) the best validated ones, exported
    from checkpoint-best to output_dir/best unless they are the last weights anyway."""
    state, metric = run.state, run.checkpoint_metric
    best = Path(settings.output_dir) / BEST_CHECKPOINT
    if settings.register != "best" or metric is None or state.best_step is None or not best.is_dir():
        if settings.register == "best" and run.accelerator.is_main_process:
            logger.info("No validated checkpoint to choose from: registering the last weights.")
        return last
    step, value = state.best_step, state.best_value
    if step == state.global_step:
        return TrainingOutcome(last.metrics, last.model_dir, "best", step, metric, value)
    load_checkpoint(run.accelerator, best, run.checkpoint_states)
    task.after_resume(run.accelerator)
    target = Path(settings.output_dir) / "best"
    metrics = _save_model(settings, task, run, target)
    logger.info("Exported the best weights (step %d, %s %.5g) to %s.", step, metric, value, target)
    return TrainingOutcome(metrics, target, "best", step, metric, value)


def _train_epoch(settings, task, tracker, run: PreparedRun, window: _MetricWindow, batches, epoch: int) -> None:
    """Steps until the epoch or the step budget ends: forward/backward, clip, step, log, checkpoint."""
    accelerator, state, model = run.accelerator, run.state, run.model
    micro_step = 0
    for batch in batches:
        # Noise, timesteps and dropout are a function of the step: resume continues exactly.
        torch.manual_seed(derive_seed(settings.seed, state.global_step, micro_step, accelerator.process_index))
        micro_step += 1
        with accelerator.accumulate(model):
            loss, parts = task.loss(model, batch, state.global_step)  # fp32 scalar, (len(metric_names),)
            accelerator.backward(loss)
            task.after_backward(accelerator)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
                weights_moved = _optimizer_step(run, run.skipped.check(loss, grad_norm, accelerator))
            run.optimizer.zero_grad(set_to_none=True)
        window.add(loss, parts, len(batch["index"]), batch.get("substituted"))
        run.unreadable_paths.update(path for path in batch.get("unreadable", ()) if path)
        if not accelerator.sync_gradients:
            continue
        micro_step = 0
        state.global_step += 1
        run.progress.update(1, settings.train_batch_size * settings.gradient_accumulation_steps
                            * accelerator.num_processes)
        if weights_moved:  # the EMA skips what the host knows was skipped (a step skipped on the device
            task.after_optimizer_step(model, state.global_step)  # left the weights as they were: the EMA steps towards the same)
        if state.global_step % settings.logging_steps == 0 or state.global_step == run.max_steps:
            _read_skipped(settings, run)
            metrics = window.read(accelerator)
            metrics.update(lr=run.lr_scheduler.get_last_lr()[0], nonfinite_steps=state.nonfinite_steps, epoch=epoch,
                           grad_norm=float(grad_norm) if grad_norm is not None else float("nan"))
            if accelerator.is_main_process:
                tracker.log_metrics(metrics, state.global_step)
            if "loss" in metrics:
                run.progress.note(loss=metrics["loss"])
        at_log_point = state.global_step % settings.logging_steps == 0
        if _stop_now(run, at_log_point):
            _checkpoint(settings, run, tracker)
            logger.warning("SIGTERM: stopped at step %d with a checkpoint; continue with --resume_from_checkpoint "
                           "latest.", state.global_step)
            raise Preempted(f"stopped by SIGTERM at step {state.global_step}")
        if state.global_step % settings.checkpointing_steps == 0:
            if state.global_step % run.steps_per_epoch and state.global_step < run.max_steps:
                _checkpoint(settings, run, tracker)
            else:  # the epoch's last step: checkpoint after its validation, so it holds the best-so-far
                run.checkpoint_after_epoch = True
        if state.global_step >= run.max_steps:
            return


def _check_weights_finite(settings: TrainSettings, run: PreparedRun, what: str) -> None:
    """Never write weights that are not finite: the loss and gradient guard cannot see an update that overflows."""
    finite = torch.stack([torch.isfinite(p.detach()).all() for p in run.model.parameters()]).all().float()
    if run.accelerator.reduce(finite.reshape(1), reduction="mean").item() == 1.0:
        return
    checkpoints = list_checkpoints(settings.output_dir)
    last = f"the last checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was written yet"
    raise LdmflowError(f"The weights became non-finite by step {run.state.global_step}; {what} was not written "
                       f"and {last}. Lower --learning_rate or --max_grad_norm, or try --mixed_precision no.")


def _checkpoint(settings: TrainSettings, run: PreparedRun, tracker: Tracker) -> None:
    step = run.state.global_step
    _read_skipped(settings, run)  # the checkpoint's state holds the current count
    _check_weights_finite(settings, run, f"checkpoint-{step}")
    path = save_checkpoint(run.accelerator, settings.output_dir, step, settings.checkpoints_total_limit,
                           run.checkpoint_states)
    if run.accelerator.is_main_process:
        tracker.set_tags({"ldmflow.last_checkpoint": str(path), "ldmflow.last_checkpoint_step": str(step)})
        if run.progress is not None:
            run.progress.note(saved=path.name)


def _advance_lr_schedule(run: PreparedRun) -> None:
    """One step of the LR schedule without an optimizer step (accelerate holds it back after a skipped step);
    the schedule counts a step per process, as accelerate's own stepping does."""
    scheduler = getattr(run.lr_scheduler, "scheduler", run.lr_scheduler)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(run.accelerator.num_processes):
            scheduler.step()


def _optimizer_step(run: PreparedRun, finite: torch.Tensor) -> bool:
    """The optimizer and LR-schedule step, unless the step is not finite; False when the host knows the
    weights did not move. The LR schedule keeps step with global_step either way."""
    accelerator = run.accelerator
    if accelerator.scaler is not None:  # fp16: the GradScaler skips non-finite gradients itself
        moved = True
    elif run.fused_optimizer:  # decided on the device, no host sync
        run.optimizer.optimizer.found_inf = (~finite).float()
        moved = True
    else:
        moved = bool(finite)  # one host sync, on devices without fused AdamW
    if moved:
        run.optimizer.step()
        run.lr_scheduler.step()
        moved = not accelerator.optimizer_step_was_skipped
    if not moved:
        _advance_lr_schedule(run)
    return moved


def _read_skipped(settings: TrainSettings, run: PreparedRun) -> None:
    """Reads the device's count of skipped steps (one host sync per read); stops a run that diverged."""
    total, new, longest = run.skipped.read()
    run.state.nonfinite_steps, step = total, run.state.global_step
    if new:
        logger.warning("Non-finite loss or gradient: %d step(s) skipped by step %d (%d in all).", new, step, total)
    if longest >= settings.max_nonfinite_steps:
        checkpoints = list_checkpoints(settings.output_dir)
        last = f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was written yet"
        raise LdmflowError(
            f"Training diverged: {longest} non-finite losses in a row by step {step}; {last}. "
            "Lower --learning_rate, check the data, or try --mixed_precision no.")


def _resume(settings: TrainSettings, accelerator: Accelerator, run: PreparedRun) -> dict | None:
    """Load the checkpoint to resume from, if any; returns the tags that say where the run continues from."""
    checkpoint = find_resume_checkpoint(settings.output_dir, settings.resume_from_checkpoint)
    if checkpoint is None:
        return None
    try:
        load_checkpoint(accelerator, checkpoint, run.checkpoint_states)
    except (RuntimeError, KeyError, ValueError, FileNotFoundError) as error:
        lines = str(error).splitlines()
        detail = next((line.strip() for line in lines if "size mismatch" in line or "Missing key" in line),
                      lines[0] if lines else type(error).__name__)
        raise LdmflowError(f"Cannot resume from {checkpoint}: it does not match this model and settings "
                           f"({detail[:300]}). Use the same model size and --use_ema as the run that wrote it.") from None
    state = run.state
    logger.info("Resumed from %s at step %d.", checkpoint, state.global_step)
    return {"ldmflow.resumed_from_checkpoint": str(checkpoint), "ldmflow.resumed_from_step": str(state.global_step),
            "ldmflow.resumed_from_run_id": state.run_id}


def _end_of_epoch(settings, task, run: PreparedRun, tracker, epoch: int, last_epoch: bool) -> None:
    """Validation every `run.eval_every` epochs and previews every --save_images_epochs (both after the last epoch);
    a better validation score than any before saves checkpoint-best."""
    accelerator, model, step = run.accelerator, run.model, run.state.global_step
    previews = (epoch + 1) % settings.save_images_epochs == 0 or last_epoch
    validate = run.eval_every > 0 and ((epoch + 1) % run.eval_every == 0 or last_epoch)
    model.eval()
    metrics, images = task.end_of_epoch(accelerator, model, step, previews=previews, validate=validate)
    if validate and accelerator.num_processes > 1:  # scores read on the main process alone (probe readings)
        metrics = broadcast_object_list([metrics])[0]  # every process then agrees on checkpoint-best
    if accelerator.is_main_process:
        if metrics:
            tracker.log_metrics(metrics, step)
        for key, image in images.items():
            tracker.log_image(image, key, step)
    model.train()
    metric = run.checkpoint_metric
    if metric in metrics and _is_better(metric, metrics[metric], run.state.best_value):
        run.state.best_step, run.state.best_value = step, metrics[metric]  # saved with the checkpoint
        _check_weights_finite(settings, run, BEST_CHECKPOINT)
        save_checkpoint(accelerator, settings.output_dir, step, None, run.checkpoint_states, name=BEST_CHECKPOINT)
        if accelerator.is_main_process:
            tracker.set_tags({"ldmflow.best_checkpoint_step": str(step),
                              "ldmflow.best_checkpoint_metric": f"{metric}={metrics[metric]:.6g}"})
    accelerator.wait_for_everyone()
