"""Trainer overhead: ldmflow's loop against a bare forward/backward/step loop of the same model and data.

Run: python benchmarks/trainer_overhead.py [--steps 40] [--resolution 32] [--device cpu|cuda] [--write_docs]
Prints seconds per step for both and the ratio (target: <= 1.05); --write_docs puts them in
docs/benchmarks.md. Setup, previews and saving are cancelled out by timing the trainer at N and 2N steps and
taking the difference.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
from doc_figures import add_write_docs_option, describe_machine, write_figures


class _Quiet:
    run_id = ""

    def log_metrics(self, metrics, step): pass
    def log_image(self, image, key, step): pass
    def set_tags(self, tags): pass


def _settings(manifest: Path, output: Path, steps: int, args):
    from ldmflow.settings import LegacyDdpmSettings

    return LegacyDdpmSettings(
        manifest_path=str(manifest), output_dir=str(output), resolution=args.resolution,
        train_batch_size=args.batch_size, max_train_steps=steps, lr_warmup_steps=0, layers_per_block=1,
        block_out_channels=tuple(int(c) for c in args.channels.split(",")), checkpointing_steps=10**9,
        save_images_epochs=10**9, logging_steps=10, num_preview_images=1, preview_inference_steps=1,
        mixed_precision=args.mixed_precision, no_mlflow=True)


def time_trainer(manifest: Path, workdir: Path, steps: int, args) -> float:
    from ldmflow.data.manifest import load_manifest
    from ldmflow.training.legacy_task import LegacyDdpmTask
    from ldmflow.training.loop import train
    from ldmflow.training.prepare import build_accelerator, prepare

    settings = _settings(manifest, workdir / f"trainer-{steps}", steps, args)
    task = LegacyDdpmTask(settings, load_manifest(manifest, condition_spec="none"))
    started = time.perf_counter()
    train(settings, task, _Quiet(), prepare(settings, task, build_accelerator(settings)))
    return time.perf_counter() - started


def time_bare_loop(manifest: Path, steps: int, args) -> float:
    """The diffusers-example core: batch -> noise -> forward -> MSE -> backward -> AdamW step."""
    from ldmflow.data.dataset import ManifestImageDataset
    from ldmflow.data.manifest import load_manifest
    from ldmflow.models.architectures import build_pixel_unet
    from ldmflow.training.diffusion import build_noise_scheduler, diffusion_loss

    settings = _settings(manifest, Path("unused"), steps, args)
    device = torch.device(args.device)
    dataset = ManifestImageDataset(load_manifest(manifest, condition_spec="none").records, args.resolution)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)
    model = build_pixel_unet(settings.block_out_channels, 1, args.resolution).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = build_noise_scheduler(settings)
    done, started = 0, time.perf_counter()
    while done < steps:
        for batch in loader:
            pixels = batch["pixel_values"].to(device)
            loss = diffusion_loss(lambda x, t: model(x, t).sample, pixels, scheduler, None)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--channels", default="32,64")
    parser.add_argument("--mixed_precision", default="no")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_write_docs_option(parser, __file__, "docs/benchmarks.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from ldmflow.data.demo import make_demo_dataset

    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        manifest = make_demo_dataset(workdir / "data", num_images=64, resolution=args.resolution)
        time_bare_loop(manifest, 3, args)  # warm-up (allocator, kernels)
        bare, trainer = [], []
        for _ in range(args.repeats):  # interleaved, best of: robust to a busy machine
            bare.append(time_bare_loop(manifest, args.steps, args) / args.steps)
            trainer.append((time_trainer(manifest, workdir, 2 * args.steps, args)
                            - time_trainer(manifest, workdir, args.steps, args)) / args.steps)
        bare, trainer = min(bare), min(trainer)
    print(f"bare loop : {bare * 1000:8.2f} ms/step")
    print(f"ldmflow   : {trainer * 1000:8.2f} ms/step")
    print(f"ratio     : {trainer / bare:8.3f}  (target <= 1.05)")
    sizes = f"UNet {args.channels} at {args.resolution} px, batch {args.batch_size}" + \
        (f", {args.mixed_precision}" if args.mixed_precision != "no" else "")
    row = {"sizes": sizes, "bare loop": f"{bare * 1000:.1f} ms/step", "ldmflow": f"{trainer * 1000:.1f} ms/step",
           "ratio": f"{trainer / bare:.3f}"}
    write_figures(args.write_docs, __file__, [row], machine=describe_machine(args.device))


if __name__ == "__main__":
    main()
