"""Every command's settings, one frozen dataclass each: the single source of every default.

The CLI's options (`cli.py`) and MLproject's parameters (`projects.py` renders the file) are generated from
these fields and their metadata, so a default, a choice or a help text is written here and nowhere else.
This module is at the bottom of the package: every layer may import it, and it imports only the standard
library (the CLI's --help stays instant).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path

from ldmflow.errors import LdmflowError

DEFAULT_CONDITION_SPEC = "temperature:1,wind:3,wind_mag:1"  # the original scripts' default
DEFAULT_EXPERIMENT = "ldmflow"
IMAGE_FORMATS = ("png", "png16", "tiff16", "tiff32")  # what image_io writes
MIXED_PRECISIONS = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
PREDICTION_TYPES = ("epsilon", "v_prediction")
DISC_LOSSES = ("hinge", "vanilla")  # the VAE discriminator's loss
SAMPLE_DTYPES = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "eager")  # eager: TorchDynamo's graphs without inductor's kernels
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SAMPLING_SCHEDULERS = ("ddpm", "ddim", "dpm_solver")
REGISTER_CHOICES = ("best", "last")
FEATURE_EXTRACTORS = ("auto", "inception", "probe")
PROBE_NORMS = ("group", "batch", "none")
SWEEP_STAGES = ("vae", "latent-ddpm", "legacy-ddpm")  # the commands a sweep trains (their kinds: models/kinds.py)
SWEEP_DIRECTIONS = ("auto", "minimize", "maximize")
SWEEP_PRUNERS = ("median", "none")
# Upper bounds, checked in __post_init__ before anything is allocated (each error says the value, bound and why)
MAX_SEED = 2**32 - 1  # numpy's generators refuse larger seeds
MAX_RESOLUTION = 4096
MAX_TENSOR_ELEMENTS = 2**31 - 1  # torch's 32-bit index math in convolution and resize kernels
MAX_WORKERS = 64
MAX_DIFFUSION_STEPS = 10_000
MAX_GENERATED_IMAGES = 100_000
MAX_FID_SAMPLES = 50_000
MAX_SAMPLING_BATCH = 1024
MAX_REPLICATES = 100
MAX_GUIDANCE_SCALE = 100.0  # models are guided at 1 to 20; far beyond, every image saturates to one flat colour
LATENT_CACHE_DTYPES = ("float32", "float16")
MAX_IMAGE_PIXELS = 16384 * 16384  # larger images are refused from their header, before any decoding


def setting(default=MISSING, help: str = "", *, choices: tuple[str, ...] | None = None,
            aliases: tuple[str, ...] = (), project: bool = True, resumable: bool = False):
    """A settings field with what the CLI and MLproject need to expose it.

    choices: allowed values (a click.Choice); aliases: other accepted flags (the original scripts' names);
    project=False: a CLI-only option (`mlflow run` has its own run and experiment);
    resumable=True: may differ when a run resumes from a checkpoint (how long, how often, where to track and
    register, how fast), because it does not change what is trained.
    """
    metadata = {"help": help, "choices": choices, "aliases": aliases, "project": project, "resumable": resumable}
    return field(default=default, metadata=metadata)


def setting_fields(settings_class) -> list[tuple[dataclasses.Field, type, dict]]:
    """(field, resolved type, metadata) per field; metadata is inherited from the base class that declared it,
    so a subclass may override just the default (`resolution: int = 64`).

    In declaration order, except that the tracking settings (experiment, run name, --no_mlflow) come last:
    their base class declares them first, but --help lists a command's own settings before them.
    """
    hints = typing.get_type_hints(settings_class)
    result = []
    for item in dataclasses.fields(settings_class):
        metadata: dict = {}
        for klass in reversed(settings_class.__mro__):
            declared = getattr(klass, "__dataclass_fields__", {}).get(item.name)
            if declared is not None:
                metadata.update({k: v for k, v in declared.metadata.items() if v not in (None, "", ())})
        result.append((item, hints[item.name], metadata))
    tracking = {item.name for item in dataclasses.fields(TrackingSettings)}
    return sorted(result, key=lambda entry: entry[0].name in tracking)


def resumable_changes(settings_class) -> frozenset[str]:
    """The settings declared `resumable`: a resumed run may change them, the checkpoint's fingerprint omits them."""
    return frozenset(item.name for item, _, metadata in setting_fields(settings_class) if metadata.get("resumable"))


def settings_params(settings) -> dict[str, str]:
    """Flat string params for MLflow (None becomes an empty string, tuples a comma list, booleans true/false)."""
    return {item.name: param_value(getattr(settings, item.name)) for item in dataclasses.fields(settings)}


def param_value(value) -> str:
    """One setting as MLflow stores it, the same string `mlflow run -P name=value` logs."""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def _check_at_least(settings, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(settings, name)
        if value is not None and value < minimum:
            raise LdmflowError(f"--{name} must be at least {minimum}, got {value}.")


def _check_at_most(settings, maximum: int, why: str, *names: str) -> None:
    """An upper bound, checked before anything is allocated; the message gives the value, the bound and why."""
    for name in names:
        value = getattr(settings, name)
        if value is not None and value > maximum:
            raise LdmflowError(f"--{name} is {value}, over the bound of {maximum}: {why}.")


def _check_seeds(settings, count_name: str | None = None) -> None:
    """--seed, and with `count_name` the last seed used (image i uses seed + i), within numpy's seed range."""
    _check_at_least(settings, 0, "seed")
    count = getattr(settings, count_name) if count_name else 1
    last = settings.seed + max(count, 1) - 1
    if last > MAX_SEED:
        what = (f"--seed {settings.seed} + --{count_name} {count} - 1 (the last image's seed) is {last}" if count_name
                else f"--seed is {last}")
        raise LdmflowError(f"{what}, over the bound of {MAX_SEED}: numpy and torch generators take seeds in "
                           "[0, 2**32 - 1].")


def _check_batch_elements(settings, *names: str) -> None:
    """A batch of input images at --resolution must fit torch's 32-bit index math."""
    for name in names:
        elements = getattr(settings, name) * 3 * settings.resolution ** 2
        if elements > MAX_TENSOR_ELEMENTS:
            raise LdmflowError(f"--{name} {getattr(settings, name)} at --resolution {settings.resolution} is a batch "
                               f"of {elements:,} values, over the bound of {MAX_TENSOR_ELEMENTS:,}: torch's "
                               "convolution and resize kernels index a tensor with 32-bit integers.")


def _check_sampling_bounds(settings, count_name: str, maximum: int, why: str) -> None:
    """sample and evaluate: how many images, their steps and batch, and the seed of the last image."""
    _check_at_most(settings, maximum, why, count_name)
    _check_at_most(settings, MAX_DIFFUSION_STEPS, "no noise schedule has more steps", "num_inference_steps")
    _check_at_most(settings, MAX_SAMPLING_BATCH, "images denoised together; more do not fit an accelerator at "
                   "any useful size", "batch_size")
    _check_seeds(settings, count_name)


def _check_number(settings, name: str, low: float | None = None, high: float | None = None,
                  low_open: bool = False, high_open: bool = False) -> None:
    """A finite number within [low, high] (open ends where asked); None (an unset optional) passes."""
    value = getattr(settings, name)
    if value is None:
        return
    if not math.isfinite(value):
        raise LdmflowError(f"--{name} must be a finite number, got {value}.")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise LdmflowError(f"--{name} must be in {span}, got {value}.")


def _check_choices(settings) -> None:
    """Every setting declared with `choices` holds one of them: the one check for all of them, in field order."""
    for name, choices in _choice_fields(type(settings)):
        if getattr(settings, name) not in choices:
            raise LdmflowError(f"--{name} must be one of {', '.join(choices)}, got {getattr(settings, name)!r}.")


@functools.lru_cache(maxsize=None)
def _choice_fields(settings_class) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return tuple((item.name, metadata["choices"]) for item, _, metadata in setting_fields(settings_class)
                 if metadata.get("choices"))


def _check_alias(alias: str | None) -> None:
    if alias is not None and (alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias) or not alias.strip()):
        raise LdmflowError(f"--register_alias {alias!r} is reserved by MLflow (latest, v<number>); "
                           "choose another name such as candidate or champion.")


def _check_model_name(name: str | None) -> None:
    """Checked before training, not at registration hours later: MLflow refuses '/' and ':' and names that are not
    a plain path segment; '@' would make models:/<name>@<alias> ambiguous. Quotes, spaces and unicode work."""
    if name is None:
        return
    bad = sorted({char for char in name if char in "/:@" or ord(char) < 32 or ord(char) == 127})
    if not name.strip() or bad or name.strip() in (".", "..") or name != name.strip():
        why = (f"it contains {', '.join(repr(char) for char in bad)}" if bad
               else "it is empty, '.' or '..', or starts or ends with a space")
        raise LdmflowError(f"--registered_model_name {name[:100]!r} cannot be a registered model's name: {why} "
                           "(MLflow refuses '/' and ':', and ldmflow reads '@' as models:/<name>@<alias>).")


def named_numbers(text: str, option: str) -> float | dict[str, float] | None:
    """`--<option>` as written: '' -> None, '0.1' -> 0.1, 'temperature=0.1,wind=0.2' -> {name: number}; a malformed
    item, a repeated name or a number that is not finite is one line."""
    stripped = (text or "").strip()
    if not stripped:
        return None
    if "=" not in stripped:
        return _finite_number(stripped, option, stripped)
    numbers: dict[str, float] = {}
    for item in stripped.split(","):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise LdmflowError(f"--{option} {text!r}: expected name=number items separated by commas (e.g. "
                               f"temperature=0.1,wind=0.2), got {item.strip()!r}.")
        if name in numbers:
            raise LdmflowError(f"--{option} {text!r}: {name} is given twice.")
        numbers[name] = _finite_number(value, option, item.strip())
    return numbers


def _finite_number(value: str, option: str, item: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise LdmflowError(f"--{option}: {item!r} is not a number (expected e.g. 0.1 or temperature=0.1).") from None
    if not math.isfinite(number):
        raise LdmflowError(f"--{option}: {item!r} must be a finite number.")
    return number


def _check_named_range(numbers: dict[str, float], option: str, low: float, high: float, high_open: bool) -> None:
    for name, value in numbers.items():
        if not (low <= value < high if high_open else low <= value <= high):
            right = ")" if high_open else "]"
            raise LdmflowError(f"--{option}: {name}={value:g} must be in [{low:g}, {high:g}{right}.")


def condition_names(condition_spec: str) -> tuple[str, ...]:
    """The names of a `name:dim,...` spec as written ('none': no names); the spec itself is parsed and checked by
    data/conditions.py, which this bottom module cannot import."""
    if condition_spec.strip().lower() in ("", "none"):
        return ()
    return tuple(item.split(":")[0].strip() for item in condition_spec.split(",") if item.strip())


def _default(settings_class, name: str):
    """A field's default, for settings that pass it on to another command (the pipeline's steps)."""
    return next(item for item in dataclasses.fields(settings_class) if item.name == name).default


def _channels(settings_class) -> str:
    return param_value(_default(settings_class, "block_out_channels"))


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every command's settings: logged to MLflow as flat string params."""

    def to_params(self) -> dict[str, str]:
        return settings_params(self)


@dataclass(frozen=True, kw_only=True)
class ExperimentSettings(Settings):
    """A command that logs to an MLflow experiment: the pipeline, and every command that opens a run.
    project=False: under `mlflow run`, MLflow chooses the experiment and the run."""

    experiment_name: str = setting(DEFAULT_EXPERIMENT, "MLflow experiment.", project=False, resumable=True)


@dataclass(frozen=True, kw_only=True)
class TrackingSettings(ExperimentSettings):
    """A command that opens one MLflow run, or none with --no_mlflow: the trainers, sample and evaluate."""

    run_name: str | None = setting(None, "MLflow run name.", project=False, resumable=True)
    no_mlflow: bool = setting(False, "Do not track this run in MLflow.", project=False, resumable=True)


@dataclass(frozen=True, kw_only=True)
class ManifestSettings(Settings):
    """A command that reads a manifest's images: the trainers, evaluate and check-manifest."""

    manifest_path: str = setting(help="JSON manifest of images (see docs/manifest.md).")
    data_root: str | None = setting(None, "Folder output_rel is relative to (default: the manifest's).")
    allow_outside_root: bool = setting(False, "Accept output_rel paths outside the data root.")


@dataclass(frozen=True, kw_only=True)
class TrainSettings(ManifestSettings, TrackingSettings):
    """What every trainer shares: data, optimisation, checkpoints, previews and tracking."""

    output_dir: str = setting(help="Where weights, checkpoints and previews go.", resumable=True)
    split: str = setting("train", "metadata.split value to train on.")
    val_split: str = setting("val", "Split used for validation, if present.")
    resolution: int = setting(256, "Square training size in pixels (multiple of 8).")
    random_crop: bool = setting(False, "Random instead of center crop.")
    random_flip: bool = setting(False, "Random horizontal flips.")
    preserve_input_precision: bool = setting(False, "Keep 16-bit/float precision instead of 8-bit.")
    max_image_pixels: int = setting(MAX_IMAGE_PIXELS, "Images with more pixels are skipped as unreadable "
                                                      "(from their header, before decoding).")
    train_batch_size: int = setting(8, "Images per process and step.")
    eval_batch_size: int = setting(4, "Images per batch for validation and previews.")
    num_epochs: int = setting(50, "Passes over the training split.", resumable=True)
    max_train_steps: int | None = setting(None, "Stop after this many optimizer steps (overrides --num_epochs).",
                                          resumable=True)
    learning_rate: float = setting(1e-4, "AdamW learning rate.")
    lr_scheduler: str = setting("cosine", "Learning-rate schedule (diffusers.optimization).", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = setting(500, "Linear warm-up steps of the LR schedule.")
    adam_weight_decay: float = setting(1e-6, "AdamW weight decay.")
    gradient_accumulation_steps: int = setting(1, "Micro-batches per optimizer step.")
    max_grad_norm: float = setting(1.0, "Gradient clipping norm.")
    mixed_precision: str = setting("no", "Autocast precision (fp16 needs CUDA).", choices=MIXED_PRECISIONS)
    seed: int = setting(0, "Seed of weights, shuffling, augmentation and noise.")
    replicates: int = setting(1, "Train this many seeds (--seed, --seed + 1, ...) as child runs of one parent run "
                                 "holding each metric's mean, sd, min and max; the replicate nearest the mean is "
                                 "registered.")
    replicate_group: str | None = setting(None, "Run the replicates in several processes: every process started "
                                                "with the same command and group name trains the next seed nobody "
                                                "has taken (one per GPU with CUDA_VISIBLE_DEVICES, or per node), "
                                                "and the last to finish summarises the group.", resumable=True)
    dataloader_num_workers: int = setting(0, "Data-loader worker processes.", resumable=True)
    checkpointing_steps: int = setting(500, "Save a resumable checkpoint every N steps.", resumable=True)
    checkpoints_total_limit: int | None = setting(None, "Keep only the newest N checkpoints.", resumable=True)
    resume_from_checkpoint: str | None = setting(None, "'latest' or a checkpoint folder.", resumable=True)
    save_images_epochs: int = setting(5, "Preview every N epochs (and after the last).", resumable=True)
    eval_epochs: int | None = setting(None, "Validate on the val split every N epochs (and after the last); 0: "
                                            "never; default: about --num_validations times per run.",
                                    resumable=True)
    num_validations: int = setting(20, "Validations per run when --eval_epochs is not given (evenly spaced "
                                       "epochs, the last included): about 5% of a run's time on the demo.",
                                   resumable=True)
    checkpoint_metric: str | None = setting(None, "Validation metric that picks the best checkpoint (default: "
                                                  "the stage's, val/psnr or val/denoise_loss[_ema]).")
    register: str = setting("best", "Register the best checkpoint (by --checkpoint_metric) or the last weights; "
                                    "without validation the last.", choices=REGISTER_CHOICES, resumable=True)
    logging_steps: int = setting(10, "Log metrics every N steps.", resumable=True)
    max_nonfinite_steps: int = setting(5, "Stop after this many non-finite losses in a row.", resumable=True)
    block_out_channels: tuple[int, ...] = setting((), "Channels per resolution level, comma separated.")
    layers_per_block: int = setting(2, "ResNet layers per resolution level.")
    enable_xformers_memory_efficient_attention: bool = setting(
        False, "Use xformers when installed and usable; otherwise PyTorch SDPA.")
    torch_compile: bool = setting(False, "torch.compile the trained model (minutes of compiling, then faster "
                                         "steps; worth it for long runs on a GPU).", resumable=True)
    compile_mode: str = setting("default", "torch.compile mode.", choices=COMPILE_MODES, resumable=True)
    compile_backend: str = setting("inductor", "torch.compile backend: inductor generates fast kernels; eager "
                                               "traces the same graphs and runs them without, to tell a compiler "
                                               "bug from a model bug.", choices=COMPILE_BACKENDS, resumable=True)
    channels_last: bool = setting(False, "Channels-last memory layout for the convolutions (faster on tensor "
                                         "cores).", resumable=True)
    allow_tf32: bool = setting(True, "TF32 matmuls and convolutions on CUDA (Ampere and newer); "
                                     "--no_allow_tf32 for strict fp32.", resumable=True)
    registered_model_name: str | None = setting(None, "Registry name (default ldmflow-<stage>).", resumable=True)
    register_alias: str | None = setting(None, "Set this alias (e.g. candidate) on the new version.", resumable=True)
    allow_changed_settings: bool = setting(False, "Resume even though the settings or the data differ from the "
                                                  "checkpoint's.", resumable=True)

    def __post_init__(self) -> None:
        if self.resolution <= 0 or self.resolution % 8:
            raise LdmflowError(f"--resolution must be a positive multiple of 8, got {self.resolution}.")
        _check_at_least(self, 1, "max_image_pixels", "train_batch_size", "eval_batch_size", "num_epochs", "replicates",
                        "gradient_accumulation_steps", "checkpointing_steps", "save_images_epochs", "logging_steps",
                        "layers_per_block", "num_validations",
                        "max_train_steps", "max_nonfinite_steps", "checkpoints_total_limit")
        _check_at_least(self, 0, "dataloader_num_workers", "lr_warmup_steps", "eval_epochs")
        _check_at_most(self, MAX_RESOLUTION, "one image of that size is already 200 MB of float32 input before any "
                       "activation; latent diffusion trains at 256 to 1024", "resolution")
        _check_batch_elements(self, "train_batch_size", "eval_batch_size")
        _check_at_most(self, MAX_WORKERS, "each worker is a process with its own copy of the dataset, and more "
                       "never load faster", "dataloader_num_workers")
        _check_seeds(self, "replicates")
        _check_at_most(self, MAX_REPLICATES, "each replicate is a whole training, run one after another",
                       "replicates")
        if self.replicate_group is not None and (self.replicates < 2 or not self.replicate_group.strip()):
            raise LdmflowError(f"--replicate_group {self.replicate_group!r} names a group of --replicates 2 or more "
                               f"(got --replicates {self.replicates}); give both, or neither.")
        _check_number(self, "learning_rate", 0, 1, low_open=True)
        _check_number(self, "adam_weight_decay", 0)
        _check_number(self, "max_grad_norm", 0, low_open=True)
        _check_choices(self)
        if self.compile_mode != "default" and self.compile_backend != "inductor":
            raise LdmflowError(f"--compile_mode {self.compile_mode} needs --compile_backend inductor (the modes are "
                               f"inductor's), got {self.compile_backend}.")
        if any(c < 1 for c in self.block_out_channels):
            raise LdmflowError(f"--block_out_channels must be positive integers, got {self.block_out_channels}.")
        _check_alias(self.register_alias)
        _check_model_name(self.registered_model_name)


@dataclass(frozen=True, kw_only=True)
class VaeSettings(TrainSettings):
    """`ldmflow vae`: AutoencoderKL, by default with 4 latent channels and x8 downsampling."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    kl_weight: float = setting(1e-4, "Weight of the KL term (loss = MSE + L1 + kl_weight x KL).")
    scaling_factor_batches: int = setting(50, "Training batches used to measure the latent scaling factor.")
    latent_channels: int = setting(4, "Channels of the latent space (the LDM paper compares 4, 8 and 16).")
    downsample_factor: int = setting(8, "How much the latents shrink each side: 4, 8 or 16 (--block_out_channels "
                                        "then needs 3, 4 or 5 widths, one per level).")
    perceptual_weight: float = setting(0.0, "Weight of the LPIPS perceptual loss (1.0 in latent diffusion); 0: off.")
    perceptual_weights: str | None = setting(None, "Folder with the LPIPS weight files (default: "
                                                   "$LDMFLOW_LPIPS_WEIGHTS, else downloaded on first use).")
    disc_weight: float = setting(0.0, "Weight of the PatchGAN adversarial loss (0.5 in latent diffusion); 0: off.")
    disc_start: int = setting(0, "Step from which the discriminator trains and the adversarial term applies.")
    disc_loss: str = setting("hinge", "Adversarial loss.", choices=DISC_LOSSES)
    disc_learning_rate: float | None = setting(None, "Discriminator learning rate (default: --learning_rate).")
    disc_layers: int = setting(3, "Strided layers of the PatchGAN discriminator.")
    learn_logvar: bool = setting(False, "Learn an output log-variance that weighs the reconstruction loss, as "
                                        "latent diffusion does.")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_at_least(self, 1, "scaling_factor_batches", "latent_channels", "disc_layers")
        _check_at_least(self, 0, "disc_start")
        _check_number(self, "kl_weight", 0)
        _check_number(self, "perceptual_weight", 0)
        _check_number(self, "disc_weight", 0)
        _check_number(self, "disc_learning_rate", 0, 1, low_open=True)
        if self.downsample_factor not in (4, 8, 16):
            raise LdmflowError(f"--downsample_factor must be 4, 8 or 16, got {self.downsample_factor}.")
        levels = self.downsample_factor.bit_length()  # 4 -> 3 levels, 8 -> 4, 16 -> 5
        if len(self.block_out_channels) != levels:
            raise LdmflowError(
                f"--downsample_factor {self.downsample_factor} needs {levels} --block_out_channels (one per "
                f"resolution level), got {len(self.block_out_channels)}: "
                f"{','.join(map(str, self.block_out_channels))}.")
        if self.resolution % self.downsample_factor:
            raise LdmflowError(f"--resolution {self.resolution} is not a multiple of --downsample_factor "
                               f"{self.downsample_factor}.")


@dataclass(frozen=True, kw_only=True)
class DdpmSettings(TrainSettings):
    """What both DDPM trainers (latent and legacy) share: noise schedule, objective, EMA, previews."""

    block_out_channels: tuple[int, ...] = (128, 128, 256, 256, 512, 512)
    use_ema: bool = setting(False, "Keep an EMA of the weights (used for previews and saving).")
    ema_max_decay: float = setting(0.9999, "Largest EMA decay.")
    ema_inv_gamma: float = setting(1.0, "EMA warm-up inverse multiplicative factor.")
    ema_power: float = setting(0.75, "EMA warm-up exponential factor.")
    ema_update_every: int = setting(1, "Update the EMA every N optimizer steps, with decay^N (the same horizon at "
                                       "1/N of the cost).")
    prediction_type: str = setting("epsilon", "What the UNet predicts.", choices=PREDICTION_TYPES)
    snr_gamma: float | None = setting(None, "Min-SNR loss weighting gamma (5.0 is typical).")
    ddpm_num_steps: int = setting(1000, "Diffusion steps of the noise schedule.")
    ddpm_beta_schedule: str = setting("linear", "Noise schedule.", choices=BETA_SCHEDULES)
    rescale_betas_zero_snr: bool = setting(False, "Rescale the schedule to zero terminal SNR (Lin et al. 2024; "
                                                  "needs v_prediction), with trailing timestep spacing.")
    num_preview_images: int = setting(8, "Images per preview grid.")
    preview_inference_steps: int = setting(25, "DDIM steps for preview grids.")
    val_timesteps: int = setting(10, "Timesteps of the fixed grid the validation denoising loss averages over.")
    attention_head_dim: int = setting(8, "Channels per attention head (heads = width / this); 64 suits tensor "
                                         "cores better at large widths.")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_at_least(self, 1, "num_preview_images", "preview_inference_steps", "ddpm_num_steps", "val_timesteps",
                        "attention_head_dim")
        _check_at_most(self, MAX_DIFFUSION_STEPS, "the noise schedule is tabulated per step, and diffusers' "
                       "schedules are tuned for 1000", "ddpm_num_steps")
        attended = self.block_out_channels[-2:] if len(self.block_out_channels) >= 3 else self.block_out_channels[-1:]
        if any(width % self.attention_head_dim for width in attended):  # the widths that have self-attention
            raise LdmflowError(f"--attention_head_dim {self.attention_head_dim} must divide the attention levels' "
                               f"widths {','.join(map(str, attended))} (--block_out_channels).")
        _check_number(self, "ema_max_decay", 0, 1)
        _check_at_least(self, 1, "ema_update_every")
        _check_number(self, "ema_inv_gamma", 0, low_open=True)
        _check_number(self, "ema_power", 0, low_open=True)
        _check_number(self, "snr_gamma", 0, low_open=True)
        if self.val_timesteps > self.ddpm_num_steps:
            raise LdmflowError(f"--val_timesteps ({self.val_timesteps}) cannot exceed --ddpm_num_steps "
                               f"({self.ddpm_num_steps}).")
        if self.preview_inference_steps > self.ddpm_num_steps:
            raise LdmflowError(f"--preview_inference_steps ({self.preview_inference_steps}) cannot exceed "
                               f"--ddpm_num_steps ({self.ddpm_num_steps}).")
        if self.rescale_betas_zero_snr and self.prediction_type != "v_prediction":
            raise LdmflowError("--rescale_betas_zero_snr needs --prediction_type v_prediction (at zero terminal SNR "
                               "the last step's noise says nothing about the image); with epsilon add "
                               "--no_rescale_betas_zero_snr.")
        if len(self.block_out_channels) < 2:
            raise LdmflowError("--block_out_channels needs at least 2 values for a UNet.")

    def _check_downsampling(self, size: int, what: str) -> None:
        if size % (2 ** (len(self.block_out_channels) - 1)):
            raise LdmflowError(f"{what} cannot be downsampled {len(self.block_out_channels) - 1} times; "
                               "use fewer --block_out_channels or a larger resolution.")


@dataclass(frozen=True, kw_only=True)
class LatentDdpmSettings(DdpmSettings):
    """`ldmflow latent-ddpm`: a conditioned UNet2DConditionModel on a trained VAE's latents."""

    vae_uri: str = setting(help="The VAE: its folder or an MLflow URI (runs:/, models:/name/version, ...).",
                           aliases=("--vae_path",))
    block_out_channels: tuple[int, ...] = (256, 256, 256)
    train_batch_size: int = 4
    condition_spec: str = setting(DEFAULT_CONDITION_SPEC, "Comma list of name:dim, or 'none' for unconditional.")
    cond_dropout_prob: float = setting(0.1, "Probability of training a sample with the null condition "
                                            "(classifier-free guidance).")
    cond_dropout_per_condition: str = setting("", "Probability of dropping each condition alone (its value and "
                                                  "flag zeroed), independent of --cond_dropout_prob: one number for "
                                                  "every condition, or per name, temperature=0.1,wind=0.2 (others "
                                                  "0); a model trained with it takes requests that give only some "
                                                  "conditions. Default: off.")
    cache_latents: bool = setting(False, "Encode the dataset once into an on-disk cache (reused by later runs "
                                         "with the same VAE and data), then train from it.")
    latent_cache_dir: str = setting("", "Folder of the on-disk latent caches (default: $LDMFLOW_CACHE/latents, else "
                                        "latent-cache beside --output_dir).", resumable=True)
    latent_cache_dtype: str = setting("float32", "How the cache stores the posteriors (float16 halves its size).",
                                      choices=LATENT_CACHE_DTYPES)
    guidance_scale: float = setting(3.0, "Classifier-free guidance of the preview grids.")
    time_embedding_dim: int | None = setting(None, "Width of the timestep embedding, which the conditions' "
                                                   "projection adds to (default: 4 x the first channel width).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.condition_spec.strip():
            raise LdmflowError("--condition_spec is empty: give name:dim,... or none for an unconditional model.")
        if not self.vae_uri:
            raise LdmflowError("--vae_uri is required: a VAE folder or an MLflow model URI.")
        _check_number(self, "cond_dropout_prob", 0, 1, high_open=True)
        self.dropout_per_condition()
        _check_number(self, "guidance_scale", 1, MAX_GUIDANCE_SCALE)
        _check_at_least(self, 1, "time_embedding_dim")


    def dropout_per_condition(self) -> dict[str, float]:
        """--cond_dropout_per_condition as name -> probability for every condition of --condition_spec (0: never
        dropped alone); empty when it is off."""
        given = named_numbers(self.cond_dropout_per_condition, "cond_dropout_per_condition")
        names = condition_names(self.condition_spec)
        if given is None:
            return {}
        if not names:
            raise LdmflowError("--cond_dropout_per_condition needs conditions; --condition_spec is none.")
        if isinstance(given, float):
            given = dict.fromkeys(names, given)
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise LdmflowError(f"--cond_dropout_per_condition names {', '.join(unknown)}, not in --condition_spec "
                               f"{self.condition_spec} (conditions: {', '.join(names)}).")
        _check_named_range(given, "cond_dropout_per_condition", 0, 1, high_open=True)
        return {name: given.get(name, 0.0) for name in names}


@dataclass(frozen=True, kw_only=True)
class LegacyDdpmSettings(DdpmSettings):
    """`ldmflow legacy-ddpm`: the original unconditional UNet2DModel in pixel space.

    Its resolution defaults to 64 like diffusers' train_unconditional.py, which the legacy script derives from
    (a six-level pixel UNet at 256 px is many times the latent model's cost).
    """

    resolution: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_downsampling(self.resolution, f"Resolution {self.resolution}")


@dataclass(frozen=True, kw_only=True)
class ProbeSettings(TrainSettings):
    """`ldmflow probe`: a small CNN that reads the conditions back from images, for evaluation."""

    resolution: int = 64
    block_out_channels: tuple[int, ...] = (32, 64, 128, 128)
    train_batch_size: int = 16
    eval_batch_size: int = 32
    num_epochs: int = 40
    learning_rate: float = 3e-3
    lr_warmup_steps: int = 0
    save_images_epochs: int = 10**6  # a probe has no previews
    norm: str = setting("batch", "Normalisation after each convolution: group, batch (keeps how much of a feature "
                                 "each image has) or none.", choices=PROBE_NORMS)
    axis_outputs: bool = setting(True, "Predict each vector condition as its axis (v v^T / |v|: the same for v "
                                        "and -v, and continuous), as the evaluation scores it.")
    condition_spec: str = setting(DEFAULT_CONDITION_SPEC, "The conditions to read: comma list of name:dim.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.condition_spec.strip().lower() == "none":
            raise LdmflowError("A probe reads conditions: --condition_spec none leaves it nothing to learn.")
        if self.resolution % 2 ** len(self.block_out_channels):
            raise LdmflowError(f"--resolution {self.resolution} cannot be halved {len(self.block_out_channels)} "
                               "times; use fewer --block_out_channels or a larger resolution.")


@dataclass(frozen=True, kw_only=True)
class SampleSettings(TrackingSettings):
    """`ldmflow sample`: images from a trained model, for given conditions or unconditional."""

    model_uri: str = setting(help="Output folder, runs:/..., models:/name/version, models:/name@alias or "
                                  "models:/<model_id>.")
    output_dir: str = setting("outputs/samples", "Each run writes its images and grid.png to a new folder here.")
    num_images: int = setting(8, "Images to generate (without --conditions_file).")
    condition: tuple[str, ...] = setting((), "name=value, repeatable: --condition temperature=12.5 "
                                             "--condition wind=1,0,0 --condition wind_mag=1; every image gets "
                                             "them (every condition of the model or none; some only with a model "
                                             "trained with --cond_dropout_per_condition).", project=False)
    conditions_file: str | None = setting(None, "CSV or JSON list: one row of conditions (and seed) per image.")
    guidance_scale: float = setting(3.0, "Classifier-free guidance scale (1 = no guidance).")
    condition_guidance: str = setting("", "Guidance per condition, e.g. temperature=4,wind=2: the unconditional "
                                          "prediction plus each given condition's difference times its weight "
                                          "(one more UNet pass per condition; a condition not named gets "
                                          "--guidance_scale). Needs a model trained with "
                                          "--cond_dropout_per_condition. Default: --guidance_scale alone.")
    num_inference_steps: int = setting(25, "Denoising steps.")
    scheduler: str = setting("ddim", "Sampling scheduler.", choices=SAMPLING_SCHEDULERS)
    seed: int = setting(0, "Image i uses seed + i.")
    batch_size: int = setting(16, "Images denoised together (an image depends only on its seed, whatever this).")
    dtype: str = setting("fp32", "UNet precision on a GPU (the VAE decodes in bf16 or fp32); fp32 on a CPU.",
                         choices=SAMPLE_DTYPES)
    torch_compile: bool = setting(False, "torch.compile the UNet (pays off for many images).")
    output_format: str = setting("png", "Image file format.", choices=IMAGE_FORMATS)

    def __post_init__(self) -> None:
        _check_at_least(self, 1, "num_images", "num_inference_steps", "batch_size")
        _check_sampling_bounds(self, "num_images", MAX_GENERATED_IMAGES, "each image is written and logged to the "
                               "run; split larger jobs into several runs")
        _check_number(self, "guidance_scale", 1, MAX_GUIDANCE_SCALE)
        if self.guidance_weights() and not (self.condition or self.conditions_file):
            raise LdmflowError("--condition_guidance weighs the conditions asked for: give them with --condition or "
                               "--conditions_file.")
        _check_choices(self)
        if self.condition and self.conditions_file:
            raise LdmflowError("Give conditions either with --condition or with --conditions_file, not both.")


    def guidance_weights(self) -> dict[str, float]:
        """--condition_guidance as name -> weight (empty: --guidance_scale alone); the names are checked against
        the model's conditions when it is loaded."""
        return guidance_weights(self.condition_guidance, "condition_guidance")


def guidance_weights(text: str, option: str) -> dict[str, float]:
    """`temperature=4,wind=2` -> {name: weight}, each weight in [0, MAX_GUIDANCE_SCALE]; '' -> {}."""
    weights = named_numbers(text, option)
    if weights is None:
        return {}
    if isinstance(weights, float):
        raise LdmflowError(f"--{option} {text!r}: name each condition's weight, e.g. temperature=4,wind=2 "
                           "(--guidance_scale is the one weight for all).")
    _check_named_range(weights, option, 0, MAX_GUIDANCE_SCALE, high_open=False)
    return weights


@dataclass(frozen=True, kw_only=True)
class EvaluationOptions(ManifestSettings, TrackingSettings):
    """How a model is scored: what `ldmflow evaluate` and `ldmflow compare` share."""

    manifest_path: str = setting(help="JSON manifest with the real images (see docs/manifest.md).")
    split: str = setting("val", "Real images to compare with (and the probe's validation split).")
    train_split: str = setting("train", "The model's training split: the probe's training images and the "
                                        "conditions' range.")
    num_samples: int = setting(256, "Generated (or reconstructed) images compared with the real ones.")
    guidance_scale: float = setting(_default(SampleSettings, "guidance_scale"),
                                    "Classifier-free guidance of the evaluated samples.")
    num_inference_steps: int = setting(_default(SampleSettings, "num_inference_steps"), "Denoising steps.")
    scheduler: str = setting(_default(SampleSettings, "scheduler"), "Sampling scheduler.", choices=SAMPLING_SCHEDULERS)
    seed: int = setting(0, "Sample i uses seed + i: two models are compared on identical noise.")
    batch_size: int = setting(16, "Images per generation or feature batch.")
    feature_extractor: str = setting("auto", "Features for FID/KID: inception (needs ldmflow[eval]), probe (the "
                                             "condition probe's), or auto (inception when available).",
                                     choices=FEATURE_EXTRACTORS)
    inception_weights: str | None = setting(None, "Local pt_inception-2015-12-05 weights (else downloaded).")
    perceptual_weights: str | None = setting(None, "Folder with the LPIPS weight files, for a VAE's LPIPS (default: "
                                                   "$LDMFLOW_LPIPS_WEIGHTS, else torch hub's cache; never downloaded).")
    probe_uri: str | None = setting(None, "Condition probe (folder or MLflow URI); default: the registered probe "
                                          "of this dataset, trained when there is none.")
    condition_spec: str = setting(DEFAULT_CONDITION_SPEC, "Conditions the probe reads ('none': no probe); a "
                                                          "conditioned model's own spec takes precedence.")
    probe_epochs: int = setting(_default(ProbeSettings, "num_epochs"), "Epochs of a probe trained here.")

    def __post_init__(self) -> None:
        _check_evaluation_options(self)


def _check_evaluation_options(self) -> None:
    _check_at_least(self, 2, "num_samples")
    _check_at_least(self, 1, "num_inference_steps", "batch_size")
    _check_sampling_bounds(self, "num_samples", MAX_FID_SAMPLES, "the standard FID count; every sample's "
                           "features are held in memory")
    _check_choices(self)
    _check_number(self, "guidance_scale", 1, MAX_GUIDANCE_SCALE)
    _check_at_least(self, 1, "probe_epochs")


@dataclass(frozen=True, kw_only=True)
class EvaluateSettings(EvaluationOptions):
    """`ldmflow evaluate`: quality metrics of a trained model, logged to a run linked to the model."""

    model_uri: str = setting(help="The model: its folder, runs:/..., models:/name/version or models:/name@alias.")
    output_dir: str = setting("outputs/evaluate", "Where the sample grid, the table and a new probe go.")


@dataclass(frozen=True, kw_only=True)
class CompareSettings(EvaluationOptions):
    """`ldmflow compare A B`: two models (or two replicate groups) scored on the same requests and seeds."""

    output_dir: str = setting("outputs/compare", "Where a probe trained for the comparison goes.")
    fail_if_worse: str | None = setting(None, "Exit with code 1 when A is worse than B on this metric beyond "
                                              "noise (a CI gate), e.g. temperature_mae_pct or psnr.")


@dataclass(frozen=True, kw_only=True)
class PipelineSettings(ExperimentSettings):
    """`ldmflow pipeline`: vae -> latent_ddpm -> sample -> evaluate. Defaults are the steps' own, except where
    noted."""

    manifest_path: str = setting(help="JSON manifest of images (see docs/manifest.md).")
    output_root: str = setting("outputs/pipeline", "Folder of the steps' output folders.")
    resolution: int = setting(_default(TrainSettings, "resolution"), "Training size of both models.")
    vae_train_batch_size: int = setting(_default(VaeSettings, "train_batch_size"), "VAE batch size.")
    ddpm_train_batch_size: int = setting(_default(LatentDdpmSettings, "train_batch_size"), "Latent DDPM batch size.")
    vae_block_out_channels: str = setting(_channels(VaeSettings), "VAE channels per level.")
    ddpm_block_out_channels: str = setting(_channels(LatentDdpmSettings), "Latent UNet channels per level.",
                                           aliases=("--unet_block_out_channels",))
    layers_per_block: int = setting(_default(TrainSettings, "layers_per_block"), "Layers per level, both models.")
    vae_epochs: int = setting(_default(VaeSettings, "num_epochs"), "VAE epochs.")
    ddpm_epochs: int = setting(_default(LatentDdpmSettings, "num_epochs"), "Latent DDPM epochs.")
    learning_rate: float = setting(_default(TrainSettings, "learning_rate"), "Learning rate of both models.")
    vae_learning_rate: float | None = setting(None, "VAE learning rate; default: --learning_rate.")
    ddpm_learning_rate: float | None = setting(None, "Latent DDPM learning rate; default: --learning_rate.")
    lr_warmup_steps: int = setting(_default(TrainSettings, "lr_warmup_steps"), "LR warm-up of both models.")
    save_images_epochs: int = setting(_default(TrainSettings, "save_images_epochs"), "Preview every N epochs.")
    checkpointing_steps: int = setting(_default(TrainSettings, "checkpointing_steps"), "Checkpoint every N steps.")
    eval_epochs: int | None = setting(None, "Validate both models every N epochs; default: --num_validations.")
    num_validations: int = setting(_default(TrainSettings, "num_validations"), "Validations per training when "
                                                                              "--eval_epochs is not given.")
    kl_weight: float = setting(_default(VaeSettings, "kl_weight"), "VAE KL weight.")
    latent_channels: int = setting(_default(VaeSettings, "latent_channels"), "VAE latent channels.")
    downsample_factor: int = setting(_default(VaeSettings, "downsample_factor"), "VAE downsampling (4, 8, 16).")
    disc_weight: float = setting(_default(VaeSettings, "disc_weight"), "VAE adversarial loss weight; 0: off.")
    disc_start: int = setting(_default(VaeSettings, "disc_start"), "Step the VAE discriminator starts at.")
    perceptual_weight: float = setting(_default(VaeSettings, "perceptual_weight"), "VAE LPIPS weight; 0: off.")
    condition_spec: str = setting(_default(LatentDdpmSettings, "condition_spec"), "Conditions of the latent DDPM.")
    cond_dropout_per_condition: str = setting(_default(LatentDdpmSettings, "cond_dropout_per_condition"),
                                              "Latent DDPM: probability of dropping each condition alone (a model "
                                              "that samples from some conditions); see latent-ddpm.")
    use_ema: bool = setting(True, "EMA weights for the latent DDPM (on here; off by default in latent-ddpm).")
    cache_latents: bool = setting(True, "Cache the VAE latents (on here; off by default in latent-ddpm).")
    num_images: int = setting(_default(SampleSettings, "num_images"), "Images of the sample step.")
    num_inference_steps: int = setting(_default(SampleSettings, "num_inference_steps"), "Sampling steps.")
    guidance_scale: float = setting(_default(SampleSettings, "guidance_scale"), "Guidance of previews and samples.")
    eval_num_samples: int = setting(_default(EvaluateSettings, "num_samples"), "Images the evaluate step scores.")
    seed: int = setting(_default(TrainSettings, "seed"), "Seed of every step.")
    replicates: int = setting(1, "Run the pipeline with this many seeds (--seed, --seed + 1, ...) as child runs of "
                                 "one parent run holding each evaluation score's mean, sd, min and max.")

    def __post_init__(self) -> None:
        """Check every step's settings now, so a bad value fails before the parent run opens."""
        _check_at_least(self, 1, "replicates")
        _check_at_most(self, MAX_REPLICATES, "each replicate is a whole pipeline, run one after another",
                       "replicates")
        _check_seeds(self, "replicates")
        for name in ("vae_learning_rate", "ddpm_learning_rate"):
            _check_number(self, name, 0, 1, low_open=True)
        upstream_model = {"model_uri": "models:/latent-ddpm-step"}
        placeholders = ({}, {"vae_uri": "models:/vae-step"}, upstream_model, upstream_model)
        step_classes = (VaeSettings, LatentDdpmSettings, SampleSettings, EvaluateSettings)
        for (name, arguments), settings_class, upstream in zip(self.step_arguments().items(), step_classes,
                                                               placeholders):
            try:
                settings_class(**arguments, **upstream)
            except LdmflowError as error:
                raise LdmflowError(f"Pipeline step {name}: {error}") from None

    def step_arguments(self) -> dict[str, dict]:
        """Per step (vae, latent_ddpm, sample, evaluate), the settings the pipeline sets; upstream model URIs are
        added when the step before has run, and everything else keeps the step's own default."""
        root = Path(self.output_root).resolve()
        shared = {name: getattr(self, name) for name in ("resolution", "seed", "layers_per_block", "learning_rate",
                                                         "lr_warmup_steps", "save_images_epochs",
                                                         "checkpointing_steps", "eval_epochs", "num_validations")}
        shared["manifest_path"] = str(Path(self.manifest_path).resolve())
        vae = {**shared, "output_dir": str(root / "vae"), "train_batch_size": self.vae_train_batch_size,
               "num_epochs": self.vae_epochs, "learning_rate": self.vae_learning_rate or self.learning_rate,
               **{name: getattr(self, name) for name in ("kl_weight", "latent_channels", "downsample_factor",
                                                         "disc_weight", "disc_start", "perceptual_weight")},
               "block_out_channels": _int_list(self.vae_block_out_channels, "vae_block_out_channels")}
        latent = {**shared, "output_dir": str(root / "latent_ddpm"), "train_batch_size": self.ddpm_train_batch_size,
                  "num_epochs": self.ddpm_epochs, "learning_rate": self.ddpm_learning_rate or self.learning_rate,
                  "block_out_channels": _int_list(self.ddpm_block_out_channels, "ddpm_block_out_channels"),
                  **{name: getattr(self, name) for name in ("condition_spec", "use_ema", "cache_latents",
                                                            "guidance_scale", "cond_dropout_per_condition")}}
        sample = {"output_dir": str(root / "samples"),
                  **{name: getattr(self, name) for name in ("num_images", "num_inference_steps", "seed",
                                                            "guidance_scale")}}
        evaluate = {"manifest_path": shared["manifest_path"], "output_dir": str(root / "evaluate"),
                    "num_samples": self.eval_num_samples, "condition_spec": self.condition_spec,
                    **{name: getattr(self, name) for name in ("num_inference_steps", "guidance_scale", "seed")}}
        return {"vae": vae, "latent_ddpm": latent, "sample": sample, "evaluate": evaluate}


def _int_list(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise LdmflowError(f"--{name} must be a comma list of integers such as 32,64, got {text!r}.") from None


DEMO_STYLES = ("stripes", "textured", "plumes")


@dataclass(frozen=True, kw_only=True)
class SweepSettings(ExperimentSettings):
    """`ldmflow sweep`: an Optuna study over one stage's settings; every trial is an MLflow run of that stage.

    The stage's other options (--manifest_path, --output_dir: the trials' root folder, ...) follow on the command
    line, or go in --stage_options under `mlflow run`; they are fixed for every trial."""

    stage: str = setting(help="The stage to train in each trial.", choices=SWEEP_STAGES)
    space: str = setting(help="YAML or JSON file: setting -> {low, high[, log][, int]} or {choices: [...]}.")
    objective: str | None = setting(None, "Metric to optimise: a validation metric (default: the stage's "
                                          "checkpoint metric), or an evaluate metric such as eval/fid (each finished "
                                          "trial is then evaluated).")
    direction: str = setting("auto", "auto: maximize psnr, ssim and diversity, minimize the rest.",
                             choices=SWEEP_DIRECTIONS)
    n_trials: int = setting(20, "Trials of the study in all: a worker stops once the study has them (several "
                                "workers may each start one more).")
    timeout: float | None = setting(None, "Seconds after which this worker starts no new trial.")
    study_name: str | None = setting(None, "The study (its parent run's name); workers join it by using the same "
                                           "name. Default: <stage>-<space file name>.")
    storage: str = setting("mlflow", "Where the study lives: mlflow (the tracking store, nothing to set up) or an "
                                     "Optuna RDB URL such as postgresql://user:password@host:5432/optuna, which "
                                     "numbers trials safely when many workers share a study (docs/sweeps.md).")
    pruner: str = setting("median", "Stop a trial whose validation is worse than the median of earlier trials' at "
                                    "the same step; none: never.", choices=SWEEP_PRUNERS)
    pruner_startup_trials: int = setting(3, "Trials that finish before any is pruned.")
    sampler_seed: int | None = setting(None, "Seed of the TPE sampler (reproducible suggestions for one worker).")
    registered_model_name: str | None = setting(None, "Registry name of the best trial's model (default "
                                                      "ldmflow-<stage>); it gets the alias sweep-<study>.")
    stage_options: str = setting("", "The stage's other options as on its command line, e.g. '--manifest_path "
                                     "data/manifest.json --output_dir outputs/sweep --resolution 64'.")

    def __post_init__(self) -> None:
        _check_choices(self)
        _check_at_least(self, 1, "n_trials")
        _check_at_least(self, 0, "pruner_startup_trials")
        _check_number(self, "timeout", 0, low_open=True)
        if self.study_name is not None and not re.fullmatch(r"[A-Za-z0-9_\-]{1,200}", self.study_name):
            raise LdmflowError(f"--study_name must be letters, digits, _ and - (it names the alias sweep-<study>), "
                               f"got {self.study_name!r}.")


@dataclass(frozen=True, kw_only=True)
class DemoDataSettings(Settings):
    """`ldmflow demo-data`: a synthetic, condition-dependent dataset."""

    output_dir: str = setting(help="Folder for images/ and manifest.json.")
    num_images: int = setting(64, "Images to write.")
    resolution: int = setting(64, "Image size in pixels.")
    image_format: str = setting("png", "Image file format.", choices=IMAGE_FORMATS)
    style: str = setting("stripes", "Smooth stripes; textured: fine streaks and colour clouds a blurry VAE loses; "
                                    "plumes: small sources trailing plumes at random positions on a varied background.",
                         choices=DEMO_STYLES)
    seed: int = setting(0, "Seed of the scenes and the split.")
    val_fraction: float = setting(0.1, "Fraction of entries in the val split.")
    overwrite: bool = setting(False, "Replace manifest.json and images/ in a folder that is not empty.")

    def __post_init__(self) -> None:
        _check_at_least(self, 1, "num_images")
        if self.resolution < 8:
            raise LdmflowError(f"--resolution must be at least 8 for demo data, got {self.resolution}.")
        _check_at_most(self, MAX_RESOLUTION, "each image is drawn in memory at that size", "resolution")
        _check_at_most(self, MAX_GENERATED_IMAGES, "a synthetic set for demos and tests; larger ones take hours "
                       "to write", "num_images")
        _check_choices(self)
        _check_number(self, "val_fraction", 0, 1, high_open=True)
        _check_seeds(self)


@dataclass(frozen=True, kw_only=True)
class ServerSettings(Settings):
    """`ldmflow server`: a team's MLflow server on this machine (PostgreSQL, proxied artifacts, basic auth)."""

    root: str = setting("team-server", "Folder of its database, artifacts, logs and state.")
    port: int = setting(5000, "Port of the MLflow server.")
    host: str = setting("127.0.0.1", "Address to listen on; anything but loopback needs TLS (or --insecure).")
    tls_cert: str | None = setting(None, "PEM certificate (chain) to serve HTTPS with; needs --tls_key.")
    tls_key: str | None = setting(None, "Private key of --tls_cert.")
    self_signed: bool = setting(False, "Serve HTTPS with a certificate made for this host's names (in <root>/tls).")
    insecure: bool = setting(False, "Allow plain HTTP on a non-loopback --host (passwords cross in clear text).")

    def __post_init__(self) -> None:
        _check_number(self, "port", 1, 65535)


@dataclass(frozen=True, kw_only=True)
class CacheLatentsSettings(ManifestSettings):
    """`ldmflow cache-latents`: fill the on-disk latent cache that `latent-ddpm --cache_latents` reads."""

    vae_uri: str = setting(help="The VAE: its folder or an MLflow URI (runs:/, models:/name/version, ...).")
    split: str = setting(_default(TrainSettings, "split"), "metadata.split value to encode (the one trained on).")
    resolution: int = setting(_default(TrainSettings, "resolution"), "Square size in pixels, as trained.")
    random_flip: bool = setting(False, "Also encode the mirrored images (for --random_flip trainings).")
    preserve_input_precision: bool = setting(False, "Keep 16-bit/float precision instead of 8-bit.")
    max_image_pixels: int = setting(MAX_IMAGE_PIXELS, "Images with more pixels are skipped as unreadable.")
    eval_batch_size: int = setting(_default(TrainSettings, "eval_batch_size"), "Images encoded per batch.")
    dataloader_num_workers: int = setting(0, "Processes decoding images while the VAE encodes.")
    latent_cache_dir: str = setting("", "Folder of the latent caches (default: $LDMFLOW_CACHE/latents); give a "
                                        "training the same folder.")
    latent_cache_dtype: str = setting("float32", "How the cache stores the posteriors (float16 halves its size).",
                                      choices=LATENT_CACHE_DTYPES)

    def __post_init__(self) -> None:
        if not self.vae_uri:
            raise LdmflowError("--vae_uri is required: a VAE folder or an MLflow model URI.")
        _check_at_least(self, 1, "resolution", "eval_batch_size", "max_image_pixels")
        _check_at_least(self, 0, "dataloader_num_workers")
        _check_at_most(self, MAX_RESOLUTION, "one image of that size is already 200 MB of float32 input",
                       "resolution")
        _check_at_most(self, MAX_WORKERS, "each worker is a process with its own copy of the dataset",
                       "dataloader_num_workers")
        _check_batch_elements(self, "eval_batch_size")
        _check_choices(self)


@dataclass(frozen=True, kw_only=True)
class CheckManifestSettings(ManifestSettings):
    """`ldmflow check-manifest`: the data report before a long training."""

    split: str = setting(_default(TrainSettings, "split"), "Split to check ('all' for every entry).")
    condition_spec: str = setting(DEFAULT_CONDITION_SPEC, "Comma list of name:dim, or 'none'.")
    max_image_pixels: int = setting(MAX_IMAGE_PIXELS, "Images with more pixels are reported as unreadable.")
