"""The GPU benchmark's --smoke mode runs on the CPU, so the script CI keeps is the one a GPU user runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_benchmark_smoke_run_prints_every_comparison():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for row in ("bare / trainer, eager", "bare / trainer, EMA", "EMA overhead (trainer)", "GFLOP per step",
                "VAE:", "ddim fp32", "dpm_solver bf16", "x fp32"):
        assert row in out, out
    assert "FLOP/s" in out and " nan " not in out
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["gflop_per_step"]["latent_ddpm"] > 0 and figures["gflop_per_step"]["vae"] > 0
    assert all(value > 0 for value in [*figures["trainer_ms"].values(), *figures["bare_ms"].values()])
