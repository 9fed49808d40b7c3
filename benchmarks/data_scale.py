"""Data at scale: manifest checks, training startup, the latent cache's build speed and memory at 1k-100k images.

Each size is a manifest of N entries hard-linked to the demo images (no disk space, and the loader still sees N
files). Every command runs as a new process, as a user would start it, with its own LDMFLOW_CACHE:

- check-manifest, first run (nothing remembered) and second run (the image-check index);
- a 1-step VAE run's startup: from launch to its first training step, first run (no check ran before it)
  and second run;
- the latent cache built by `ldmflow cache-latents` (timed from its "Encoding" line to its "Wrote" line:
  the loop, the shard files and the index) against a bare loop that decodes and encodes the same images with
  the same VAE into memory (timed around the loop);
- a latent DDPM trained from that cache with 1 and 2 processes: whether it encoded anything, and each
  process's peak private (anonymous) and shared (file-backed: the mapped cache) resident memory.

With --baseline_src (a checkout of an older ldmflow, e.g. `git worktree add /tmp/old 29a37b1`), the check and
startup rows also run that code, for the speed-up. Targets (issue 23): second-run check and startup at 100k
<= 10 s, first-run check >= 2x faster than before, cache build >= 0.9x the bare loop, private memory
independent of N (within a few hundred MiB), a second latent run encodes nothing.

    python benchmarks/data_scale.py --sizes 1000,10000,100000 --baseline_src /tmp/old --write_docs
    python benchmarks/data_scale.py --smoke      # 40 images, seconds: tests/test_benchmarks.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from doc_figures import add_write_docs_option, write_figures

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = "64"  # the demo images' own size: no resize, so decoding is what the loader pays
VAE_SIZES = ["--block_out_channels", "8,8,8,8", "--layers_per_block", "1"]
ENCODE_BATCH = "32"


def _environment(cache: Path, source: Path | None = None) -> dict:
    env = {**os.environ, "LDMFLOW_CACHE": str(cache), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{cache}/mlflow.db"}
    if source is not None:  # an older checkout first on the path (and the working folder): its ldmflow runs
        env["PYTHONPATH"] = os.pathsep.join([str(source), env.get("PYTHONPATH", "")])
    return env


def _run(arguments: list[str], env: dict, marks: dict[str, str] | None = None,
         launcher: list[str] | None = None, source: Path | None = None) -> tuple[float, dict, str, dict[int, dict]]:
    """Run a command (with `source`'s ldmflow: `-m` imports from the working folder first); returns its wall
    time, when each `marks` text first appeared in its log (seconds after launch), its log, and the peak
    memory of each of its Python processes."""
    command = [*(launcher or [sys.executable]), "-m", "ldmflow", *arguments]
    start = time.monotonic()
    process = subprocess.Popen(command, env=env, cwd=source or ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    memory: dict[int, dict] = {}
    watcher = threading.Thread(target=_watch_memory, args=(process, memory), daemon=True)
    watcher.start()
    seen, lines = {}, []
    for line in process.stdout:
        lines.append(line)
        for name, text in (marks or {}).items():
            if name not in seen and text in line:
                seen[name] = time.monotonic() - start
    process.wait()
    wall = time.monotonic() - start
    watcher.join()
    log = "".join(lines)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{log[-3000:]}")
    return wall, seen, log, memory


def _watch_memory(process: subprocess.Popen, memory: dict[int, dict]) -> None:
    """Peak RssAnon / RssFile (MiB) of the process and its descendants that run ldmflow, every 0.2 s."""
    while process.poll() is None:
        for pid in _tree(process.pid):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"ldmflow" not in command or any(b"accelerate" in part for part in command[:2]):
                continue  # the launcher is not a training process
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            peak = memory.setdefault(pid, {"anon": 0.0, "file": 0.0})
            for key, name in (("anon", "RssAnon"), ("file", "RssFile")):
                peak[key] = max(peak[key], int(fields.get(name, "0 kB").split()[0]) / 1024)
        time.sleep(0.2)


def _tree(pid: int) -> list[int]:
    pids, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        pids += [int(child) for child in children]
        frontier += [int(child) for child in children]
    return pids


def make_dataset(demo: Path, folder: Path, size: int) -> Path:
    """`size` entries hard-linked (round robin) to the demo's images, with their metadata (train/val splits)."""
    manifest = folder / "manifest.json"
    if manifest.is_file():
        return manifest
    items = json.loads((demo / "manifest.json").read_text())["items"]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for index in range(size):
        source = items[index % len(items)]
        name = f"images/{index:07d}.png"
        if not (folder / name).exists():
            os.link(demo / source["output_rel"], folder / name)
        entries.append({"output_rel": name, "metadata": source["metadata"]})
    manifest.write_text(json.dumps({"items": entries}))
    return manifest


def bare_encode(manifest: Path, vae: Path, env: dict) -> float:
    """Images/s of the loop the cache is compared with: decode, centre-crop, encode (and the mirror) into
    memory, timed around the loop, in its own process."""
    code = f"""
import time, torch
from diffusers import AutoencoderKL
from ldmflow.data.dataset import ManifestImageDataset
from ldmflow.data.manifest import load_manifest
records = load_manifest({str(manifest)!r}, split="all", condition_spec="none").records
vae = AutoencoderKL.from_pretrained({str(vae)!r}).eval()
loader = torch.utils.data.DataLoader(ManifestImageDataset(records, {RESOLUTION}), batch_size={ENCODE_BATCH})
kept, start = [], time.monotonic()
with torch.no_grad():
    for batch in loader:
        pixels = batch["pixel_values"]
        kept.append((vae.encode(pixels).latent_dist.parameters, vae.encode(pixels.flip(-1)).latent_dist.parameters))
print(len(records) / (time.monotonic() - start))
"""
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"bare encode loop failed:\n{result.stderr[-3000:]}")
    return float(result.stdout.split()[-1])


def measure(size: int, work: Path, demo: Path, baseline: Path | None, steps: int) -> dict:
    """One row of the table: every figure at one dataset size."""
    folder = work / f"n{size}"
    manifest = make_dataset(demo, folder, size)
    vae = work / "vae"
    row = {"images": f"{size:,}"}
    for label, source in (("", None), ("before: ", baseline)):
        if label and source is None:
            continue
        cache = folder / f"cache{'-before' if source else ''}"
        shutil.rmtree(cache, ignore_errors=True)
        env = _environment(cache, source)
        check = ["check-manifest", "--manifest_path", str(manifest), "--split", "all"]
        first, _, _, _ = _run(check, env, source=source)
        second, _, _, _ = _run(check, env, source=source)
        startup = []
        cold = folder / f"cache-startup{'-before' if source else ''}"  # nothing remembered: no check ran here
        shutil.rmtree(cold, ignore_errors=True)
        env = _environment(cold, source)
        for attempt in range(2):
            output = folder / f"vae-{attempt}{'-before' if source else ''}"
            shutil.rmtree(output, ignore_errors=True)
            _, marks, _, _ = _run(["vae", "--manifest_path", str(manifest), "--output_dir", str(output),
                                   "--resolution", RESOLUTION, "--train_batch_size", "4", "--max_train_steps", "1",
                                   *VAE_SIZES, "--lr_warmup_steps", "0", "--scaling_factor_batches", "1",
                                   "--save_images_epochs", "1000", "--eval_epochs", "0", "--no_mlflow"], env,
                                  {"first step": "Training 1 steps"}, source=source)
            startup.append(marks["first step"])
        row[f"{label}check 1st / 2nd"] = f"{first:.1f} s / {second:.1f} s"
        row[f"{label}startup 1st / 2nd"] = f"{startup[0]:.1f} s / {startup[1]:.1f} s"
        if source is None:
            current_first = first
        else:
            row["check 1st speed-up"] = f"{first / current_first:.1f}x"
    env = _environment(folder / "cache")
    latents = folder / "latent-cache"
    shutil.rmtree(latents, ignore_errors=True)
    bare = bare_encode(manifest, vae, env)
    _, marks, log, _ = _run(["cache-latents", "--manifest_path", str(manifest), "--vae_uri", str(vae),
                             "--resolution", RESOLUTION, "--random_flip", "--eval_batch_size", ENCODE_BATCH,
                             "--split", "all", "--latent_cache_dir", str(latents)], env,
                            {"start": "Encoding", "end": "Wrote the latent cache"})
    built = size / (marks["end"] - marks["start"])
    row["cache build / bare encode"] = f"{built:,.0f} / {bare:,.0f} img/s ({built / bare:.2f}x)"
    for processes in (1, 2):
        launcher = None if processes == 1 else [str(Path(sys.executable).parent / "accelerate"), "launch",
                                                "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                                "--mixed_precision", "no", "--dynamo_backend", "no"]
        env_run = {**env, "ACCELERATE_USE_CPU": "true"} if processes == 2 else env
        output = folder / f"latent-{processes}"
        shutil.rmtree(output, ignore_errors=True)
        _, _, log, memory = _run(["latent-ddpm", "--manifest_path", str(manifest), "--vae_uri", str(vae),
                                  "--output_dir", str(output), "--resolution", RESOLUTION, "--train_batch_size",
                                  "8", "--max_train_steps", str(steps), "--block_out_channels", "16,16",
                                  "--layers_per_block", "1", "--lr_warmup_steps", "0", "--cache_latents",
                                  "--random_flip", "--split", "all", "--eval_batch_size", ENCODE_BATCH,
                                  "--latent_cache_dir", str(latents), "--condition_spec",
                                  "temperature:1,wind:3:flipx=0,wind_mag:1", "--save_images_epochs", "1000",
                                  "--eval_epochs", "0", "--checkpointing_steps", "100000", "--no_mlflow"],
                                 env_run, launcher=launcher)
        encoded = "Encoding" in log
        peaks = sorted(memory.values(), key=lambda peak: -peak["anon"])[:processes]
        row[f"{processes} process{'es' if processes > 1 else ''}: private / shared MiB per process"] = (
            " + ".join(f"{p['anon']:.0f} / {p['file']:.0f}" for p in peaks) + (" (encoded!)" if encoded else ""))
    cache_bytes = sum(path.stat().st_size for path in latents.rglob("*.npy"))
    row["cache on disk"] = f"{cache_bytes / 2**20:,.0f} MiB"
    print(json.dumps(row), flush=True)
    return row


def _demo_and_vae(work: Path, images: int) -> Path:
    """The demo images every size links to, and an untrained tiny VAE (encoding costs the same trained or not)."""
    demo = work / "demo"
    if not (demo / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "ldmflow", "demo-data", "--output_dir", str(demo), "--num_images",
                        str(images), "--resolution", RESOLUTION, "--seed", "0"], check=True, cwd=ROOT,
                       capture_output=True)
    if not (work / "vae" / "config.json").is_file():
        from diffusers import AutoencoderKL

        AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                      down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4).save_pretrained(work / "vae")
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="Dataset sizes (entries).")
    parser.add_argument("--work_dir", default="/tmp/ldmflow-data-scale", help="Datasets, caches and outputs.")
    parser.add_argument("--baseline_src", default=None, help="An older ldmflow checkout to compare with.")
    parser.add_argument("--steps", type=int, default=20, help="Latent DDPM steps trained from the cache.")
    parser.add_argument("--smoke", action="store_true", help="40 images, 4 steps: proves the script runs.")
    add_write_docs_option(parser, __file__, "docs/benchmarks.md")
    args = parser.parse_args(argv)
    sizes = [40] if args.smoke else [int(size) for size in args.sizes.split(",")]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    demo = _demo_and_vae(work, 16 if args.smoke else 128)
    baseline = Path(args.baseline_src).absolute() if args.baseline_src else None
    rows = [measure(size, work, demo, baseline, 4 if args.smoke else args.steps) for size in sizes]
    write_figures(args.write_docs, __file__, rows)


if __name__ == "__main__":
    main()
