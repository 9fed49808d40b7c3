"""Which training recipe should the latent DDPM use? Each variant is trained and scored on the demo data.

Run: python benchmarks/recipe.py [--budgets 300,600,1200] [--seeds 0,1] [--variants baseline,cosine,...]
     [--num_samples 64] [--work_dir benchmarks-out/recipe] [--smoke] [--write_docs]

One demo VAE (the Makefile's DEMO_PARAMS sizes) is trained once; then, for every variant x seed x budget, a
latent DDPM of the demo's sizes trains for exactly that many steps (no validation, the last weights) and
`ldmflow evaluate` scores it with the condition probe's features (the first evaluation trains and registers
the probe; every later one reuses it, and all use the same sampling seeds). Each variant differs from the
baseline (the current defaults: epsilon, linear schedule, no min-SNR, condition dropout 0.1) in one thing.
Prints a markdown table (mean over seeds +- half their range, training seconds), a verdict per score at the
largest budget, and a last line of JSON; logs recipe.png, recipe.md and recipe.json to an MLflow run named
"recipe benchmark". Everything (data, VAE, models, the SQLite store mlflow.db) stays in --work_dir, and a
rerun reuses whatever is finished there. The full run (6 variants x 2 seeds x 3 budgets) takes about an
hour on a 2-core CPU (measured: the VAE 5 minutes, a 300-step model 32 s, an evaluation 30-40 s). --smoke:
tiny sizes that exercise every step (about a minute on an idle 2-core CPU, nearly all of it the start-up of its
seven ldmflow processes). --write_docs puts the table and verdicts in docs/benchmarks.md and the largest
budget's condition errors in docs/training.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from doc_figures import add_write_docs_option, markdown_table, script_name, this_command, write_section
from ldmflow.evaluation.intervals import CI_SUFFIX  # the evaluation's own 95% half-width of a score

EXPERIMENT = "ldmflow-recipe"
SCORES = ("eval/temperature_mae_pct", "eval/wind_angle_error_deg", "eval/wind_mag_mae_pct", "eval/fid")  # lower wins
CONDITION_COLUMNS = {"eval/temperature_mae_pct": "temperature %", "eval/wind_angle_error_deg": "wind angle, deg",
                     "eval/wind_mag_mae_pct": "wind_mag %"}  # docs/training.md's summary at the largest budget
FID_COUNTS = ("eval/fid_num_real", "eval/fid_min_real")  # real images FID used, and needs to be comparable
VARIANTS = {
    "baseline": [],
    "v_prediction": ["--prediction_type", "v_prediction", "--rescale_betas_zero_snr"],
    "cosine": ["--ddpm_beta_schedule", "squaredcos_cap_v2"],
    "min_snr": ["--snr_gamma", "5"],
    "dropout_0.2": ["--cond_dropout_prob", "0.2"],
    "wide_condition": ["--time_embedding_dim", "512"],
}
OPTIONAL_FLAGS = ("--rescale_betas_zero_snr",)  # dropped (with a note) when the CLI lacks them; others skip the variant
NEVER = 10**6  # a cadence in steps or epochs no run reaches: no checkpoints, one preview at the end


@dataclasses.dataclass(frozen=True)
class Scale:
    """The sizes of one benchmark: the demo's (Makefile DEMO_PARAMS), or the smoke test's."""

    num_images: int
    resolution: int
    val_fraction: float
    vae_blocks: str
    vae_epochs: int
    unet_blocks: str
    budgets: tuple[int, ...]
    seeds: tuple[int, ...]
    variants: tuple[str, ...]
    num_samples: int
    evaluate_args: tuple[str, ...] = ()


DEMO = Scale(128, 64, 0.1, "32,32,64,64", 25, "64,64", (300, 600, 1200), (0, 1), tuple(VARIANTS), 64)
SMOKE = Scale(24, 32, 0.25, "16,16,16,16", 2, "32,32", (2,), (0,), ("baseline", "v_prediction"), 4,
              ("--num_inference_steps", "2", "--probe_epochs", "2"))


def ldmflow(*args: str) -> tuple[str, float]:
    """Run one ldmflow command in its own process, as a user would; its output is shown only when it fails,
    and then the benchmark stops (every later step needs this one)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "ldmflow", *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"recipe.py: `ldmflow {args[0]}` failed with exit code {result.returncode} (output above).")
    return result.stdout, time.perf_counter() - started


def recipes(names: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Each variant's extra latent-ddpm flags, checked against `latent-ddpm --help`, so the benchmark runs on
    a CLI that does not have every flag yet: an optional flag is dropped, any other missing flag skips its
    variant; each with a note."""
    help_text, _ = ldmflow("latent-ddpm", "--help")
    supported = set(re.findall(r"--[a-z_0-9]+", help_text))
    chosen, notes = {}, []
    for name in names:
        missing = [flag for flag in VARIANTS[name] if flag.startswith("--") and flag not in supported]
        if any(flag not in OPTIONAL_FLAGS for flag in missing):
            notes.append(f"{name}: skipped, this ldmflow has no {', '.join(missing)}")
            continue
        if missing:
            notes.append(f"{name}: run without {', '.join(missing)}, which this ldmflow does not have")
        chosen[name] = [arg for arg in VARIANTS[name] if arg not in missing]
    return chosen, notes


def claim_work_dir(work: Path, scale: Scale) -> None:
    """The data and VAE in a work folder are reused, so they must be of the sizes asked for now."""
    work.mkdir(parents=True, exist_ok=True)
    sizes = {key: getattr(scale, key) for key in ("num_images", "resolution", "val_fraction", "vae_blocks",
                                                   "vae_epochs")}
    record = work / "sizes.json"
    if record.is_file() and json.loads(record.read_text()) != sizes:
        raise SystemExit(f"recipe.py: {work} holds data or a VAE of other sizes ({record}); use another --work_dir.")
    record.write_text(json.dumps(sizes))


def demo_data(work: Path, scale: Scale) -> Path:
    """The demo dataset, written once per work folder."""
    manifest = work / "data" / "manifest.json"
    if not manifest.is_file():
        ldmflow("demo-data", "--output_dir", str(manifest.parent), "--num_images", str(scale.num_images),
                "--resolution", str(scale.resolution), "--val_fraction", str(scale.val_fraction), "--seed", "0",
                "--overwrite")
    return manifest


def demo_vae(work: Path, manifest: Path, scale: Scale) -> Path:
    """One VAE for every variant (trained once per work folder): the folder of the weights it registered."""
    output = work / "vae"
    if not (output / "config.json").is_file():
        shutil.rmtree(output, ignore_errors=True)  # an unfinished run
        _, seconds = ldmflow(
            "vae", "--manifest_path", str(manifest), "--output_dir", str(output), "--resolution",
            str(scale.resolution), "--train_batch_size", "8", "--num_epochs", str(scale.vae_epochs),
            "--block_out_channels", scale.vae_blocks, "--layers_per_block", "1", "--learning_rate", "1e-3",
            "--lr_warmup_steps", "20", "--kl_weight", "1e-6", "--checkpointing_steps", str(NEVER),
            "--experiment_name", EXPERIMENT, "--run_name", "recipe vae", "--registered_model_name", "recipe-vae")
        print(f"VAE trained in {seconds:.0f} s", flush=True)
    return output / "best" if (output / "best" / "config.json").is_file() else output


def run_cell(work: Path, manifest: Path, vae: Path, scale: Scale, variant: str, flags: list[str], seed: int,
             budget: int, num_samples: int) -> dict:
    """Train one latent DDPM for exactly `budget` steps and evaluate it; a finished cell of the same recipe is
    read back from its result.json instead, so an interrupted benchmark continues where it stopped."""
    folder = work / "runs" / variant / f"seed{seed}-steps{budget}"
    recipe = {"flags": flags, "num_samples": num_samples, "evaluate_args": list(scale.evaluate_args),
              "unet_blocks": scale.unet_blocks}
    done = folder / "result.json"
    if done.is_file() and json.loads(done.read_text())["recipe"] == recipe:
        return json.loads(done.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    name = f"recipe {variant} seed {seed} {budget} steps"
    _, train_seconds = ldmflow(
        "latent-ddpm", "--manifest_path", str(manifest), "--vae_uri", str(vae), "--output_dir", str(folder / "model"),
        "--resolution", str(scale.resolution), "--train_batch_size", "8", "--block_out_channels", scale.unet_blocks,
        "--layers_per_block", "1", "--learning_rate", "1e-3", "--lr_warmup_steps", "20", "--use_ema",
        "--cache_latents", "--max_train_steps", str(budget), "--seed", str(seed), "--eval_epochs", "0",
        "--register", "last", "--checkpointing_steps", str(NEVER), "--save_images_epochs", str(NEVER),
        "--experiment_name", EXPERIMENT, "--run_name", name,
        "--registered_model_name", "recipe-" + re.sub(r"[^A-Za-z0-9]+", "-", variant), *flags)
    _, eval_seconds = ldmflow(
        "evaluate", "--model_uri", str(folder / "model"), "--manifest_path", str(manifest), "--feature_extractor",
        "probe", "--num_samples", str(num_samples), "--guidance_scale", "3", "--output_dir", str(folder / "evaluate"),
        "--experiment_name", EXPERIMENT, "--run_name", name + " eval", *scale.evaluate_args)
    result = {"variant": variant, "seed": seed, "budget": budget, "train_seconds": round(train_seconds, 1),
              "eval_seconds": round(eval_seconds, 1), "scores": evaluation_scores(name + " eval"), "recipe": recipe}
    done.write_text(json.dumps(result, indent=1))
    print(f"{variant}, seed {seed}, {budget} steps: trained in {train_seconds:.0f} s, evaluated in "
          f"{eval_seconds:.0f} s", flush=True)
    return result


def evaluation_scores(run_name: str) -> dict[str, float]:
    """The kept scores of the newest evaluate run of that name, read back from MLflow (not from its console
    table, whose layout is for people)."""
    import mlflow

    from ldmflow.tracking.store import filter_value

    runs = mlflow.search_runs(experiment_names=[EXPERIMENT], max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.`ldmflow.stage` = 'evaluate' and "
                                            f"attributes.run_name = {filter_value(run_name)}")
    if runs.empty:
        raise SystemExit(f"recipe.py: no evaluate run named {run_name!r} in {mlflow.get_tracking_uri()}.")
    row = runs.iloc[0]
    wanted = [key + suffix for key in SCORES for suffix in ("", CI_SUFFIX)] + list(FID_COUNTS)
    return {key: float(row[f"metrics.{key}"]) for key in wanted
            if f"metrics.{key}" in row and not math.isnan(row[f"metrics.{key}"])}


def summarise(results: list[dict]) -> dict[tuple[str, int], dict]:
    """Per (variant, budget): each score's mean, min and max over seeds (and mean CI when reported), and the
    mean training seconds."""
    cells: dict[tuple[str, int], list[dict]] = {}
    for result in results:
        cells.setdefault((result["variant"], result["budget"]), []).append(result)
    summary = {}
    for key, runs in cells.items():
        stats = {"train_seconds": sum(r["train_seconds"] for r in runs) / len(runs), "seeds": len(runs)}
        for score in SCORES:
            values = [r["scores"][score] for r in runs if score in r["scores"]]
            intervals = [r["scores"][score + CI_SUFFIX] for r in runs if score + CI_SUFFIX in r["scores"]]
            if values:
                stats[score] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values),
                                **({"ci95": sum(intervals) / len(intervals)} if intervals else {})}
        summary[key] = stats
    return summary


def fid_caveat(results: list[dict]) -> list[str]:
    """evaluate's warning, carried into the verdict: FID from fewer real images than its features need (their
    dimension + 1) mostly measures the count (the demo's val split has 13 images)."""
    counts = [(r["scores"][FID_COUNTS[0]], r["scores"][FID_COUNTS[1]]) for r in results
              if all(key in r["scores"] for key in FID_COUNTS)]
    short_of = [(real, needed) for real, needed in counts if real < needed]
    if not short_of:
        return []
    real, needed = min(short_of)
    return [f"fid: not comparable between models here, {real:.0f} real images where its features need {needed:.0f} "
            "(evaluate's own warning); read it as a rough sign only"]


def short(score: str) -> str:
    return score.removeprefix("eval/")


def table(summary: dict, variants: list[str], budgets: list[int]) -> str:
    return "\n".join(markdown_table(*table_cells(summary, variants, budgets)))


def table_cells(summary: dict, variants: list[str], budgets: list[int]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the markdown table: one row per variant x budget; each score as mean +- half its range
    over seeds, with the evaluations' own mean 95% half-width in brackets when evaluate reports one."""
    header = ["variant", "steps", "train s", *(short(s) for s in SCORES)]
    rows = []
    for variant in variants:
        for budget in budgets:
            stats = summary.get((variant, budget))
            if stats is None:
                continue
            cells = []
            for score in SCORES:
                s = stats.get(score)
                cells.append("n/a" if s is None else f"{s['mean']:.4g} ± {(s['max'] - s['min']) / 2:.2g}"
                             + (f" [ci {s['ci95']:.2g}]" if "ci95" in s else ""))
            rows.append([variant, str(budget), f"{stats['train_seconds']:.0f}", *cells])
    return header, rows


def condition_table(summary: dict, variants: list[str], budget: int) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the condition errors at one budget, mean +- half the seeds' range (docs/training.md)."""
    rows = []
    for variant in variants:
        stats = summary.get((variant, budget), {})
        rows.append([variant, *(f"{stats[s]['mean']:.4g} ± {(stats[s]['max'] - stats[s]['min']) / 2:.2g}"
                                if s in stats else "n/a" for s in CONDITION_COLUMNS)])
    return [f"at {budget} steps", *CONDITION_COLUMNS.values()], rows


def verdicts(summary: dict, variants: list[str], budget: int) -> list[str]:
    """Per score at `budget`: the best variant, and whether it wins on every seed (its worst seed beats the
    runner-up's best), which is what a margin larger than the seed spread means here."""
    lines = []
    for score in SCORES:
        ranked = sorted((summary[(v, budget)][score]["mean"], v) for v in variants
                        if score in summary.get((v, budget), {}))
        if len(ranked) < 2:
            lines.append(f"- {short(score)}: fewer than two variants scored at {budget} steps")
            continue
        (best, winner), (second, runner_up) = ranked[:2]
        won, lost = summary[(winner, budget)][score], summary[(runner_up, budget)][score]
        head = f"- {short(score)} at {budget} steps: {winner} wins ({best:.4g} vs {runner_up} {second:.4g})"
        if summary[(winner, budget)]["seeds"] < 2:
            lines.append(head + ", one seed: no spread to judge the margin by")
        elif won["max"] < lost["min"]:
            lines.append(head + f", beyond the seed spread (its worst seed {won['max']:.4g} < {lost['min']:.4g})")
        else:
            lines.append(head + f", within the seed spread (its worst seed {won['max']:.4g} >= {lost['min']:.4g})")
    return lines


def report(summary: dict, variants: list[str], budgets: list[int], notes: list[str], sizes: str) -> str:
    """The markdown printed and logged: what was measured, the table, the verdicts, then the caveats."""
    return (f"Latent DDPM recipes on the demo data ({sizes}); each score: mean over seeds ± half their range; "
            "train s: the whole latent-ddpm command (start-up and latent cache included).\n\n"
            + table(summary, variants, budgets) + "\n\n" + "\n".join(verdicts(summary, variants, max(budgets)))
            + "".join(f"\n\nNote: {note}" for note in notes))


def plot(summary: dict, variants: list[str], budgets: list[int], path: Path) -> None:
    """Convergence: one panel per score, score against budget, one line per variant (mean over seeds, bars from
    the worst to the best seed). matplotlib is always there: mlflow requires it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(SCORES), figsize=(4.2 * len(SCORES), 3.6), constrained_layout=True)
    for axis, score in zip(axes, SCORES):
        for variant in variants:
            points = [(b, summary[(variant, b)][score]) for b in budgets if score in summary.get((variant, b), {})]
            if points:
                means = [s["mean"] for _, s in points]
                spread = [[m - s["min"] for m, (_, s) in zip(means, points)],
                          [s["max"] - m for m, (_, s) in zip(means, points)]]
                axis.errorbar([b for b, _ in points], means, yerr=spread, marker="o", capsize=3, label=variant)
        axis.set(title=f"{short(score)} (lower is better)", xlabel="training steps", xticks=budgets)
    axes[0].legend(fontsize="small")
    figure.savefig(path, dpi=100)
    plt.close(figure)


def log_benchmark(work: Path, args: dict, markdown: str, results: list[dict], summary: dict) -> str:
    """The plot, the table and the raw results as one MLflow run beside the runs they came from; each mean score
    also as a metric `<variant>/<score>` at step = budget, so the UI can chart convergence too."""
    import mlflow

    with mlflow.start_run(run_name="recipe benchmark") as run:
        mlflow.set_tag("ldmflow.stage", "benchmark")
        mlflow.log_params({key: ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
                           for key, value in args.items()})
        for (variant, budget), stats in summary.items():
            mlflow.log_metrics({f"{variant}/{short(score)}": stats[score]["mean"] for score in SCORES
                                if score in stats}, step=budget)
        mlflow.log_artifact(str(work / "recipe.png"))
        mlflow.log_text(markdown, "recipe.md")
        mlflow.log_dict({"settings": args, "results": results}, "recipe.json")
    return run.info.run_id


def write_docs(targets, summary: dict, variants: list[str], budgets: list[int]) -> None:
    """The table and verdicts into docs/benchmarks.md's section, the condition errors at the largest budget
    into the section labelled largest-budget (docs/training.md)."""
    for doc, label in targets or ():
        if label == "largest-budget":
            figures, notes = condition_table(summary, variants, max(budgets)), []
        else:
            figures = table_cells(summary, variants, budgets)
            notes = [line.removeprefix("- ") for line in verdicts(summary, variants, max(budgets))]
        write_section(doc, script_name(__file__), this_command(), figures, label=label, notes=notes)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default=None, help="training steps, comma list (default 300,600,1200)")
    parser.add_argument("--seeds", default=None, help="training seeds, comma list (default 0,1)")
    parser.add_argument("--variants", default=None, help=f"comma list of {', '.join(VARIANTS)} (default all)")
    parser.add_argument("--num_samples", type=int, default=None, help="evaluated samples per model (default 64)")
    parser.add_argument("--work_dir", default=None, help="default benchmarks-out/recipe (--smoke: .../recipe-smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes that exercise every step (2 variants, 1 seed, 1 budget)")
    add_write_docs_option(parser, __file__, "docs/benchmarks.md", "docs/training.md#largest-budget")
    args = parser.parse_args()
    unknown = set((args.variants or "").split(",")) - set(VARIANTS) - {""}
    if unknown:
        parser.error(f"--variants: unknown {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    return args


def main() -> None:
    args = parse_args()
    scale = SMOKE if args.smoke else DEMO
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else list(scale.budgets)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(scale.seeds)
    num_samples = args.num_samples or scale.num_samples
    work = Path(args.work_dir or ("benchmarks-out/recipe" + ("-smoke" if args.smoke else ""))).resolve()
    claim_work_dir(work, scale)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"  # this process and every ldmflow command
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not MLflow's lines about creating the database
    import mlflow

    from ldmflow.tracking.store import ensure_experiment

    mlflow.set_experiment(experiment_id=ensure_experiment(EXPERIMENT))
    chosen, notes = recipes(args.variants.split(",") if args.variants else list(scale.variants))
    for note in notes:
        print(f"Note: {note}", flush=True)
    manifest = demo_data(work, scale)
    vae = demo_vae(work, manifest, scale)
    results = [run_cell(work, manifest, vae, scale, variant, flags, seed, budget, num_samples)
               for variant, flags in chosen.items() for budget in budgets for seed in seeds]
    variants, summary = list(chosen), summarise(results)
    notes += fid_caveat(results)
    markdown = report(summary, variants, budgets, notes, f"{scale.resolution} px, {len(seeds)} seed(s), "
                                                         f"{num_samples} evaluated samples each")
    print("\n" + markdown + "\n", flush=True)
    plot(summary, variants, budgets, work / "recipe.png")
    settings = {"budgets": budgets, "seeds": seeds, "variants": variants, "num_samples": num_samples,
                "smoke": args.smoke, "work_dir": str(work)}
    run_id = log_benchmark(work, settings, markdown, results, summary)
    write_docs(args.write_docs, summary, variants, budgets)
    print(f"Plot: {work / 'recipe.png'}; MLflow run {run_id} ('recipe benchmark') in "
          f"{os.environ['MLFLOW_TRACKING_URI']}")
    print(json.dumps({**settings, "notes": notes, "mlflow_run_id": run_id, "results": results}))


if __name__ == "__main__":
    main()
