"""The one set of tiny sizes tests train with: 32 px images, one layer per block, no warm-up (seconds on a CPU).
Each test adds what it is about; a later repeat of a flag wins (click keeps the last value)."""

from __future__ import annotations

TINY_SIZES = ["--resolution", "32", "--train_batch_size", "4", "--layers_per_block", "1", "--lr_warmup_steps", "0"]


def as_project_params(arguments: list[str]) -> list[str]:
    """["--resolution", "32", ...] as `mlflow run` parameters: ["-P", "resolution=32", ...]."""
    names, values = arguments[0::2], arguments[1::2]
    return [part for name, value in zip(names, values) for part in ("-P", f"{name.removeprefix('--')}={value}")]


TINY_TRAINING = [*TINY_SIZES, "--max_train_steps", "2", "--mixed_precision", "no"]
# What a docs block marked `<!-- runnable: tiny -->` appends to each `ldmflow <command>` it runs
# (tests/test_runnable_docs.py): the doc's own sizes are overridden, so its commands run in seconds.
TINY_COMMANDS = {
    "vae": [*TINY_TRAINING, "--block_out_channels", "8,8,8,8", "--scaling_factor_batches", "1"],
    "latent-ddpm": [*TINY_TRAINING, "--block_out_channels", "16,16", "--num_preview_images", "1",
                    "--preview_inference_steps", "1"],
    "legacy-ddpm": [*TINY_TRAINING, "--block_out_channels", "32,32", "--num_preview_images", "1",
                    "--preview_inference_steps", "1"],
    "probe": TINY_TRAINING,
    "sample": ["--num_inference_steps", "2"],
    "evaluate": ["--num_samples", "4", "--num_inference_steps", "2", "--batch_size", "4", "--probe_epochs", "1"],
    # not --layers_per_block: docs/sweeps.md's space searches it, and a sweep refuses a setting given both ways
    "sweep": ["--n_trials", "2", *[part for name, value in zip(TINY_TRAINING[0::2], TINY_TRAINING[1::2])
                                   if name != "--layers_per_block" for part in (name, value)]],
}
