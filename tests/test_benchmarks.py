"""The benchmarks' --smoke modes run on the CPU, so the script CI keeps is the one a GPU user (or the full
CPU run) runs; each also writes its figures (--write_docs) into copies of the pages that quote them."""

from __future__ import annotations

import json
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
    assert written.command == "`python benchmarks/gpu.py --smoke`" and written.machine.endswith("-core CPU")
    assert {"latent DDPM: bare / trainer, eager", "VAE: bare / trainer", "sampling 2 images, 2 steps: ddim fp32"} <= \
        {row[0] for row in written.rows}, written.rows


def _recipe_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe", ROOT / "benchmarks" / "recipe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["recipe"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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
        assert f"- {score} at 2 steps: " in out, out
        assert all(f"eval/{score}" in r["scores"] and f"eval/{score}_ci95" in r["scores"] for r in figures["results"])
    assert (tmp_path / "work" / "recipe.png").stat().st_size > 0
    table = _written(benchmarks, benchmarks_before, "benchmarks/recipe.py")
    assert [row[:2] for row in table.rows] == [["baseline", "2"], ["v_prediction", "2"]]
    assert any(note.startswith("temperature_mae_pct at 2 steps: ") for note in table.notes), table.notes
    summary = _written(training, training_before, "benchmarks/recipe.py largest-budget")
    assert summary.header[0] == "at 2 steps" and [row[0] for row in summary.rows] == ["baseline", "v_prediction"]


def test_the_recipe_verdict_weighs_the_margin_against_the_seed_spread():
    recipe = _recipe_module()

    def result(variant, seed, budget, temperature):
        return {"variant": variant, "seed": seed, "budget": budget, "train_seconds": 10.0,
                "scores": {"eval/temperature_mae_pct": temperature, "eval/temperature_mae_pct_ci95": 1.0}}

    results = [result("baseline", 0, 100, 9.0), result("baseline", 1, 100, 11.0),
               result("cosine", 0, 100, 6.0), result("cosine", 1, 100, 7.0),  # wins on both seeds
               result("baseline", 0, 200, 5.0), result("baseline", 1, 200, 8.0),
               result("cosine", 0, 200, 5.5), result("cosine", 1, 200, 7.0)]  # better mean, within the spread
    summary = recipe.summarise(results)
    assert summary[("baseline", 100)]["eval/temperature_mae_pct"] == {"mean": 10.0, "min": 9.0, "max": 11.0,
                                                                       "ci95": 1.0}
    [at_100] = [v for v in recipe.verdicts(summary, ["baseline", "cosine"], 100) if "temperature" in v]
    assert "cosine wins (6.5 vs baseline 10)" in at_100 and "beyond the seed spread" in at_100
    [at_200] = [v for v in recipe.verdicts(summary, ["baseline", "cosine"], 200) if "temperature" in v]
    assert "cosine wins" in at_200 and "within the seed spread" in at_200
    table = recipe.table(summary, ["baseline", "cosine"], [100, 200])
    assert "| baseline | 100 | 10 | 10 ± 1 [ci 1] |" in table


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
    assert "-core CPU (" in written.machine and ", lock " in written.machine
    assert [row[:2] for row in written.rows] == [[family, condition] for family in ("stripes", "plumes") for
                                                 condition in ("temperature, % of range", "wind angle, degrees",
                                                               "wind_mag, % of range")]
    assert all(" ± " in row[4] or row[4] == "n/a" for row in written.rows)  # n/a: no strong wind in 1 val image
    assert written.notes[0].startswith("probe training: ")
