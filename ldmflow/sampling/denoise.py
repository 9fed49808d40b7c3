"""A pure denoising loop with classifier-free guidance, over any diffusers scheduler and any model callable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from ldmflow.errors import LdmflowError

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm_solver": DPMSolverMultistepScheduler}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> str:
    """Where sampling runs unless told: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_dtype(name: str, device) -> torch.dtype:
    """The UNet's dtype for `--dtype`; half precision only where it is fast (not on the CPU: fp32 there)."""
    if name not in DTYPES:
        raise LdmflowError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}.")
    return DTYPES[name] if torch.device(device).type != "cpu" else torch.float32


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """`model.to(dtype)` in place. diffusers' `to` warns about modules kept in fp32 on every dtype cast, even
    when a model has none (every model ldmflow builds): those get torch's own `Module.to`, which does the
    same cast quietly."""
    if model.dtype == dtype:
        return
    if getattr(model, "_keep_in_fp32_modules", None):
        model.to(dtype)  # diffusers keeps those modules in fp32
    else:
        torch.nn.Module.to(model, dtype)


def batches(count: int, batch_size: int | None):
    """Index ranges of at most `batch_size` images (all at once when None)."""
    size = batch_size or max(count, 1)
    return [range(start, min(start + size, count)) for start in range(0, count, size)]

# model(sample (B, C, H, W), timestep, condition (B, E) or None) -> prediction (B, C, H, W)
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def make_scheduler(name: str, training_config: dict):
    """An inference scheduler with the training noise schedule (DDIM / DPM-Solver need few steps)."""
    if name not in SCHEDULERS:
        raise LdmflowError(f"Unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}.")
    return SCHEDULERS[name].from_config(training_config)


def check_inference_steps(num_inference_steps: int, scheduler_config: dict) -> None:
    """A clear error instead of diffusers' ValueError deep inside sampling."""
    limit = int(scheduler_config["num_train_timesteps"])
    if not 1 <= int(num_inference_steps) <= limit:
        raise LdmflowError(f"num_inference_steps must be between 1 and the model's {limit} training timesteps, "
                           f"got {num_inference_steps}.")


def initial_noise(shape: tuple[int, ...], seeds: list[int], device, dtype=torch.float32) -> torch.Tensor:
    """(N, C, H, W) noise where image i depends only on seeds[i], so any image can be reproduced alone."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)), dtype=dtype) for seed in seeds]
    return torch.stack(noise).to(device)


def step_generators(seeds: list[int]) -> list[torch.Generator]:
    """Per-image (CPU, so device-independent) generators for the noise a stochastic scheduler adds."""
    return [torch.Generator().manual_seed(int(seed) + 1_000_003) for seed in seeds]


@dataclass(frozen=True)
class ComposedGuidance:
    """Compositional classifier-free guidance: `parts[k]` is each row's condition with only condition k present
    (the null condition where a row lacks it), weighed by `weights[k]`."""

    parts: torch.Tensor  # (P, B, E)
    weights: tuple[float, ...]  # (P,)

    def rows(self, rows: range) -> "ComposedGuidance":
        return ComposedGuidance(self.parts[:, rows.start:rows.stop], self.weights)

    def predict(self, model: Denoiser, model_input: torch.Tensor, timestep, null_condition: torch.Tensor):
        """null + sum_k w_k (model(part_k) - null): the P + 1 predictions in one forward of (P + 1) B rows."""
        count = len(self.weights) + 1
        stacked = model(model_input.repeat(count, 1, 1, 1), timestep, torch.cat([*self.parts, null_condition]))
        *conditional, unconditional = stacked.chunk(count)  # each (B, C, H, W)
        prediction = unconditional
        for weight, part in zip(self.weights, conditional):
            prediction = prediction + weight * (part - unconditional)
        return prediction


@torch.no_grad()
def denoise(model: Denoiser, scheduler, noise: torch.Tensor, num_inference_steps: int,
            condition: torch.Tensor | None = None, null_condition: torch.Tensor | None = None,
            guidance_scale: float = 1.0, generator: list[torch.Generator] | None = None,
            composed: ComposedGuidance | None = None) -> torch.Tensor:
    """Run the reverse process from `noise`; guidance mixes conditional and null predictions when > 1, or, with
    `composed`, the null prediction and each condition's own (guidance per condition).

    `generator` (one per image) drives the noise that stochastic schedulers (DDPM) add at each step.
    """
    check_inference_steps(num_inference_steps, scheduler.config)
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    sample = noise * scheduler.init_noise_sigma
    guided = condition is not None and null_condition is not None and guidance_scale != 1.0
    if guided and torch.equal(condition, null_condition):  # every row unconditional: null + null is one pass
        guided = False
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, timestep)
        if composed is not None:
            prediction = composed.predict(model, model_input, timestep, null_condition)
        elif guided:
            both = model(torch.cat([model_input, model_input]), timestep, torch.cat([condition, null_condition]))
            conditional, unconditional = both.chunk(2)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
        else:
            prediction = model(model_input, timestep, condition)
        sample = scheduler.step(prediction, timestep, sample, generator=generator).prev_sample
    return sample
