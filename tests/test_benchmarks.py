"""The benchmarks' --smoke modes run on the CPU, so the script CI keeps is the one a GPU user (or the full
CPU run) runs; each also writes its figures (--write_docs) into copies of the pages that quote them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import doc_figures and step_clock from there

from doc_figures import find_sections, parse_figures  # noqa: E402


def _copy_page(name: str, folder: Path) -> tuple[Path, str]:
    text = (ROOT / "docs" / name).read_text(encoding="utf-8")
    (folder / name).write_text(text, encoding="utf-8")
    return folder / name, text


def _written(page: Path, original: str, name: str):
    """The figures written into section `name` of `page`, after checking that nothing else changed."""
    text = page.read_text(encoding="utf-8")
    [section] = [s for s in find_sections(text) if s.name == name]
    before = original.split("\n")
    [old] = [s for s in find_sections(original) if s.name == name]
    assert text.split("\n") == before[:old.start + 1] + section.body + before[old.end:]
    return parse_figures(section.body)


@pytest.mark.train  # keeps the script a lent GPU runs working
def test_the_gpu_benchmark_smoke_run_prints_every_comparison_and_writes_them(tmp_path):
    page, original = _copy_page("benchmarks.md", tmp_path)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--write_docs",
                             str(page)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for row in ("bare / trainer, eager", "bare / trainer, EMA", "EMA overhead (trainer)", "GFLOP per step",
                "VAE:", "ddim fp32", "dpm_solver bf16", "x fp32"):
        assert row in out, out
    assert "FLOP/s" in out and " nan " not in out
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["gflop_per_step"]["latent_ddpm"] > 0 and figures["gflop_per_step"]["vae"] > 0
    assert all(value > 0 for value in [*figures["trainer_ms"].values(), *figures["bare_ms"].values()])
    written = _written(page, original, "benchmarks/gpu.py")
    assert written.command == "`python benchmarks/gpu.py --smoke`"
    assert re.fullmatch(r"a \d+-core .+ CPU \(\w+\), lock \w+", written.machine), written.machine
    assert {"latent DDPM: bare / trainer, eager", "VAE: bare / trainer", "sampling 2 images, 2 steps: ddim fp32"} <= \
        {row[0] for row in written.rows}, written.rows


def _benchmark_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _recipe_module():
    return _benchmark_module("recipe")


def test_the_demo_scores_measure_the_makefiles_demo_against_its_targets():
    demo = _benchmark_module("demo_scores")
    data, params = demo.makefile_demo()
    makefile = (ROOT / "Makefile").read_text()
    assert data == ["--num_images", "128", "--resolution", "64", "--seed", "0"]
    assert all(f"-P {name}={value}" in makefile for name, value in params.items()) and "vae_epochs" in params
    group = {}
    for key, values in {"eval/temperature_mae_pct": [2.0, 2.5, 3.5], "vae_val/psnr": [34.0, 34.5, 36.0],
                        "eval/only_temperature/temperature_mae_pct": [4.0, 4.5, 5.0],
                        "eval/only_temperature/wind_spread_ratio": [0.9, 0.8, 1.0]}.items():
        mean = sum(values) / 3
        sd = (sum((v - mean) ** 2 for v in values) / 2) ** 0.5
        group.update({key: mean, key + "_sd": sd, key + "_min": min(values), key + "_max": max(values)})
    table, verdicts = demo.rows(group, 3, 8.0)
    met = {row["score"]: row["met"] for row in table}
    assert met == {"temperature MAE, % of range": "yes", "VAE val PSNR, dB": "no (spread 2.00)",
                   "temperature only: temperature MAE, % of range": "no",  # 4.5 > 1.5 x 2.67
                   "temperature only: wind spread / the data's": "yes"}
    assert verdicts[0] == "VAE val PSNR, dB: 34.83 ± 1.04 (spread 2.00) misses the target ≥ 32 with spread ≤ 1.5"
    assert verdicts[-1].startswith("8.0 minutes per pipeline (one seed, the install not included")


def test_the_demo_vae_trains_the_pipelines_own_vae_step_and_judges_mean_and_spread(tmp_path):
    demo_vae = _benchmark_module("demo_vae")
    _, params = demo_vae.makefile_demo()
    flags = demo_vae.vae_flags(params, tmp_path / "m.json", tmp_path / "out")
    given = dict(zip(flags[::2], flags[1::2]))
    assert given["--num_epochs"] == params["vae_epochs"] and given["--learning_rate"] == params["vae_learning_rate"]
    assert given["--block_out_channels"] == params["vae_block_out_channels"] and "--seed" not in given
    before = dict(zip(*[iter(demo_vae.vae_flags({**params, **demo_vae.VARIANTS["25-epochs"][1]}, tmp_path / "m.json",
                                               tmp_path / "out"))] * 2))
    assert before["--num_epochs"] == "25" and before["--learning_rate"] == params["learning_rate"]
    steady = demo_vae.row("demo", [34.0, 34.5, 35.0], 150.0)
    assert list(steady.values())[1:5] == ["34.00, 34.50, 35.00", "34.50 ± 0.50", "1.00", "yes"]
    assert list(demo_vae.row("25-epochs", [31.5, 33.0, 34.5], 80.0).values())[4] == "no (spread 3.00)"
    assert list(demo_vae.row("25-epochs", [28.0, 28.5, 29.0], 80.0).values())[4] == "no (mean)"


@pytest.mark.slow
def test_the_recipe_benchmark_smoke_run_prints_its_table_verdicts_plot_and_results(tmp_path):
    (tmp_path / "docs").mkdir()
    benchmarks, benchmarks_before = _copy_page("benchmarks.md", tmp_path / "docs")
    training, training_before = _copy_page("training.md", tmp_path / "docs")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "recipe.py"), "--smoke", "--work_dir",
                             str(tmp_path / "work"), "--write_docs", str(benchmarks), f"{training}#largest-budget"],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["variants"] == ["baseline", "v_prediction"]
    assert sorted((r["variant"], r["budget"]) for r in figures["results"]) == [("baseline", 2), ("v_prediction", 2)]
    for score in ("temperature_mae_pct", "wind_angle_error_deg", "wind_mag_mae_pct", "fid"):
        assert f"- {score} at 2 steps, v_prediction vs baseline: stripes " in out, out
        assert all(f"eval/{score}" in r["scores"] and f"eval/{score}_ci95" in r["scores"] for r in figures["results"])
    assert (tmp_path / "work" / "recipe.png").stat().st_size > 0
    table = _written(benchmarks, benchmarks_before, "benchmarks/recipe.py")
    assert [row[:3] for row in table.rows] == [["stripes", "baseline", "2"], ["stripes", "v_prediction", "2"]]
    assert any(note.startswith("temperature_mae_pct at 2 steps, v_prediction vs baseline: stripes ")
               for note in table.notes), table.notes
    summary = _written(training, training_before, "benchmarks/recipe.py largest-budget")
    assert summary.header[:2] == ["family", "at 2 steps"]
    assert [row[:2] for row in summary.rows] == [["stripes", "baseline"], ["stripes", "v_prediction"]]


def test_the_recipe_verdict_changes_a_default_only_beyond_the_seed_spread_on_every_family():
    recipe = _recipe_module()

    def result(family, variant, seed, budget, temperature):
        return {"family": family, "variant": variant, "seed": seed, "budget": budget, "train_seconds": 10.0,
                "scores": {"eval/temperature_mae_pct": temperature, "eval/temperature_mae_pct_ci95": 1.0}}

    results = [result(family, "baseline", 0, 100, 9.0) for family in ("stripes", "plumes")]
    results += [result(family, "baseline", 1, 100, 11.0) for family in ("stripes", "plumes")]
    results += [result(family, "cosine", seed, 100, value) for family in ("stripes", "plumes")
                for seed, value in ((0, 6.0), (1, 7.0))]  # wins on both seeds of both families
    results += [result("stripes", "baseline", 0, 200, 5.0), result("stripes", "baseline", 1, 200, 8.0),
                result("stripes", "cosine", 0, 200, 5.5), result("stripes", "cosine", 1, 200, 7.0),  # within
                result("plumes", "baseline", 0, 200, 9.0), result("plumes", "baseline", 1, 200, 11.0),
                result("plumes", "cosine", 0, 200, 6.0), result("plumes", "cosine", 1, 200, 7.0)]  # beyond
    summary = recipe.summarise(results)
    stats = summary[("stripes", "baseline", 100)]["eval/temperature_mae_pct"]
    assert stats == pytest.approx({"mean": 10.0, "sd": 2 ** 0.5, "min": 9.0, "max": 11.0, "ci95": 1.0})
    families = ["stripes", "plumes"]
    [at_100] = [v for v in recipe.verdicts(summary, families, ["baseline", "cosine"], 100) if "temperature" in v]
    assert "stripes 6.5 ± 0.71 vs 10 ± 1.4, better beyond the spread" in at_100
    assert at_100.endswith(": wins on every family")
    [at_200] = [v for v in recipe.verdicts(summary, families, ["baseline", "cosine"], 200) if "temperature" in v]
    assert "stripes 6.25 ± 1.1 vs 6.5 ± 2.1, within the spread" in at_200
    assert "plumes 6.5 ± 0.71 vs 10 ± 1.4, better beyond the spread" in at_200
    assert not at_200.endswith("wins on every family")  # one family is not enough to change a default
    table = recipe.table(summary, families, ["baseline", "cosine"], [100, 200])
    assert "| stripes | baseline | 100 | 2 | 10 | 10 ± 1.4 [ci 1] |" in table


@pytest.mark.slow
def test_the_data_scale_benchmark_smoke_run_measures_every_column_and_writes_them(tmp_path):
    page, original = _copy_page("benchmarks.md", tmp_path)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_scale.py"), "--smoke", "--work_dir",
                             str(tmp_path / "work"), "--write_docs", str(page)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["images"] == "40" and "encoded!" not in json.dumps(row)  # the trainings read the built cache
    written = _written(page, original, "benchmarks/data_scale.py")
    assert written.rows[0][0] == "40" and len(written.rows[0]) == len(row)


@pytest.mark.slow
def test_the_probe_quality_benchmark_compares_probe_and_reader_on_both_families_and_writes_them(tmp_path):
    page, original = _copy_page("evaluation.md", tmp_path)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probe_quality.py"), "--seeds", "0,1",
                             "--num_images", "12", "--resolution", "32", "--num_epochs", "1", "--work_dir",
                             str(tmp_path / "work"), "--write_docs", str(page)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "plumes seed 1: probe trained in" in result.stdout
    written = _written(page, original, "benchmarks/probe_quality.py")
    assert "-core " in written.machine and " CPU (" in written.machine and ", lock " in written.machine
    assert [row[:2] for row in written.rows] == [[family, condition] for family in ("stripes", "plumes") for
                                                 condition in ("temperature, % of range", "wind angle, degrees",
                                                               "wind_mag, % of range")]
    assert all(" ± " in row[4] or row[4] == "n/a" for row in written.rows)  # n/a: no strong wind in 1 val image
    assert written.notes[0].startswith("probe training: ")
