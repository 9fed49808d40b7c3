"""Which VAE recipe holds on the demo's data? The demo's VAE alone, as a replicate group per recipe.

Run: python benchmarks/demo_vae.py [--variants demo,25-epochs,50-epochs-lr-1e-3] [--replicates 3]
     [--cpu native|default|avx2] [--work_dir benchmarks-out/demo-vae-<cpu>] [--write_docs [DOC[#LABEL] ...]]

Writes the demo data as `make demo` does, then trains, per variant, `ldmflow vae --replicates N` with exactly the
VAE step's settings that `make demo`'s pipeline gives it (the Makefile's DEMO_PARAMS through the pipeline's own
mapping), a variant overriding some of those DEMO_PARAMS. Prints per variant each seed's val PSNR of the weights
the run keeps (its best validation), the mean ± sd and the spread (max - min) against the demo's targets (mean
>= 32 dB, spread <= 1.5 dB), and the seconds per VAE. --cpu emulates another CPU's numerics as demo_scores.py
does. --write_docs puts the table into docs/benchmarks.md's section (label demo-vae-<cpu>). About 2.5 minutes
per 50-epoch VAE on an idle 2-core CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
import typing
from pathlib import Path

from demo_scores import CPUS, LDMFLOW, demo_workspace, emulated_machine, makefile_demo, run
from doc_figures import add_write_docs_option, check_target, script_name, this_command, write_section

# variant -> (what it is, the DEMO_PARAMS it changes)
VARIANTS = {
    "demo": ("the demo's: 50 epochs, learning rate 3e-4", {}),
    "25-epochs": ("25 epochs, learning rate 1e-3 (the demo's before)", {"vae_epochs": "25", "vae_learning_rate": ""}),
    "50-epochs-lr-1e-3": ("50 epochs, learning rate 1e-3", {"vae_learning_rate": ""}),
}
TARGET_PSNR, TARGET_SPREAD = 32.0, 1.5


def vae_flags(params: dict[str, str], manifest: Path, output_dir: Path) -> list[str]:
    """The `ldmflow vae` flags of the pipeline's VAE step for these DEMO_PARAMS (its own mapping, not a copy)."""
    from ldmflow.settings import PipelineSettings, param_value, setting_fields

    def number_type(kind):  # int, float, `float | None` (a setting that defaults to another one), or None
        return next((t for t in (int, float) if kind is t or t in typing.get_args(kind)), None)

    types = {item.name: number_type(kind) for item, kind, _ in setting_fields(PipelineSettings)}
    typed = {name: None if value == "" else types[name](value) if types[name] else value
             for name, value in params.items()}
    settings = PipelineSettings(manifest_path=str(manifest), output_root=str(output_dir), **typed)
    arguments = settings.step_arguments()["vae"]
    arguments.pop("seed")  # --replicates gives the seeds
    return [part for name, value in arguments.items() if value is not None
            for part in (f"--{name}", param_value(value))]


def best_psnr_per_seed(store: str, experiment: str) -> list[float]:
    """Each replicate's best val/psnr (the weights it keeps), by seed, of the newest replicate group."""
    from mlflow import MlflowClient

    from ldmflow.tags import REPLICATE_OF_TAG, REPLICATES_TAG

    client = MlflowClient(store)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    [parent] = client.search_runs([experiment_id], f"tags.`{REPLICATES_TAG}` != ''", max_results=1,
                                  order_by=["attributes.start_time DESC"])
    children = client.search_runs([experiment_id], f"tags.`{REPLICATE_OF_TAG}` = '{parent.info.run_id}'")
    children.sort(key=lambda child: int(child.data.params["seed"]))  # params are text: "10" sorts before "2"
    return [max(m.value for m in client.get_metric_history(child.info.run_id, "val/psnr")) for child in children]


def row(variant: str, values: list[float], seconds: float) -> dict[str, str]:
    mean, spread = statistics.mean(values), max(values) - min(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    met = [] if mean >= TARGET_PSNR else ["mean"]
    met += [] if spread <= TARGET_SPREAD else [f"spread {spread:.2f}"]
    return {"recipe": VARIANTS[variant][0], "val PSNR per seed, dB": ", ".join(f"{v:.2f}" for v in values),
            f"mean ± sd ({len(values)} seeds)": f"{mean:.2f} ± {sd:.2f}", "max - min": f"{spread:.2f}",
            f"target ≥ {TARGET_PSNR:g}, spread ≤ {TARGET_SPREAD:g}": "yes" if not met else f"no ({', '.join(met)})",
            "s per VAE": f"{seconds:.0f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--replicates", type=int, default=3, help="seeds 0 .. N-1 per variant (default 3)")
    parser.add_argument("--cpu", choices=tuple(CPUS), default="native", help="numerics to emulate (default native)")
    parser.add_argument("--work_dir", default=None, help="default benchmarks-out/demo-vae-<cpu>")
    add_write_docs_option(parser, __file__, "docs/benchmarks.md#demo-vae-native")
    args = parser.parse_args()
    variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(VARIANTS)}")
    if args.replicates < 2:
        parser.error("--replicates must be at least 2: a spread needs two seeds")
    args.write_docs = [(doc, label if label is not None else f"demo-vae-{args.cpu}")
                       for doc, label in args.write_docs] if args.write_docs else None
    for doc, label in args.write_docs or ():
        check_target(doc, script_name(__file__), label)  # before the long run, not after it
    work = Path(args.work_dir or f"benchmarks-out/demo-vae-{args.cpu}").resolve()
    store, env, manifest = demo_workspace(work, args.cpu)
    params = makefile_demo()[1]
    table = []
    for variant in variants:
        flags = vae_flags({**params, **VARIANTS[variant][1]}, manifest, work / variant)
        started = time.perf_counter()
        run([*LDMFLOW, "vae", *flags, "--replicates", str(args.replicates), "--experiment_name", variant,
             "--registered_model_name", f"demo-vae-{variant}"], env, work / f"{variant}.log")
        seconds = (time.perf_counter() - started) / args.replicates
        table.append(row(variant, best_psnr_per_seed(store, variant), seconds))
        print(" | ".join(table[-1].values()), flush=True)
    machine = emulated_machine(args.cpu)
    print(f"The demo VAE over {args.replicates} seeds, CPU numerics {args.cpu} ({machine})")
    for doc, label in args.write_docs or ():
        write_section(doc, script_name(__file__), this_command(), table, machine, label=label)


if __name__ == "__main__":
    main()
