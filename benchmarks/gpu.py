"""GPU throughput in one run: each trainer against a bare loop with the same options, achieved TFLOP/s, and
sampling time per dtype and scheduler. Prints ratios against issue 11's targets.

Run: python benchmarks/gpu.py            one GPU, under 5 minutes (issue 11's sizes: latent UNet 256,256,256
                                         with 2 layers per block on 4x32x32 latents, batch 64, bf16)
     python benchmarks/gpu.py --smoke    CPU, tiny sizes, fp32, no compilation: checks the script (CI runs it)
     --write_docs                        also write the figures into docs/benchmarks.md

Latent DDPM: the trainer (cached latents) and a bare forward/backward/clip/fused-AdamW loop of the same UNet
(built from the trainer's saved config) on device-resident latents, eager, with EMA, and compiled with EMA.
The trainer's time per step is read between logging steps after warm-up (compilation, setup and saving
excluded); the bare loop is timed after the same warm-up. VAE: the trainer against a bare MSE + L1 + KL loop.
FLOPs of one training step come from torch.utils.flop_counter.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from doc_figures import add_write_docs_option, describe_machine, write_figures
from step_clock import StepClock

LOG_EVERY = 10
EXTRA_VARIANTS = {"EMA every 4": {"use_ema": True, "ema_update_every": 4}, "channels_last": {"channels_last": True},
                  "attention_head_dim 64": {"attention_head_dim": 64}}  # --extra: trainer only, against eager
CONDITION = {"temperature": 12.0, "wind": [1.0, 0.5, 0.0], "wind_mag": 1.1}  # the default spec's conditions


@dataclass
class Sizes:
    unet_channels: tuple[int, ...]
    unet_layers: int
    resolution: int
    batch: int
    vae_channels: tuple[int, ...]
    vae_batch: int
    steps: int
    mixed_precision: str
    compile: bool
    sample_images: int
    sample_steps: int


FULL = Sizes((256, 256, 256), 2, 256, 64, (128, 256, 512, 512), 16, 60, "bf16", True, 16, 25)
SMOKE = Sizes((32, 32), 1, 32, 4, (16, 16, 16, 16), 4, 3 * LOG_EVERY, "no", False, 2, 2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device: torch.device, mixed_precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _time_steps(step, device: torch.device, steps: int, warmup: int) -> float:
    """Seconds per call of `step` after `warmup` calls (compilation happens there)."""
    for _ in range(warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - started) / steps


def _flops(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def latent_trainer(root: Path, manifest: Path, vae: Path, sizes: Sizes, **options) -> tuple[float, Path]:
    """ms per step of the real latent-DDPM trainer, and its output folder."""
    from ldmflow.data.manifest import load_manifest
    from ldmflow.settings import LatentDdpmSettings
    from ldmflow.tracking.model_uri import ModelSource
    from ldmflow.training.latent_task import LatentDdpmTask
    from ldmflow.training.loop import train
    from ldmflow.training.prepare import build_accelerator, prepare

    output = root / "latent-{}".format("-".join(f"{k}" for k, v in options.items() if v) or "eager")
    settings = LatentDdpmSettings(
        manifest_path=str(manifest), output_dir=str(output), vae_uri=str(vae), resolution=sizes.resolution,
        train_batch_size=sizes.batch, max_train_steps=sizes.steps, lr_warmup_steps=0,
        layers_per_block=sizes.unet_layers, block_out_channels=sizes.unet_channels,
        mixed_precision=sizes.mixed_precision, cache_latents=True, checkpointing_steps=10**9,
        save_images_epochs=10**9, eval_epochs=0, logging_steps=LOG_EVERY, num_preview_images=1,
        preview_inference_steps=1, no_mlflow=True, **options)
    task = LatentDdpmTask(settings, load_manifest(manifest, condition_spec=settings.condition_spec),
                          ModelSource(local_dir=vae, uri=str(vae)))
    clock = StepClock()
    train(settings, task, clock, prepare(settings, task, build_accelerator(settings)))
    return clock.seconds_per_step(2 * LOG_EVERY) * 1000, output


def latent_bare(unet_dir: Path, sizes: Sizes, device: torch.device, use_ema: bool, compile: bool):
    """(ms per step, FLOPs per step) of a bare loop on the trainer's UNet architecture."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    from ldmflow.training.diffusion import diffusion_loss

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_dir)).to(device).train()
    config = unet.config
    side = config.sample_size
    latents = torch.randn(sizes.batch, config.in_channels, side, side, device=device)
    conditions = torch.randn(sizes.batch, config.projection_class_embeddings_input_dim, device=device)
    scheduler = DDPMScheduler()
    parameters = list(unet.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, fused=device.type in ("cuda", "cpu"))
    ema = EMAModel(parameters, foreach=True) if use_ema else None
    if ema is not None:
        ema.to(device)
    if compile:
        unet.compile()

    def step():
        with _autocast(device, sizes.mixed_precision):
            loss = diffusion_loss(lambda x, t: unet(x, t, encoder_hidden_states=None, class_labels=conditions).sample,
                                  latents, scheduler, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(parameters)

    seconds = _time_steps(step, device, sizes.steps - 2 * LOG_EVERY, 2 * LOG_EVERY)
    return seconds * 1000, (0.0 if compile else _flops(step))


def vae_trainer(root: Path, manifest: Path, sizes: Sizes) -> tuple[float, Path]:
    from ldmflow.data.manifest import load_manifest
    from ldmflow.settings import VaeSettings
    from ldmflow.training.loop import train
    from ldmflow.training.prepare import build_accelerator, prepare
    from ldmflow.training.vae_task import VaeTask

    output = root / "vae-trainer"
    settings = VaeSettings(manifest_path=str(manifest), output_dir=str(output), resolution=sizes.resolution,
                           train_batch_size=sizes.vae_batch, block_out_channels=sizes.vae_channels,
                           max_train_steps=sizes.steps, lr_warmup_steps=0, mixed_precision=sizes.mixed_precision,
                           checkpointing_steps=10**9, save_images_epochs=10**9, eval_epochs=0,
                           logging_steps=LOG_EVERY, scaling_factor_batches=1, no_mlflow=True)
    task = VaeTask(settings, load_manifest(manifest, condition_spec="none"), None)
    clock = StepClock()
    train(settings, task, clock, prepare(settings, task, build_accelerator(settings)))
    return clock.seconds_per_step(2 * LOG_EVERY) * 1000, output


def vae_bare(vae_dir: Path, sizes: Sizes, device: torch.device) -> tuple[float, float]:
    import torch.nn.functional as F
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(vae_dir)).to(device).train()
    pixels = torch.rand(sizes.vae_batch, 3, sizes.resolution, sizes.resolution, device=device) * 2 - 1
    parameters = list(vae.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, fused=device.type in ("cuda", "cpu"))

    def step():
        with _autocast(device, sizes.mixed_precision):
            posterior = vae.encode(pixels).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample.float()
        loss = F.mse_loss(reconstruction, pixels) + F.l1_loss(reconstruction, pixels) + \
            1e-6 * posterior.kl().float().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _time_steps(step, device, sizes.steps - 2 * LOG_EVERY, 2 * LOG_EVERY) * 1000, _flops(step)


def sampling_seconds(latent_output: Path, sizes: Sizes, device: torch.device) -> dict[tuple[str, str], float]:
    """Seconds to generate `sample_images` conditioned images (guidance 3) per (dtype, scheduler)."""
    from ldmflow.sampling.load import load_sampler

    dtypes = ("fp32", "bf16", "fp16") if device.type == "cuda" else ("fp32", "bf16")
    sampler = load_sampler(latent_output, device=str(device))
    results = {}
    for dtype in dtypes:
        sampler.set_dtype(dtype)
        for scheduler in ("ddim", "dpm_solver"):
            def generate():
                sampler.generate([CONDITION] * sizes.sample_images, guidance_scale=3.0,
                                 num_inference_steps=sizes.sample_steps, scheduler=scheduler)

            results[dtype, scheduler] = _time_steps(generate, device, 2, 1)
    return results


def _rate(flops: float, milliseconds: float) -> str:
    per_second = flops / milliseconds * 1000
    return f"{per_second / 1e12:7.1f} TFLOP/s" if per_second >= 1e12 else f"{per_second / 1e9:7.1f} GFLOP/s"


def _line(rows: list[dict], group: str, name: str, value: float, unit: str, note: str = "") -> None:
    """Print one figure under its group's heading, and keep it as a row of the docs' table."""
    print(f"  {name:44} {value:9.2f} {unit:6} {note}")
    rows.append({"figure": f"{group}: {name.strip()}", "value": f"{value:.2f} {unit}".strip(), "note": note.strip()})


def _verdict(value: float, target: float, higher_is_better: bool) -> str:
    met = value >= target if higher_is_better else value <= target
    return f"(target {'>=' if higher_is_better else '<='} {target:g}: {'met' if met else 'NOT met'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, no compilation (for CI)")
    parser.add_argument("--no_compile", action="store_true", help="skip the compiled variants")
    parser.add_argument("--extra", action="store_true", help="also time the trainer with " +
                        ", ".join(EXTRA_VARIANTS) + " (about a minute more on a GPU)")
    add_write_docs_option(parser, __file__, "docs/benchmarks.md")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else FULL
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    compile_ = sizes.compile and not args.no_compile
    logging.basicConfig(level=logging.WARNING)
    from ldmflow.data.demo import make_demo_dataset
    from ldmflow.models.architectures import build_vae

    with tempfile.TemporaryDirectory(prefix="ldmflow-gpu-") as folder:
        root = Path(folder)
        manifest = make_demo_dataset(root / "data", num_images=2 * sizes.batch, resolution=sizes.resolution)
        vae = root / "untrained-vae"  # only the UNet's speed matters here
        build_vae((32, 32, 32, 32), 1, sizes.resolution, 4).save_pretrained(vae)
        variants = {"eager": {}, "EMA": {"use_ema": True}}
        if compile_:
            variants["compiled + EMA"] = {"use_ema": True, "torch_compile": True}
        trainer, bare, flops, latent_output = {}, {}, 0.0, None
        for name, options in variants.items():
            trainer[name], output = latent_trainer(root, manifest, vae, sizes, **options)
            latent_output = latent_output or output
            bare[name], counted = latent_bare(output / "unet", sizes, device, bool(options.get("use_ema")),
                                              bool(options.get("torch_compile")))
            flops = flops or counted
        extra = {name: latent_trainer(root, manifest, vae, sizes, **options)[0]
                 for name, options in (EXTRA_VARIANTS.items() if args.extra else ())}
        vae_ms, vae_output = vae_trainer(root, manifest, sizes)
        vae_bare_ms, vae_flops = vae_bare(vae_output, sizes, device)
        sampling = sampling_seconds(latent_output, sizes, device)

    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\nldmflow on {name}, {sizes.mixed_precision}{' (--smoke: sizes too small to judge)' if args.smoke else ''}")
    latent = f"UNet {','.join(map(str, sizes.unet_channels))} x{sizes.unet_layers}, {sizes.resolution} px images, " \
             f"batch {sizes.batch}"
    print(f"Latent DDPM: {latent}, {flops / 1e9:.3g} GFLOP per step")
    rows: list[dict] = []
    line = functools.partial(_line, rows, "latent DDPM")
    for variant in variants:
        ratio = bare[variant] / trainer[variant]
        line(f"trainer, {variant}", trainer[variant], "ms", _rate(flops, trainer[variant]))
        line(f"bare loop, {variant}", bare[variant], "ms", _rate(flops, bare[variant]))
        line(f"  bare / trainer, {variant}", ratio, "", _verdict(ratio, 0.95, True))
    ema_overhead = trainer["EMA"] / trainer["eager"] - 1
    line("EMA overhead (trainer)", 100 * ema_overhead, "%", _verdict(100 * ema_overhead, 5, False))
    if "compiled + EMA" in variants:
        ratio = trainer["compiled + EMA"] / trainer["EMA"]
        line("compiled / eager step (trainer, EMA)", ratio, "", _verdict(ratio, 0.6, False))
    for variant, milliseconds in extra.items():
        line(f"trainer, {variant}", milliseconds, "ms", f"{trainer['eager'] / milliseconds:5.2f}x eager")
    vae = f"{','.join(map(str, sizes.vae_channels))}, {sizes.resolution} px, batch {sizes.vae_batch}"
    print(f"VAE: {vae}, {vae_flops / 1e9:.3g} GFLOP per step")
    line = functools.partial(_line, rows, "VAE")
    line("trainer", vae_ms, "ms", _rate(vae_flops, vae_ms))
    line("bare loop", vae_bare_ms, "ms", _rate(vae_flops, vae_bare_ms))
    line("  bare / trainer", vae_bare_ms / vae_ms, "", _verdict(vae_bare_ms / vae_ms, 0.95, True))
    print(f"Sampling {sizes.sample_images} conditioned images, guidance 3, {sizes.sample_steps} steps:")
    line = functools.partial(_line, rows, f"sampling {sizes.sample_images} images, {sizes.sample_steps} steps")
    for (dtype, scheduler), seconds in sampling.items():
        speedup = sampling["fp32", scheduler] / seconds
        note = _verdict(speedup, 1.5, True) if dtype == "bf16" else ""
        line(f"{scheduler} {dtype}", seconds, "s", f"{speedup:5.2f}x fp32 {note}".rstrip())
    print(json.dumps({"device": name, "gflop_per_step": {"latent_ddpm": flops / 1e9, "vae": vae_flops / 1e9},
                      "trainer_ms": trainer, "bare_ms": bare, "vae_ms": [vae_ms, vae_bare_ms],
                      "sampling_s": {f"{d} {s}": v for (d, s), v in sampling.items()}}))
    sizes_rows = [{"figure": f"latent DDPM: {latent}", "value": f"{flops / 1e9:.3g} GFLOP per step", "note": ""},
                  {"figure": f"VAE: {vae}", "value": f"{vae_flops / 1e9:.3g} GFLOP per step", "note": ""}]
    write_figures(args.write_docs, __file__, sizes_rows + rows, machine=describe_machine(device.type))


if __name__ == "__main__":
    main()
