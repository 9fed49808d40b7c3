"""The one training loop shared by every task, on accelerate (devices, precision, distribution and state).

`prepare` (prepare.py) builds everything before the first step, resume included; `train` runs it and reads
top to bottom: for each epoch, for each batch: forward/backward, clip, skip non-finite, optimizer/LR/EMA step,
log, checkpoint; validation and previews at the epoch's end; then the last (and best) weights are saved. The
helpers follow `train` in the order it calls them. A task (task.py) supplies the model, data and loss. Metrics
stay on the device and are read once per `logging_steps`.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from PIL import Image
from safetensors import SafetensorError

from ldmflow.errors import LdmflowError
from ldmflow.evaluation.metric_names import higher_is_better
from ldmflow.files import disk_problem
from ldmflow.progress import Progress
from ldmflow.tags import (BEST_CHECKPOINT_METRIC_TAG, BEST_CHECKPOINT_STEP_TAG, CHECKPOINT_METRIC_TAG,
                          CHECKPOINT_METRIC_VALUE_TAG, CHECKPOINT_STEP_TAG, CHECKPOINT_TAG, LAST_CHECKPOINT_STEP_TAG,
                          LAST_CHECKPOINT_TAG)
from ldmflow.settings import TrainSettings
from ldmflow.training.checkpoints import (BEST_CHECKPOINT, TrainingState, list_checkpoints, load_checkpoint,
                                          save_checkpoint)
from ldmflow.training.prepare import Prepared, derive_seed
from ldmflow.training.skipped_steps import SkippedSteps
from ldmflow.training.task import Task

logger = logging.getLogger(__name__)


class Tracker(Protocol):
    """What the loop needs from tracking (ldmflow.tracking.run_tracker.RunTracker or NullTracker)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image: Image.Image, key: str, step: int) -> None: ...
    def log_dict(self, obj, artifact_file: str) -> bool: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...


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
        tags = {CHECKPOINT_TAG: self.checkpoint, CHECKPOINT_STEP_TAG: str(self.step)}
        if self.metric is not None:
            tags.update({CHECKPOINT_METRIC_TAG: self.metric, CHECKPOINT_METRIC_VALUE_TAG: f"{self.metric_value:.6g}"})
        return tags


# Called after each validation with (step, metrics); it may raise to stop the training (a sweep's pruner).
ValidationCallback = Callable[[int, dict], None]


def train(settings: TrainSettings, task: Task, tracker: Tracker, prepared: Prepared,
          on_validation: ValidationCallback | None = None) -> TrainingOutcome:
    """Run the whole training from what `prepare` made; save the last weights (and the best ones). What changes
    as it runs is `prepared.state` (the step and the counters saved with checkpoints) and the locals below."""
    accelerator, model, state = prepared.accelerator, prepared.model, prepared.state
    state.run_id = getattr(tracker, "run_id", "") or ""
    if prepared.resumed_tags and accelerator.is_main_process:
        tracker.set_tags(prepared.resumed_tags)
    num_epochs = math.ceil(prepared.max_steps / prepared.steps_per_epoch)
    first_epoch, skip_batches = divmod(state.global_step, prepared.steps_per_epoch)
    window = _MetricWindow(task.metric_names, accelerator.device)
    unreadable: set[str] = set()  # images this process replaced by a neighbour
    non_finite: set[str] = set()  # images this process read with NaN or infinite pixels replaced
    images_per_step = settings.train_batch_size * settings.gradient_accumulation_steps * accelerator.num_processes
    with _sigterm_requests_stop() as stop:
        logger.info("Training %d steps (%d epochs of %d steps) on %d process(es), %d images; checkpoints every %d "
                    "steps in %s.", prepared.max_steps, num_epochs, prepared.steps_per_epoch, accelerator.num_processes,
                    len(prepared.dataset), settings.checkpointing_steps, settings.output_dir)
        if state.global_step == 0:
            _preview_before_training(task, prepared, tracker)
        progress = Progress(task.name, prepared.max_steps, state.global_step, enabled=accelerator.is_main_process)
        skipped = SkippedSteps(accelerator.device, state.nonfinite_steps)
        try:
            for epoch in range(first_epoch, num_epochs):
                if state.global_step >= prepared.max_steps:
                    break
                checkpoint_after_validation, micro_step = False, 0
                for batch in _epoch_batches(settings, prepared, epoch, skip_batches if epoch == first_epoch else 0):
                    loss, parts, grad_norm, moved = _micro_step(settings, task, prepared, batch, skipped, micro_step)
                    micro_step += 1
                    window.add(loss, parts, len(batch["index"]), batch.get("substituted"))
                    unreadable.update(path for path in batch.get("unreadable", ()) if path)
                    non_finite.update(path for path in batch.get("non_finite", ()) if path)
                    if not accelerator.sync_gradients:
                        continue  # the next micro-batch of this step
                    micro_step = 0
                    state.global_step += 1
                    progress.update(1, images_per_step)
                    # The EMA skips what the host knows was skipped (a step skipped on the device left the
                    # weights as they were: the EMA steps towards the same).
                    if moved:
                        task.after_optimizer_step(model, state.global_step)
                    at_log_point = state.global_step % settings.logging_steps == 0
                    if at_log_point or state.global_step == prepared.max_steps:
                        _log_point(settings, prepared, tracker, window, skipped, progress, epoch, grad_norm)
                    if _stop_now(accelerator, stop, at_log_point):
                        _checkpoint(settings, prepared, tracker, skipped, progress)
                        logger.warning("SIGTERM: stopped at step %d with a checkpoint; continue with "
                                       "--resume_from_checkpoint latest.", state.global_step)
                        raise Preempted(f"stopped by SIGTERM at step {state.global_step}")
                    if state.global_step % settings.checkpointing_steps == 0:
                        if state.global_step % prepared.steps_per_epoch and state.global_step < prepared.max_steps:
                            _checkpoint(settings, prepared, tracker, skipped, progress)
                        else:  # the epoch's last step: after its validation, so it holds the best so far
                            checkpoint_after_validation = True
                    if state.global_step >= prepared.max_steps:
                        break
                last_epoch = epoch == num_epochs - 1 or state.global_step >= prepared.max_steps
                metrics = _end_of_epoch(settings, task, prepared, tracker, epoch, last_epoch)
                if metrics and on_validation is not None:
                    on_validation(state.global_step, metrics)
                if checkpoint_after_validation:
                    _checkpoint(settings, prepared, tracker, skipped, progress)
        finally:
            progress.close()
    outcome = _finish(settings, task, tracker, prepared, unreadable, non_finite)
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # drop the DDP wrapper before any process-group teardown (gloo deadlocks otherwise)
    return outcome


def _micro_step(settings: TrainSettings, task: Task, prepared: Prepared, batch: dict, skipped: SkippedSteps,
                micro_step: int):
    """One micro-batch: seed, forward, backward and, at the last one of a step, clip and the optimizer step.
    Returns (loss, loss parts, grad norm, whether the weights moved); the last two are None, False before then."""
    accelerator, model, grad_norm, weights_moved = prepared.accelerator, prepared.model, None, False
    # Noise, timesteps and dropout are a function of the step: resume continues exactly.
    torch.manual_seed(derive_seed(settings.seed, prepared.state.global_step, micro_step, accelerator.process_index))
    with accelerator.accumulate(model):
        loss, parts = task.loss(model, batch, prepared.state.global_step)  # fp32 (), (len(metric_names),)
        accelerator.backward(loss)
        task.after_backward(accelerator)
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            weights_moved = _optimizer_step(prepared, skipped.check(loss, grad_norm, accelerator))
        prepared.optimizer.zero_grad(set_to_none=True)
    return loss, parts, grad_norm, weights_moved


def _log_point(settings: TrainSettings, prepared: Prepared, tracker: Tracker, window: "_MetricWindow",
               skipped: SkippedSteps, progress: Progress, epoch: int, grad_norm) -> None:
    """Read the window's metrics and the skipped steps (one host sync) and log them with the LR and the epoch."""
    state, accelerator = prepared.state, prepared.accelerator
    _read_skipped(settings, state, skipped)
    metrics = window.read(accelerator)
    metrics.update(lr=prepared.lr_scheduler.get_last_lr()[0], nonfinite_steps=state.nonfinite_steps,
                   epoch=epoch, grad_norm=float("nan") if grad_norm is None else float(grad_norm))
    if accelerator.is_main_process:
        tracker.log_metrics(metrics, state.global_step)
    progress.note(loss=metrics["loss"])


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


@contextlib.contextmanager
def _sigterm_requests_stop():
    """Yields an event that SIGTERM sets; the loop checks it after each step, so it can checkpoint first."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def _preview_before_training(task: Task, prepared: Prepared, tracker: Tracker) -> None:
    """Previews of the untrained model at step 0, so MLflow's image slider starts from noise."""
    prepared.model.eval()
    _, images = task.end_of_epoch(prepared.accelerator, prepared.model, 0, previews=True, validate=False)
    prepared.model.train()
    if prepared.accelerator.is_main_process:
        for key, image in images.items():
            tracker.log_image(image, key, 0)


def _epoch_batches(settings: TrainSettings, prepared: Prepared, epoch: int, skip_steps: int):
    """The epoch's batches in their seeded order, after the `skip_steps` steps a resumed run already took."""
    prepared.model.train()
    prepared.dataloader.set_epoch(epoch)
    prepared.dataset.set_epoch(epoch)
    if not skip_steps:
        return prepared.dataloader
    return prepared.accelerator.skip_first_batches(prepared.dataloader,
                                                   skip_steps * settings.gradient_accumulation_steps)


def _optimizer_step(prepared: Prepared, finite: torch.Tensor) -> bool:
    """The optimizer and LR-schedule step, unless the step is not finite; False when the host knows the
    weights did not move. The LR schedule keeps step with global_step either way."""
    accelerator = prepared.accelerator
    if accelerator.scaler is not None:  # fp16: the GradScaler skips non-finite gradients itself
        moved = True
    elif prepared.fused_optimizer:  # decided on the device, no host sync
        prepared.optimizer.optimizer.found_inf = (~finite).float()
        moved = True
    else:
        moved = bool(finite)  # one host sync, on devices without fused AdamW
    if moved:
        prepared.optimizer.step()
        prepared.lr_scheduler.step()
        moved = not accelerator.optimizer_step_was_skipped
    if not moved:
        _advance_lr_schedule(prepared)
    return moved


def _advance_lr_schedule(prepared: Prepared) -> None:
    """One step of the LR schedule without an optimizer step (accelerate holds it back after a skipped step);
    the schedule counts a step per process, as accelerate's own stepping does."""
    scheduler = getattr(prepared.lr_scheduler, "scheduler", prepared.lr_scheduler)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(prepared.accelerator.num_processes):
            scheduler.step()


def _read_skipped(settings: TrainSettings, state: TrainingState, skipped: SkippedSteps) -> None:
    """Reads the device's count of skipped steps (one host sync per read); stops a run that diverged."""
    total, new, longest = skipped.read()
    state.nonfinite_steps, step = total, state.global_step
    if new:
        logger.warning("Non-finite loss or gradient: %d step(s) skipped by step %d (%d in all).", new, step, total)
    if longest >= settings.max_nonfinite_steps:
        checkpoints = list_checkpoints(settings.output_dir)
        last = f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was written yet"
        raise LdmflowError(
            f"Training diverged: {longest} non-finite losses in a row by step {step}; {last}. "
            "Lower --learning_rate, check the data, or try --mixed_precision no.")


def _stop_now(accelerator: Accelerator, stop: threading.Event, at_log_point: bool) -> bool:
    """Whether a SIGTERM asks to stop: every step alone; with several processes, agreed at log points."""
    if accelerator.num_processes == 1:
        return stop.is_set()
    if not at_log_point:
        return False
    flag = torch.tensor([float(stop.is_set())], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() > 0


class Preempted(KeyboardInterrupt):
    """SIGTERM (how clusters preempt): the state was checkpointed, and the run ends KILLED."""

    signal_number = signal.SIGTERM


def _checkpoint(settings: TrainSettings, prepared: Prepared, tracker: Tracker, skipped: SkippedSteps,
                progress: Progress) -> None:
    """checkpoint-<step>, named in the run's tags and on the progress line."""
    step = prepared.state.global_step
    _read_skipped(settings, prepared.state, skipped)  # the checkpoint's state holds the current count
    _check_weights_finite(settings, prepared, f"checkpoint-{step}")
    path = save_checkpoint(prepared.accelerator, settings.output_dir, step, settings.checkpoints_total_limit,
                           prepared.checkpoint_states)
    if prepared.accelerator.is_main_process:
        tracker.set_tags({LAST_CHECKPOINT_TAG: str(path), LAST_CHECKPOINT_STEP_TAG: str(step)})
        progress.note(saved=path.name)


def _check_weights_finite(settings: TrainSettings, prepared: Prepared, what: str) -> None:
    """Never write weights that are not finite: the loss and gradient guard cannot see an update that overflows."""
    finite = torch.stack([torch.isfinite(p.detach()).all() for p in prepared.model.parameters()]).all().float()
    if prepared.accelerator.reduce(finite.reshape(1), reduction="mean").item() == 1.0:
        return
    checkpoints = list_checkpoints(settings.output_dir)
    last = f"the last checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was written yet"
    raise LdmflowError(f"The weights became non-finite by step {prepared.state.global_step}; {what} was not written "
                       f"and {last}. Lower --learning_rate or --max_grad_norm, or try --mixed_precision no.")


def _end_of_epoch(settings, task, prepared: Prepared, tracker, epoch: int, last_epoch: bool) -> dict[str, float]:
    """Validation every `prepared.eval_every` epochs and previews every --save_images_epochs (both after the last
    epoch); a better validation score than any before saves checkpoint-best. Returns the validation metrics ({}:
    none)."""
    accelerator, model, step = prepared.accelerator, prepared.model, prepared.state.global_step
    previews = (epoch + 1) % settings.save_images_epochs == 0 or last_epoch
    validate = prepared.eval_every > 0 and ((epoch + 1) % prepared.eval_every == 0 or last_epoch)
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
    metric = prepared.checkpoint_metric
    if metric in metrics and _is_better(metric, metrics[metric], prepared.state.best_value):
        prepared.state.best_step, prepared.state.best_value = step, metrics[metric]  # saved with the checkpoint
        _check_weights_finite(settings, prepared, BEST_CHECKPOINT)
        save_checkpoint(accelerator, settings.output_dir, step, None, prepared.checkpoint_states, name=BEST_CHECKPOINT)
        if accelerator.is_main_process:
            tracker.set_tags({BEST_CHECKPOINT_STEP_TAG: str(step),
                              BEST_CHECKPOINT_METRIC_TAG: f"{metric}={metrics[metric]:.6g}"})
    accelerator.wait_for_everyone()
    return metrics if validate else {}


def _is_better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return math.isfinite(value)
    return value > best if higher_is_better(metric) else value < best


def _finish(settings, task, tracker, prepared: Prepared, unreadable: set[str],
            non_finite: set[str]) -> TrainingOutcome:
    """After the last step: report unreadable and non-finite images, save the last (and best) weights."""
    accelerator, state = prepared.accelerator, prepared.state
    accelerator.wait_for_everyone()
    _report_unreadable(prepared, task, tracker, unreadable)
    _report_non_finite(prepared, task, tracker, non_finite)
    output_dir = Path(settings.output_dir)
    _check_weights_finite(settings, prepared, "the model")
    final_metrics = _save_model(settings, task, prepared, output_dir)
    if accelerator.is_main_process and final_metrics:
        tracker.log_metrics(final_metrics, state.global_step)
    return _registered_weights(settings, task, prepared, TrainingOutcome(final_metrics, output_dir, "last",
                                                                         state.global_step))


def _report_unreadable(prepared: Prepared, task: Task, tracker: Tracker, unreadable: set[str]) -> None:
    """One warning with the count, and the files named in the run's unreadable_images.json."""
    paths = unreadable | task.unreadable_before_training
    if prepared.accelerator.num_processes > 1:
        paths = {path for part in gather_object([sorted(paths)]) for path in part}
    if paths and prepared.accelerator.is_main_process:
        logger.warning("%d image(s) could not be read during training and were replaced by their neighbours "
                       "(metric unreadable_substitutions; the files are listed in unreadable_images.json), e.g. %s.",
                       len(paths), sorted(paths)[0])
        tracker.log_dict({"unreadable_images": sorted(paths)}, "unreadable_images.json")


def _report_non_finite(prepared: Prepared, task: Task, tracker: Tracker, non_finite: set[str]) -> None:
    """One warning with the count, the metric non_finite_images and the files in non_finite_images.json (those
    read now, and those the latent cache was encoded from)."""
    paths = non_finite | task.non_finite_before_training
    if prepared.accelerator.num_processes > 1:
        paths = {path for part in gather_object([sorted(paths)]) for path in part}
    if paths and prepared.accelerator.is_main_process:
        logger.warning("%d image(s) had NaN or infinite pixels, read as 0 (1 for +inf) (metric non_finite_images; "
                       "the files are listed in non_finite_images.json), e.g. %s.", len(paths), sorted(paths)[0])
        tracker.log_metrics({"non_finite_images": len(paths)}, prepared.state.global_step)
        tracker.log_dict({"non_finite_images": sorted(paths)}, "non_finite_images.json")


def _save_model(settings, task: Task, prepared: Prepared, target: Path) -> dict[str, float]:
    """task.save, with a full disk (or another write error) said in one line and no temporary folder left."""
    try:
        return task.save(prepared.accelerator, prepared.model, target)
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
    except BaseException:  # Ctrl-C or SIGTERM mid-save: no half-written model folder left
        for temporary in Path(target).glob(".*.tmp"):
            shutil.rmtree(temporary, ignore_errors=True)
        raise


def _registered_weights(settings, task, prepared: Prepared, last: TrainingOutcome) -> TrainingOutcome:
    """The outcome to register: the last weights, or (--register best) the best validated ones, exported
    from checkpoint-best to output_dir/best unless they are the last weights anyway."""
    state, metric = prepared.state, prepared.checkpoint_metric
    best = Path(settings.output_dir) / BEST_CHECKPOINT
    if settings.register != "best" or metric is None or state.best_step is None or not best.is_dir():
        if settings.register == "best" and prepared.accelerator.is_main_process:
            logger.info("No validated checkpoint to choose from: registering the last weights.")
        return last
    step, value = state.best_step, state.best_value
    if step == state.global_step:
        return TrainingOutcome(last.metrics, last.model_dir, "best", step, metric, value)
    load_checkpoint(prepared.accelerator, best, prepared.checkpoint_states)
    task.after_resume(prepared.accelerator)
    target = Path(settings.output_dir) / "best"
    metrics = _save_model(settings, task, prepared, target)
    logger.info("Exported the best weights (step %d, %s %.5g) to %s.", step, metric, value, target)
    return TrainingOutcome(metrics, target, "best", step, metric, value)
