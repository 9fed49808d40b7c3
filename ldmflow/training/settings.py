"""Typed, frozen settings, one dataclass per command. The CLI builds them; they are logged once to MLflow."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ldmflow.errors import LdmflowError

from ldmflow.data import DEFAULT_CONDITION_SPEC  # noqa: F401  (re-exported)


def settings_params(settings) -> dict[str, str]:
    """Flat string params for MLflow (None becomes an empty string, tuples a comma list)."""
    params = {}
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = str(value).lower()  # as `mlflow run -P flag=true` logs it
        params[field.name] = "" if value is None else str(value)
    return params


@dataclass(frozen=True)
class TrainSettings:
    """What every trainer shares: data, optimisation, checkpoints, previews and tracking."""

    manifest_path: str
    output_dir: str
    split: str = "train"
    val_split: str = "val"
    data_root: str | None = None
    allow_outside_root: bool = False
    resolution: int = 256
    random_crop: bool = False
    random_flip: bool = False
    preserve_input_precision: bool = False
    train_batch_size: int = 8
    eval_batch_size: int = 4
    num_epochs: int = 50
    max_train_steps: int | None = None
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 500
    adam_weight_decay: float = 1e-6
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    seed: int = 0
    dataloader_num_workers: int = 0
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    save_images_epochs: int = 5
    logging_steps: int = 10
    max_nonfinite_steps: int = 5
    block_out_channels: tuple[int, ...] = ()
    layers_per_block: int = 2
    enable_xformers_memory_efficient_attention: bool = False
    experiment_name: str = "ldmflow"
    run_name: str | None = None
    no_mlflow: bool = False
    registered_model_name: str | None = None
    register_alias: str | None = None

    def __post_init__(self) -> None:
        if self.resolution <= 0 or self.resolution % 8:
            raise LdmflowError(f"--resolution must be a positive multiple of 8, got {self.resolution}.")
        for name in ("train_batch_size", "eval_batch_size", "num_epochs", "gradient_accumulation_steps",
                     "checkpointing_steps", "save_images_epochs", "logging_steps", "layers_per_block"):
            if getattr(self, name) < 1:
                raise LdmflowError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise LdmflowError(f"--max_train_steps must be at least 1, got {self.max_train_steps}.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise LdmflowError(f"--mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}.")
        if any(c < 1 for c in self.block_out_channels):
            raise LdmflowError(f"--block_out_channels must be positive integers, got {self.block_out_channels}.")
        if self.dataloader_num_workers < 0:
            raise LdmflowError(f"--dataloader_num_workers must be 0 or more, got {self.dataloader_num_workers}.")
        alias = self.register_alias
        if alias is not None and (alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias) or not alias.strip()):
            raise LdmflowError(f"--register_alias {alias!r} is reserved by MLflow (latest, v<number>); "
                               "choose another name such as candidate or champion.")

    def to_params(self) -> dict[str, str]:
        return settings_params(self)


@dataclass(frozen=True)
class VaeSettings(TrainSettings):
    """`ldmflow vae`: AutoencoderKL with 4 latent channels and x8 downsampling."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    kl_weight: float = 1e-4
    scaling_factor_batches: int = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.block_out_channels) != 4:
            raise LdmflowError(
                "The VAE downsamples x8, so --block_out_channels needs exactly 4 values "
                f"(one per resolution level), got {len(self.block_out_channels)}: {self.block_out_channels}."
            )


@dataclass(frozen=True)
class DdpmSettings(TrainSettings):
    """What both DDPM trainers (latent and pixel) share: noise schedule, objective, EMA, previews."""

    block_out_channels: tuple[int, ...] = (128, 128, 256, 256, 512, 512)
    use_ema: bool = False
    ema_max_decay: float = 0.9999
    ema_inv_gamma: float = 1.0
    ema_power: float = 0.75
    prediction_type: str = "epsilon"
    snr_gamma: float | None = None
    ddpm_num_steps: int = 1000
    ddpm_beta_schedule: str = "linear"
    num_preview_images: int = 8
    preview_inference_steps: int = 25

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_preview_images", "preview_inference_steps", "ddpm_num_steps"):
            if getattr(self, name) < 1:
                raise LdmflowError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.preview_inference_steps > self.ddpm_num_steps:
            raise LdmflowError(f"--preview_inference_steps ({self.preview_inference_steps}) cannot exceed "
                               f"--ddpm_num_steps ({self.ddpm_num_steps}).")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise LdmflowError(f"--prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}.")
        if len(self.block_out_channels) < 2:
            raise LdmflowError("--block_out_channels needs at least 2 values for a UNet.")


@dataclass(frozen=True)
class LatentDdpmSettings(DdpmSettings):
    """`ldmflow latent-ddpm`: a conditioned UNet2DConditionModel on a trained VAE's latents."""

    vae_path: str = ""
    block_out_channels: tuple[int, ...] = (256, 256, 256)
    condition_spec: str = DEFAULT_CONDITION_SPEC
    cond_dropout_prob: float = 0.1
    cache_latents: bool = False
    guidance_scale: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.vae_path:
            raise LdmflowError("--vae_path is required: a VAE folder or an MLflow model URI.")
        latent = self.resolution // 8
        if latent % (2 ** (len(self.block_out_channels) - 1)):
            raise LdmflowError(
                f"Latents of {latent}x{latent} (resolution {self.resolution} / 8) cannot be downsampled "
                f"{len(self.block_out_channels) - 1} times; use fewer --block_out_channels or a larger resolution."
            )
        if not 0.0 <= self.cond_dropout_prob < 1.0:
            raise LdmflowError(f"--cond_dropout_prob must be in [0, 1), got {self.cond_dropout_prob}.")


@dataclass(frozen=True)
class PixelDdpmSettings(DdpmSettings):
    """`ldmflow legacy-ddpm`: the original unconditional UNet2DModel in pixel space."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resolution % (2 ** (len(self.block_out_channels) - 1)):
            raise LdmflowError(
                f"Resolution {self.resolution} cannot be downsampled {len(self.block_out_channels) - 1} times; "
                "use fewer --block_out_channels or a resolution divisible by 2**(blocks-1)."
            )


@dataclass(frozen=True)
class SampleSettings:
    """`ldmflow sample`: images from a trained model, for given conditions or unconditional."""

    model_uri: str
    output_dir: str
    num_images: int = 8
    condition: tuple[str, ...] = ()
    conditions_file: str | None = None
    guidance_scale: float = 3.0
    num_inference_steps: int = 25
    scheduler: str = "ddim"
    seed: int = 0
    output_format: str = "png"
    experiment_name: str = "ldmflow"
    run_name: str | None = None
    no_mlflow: bool = False

    def __post_init__(self) -> None:
        if self.num_images < 1 or self.num_inference_steps < 1:
            raise LdmflowError("--num_images and --num_inference_steps must be at least 1.")
        if self.condition and self.conditions_file:
            raise LdmflowError("Give conditions either with --condition or with --conditions_file, not both.")

    def to_params(self) -> dict[str, str]:
        return settings_params(self)
