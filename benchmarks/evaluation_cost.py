"""What `ldmflow evaluate` costs: probe training, then the evaluation itself, per generated image.

Run: python benchmarks/evaluation_cost.py MODEL MANIFEST [--num_samples 256] [--steps 25] [--write_docs]
MODEL is a latent-ddpm output folder or an MLflow model URI (e.g. the demo's demo/outputs/latent_ddpm).
Nothing is tracked (--no_mlflow); the probe is trained once into a temporary folder, then reused.
--write_docs puts the two durations in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from doc_figures import add_write_docs_option, write_figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("manifest")
    parser.add_argument("--num_samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=25)
    add_write_docs_option(parser, __file__, "docs/benchmarks.md")
    args = parser.parse_args()
    import dataclasses

    from ldmflow.data.conditions import ConditionSpec
    from ldmflow.settings import EvaluateSettings
    from ldmflow.tracking.model_uri import resolve_model_source
    from ldmflow.workflows.evaluate import _train_probe, load_evaluated_model, run_evaluation

    with tempfile.TemporaryDirectory() as folder:
        settings = EvaluateSettings(model_uri=args.model, manifest_path=args.manifest, num_samples=args.num_samples,
                                    num_inference_steps=args.steps, output_dir=folder, no_mlflow=True)
        spec = load_evaluated_model(Path(resolve_model_source(args.model).local_dir)).spec
        started = time.perf_counter()
        probe = _train_probe(settings, spec if not spec.is_empty else ConditionSpec.parse(settings.condition_spec))
        probe_seconds = time.perf_counter() - started
        started = time.perf_counter()
        metrics = run_evaluation(dataclasses.replace(settings, probe_uri=probe))
        evaluate_seconds = time.perf_counter() - started
    print(f"probe training      {probe_seconds:8.1f} s")
    print(f"evaluation          {evaluate_seconds:8.1f} s  ({len(metrics)} metrics, {args.num_samples} samples)")
    print(f"per sample          {1000 * evaluate_seconds / args.num_samples:8.1f} ms (incl. the guidance-1 and "
          "diversity batches)")
    write_figures(args.write_docs, __file__, [
        {"model": f"`{args.model}`", "probe training": f"{probe_seconds:.1f} s",
         f"evaluation ({args.num_samples} samples, {args.steps} DDIM steps)": f"{evaluate_seconds:.1f} s"}])


if __name__ == "__main__":
    main()
