"""Which training recipe should the latent DDPM use? Each variant is trained and scored on the demo data.

Run: python benchmarks/recipe.py [--families stripes,plumes] [--budgets 300,600,1200] [--seeds 0,1,2]
     [--variants baseline,cosine,...] [--num_samples 64] [--work_dir benchmarks-out/recipe] [--smoke]
     [--write_docs]

Per dataset family (`ldmflow demo-data --style`), one demo VAE (the Makefile's DEMO_PARAMS sizes) is trained
once; then, for every variant x seed x budget, a latent DDPM of the demo's sizes trains for exactly that many
steps (no validation, the last weights) and `ldmflow evaluate` scores it with the condition probe's features
(the first evaluation of a family trains and registers its probe; every later one reuses it, and all use the
same sampling seeds). Each variant differs from the baseline (the current defaults: epsilon, linear schedule,
no min-SNR, condition dropout 0.1) in one thing. Prints a markdown table (mean ± sd over seeds, training
seconds), a verdict per score at the largest budget (a variant wins only where its worst seed beats the
baseline's best on every family: a default changes only then), and a last line of JSON; logs recipe.png,
recipe.md and recipe.json to an MLflow run named "recipe benchmark". Everything (data, VAEs, models, the SQLite
store mlflow.db) stays in --work_dir, and a rerun reuses whatever is finished there. On a 2-core CPU a VAE takes
about 3 minutes, a 1200-step model about 50 s and an evaluation 30-40 s. --smoke:
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
    vae_flags: tuple[str, ...]  # the demo VAE's recipe: epochs and learning rate
    unet_blocks: str
    budgets: tuple[int, ...]
    seeds: tuple[int, ...]
    variants: tuple[str, ...]
    families: tuple[str, ...]  # `ldmflow demo-data --style`: a default changes only when it wins on each
    num_samples: int
    evaluate_args: tuple[str, ...] = ()


DEMO = Scale(128, 64, 0.1, "32,32,64,64", ("--num_epochs", "50", "--learning_rate", "3e-4"), "64,64",
             (300, 600, 1200), (0, 1, 2), tuple(VARIANTS), ("stripes", "plumes"), 64)
SMOKE = Scale(24, 32, 0.25, "16,16,16,16", ("--num_epochs", "2", "--learning_rate", "1e-3"), "32,32", (2,), (0,),
              ("baseline", "v_prediction"), ("stripes",), 4, ("--num_inference_steps", "2", "--probe_epochs", "2"))


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
    """The data and VAE in a family's work folder are reused, so they must be of the sizes asked for now."""
    work.mkdir(parents=True, exist_ok=True)
    sizes = {key: getattr(scale, key) for key in ("num_images", "resolution", "val_fraction", "vae_blocks")}
    sizes["vae_flags"] = list(scale.vae_flags)
    record = work / "sizes.json"
    if record.is_file() and json.loads(record.read_text()) != sizes:
        raise SystemExit(f"recipe.py: {work} holds data or a VAE of other sizes ({record}); use another --work_dir.")
    record.write_text(json.dumps(sizes))


def demo_data(work: Path, scale: Scale, family: str) -> Path:
    """The family's demo dataset, written once per work folder."""
    manifest = work / "data" / "manifest.json"
    if not manifest.is_file():
        ldmflow("demo-data", "--output_dir", str(manifest.parent), "--num_images", str(scale.num_images),
                "--resolution", str(scale.resolution), "--val_fraction", str(scale.val_fraction), "--seed", "0",
                "--style", family, "--overwrite")
    return manifest


def demo_vae(work: Path, manifest: Path, scale: Scale, family: str) -> Path:
    """One VAE for every variant of a family (trained once per work folder): the folder of the weights it
    registered."""
    output = work / "vae"
    if not (output / "config.json").is_file():
        shutil.rmtree(output, ignore_errors=True)  # an unfinished run
        _, seconds = ldmflow(
            "vae", "--manifest_path", str(manifest), "--output_dir", str(output), "--resolution",
            str(scale.resolution), "--train_batch_size", "8", "--block_out_channels", scale.vae_blocks,
            "--layers_per_block", "1", "--lr_warmup_steps", "20", "--kl_weight", "1e-6", "--checkpointing_steps",
            str(NEVER), "--experiment_name", EXPERIMENT, "--run_name", f"recipe vae {family}",
            "--registered_model_name", f"recipe-vae-{family}", *scale.vae_flags)
        print(f"{family}: VAE trained in {seconds:.0f} s", flush=True)
    return output / "best" if (output / "best" / "config.json").is_file() else output


def run_cell(work: Path, manifest: Path, vae: Path, scale: Scale, family: str, variant: str, flags: list[str],
             seed: int, budget: int, num_samples: int) -> dict:
    """Train one latent DDPM for exactly `budget` steps and evaluate it; a finished cell of the same recipe is
    read back from its result.json instead, so an interrupted benchmark continues where it stopped."""
    folder = work / "runs" / variant / f"seed{seed}-steps{budget}"
    recipe = {"flags": flags, "num_samples": num_samples, "evaluate_args": list(scale.evaluate_args),
              "unet_blocks": scale.unet_blocks}
    done = folder / "result.json"
    if done.is_file() and json.loads(done.read_text())["recipe"] == recipe:
        return json.loads(done.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    name = f"recipe {family} {variant} seed {seed} {budget} steps"
    _, train_seconds = ldmflow(
        "latent-ddpm", "--manifest_path", str(manifest), "--vae_uri", str(vae), "--output_dir", str(folder / "model"),
        "--resolution", str(scale.resolution), "--train_batch_size", "8", "--block_out_channels", scale.unet_blocks,
        "--layers_per_block", "1", "--learning_rate", "1e-3", "--lr_warmup_steps", "20", "--use_ema",
        "--cache_latents", "--max_train_steps", str(budget), "--seed", str(seed), "--eval_epochs", "0",
        "--register", "last", "--checkpointing_steps", str(NEVER), "--save_images_epochs", str(NEVER),
        "--experiment_name", EXPERIMENT, "--run_name", name,
        "--registered_model_name", "recipe-" + re.sub(r"[^A-Za-z0-9]+", "-", f"{family}-{variant}"), *flags)
    _, eval_seconds = ldmflow(
        "evaluate", "--model_uri", str(folder / "model"), "--manifest_path", str(manifest), "--feature_extractor",
        "probe", "--num_samples", str(num_samples), "--guidance_scale", "3", "--output_dir", str(folder / "evaluate"),
        "--experiment_name", EXPERIMENT, "--run_name", name + " eval",
        *scale.evaluate_args)
    result = {"family": family, "variant": variant, "seed": seed, "budget": budget,
              "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
              "scores": evaluation_scores(name + " eval"), "recipe": recipe}
    done.write_text(json.dumps(result, indent=1))
    print(f"{family}, {variant}, seed {seed}, {budget} steps: trained in {train_seconds:.0f} s, evaluated in "
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


def summarise(results: list[dict]) -> dict[tuple[str, str, int], dict]:
    """Per (family, variant, budget): each score's mean, sd, min and max over seeds (and mean CI when reported),
    and the mean training seconds."""
    cells: dict[tuple[str, str, int], list[dict]] = {}
    for result in results:
        cells.setdefault((result.get("family", "stripes"), result["variant"], result["budget"]), []).append(result)
    summary = {}
    for key, runs in cells.items():
        stats = {"train_seconds": sum(r["train_seconds"] for r in runs) / len(runs), "seeds": len(runs)}
        for score in SCORES:
            values = [r["scores"][score] for r in runs if score in r["scores"]]
            intervals = [r["scores"][score + CI_SUFFIX] for r in runs if score + CI_SUFFIX in r["scores"]]
            if values:
                mean = sum(values) / len(values)
                sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
                stats[score] = {"mean": mean, "sd": sd, "min": min(values), "max": max(values),
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


def table(summary: dict, families: list[str], variants: list[str], budgets: list[int]) -> str:
    return "\n".join(markdown_table(*table_cells(summary, families, variants, budgets)))


def mean_sd(stats: dict) -> str:
    return f"{stats['mean']:.4g} ± {stats['sd']:.2g}"


def table_cells(summary: dict, families: list[str], variants: list[str], budgets: list[int]
                ) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the markdown table: one row per family x variant x budget; each score as mean ± sd over
    seeds, with the evaluations' own mean 95% half-width in brackets when evaluate reports one."""
    header = ["family", "variant", "steps", "seeds", "train s", *(short(s) for s in SCORES)]
    rows = []
    for family in families:
        for variant in variants:
            for budget in budgets:
                stats = summary.get((family, variant, budget))
                if stats is None:
                    continue
                cells = ["n/a" if score not in stats else mean_sd(stats[score])
                         + (f" [ci {stats[score]['ci95']:.2g}]" if "ci95" in stats[score] else "") for score in SCORES]
                rows.append([family, variant, str(budget), str(stats["seeds"]), f"{stats['train_seconds']:.0f}",
                             *cells])
    return header, rows


def condition_table(summary: dict, families: list[str], variants: list[str], budget: int
                    ) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the condition errors at one budget, mean ± sd over seeds (docs/training.md)."""
    rows = [[family, variant, *(mean_sd(summary[(family, variant, budget)][s])
                                if s in summary.get((family, variant, budget), {}) else "n/a"
                                for s in CONDITION_COLUMNS)]
            for family in families for variant in variants if (family, variant, budget) in summary]
    return ["family", f"at {budget} steps", *CONDITION_COLUMNS.values()], rows


def beyond_spread(won: dict, lost: dict) -> bool:
    """A margin larger than the seed spread: the winner's worst seed beats the other's best (lower wins)."""
    return won["max"] < lost["min"]


def verdicts(summary: dict, families: list[str], variants: list[str], budget: int) -> list[str]:
    """Per score at `budget`: each variant against the baseline on every family. A variant that beats it beyond
    the seed spread on every family would change the default; anything less leaves the default as it is."""
    lines = []
    for score in SCORES:
        for variant in (v for v in variants if v != "baseline"):
            outcomes = []
            for family in families:
                mine, base = (summary.get((family, name, budget), {}).get(score) for name in (variant, "baseline"))
                if mine is None or base is None:
                    outcomes.append((family, None))
                    continue
                seeds = min(summary[(family, variant, budget)]["seeds"], summary[(family, "baseline", budget)]["seeds"])
                verdict = ("one seed: no spread to judge by" if seeds < 2 else
                           "better beyond the spread" if beyond_spread(mine, base) else
                           "worse beyond the spread" if beyond_spread(base, mine) else "within the spread")
                outcomes.append((family, f"{mean_sd(mine)} vs {mean_sd(base)}, {verdict}"))
            if all(text is None for _, text in outcomes):
                continue
            wins = all(text is not None and "better beyond" in text for _, text in outcomes)
            lines.append(f"- {short(score)} at {budget} steps, {variant} vs baseline: "
                         + "; ".join(f"{family} {text or 'not run'}" for family, text in outcomes)
                         + (": wins on every family" if wins else ""))
    return lines


def report(summary: dict, families: list[str], variants: list[str], budgets: list[int], notes: list[str],
           sizes: str) -> str:
    """The markdown printed and logged: what was measured, the table, the verdicts, then the caveats."""
    return (f"Latent DDPM recipes on the demo data families {', '.join(families)} ({sizes}); each score: mean ± sd "
            "over seeds; train s: the whole latent-ddpm command (start-up and latent cache included).\n\n"
            + table(summary, families, variants, budgets) + "\n\n"
            + "\n".join(verdicts(summary, families, variants, max(budgets)))
            + "".join(f"\n\nNote: {note}" for note in notes))


def plot(summary: dict, families: list[str], variants: list[str], budgets: list[int], path: Path) -> None:
    """Convergence: one panel per score, score against budget, one line per family and variant (mean over seeds,
    bars from the worst to the best seed). matplotlib is always there: mlflow requires it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(SCORES), figsize=(4.2 * len(SCORES), 3.6), constrained_layout=True)
    for axis, score in zip(axes, SCORES):
        for family, variant in ((f, v) for f in families for v in variants):
            points = [(b, summary[(family, variant, b)][score]) for b in budgets
                      if score in summary.get((family, variant, b), {})]
            if points:
                means = [s["mean"] for _, s in points]
                spread = [[m - s["min"] for m, (_, s) in zip(means, points)],
                          [s["max"] - m for m, (_, s) in zip(means, points)]]
                axis.errorbar([b for b, _ in points], means, yerr=spread, marker="o", capsize=3,
                              label=f"{family} {variant}" if len(families) > 1 else variant)
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
        for (family, variant, budget), stats in summary.items():
            mlflow.log_metrics({f"{family}/{variant}/{short(score)}": stats[score]["mean"] for score in SCORES
                                if score in stats}, step=budget)
        mlflow.log_artifact(str(work / "recipe.png"))
        mlflow.log_text(markdown, "recipe.md")
        mlflow.log_dict({"settings": args, "results": results}, "recipe.json")
    return run.info.run_id


def write_docs(targets, summary: dict, families: list[str], variants: list[str], budgets: list[int]) -> None:
    """The table and verdicts into docs/benchmarks.md's section, the condition errors at the largest budget
    into the section labelled largest-budget (docs/training.md)."""
    for doc, label in targets or ():
        if label == "largest-budget":
            figures, notes = condition_table(summary, families, variants, max(budgets)), []
        else:
            figures = table_cells(summary, families, variants, budgets)
            notes = [line.removeprefix("- ") for line in verdicts(summary, families, variants, max(budgets))]
        write_section(doc, script_name(__file__), this_command(), figures, label=label, notes=notes)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default=None, help="training steps, comma list (default 300,600,1200)")
    parser.add_argument("--seeds", default=None, help="training seeds, comma list (default 0,1,2)")
    parser.add_argument("--families", default=None,
                        help=f"dataset families (demo-data --style), comma list (default {','.join(DEMO.families)})")
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
    families = args.families.split(",") if args.families else list(scale.families)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"  # this process and every ldmflow command
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not MLflow's lines about creating the database
    import mlflow

    from ldmflow.tracking.store import ensure_experiment

    mlflow.set_experiment(experiment_id=ensure_experiment(EXPERIMENT))
    chosen, notes = recipes(args.variants.split(",") if args.variants else list(scale.variants))
    for note in notes:
        print(f"Note: {note}", flush=True)
    results = []
    for family in families:
        claim_work_dir(work / family, scale)
        manifest = demo_data(work / family, scale, family)
        vae = demo_vae(work / family, manifest, scale, family)
        results += [run_cell(work / family, manifest, vae, scale, family, variant, flags, seed, budget, num_samples)
                    for variant, flags in chosen.items() for budget in budgets for seed in seeds]
    variants, summary = list(chosen), summarise(results)
    notes += fid_caveat(results)
    markdown = report(summary, families, variants, budgets, notes,
                      f"{scale.resolution} px, {len(seeds)} seed(s), {num_samples} evaluated samples each")
    print("\n" + markdown + "\n", flush=True)
    plot(summary, families, variants, budgets, work / "recipe.png")
    settings = {"families": families, "budgets": budgets, "seeds": seeds, "variants": variants,
                "num_samples": num_samples, "smoke": args.smoke, "work_dir": str(work)}
    run_id = log_benchmark(work, settings, markdown, results, summary)
    write_docs(args.write_docs, summary, families, variants, budgets)
    print(f"Plot: {work / 'recipe.png'}; MLflow run {run_id} ('recipe benchmark') in "
          f"{os.environ['MLFLOW_TRACKING_URI']}")
    print(json.dumps({**settings, "notes": notes, "mlflow_run_id": run_id, "results": results}))


if __name__ == "__main__":
    main()
