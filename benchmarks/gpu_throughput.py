"""Latent-DDPM trainer throughput per speed option, as ratios to the plain trainer (meant for a GPU).

Run: python benchmarks/gpu_throughput.py [--steps 60] [--batch_size 64] [--resolution 256]
         [--channels 256,256,256] [--mixed_precision bf16] [--only ema,compile]

Defaults are issue 11's measurement: UNet 256,256,256 with 2 layers per block on 4x32x32 latents (256 px
images, an untrained x8 VAE: only the UNet's speed matters), batch 64, bf16, cached latents. Each variant
runs the real trainer; its time per step is read between logging steps after warm-up (compilation
excluded), so setup, caching and saving do not count. Also prints diffusers' EMAModel.step with and
without foreach on the same UNet. On a CPU pass small sizes (e.g. --resolution 64 --batch_size 8
--channels 32,32 --mixed_precision no).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
from step_clock import StepClock

VARIANTS = {  # name -> extra settings
    "plain": {},
    "ema": {"use_ema": True},
    "ema every 4": {"use_ema": True, "ema_update_every": 4},
    "channels_last": {"channels_last": True},
    "compile": {"torch_compile": True},
    "compile + channels_last + ema every 4": {"torch_compile": True, "channels_last": True, "use_ema": True,
                                             "ema_update_every": 4},
    "attention_head_dim 64": {"attention_head_dim": 64},
}
LOG_EVERY = 10


def _vae(folder: Path) -> Path:
    from ldmflow.models.architectures import build_vae

    build_vae((32, 32, 32, 32), 1, 256, 4).save_pretrained(folder)
    return folder


def ms_per_step(manifest: Path, vae: Path, output: Path, args, **variant) -> float:
    from ldmflow.data.manifest import load_manifest
    from ldmflow.settings import LatentDdpmSettings
    from ldmflow.tracking.model_uri import ModelSource
    from ldmflow.training.latent_task import LatentDdpmTask
    from ldmflow.training.loop import build_accelerator, prepare, train

    settings = LatentDdpmSettings(
        manifest_path=str(manifest), output_dir=str(output), vae_uri=str(vae), resolution=args.resolution,
        train_batch_size=args.batch_size, max_train_steps=args.steps, lr_warmup_steps=0, layers_per_block=2,
        block_out_channels=tuple(int(c) for c in args.channels.split(",")), mixed_precision=args.mixed_precision,
        cache_latents=True, checkpointing_steps=10**9, save_images_epochs=10**9, eval_epochs=0,
        logging_steps=LOG_EVERY, num_preview_images=1, preview_inference_steps=1, no_mlflow=True, **variant)
    task = LatentDdpmTask(settings, load_manifest(manifest, condition_spec=settings.condition_spec),
                          ModelSource(local_dir=vae, uri=str(vae)))
    clock = StepClock()
    train(settings, task, clock, prepare(settings, task, build_accelerator(settings)))
    return clock.seconds_per_step(2 * LOG_EVERY) * 1000  # after warm-up and compilation


def ema_ms(args) -> dict[str, float]:
    """diffusers' EMAModel.step on the benchmark's UNet: foreach off and on."""
    from diffusers.training_utils import EMAModel

    from ldmflow.models.architectures import build_latent_unet

    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = build_latent_unet(tuple(int(c) for c in args.channels.split(",")), 2, args.resolution // 8, 4, 8)
    parameters = list(unet.to(device).parameters())
    timings = {}
    for foreach in (False, True):
        ema = EMAModel(parameters, foreach=foreach)
        ema.to(device)
        for _ in range(3):
            ema.step(parameters)
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(20):
            ema.step(parameters)
        if device == "cuda":
            torch.cuda.synchronize()
        timings[f"EMAModel.step foreach={foreach}"] = (time.perf_counter() - started) / 20 * 1000
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--channels", default="256,256,256")
    parser.add_argument("--mixed_precision", default="bf16" if torch.cuda.is_available() else "no")
    parser.add_argument("--only", default="", help="comma list of variants to run besides plain")
    args = parser.parse_args()
    if args.steps < 3 * LOG_EVERY:
        parser.error(f"--steps must be at least {3 * LOG_EVERY}")
    logging.basicConfig(level=logging.WARNING)
    from ldmflow.data.demo import make_demo_dataset

    chosen = {name: extra for name, extra in VARIANTS.items()
              if name == "plain" or not args.only or any(part in name for part in args.only.split(","))}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        manifest = make_demo_dataset(root / "data", num_images=2 * args.batch_size, resolution=args.resolution)
        vae = _vae(root / "vae")
        results = {name: ms_per_step(manifest, vae, root / name.replace(" ", "_"), args, **extra)
                   for name, extra in chosen.items()}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\nLatent DDPM trainer on {device}: UNet {args.channels}, {args.resolution} px, batch {args.batch_size}, "
          f"{args.mixed_precision}")
    for name, value in results.items():
        print(f"{name:40} {value:9.2f} ms/step   {results['plain'] / value:6.2f}x plain")
    for name, value in ema_ms(args).items():
        print(f"{name:40} {value:9.2f} ms")


if __name__ == "__main__":
    main()
