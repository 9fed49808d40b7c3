"""Can the condition probe be trusted? Its error on real val images against a simple hand-made reader's, per family.

Run: python benchmarks/probe_quality.py [--seeds 0,1,2] [--styles stripes,plumes] [--num_images 128]
     [--resolution 64] [--num_epochs N] [--probe_option NAME=VALUE ...] [--work_dir benchmarks-out/probe_quality]
     [--write_docs [DOC[#LABEL] ...]]

For every style and seed: `ldmflow demo-data --num_images 128 --resolution 64 --style STYLE --seed SEED`, a probe
trained on its train split with `ldmflow probe`'s defaults (seed SEED, no MLflow; --num_epochs overrides), and
both readers scored on the val images as `ldmflow evaluate` scores its "real images" column: temperature MAE and
wind_mag MAE in % of the training range, the wind's angle error in degrees (as an axis, wind over a quarter of the
range). The reader is `ldmflow.data.demo.estimate_conditions(image, style)`, which knows how the family is drawn.
Prints per style the probe's and the reader's errors and their ratio (probe / reader), mean +- sd over the seeds,
with the probe's training time and the CPU; --write_docs puts the table in docs/evaluation.md (a variant's into
docs/evaluation.md#first-probe, the first probe's settings: --probe_option norm=group --probe_option
axis_outputs=false --probe_option learning_rate=0.001). About 3 minutes on a 2-core CPU for 3 seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
from doc_figures import add_write_docs_option, describe_machine, write_figures

MEASURES = {"temperature_mae_pct": "temperature, % of range", "wind_angle_error_deg": "wind angle, degrees",
            "wind_mag_mae_pct": "wind_mag, % of range"}
TARGET_RATIO = 1.3  # issue 30: the probe within 1.3x of the simple reader, on every condition


def _reader_values(spec, estimates: list[dict]) -> np.ndarray:
    """(N, D) condition vectors in the manifest's spec order from `estimate_conditions` dicts."""
    rows = []
    for estimate in estimates:
        speed, angle = estimate["wind_mag"], estimate["wind_angle"]
        parts = {"temperature": [estimate["temperature"]], "wind_mag": [speed],
                 "wind": [speed * math.cos(angle), speed * math.sin(angle), 0.0]}
        rows.append(np.concatenate([parts[name][:dim] for name, dim in spec.items]))
    return np.asarray(rows, dtype=np.float64)


def measure(style: str, seed: int, args) -> dict[str, float]:
    """One family and seed: data, a probe, and both readers' errors on the val images; the probe's seconds."""
    from ldmflow.data.dataset import ManifestImageDataset
    from ldmflow.data.demo import estimate_conditions, make_demo_dataset
    from ldmflow.data.manifest import load_manifest
    from ldmflow.evaluation.adherence import condition_errors, manifest_ranges, recorded_conditions
    from ldmflow.models.probe import ProbeReader
    from ldmflow.settings import ProbeSettings
    from ldmflow.workflows.train import run_training

    folder = Path(args.work_dir) / f"{style}-{seed}"
    manifest = make_demo_dataset(folder / "data", num_images=args.num_images, resolution=args.resolution,
                                 style=style, seed=seed, overwrite=True)
    options = {"num_epochs": args.num_epochs} if args.num_epochs else {}
    options.update(args.probe_option or {})
    settings = ProbeSettings(manifest_path=str(manifest), output_dir=str(folder / "probe"), seed=seed,
                             no_mlflow=True, **options)
    started, cpu_started = time.perf_counter(), time.process_time()
    outcome, _ = run_training(settings)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    probe = ProbeReader.from_folder(outcome.model_dir)
    real, train = (load_manifest(str(manifest), split=split) for split in ("val", "train"))
    data = ManifestImageDataset(real.records, settings.resolution)
    images = np.stack([(data[i]["pixel_values"].permute(1, 2, 0).numpy() + 1) / 2 for i in range(len(data))])
    truth, ranges = recorded_conditions(real, len(images)), manifest_ranges(train)
    read_by = {"probe": probe.read(images), "reader": _reader_values(real.spec, [estimate_conditions(image, style)
                                                                                 for image in images])}
    scores = {"seconds": seconds, "cpu_seconds": cpu_seconds}
    for who, read in read_by.items():
        errors = condition_errors(real.spec, truth.values, truth.present, read, ranges)
        scores.update({f"{who}/{key}": errors.get(key, math.nan) for key in MEASURES})  # nan: no strong wind
    scores.update({f"ratio/{key}": scores[f"probe/{key}"] / max(scores[f"reader/{key}"], 1e-9) for key in MEASURES})
    return scores


class _ProbeOption(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None):
        name, _, text = value.partition("=")
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = text
        options = dict(getattr(namespace, self.dest) or {})
        options[name] = tuple(parsed) if isinstance(parsed, list) else parsed
        setattr(namespace, self.dest, options)


def _mean_sd(values: list[float], spec: str = ".3g") -> str:
    """`mean ± sd` of the values that are not nan (a val split without strong wind has no angle error)."""
    values = [value for value in values if not math.isnan(value)]
    if not values:
        return "n/a"
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):{spec}} ± {sd:{spec}}"


def table_rows(results: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for style, runs in results.items():
        for key, label in MEASURES.items():
            ratios = [run[f"ratio/{key}"] for run in runs]
            rows.append({"family": style, "condition": label,
                         "probe": _mean_sd([run[f"probe/{key}"] for run in runs]),
                         "reader": _mean_sd([run[f"reader/{key}"] for run in runs]),
                         "probe / reader": _mean_sd(ratios, ".2f"),
                         "within 1.3x": f"{sum(r <= TARGET_RATIO for r in ratios)} of {len(ratios)}"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma list: each seed draws its data and trains its probe")
    parser.add_argument("--styles", default="stripes,plumes")
    parser.add_argument("--num_images", type=int, default=128)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--num_epochs", type=int, default=None, help="probe epochs (default: ldmflow probe's)")
    parser.add_argument("--probe_option", action=_ProbeOption, metavar="NAME=VALUE",
                        help="another ProbeSettings value (JSON, lists as tuples), repeatable: a variant to measure")
    parser.add_argument("--work_dir", default="benchmarks-out/probe_quality")
    add_write_docs_option(parser, __file__, "docs/evaluation.md")
    args = parser.parse_args()
    from ldmflow.environment import lock_tags

    seeds = [int(seed) for seed in args.seeds.split(",")]
    results: dict[str, list[dict]] = {}
    for style in args.styles.split(","):
        for seed in seeds:
            scores = measure(style, seed, args)
            results.setdefault(style, []).append(scores)
            print(f"{style} seed {seed}: probe trained in {scores['seconds']:.1f} s; " + "; ".join(
                f"{key} probe {scores[f'probe/{key}']:.3g} reader {scores[f'reader/{key}']:.3g} "
                f"ratio {scores[f'ratio/{key}']:.2f}" for key in MEASURES), flush=True)
    rows = table_rows(results)
    seconds = [run["seconds"] for runs in results.values() for run in runs]
    lock = lock_tags()  # describe_machine names the CPU model, its capability and the lock; add the threads
    machine = (f"{describe_machine('cpu')}{'' if lock.get('lock_match') == 'yes' else ' (not matched)'}, "
               f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    notes = [f"probe training: {_mean_sd(seconds, '.1f')} s per probe ({len(seeds)} seeds x {len(results)} families, "
             f"{args.num_images} images at {args.resolution} px)"]
    print(f"\n{machine}; seeds {args.seeds}")
    for row in rows:
        print("  ".join(f"{value}" for value in row.values()))
    print(notes[0])
    write_figures(args.write_docs, __file__, rows, notes=notes, machine=machine)


if __name__ == "__main__":
    main()
