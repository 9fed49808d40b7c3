"""`ldmflow sample`: images from a trained model (folder or MLflow URI), written to disk and logged as a run."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from ldmflow.data.image_io import extension_for, write_image
from ldmflow.errors import LdmflowError
from ldmflow.files import temporary_folder
from ldmflow.sampling.condition_input import (SEED_COLUMN, conditions_from_frame, parse_condition_option,
                                              read_conditions_file, seed_cell)
from ldmflow.sampling.denoise import check_inference_steps
from ldmflow.sampling.grids import condition_label, image_grid, to_pil
from ldmflow.sampling.load import load_sampler
from ldmflow.sampling.sampler import Sampler, check_generated
from ldmflow.settings import MAX_SEED, SampleSettings

logger = logging.getLogger(__name__)


def requested_conditions(settings: SampleSettings, sampler: Sampler) -> tuple[list[dict] | None, list[int]]:
    """Per-image conditions (None: unconditional) and seeds from --condition / --conditions_file / --seed."""
    if settings.conditions_file:
        frame = read_conditions_file(settings.conditions_file)
        if frame.empty:
            raise LdmflowError(f"--conditions_file {settings.conditions_file} has no rows.")
        spec = sampler.condition_spec
        if spec is None:
            raise LdmflowError("This model is unconditional: --conditions_file does not apply.")
        conditions = conditions_from_frame(frame, spec)
        sampler.check_conditions(conditions, settings.guidance_weights())  # before any MLflow run opens
        if SEED_COLUMN in frame.columns:
            seeds = _seeds_column(frame[SEED_COLUMN], settings.seed)
        else:
            seeds = [settings.seed + i for i in range(len(conditions))]
        return conditions, seeds
    seeds = [settings.seed + i for i in range(settings.num_images)]
    if settings.condition:
        if sampler.condition_spec is None:
            raise LdmflowError("This model is unconditional (a legacy pixel DDPM): --condition does not apply.")
        condition = parse_condition_option(settings.condition)
        sampler.check_conditions([condition], settings.guidance_weights())  # before any MLflow run opens
        return [dict(condition) for _ in seeds], seeds
    return None, seeds


def _seeds_column(column, default_start: int) -> list[int]:
    """Integer seeds per row, in numpy's and torch's range; blank cells get default_start + row."""
    seeds, bad = [], []
    for i, raw in enumerate(column):
        try:
            seed = seed_cell(raw)
        except ValueError:
            bad.append(i)
            seed = None
        seeds.append(default_start + i if seed is None else seed)
    if bad:
        raise LdmflowError(f"--conditions_file: seed must be an integer in [0, {MAX_SEED}] (rows {bad[:5]}).")
    return seeds


BYTES_PER_IMAGE_PIXEL = 3 * 4 * 2  # RGB float32, held twice (the generated array and its 8-bit/PIL copies)


def check_images_fit(count: int, size: int, available: int | None = None) -> None:
    """All images are kept in memory until written: refuse, before any run opens, a request that cannot fit in
    the memory available now (an estimate: the images alone, not the model)."""
    import psutil

    available = psutil.virtual_memory().available if available is None else available
    needed = count * size * size * BYTES_PER_IMAGE_PIXEL
    if needed > available:
        raise LdmflowError(f"{count} images of {size}x{size} px need about {needed / 2**30:.1f} GiB in memory, "
                           f"over the {available / 2**30:.1f} GiB available now: ask for at most "
                           f"{available // (size * size * BYTES_PER_IMAGE_PIXEL)} (--num_images or the rows of "
                           "--conditions_file) and run several samples.")


def generate(settings: SampleSettings, sampler: Sampler, conditions, seeds) -> np.ndarray:
    """(N, H, W, 3) images in [0, 1]; refused when none carries information (check_generated)."""
    images = sampler.generate(conditions, num_images=len(seeds), guidance_scale=settings.guidance_scale,
                              num_inference_steps=settings.num_inference_steps, scheduler=settings.scheduler,
                              seeds=seeds, batch_size=settings.batch_size,
                              condition_guidance=settings.guidance_weights() or None)
    return check_generated(images, max([settings.guidance_scale, *settings.guidance_weights().values()]))


def write_samples(output_dir: Path, images: np.ndarray, labels: list[str] | None, image_format: str,
                  tracker) -> Path:
    """sample_0000.<ext> ... and grid.png, logged, then published as a new folder inside output_dir
    (samples-<4 random hex digits>, e.g. samples-c4d2): nothing that is already there is touched."""
    temporary = temporary_folder(output_dir, "samples")
    extension = extension_for(image_format)
    try:
        for index, image in enumerate(images):
            write_image(temporary / f"sample_{index:04d}{extension}", image, image_format)
        grid = image_grid(to_pil(images), labels=labels)
        grid.save(temporary / "grid.png")
        tracker.log_image(grid, key="samples", step=0)
        tracker.log_artifacts(str(temporary), "samples")  # exactly this run's files, nothing else in output_dir
        return _publish_under_a_new_name(temporary, output_dir) / "grid.png"
    except BaseException:  # a full disk, Ctrl-C, SIGTERM: no half-written samples folder left
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _publish_under_a_new_name(temporary: Path, output_dir: Path) -> Path:
    """Rename the finished folder to a samples-<hex> name nobody has: renaming onto a folder with files fails,
    so a name another run took meanwhile is skipped, never replaced."""
    from ldmflow.tracking.run_tracker import default_run_name

    for _ in range(100):
        folder = output_dir / default_run_name("samples")
        try:
            temporary.rename(folder)
            return folder
        except OSError:
            if not folder.exists():
                raise
    raise LdmflowError(f"No free samples-<hex> folder name in {output_dir}; move old sample folders away.")


def run_sampling(settings: SampleSettings) -> Path:
    """Resolve the model, generate, write files, and log a `sample` run that points back at the model."""
    from ldmflow.tracking.lineage import record_sample_source
    from ldmflow.tracking.model_uri import fetch_model, resolve_model_source
    from ldmflow.tracking.run_tracker import open_run

    source = resolve_model_source(settings.model_uri)
    sampler = load_sampler(source.local_dir, settings.dtype, settings.torch_compile, fetch=fetch_model)
    conditions, seeds = requested_conditions(settings, sampler)
    check_inference_steps(settings.num_inference_steps, sampler.scheduler_config)  # before any run opens
    check_images_fit(len(seeds), sampler.image_size)
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open_run(settings, "sample", enabled=not settings.no_mlflow) as tracker:
        record_sample_source(tracker, source)
        images = generate(settings, sampler, conditions, seeds)
        labels = [condition_label(c) for c in conditions] if conditions else None
        grid = write_samples(output_dir, images, labels, settings.output_format, tracker)
    logger.debug("Wrote %d images and %s", len(images), grid)  # the command prints the grid's path
    return grid
