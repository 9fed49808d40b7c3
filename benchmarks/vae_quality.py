"""Does the adversarial (and perceptual) VAE loss keep fine detail the MSE + L1 + KL default loses?

Run: python benchmarks/vae_quality.py [--resolution 64] [--seconds 300] [--perceptual_weights DIR] [--write_docs]
(defaults: the setting that showed the gain on a 2-core CPU, docs/benchmarks.md: an x4 VAE, adversarial
weight 0.1 from three quarters of the run, 34-px discriminator patches; --write_docs puts the table there,
--write_docs docs/benchmarks.md#x8-3min into another of its sections)

Trains two VAEs on textured demo data with the same wall-clock budget each (their step counts come from a
short timed calibration, so the slower adversarial step gets fewer steps), then scores posterior-mode
reconstructions of held-out images. Prints, side by side:
- val PSNR (dB) and SSIM;
- gradient energy ratio: mean squared finite difference of the reconstruction over the original's
  (1.0 keeps all the detail, a blurry VAE scores well below);
- high-frequency energy ratio: FFT energy above half the Nyquist frequency, reconstruction over original;
- LPIPS, when its weights can be had (--perceptual_weights or LDMFLOW_LPIPS_WEIGHTS, else a download).
Needs no downloaded weights unless asked for LPIPS; CPU or GPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from doc_figures import add_write_docs_option, write_figures
from step_clock import StepClock

CALIBRATION_STEPS = (8, 40)  # one run's steps between these two give the time per step (after warm-up)


BLOCKS = {4: (32, 64, 64), 8: (32, 32, 64, 64), 16: (32, 32, 64, 64, 64)}  # VAE widths per downsampling factor


def _settings(data: Path, output: Path, resolution: int, steps: int, **losses):
    from ldmflow.settings import VaeSettings

    losses = {"logging_steps": 100, "downsample_factor": 8, **losses}
    return VaeSettings(manifest_path=str(data), output_dir=str(output), resolution=resolution, train_batch_size=8,
                       block_out_channels=BLOCKS[losses["downsample_factor"]], layers_per_block=1, learning_rate=1e-3,
                       lr_warmup_steps=20, lr_scheduler="constant_with_warmup", kl_weight=1e-6, max_train_steps=steps,
                       eval_epochs=0, save_images_epochs=10**6, checkpointing_steps=10**6, scaling_factor_batches=2,
                       no_mlflow=True, **losses)


def _train(settings, clock: "StepClock | None" = None) -> float:
    """Train; returns the wall-clock seconds of the training steps alone (setup excluded)."""
    from ldmflow.data.manifest import load_manifest
    from ldmflow.training.loop import train
    from ldmflow.training.prepare import build_accelerator, prepare
    from ldmflow.training.vae_task import VaeTask

    task = VaeTask(settings, load_manifest(settings.manifest_path, condition_spec="none"), None)
    run = prepare(settings, task, build_accelerator(settings))
    started = time.perf_counter()
    train(settings, task, clock or StepClock(), run)
    return time.perf_counter() - started


def _seconds_per_step(data: Path, scratch: Path, resolution: int, losses: dict) -> float:
    """Timed over a short run's steps after its warm-up."""
    few, many = CALIBRATION_STEPS
    clock = StepClock()
    _train(_settings(data, scratch, resolution, many, logging_steps=1, **losses), clock)
    return clock.seconds_per_step(few, many)


def _steps_within(seconds: float, data: Path, scratch: Path, resolution: int, losses: dict, args) -> int:
    """How many steps of this loss fit in `seconds`; with a discriminator, its steps before --disc_start (none)
    and after (all) are timed apart."""
    if "disc_weight" not in losses:
        return int(seconds / _seconds_per_step(data, scratch, resolution, losses))
    plain = {key: value for key, value in losses.items() if key != "disc_weight"}
    before = _seconds_per_step(data, scratch / "before", resolution, plain)
    after = _seconds_per_step(data, scratch / "after", resolution, {**losses, "disc_start": 0})
    fraction = args.disc_start_fraction
    return int(seconds / (fraction * before + (1 - fraction) * after))


@torch.no_grad()
def score(vae_dir: Path, data: Path, resolution: int, lpips=None) -> dict[str, float]:
    """Reconstruction scores of the val split (posterior mode), in [0, 1] pixel units."""
    from diffusers import AutoencoderKL

    from ldmflow.data.dataset import image_dataset, pixel_batches
    from ldmflow.data.manifest import load_manifest
    from ldmflow.evaluation.image_metrics import psnr, ssim

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    manifest = load_manifest(data, split="val", condition_spec="none")
    dataset = image_dataset(manifest, _settings(data, vae_dir, resolution, 1), training=False)
    originals, restored = [], []
    for pixels in pixel_batches(dataset, list(range(len(dataset))), 16):
        reconstruction = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
        originals.append((pixels + 1) / 2)
        restored.append(((reconstruction + 1) / 2).clamp(0, 1))
    real, fake = torch.cat(originals), torch.cat(restored)  # (N, 3, H, W)
    scores = {"val PSNR (dB)": psnr(real, fake).mean().item(), "val SSIM": ssim(real, fake).mean().item(),
              "gradient energy ratio": _gradient_energy(fake) / _gradient_energy(real),
              "high-frequency energy ratio": _high_frequency_energy(fake) / _high_frequency_energy(real)}
    if lpips is not None:
        scores["LPIPS"] = lpips(fake * 2 - 1, real * 2 - 1).mean().item()
    return scores


def _gradient_energy(images: torch.Tensor) -> float:
    dx, dy = images.diff(dim=-1), images.diff(dim=-2)
    return float((dx**2).mean() + (dy**2).mean())


def _high_frequency_energy(images: torch.Tensor) -> float:
    """Energy of the spectrum outside the central half (in both axes) of each channel's centred FFT."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(images - images.mean((-2, -1), keepdim=True)), dim=(-2, -1))
    height, width = images.shape[-2:]
    y, x = torch.meshgrid(torch.arange(height) - height // 2, torch.arange(width) - width // 2, indexing="ij")
    outer = (y.abs() > height // 4) | (x.abs() > width // 4)
    return float((spectrum.abs() ** 2)[..., outer].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=300.0, help="training budget of each VAE")
    parser.add_argument("--num_images", type=int, default=128)
    parser.add_argument("--disc_weights", type=float, nargs="+", default=[0.1], help="one VAE per weight")
    parser.add_argument("--disc_start_fraction", type=float, default=0.75, help="of each run's steps")
    parser.add_argument("--downsample_factor", type=int, default=4, choices=sorted(BLOCKS),
                        help="the VAEs' first-stage trade-off (x4: 12x compression, x8: 48x)")
    parser.add_argument("--disc_layers", type=int, default=2, help="the discriminator's strided layers (receptive "
                        "field 70 px at 3, 34 px at 2: smaller judges finer texture)")
    parser.add_argument("--perceptual_weights", default=None, help="LPIPS weights folder: adds a third VAE with "
                        "--perceptual_weight 1 and LPIPS scores")
    parser.add_argument("--output_root", default=None, help="keep the VAEs here (default: a temporary folder)")
    add_write_docs_option(parser, __file__, "docs/benchmarks.md#x4")
    args = parser.parse_args()
    from ldmflow.data.demo import make_demo_dataset

    root = Path(args.output_root or tempfile.mkdtemp(prefix="ldmflow-vae-quality-"))
    data = make_demo_dataset(root / "data", num_images=args.num_images, resolution=args.resolution,
                             val_fraction=0.125, style="textured", overwrite=True)
    configurations = {"MSE + L1 + KL": {"downsample_factor": args.downsample_factor}}
    configurations.update({f"+ adversarial {weight:g}": {"disc_weight": weight, "disc_layers": args.disc_layers,
                                                          "downsample_factor": args.downsample_factor}
                           for weight in args.disc_weights})
    lpips = None
    if args.perceptual_weights:
        from ldmflow.models.perceptual import load_lpips

        lpips = load_lpips(args.perceptual_weights)
        first_adversarial = configurations[f"+ adversarial {args.disc_weights[0]:g}"]
        configurations["+ adversarial + LPIPS"] = {**first_adversarial, "perceptual_weight": 1.0,
                                                   "perceptual_weights": args.perceptual_weights}
    results = {}
    for name, losses in configurations.items():
        folder = root / "".join(c if c.isalnum() or c == "." else "_" for c in name)
        steps = _steps_within(args.seconds, data, folder / "calibration", args.resolution, losses, args)
        if "disc_weight" in losses:
            losses = {**losses, "disc_start": int(steps * args.disc_start_fraction)}  # reconstruction first
        seconds = _train(_settings(data, folder, args.resolution, steps, **losses))
        results[name] = {"steps": steps, "training seconds": seconds, **score(folder, data, args.resolution, lpips)}
        print(f"{name}: {steps} steps in {seconds:.0f} s", flush=True)
    names = list(results)
    print(f"\nTextured demo data, {args.resolution} px, about {args.seconds:.0f} s of training each "
          f"({torch.get_num_threads()} threads, {'CUDA' if torch.cuda.is_available() else 'CPU'}):")
    print(f"{'':30}" + "".join(f"{name:>24}" for name in names))
    for metric in results[names[0]]:
        row = "".join(f"{results[name].get(metric, float('nan')):>24.4g}" for name in names)
        print(f"{metric:30}{row}")
    print(f"\nOutputs in {root}")
    write_figures(args.write_docs, __file__, [_doc_row(name, result) for name, result in results.items()])


def _doc_row(name: str, result: dict) -> dict:
    """One VAE as a row of the docs' table."""
    row = {"VAE": name, "steps (seconds)": f"{result['steps']} ({result['training seconds']:.0f})",
           "val PSNR (dB)": f"{result['val PSNR (dB)']:.2f}"}
    return row | {key: f"{result[key]:.3f}" for key in ("val SSIM", "gradient energy ratio",
                                                        "high-frequency energy ratio", "LPIPS") if key in result}


if __name__ == "__main__":
    main()
