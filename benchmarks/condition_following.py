"""Does a latent DDPM trained on demo data follow its conditions? `estimate_conditions` (the demo's own reader)
reads them back from samples.

Run: python benchmarks/condition_following.py MODEL [--num_images 32] [--guidance_scale 3] [--steps 25]
     [--write_docs]
MODEL is a `ldmflow latent-ddpm` output folder or an MLflow model URI. Prints, for requested vs estimated
conditions: temperature mean absolute error and rank correlation, stripe-angle error (wind > 3 m/s) and
wind-magnitude rank correlation, next to the same numbers for shuffled requests (what ignoring the
conditions would score); --write_docs puts them in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from doc_figures import add_write_docs_option, write_figures

LABELS = {"temperature_mae": ("temperature MAE (degrees C)", ".1f"),  # score -> (row in the docs, format)
          "temperature_rank_corr": ("temperature rank correlation", ".2f"),
          "angle_error_deg": ("stripe angle error (degrees, wind > 3 m/s)", ".1f"),
          "wind_mag_rank_corr": ("wind magnitude rank correlation", ".2f")}


def _requests(count: int, seed: int) -> list[dict]:
    from ldmflow.data.demo import TEMPERATURE_RANGE, WIND_MAG_RANGE

    rng = np.random.default_rng(seed)
    temperatures = np.linspace(*TEMPERATURE_RANGE, count)
    angles = rng.uniform(0, 2 * math.pi, count)
    magnitudes = rng.uniform(WIND_MAG_RANGE[1] / 3, WIND_MAG_RANGE[1], count)
    return [{"temperature": [float(t)], "wind": [float(m * math.cos(a)), float(m * math.sin(a)), 0.0],
             "wind_mag": [float(m)]} for t, a, m in zip(temperatures, angles, magnitudes)]


def _rank_correlation(a, b) -> float:
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def score(requests: list[dict], estimates: list[dict]) -> dict[str, float]:
    from ldmflow.data.demo import angle_error

    wanted_t = np.array([r["temperature"][0] for r in requests])
    got_t = np.array([p["temperature"] for p in estimates])
    wanted_m = np.array([r["wind_mag"][0] for r in requests])
    got_m = np.array([p["wind_mag"] for p in estimates])
    angles = [(math.atan2(r["wind"][1], r["wind"][0]) % math.pi, p["wind_angle"])
              for r, p in zip(requests, estimates) if r["wind_mag"][0] > 3]
    return {"temperature_mae": float(np.abs(wanted_t - got_t).mean()),
            "temperature_rank_corr": _rank_correlation(wanted_t, got_t),
            "angle_error_deg": float(np.degrees(np.mean([angle_error(a, b) for a, b in angles]))) if angles else math.nan,
            "wind_mag_rank_corr": _rank_correlation(wanted_m, got_m)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--num_images", type=int, default=32)
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    add_write_docs_option(parser, __file__, "docs/benchmarks.md")
    args = parser.parse_args()
    from pathlib import Path

    from ldmflow.data.demo import estimate_conditions
    from ldmflow.sampling.load import load_sampler
    from ldmflow.tracking.model_uri import fetch_model, resolve_model_source

    sampler = load_sampler(Path(resolve_model_source(args.model).local_dir), fetch=fetch_model)
    requests = _requests(args.num_images, args.seed)
    images = sampler.generate(requests, guidance_scale=args.guidance_scale, num_inference_steps=args.steps,
                              seeds=list(range(args.seed, args.seed + len(requests))))
    estimates = [estimate_conditions(image) for image in images]
    shuffled = [requests[i] for i in np.random.default_rng(args.seed + 1).permutation(len(requests))]
    followed, ignored = score(requests, estimates), score(shuffled, estimates)
    print(f"{'metric':24s} {'requested':>10s} {'shuffled':>10s}")
    for key in followed:
        print(f"{key:24s} {followed[key]:10.3f} {ignored[key]:10.3f}")
    write_figures(args.write_docs, __file__, [
        {"metric": label, "requested": format(followed[key], spec), "shuffled": format(ignored[key], spec)}
        for key, (label, spec) in LABELS.items()])


if __name__ == "__main__":
    main()
