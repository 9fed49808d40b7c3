"""The evaluation table `ldmflow evaluate` and `ldmflow pipeline` print, from the logged `eval/...` metrics.

One row per measure, one column per comparison (the model, guidance 1, shuffled requests, the VAE's
reconstructions, the real images, and "<name> only" for requests giving one condition alone), `± x` the
bootstrap 95% interval; below it, the lines that say a score is capped by the VAE, limited by the probe or not
comparable.
"""

from __future__ import annotations

import re

from ldmflow.evaluation.adherence import only_prefix
from ldmflow.evaluation.intervals import CI_SUFFIX

COLUMNS = {"": "model", "guidance1/": "guidance 1", "shuffled/": "shuffled", "recon/": "VAE reconstructions",
           "probe/": "real images"}
CEILING_MARGIN = 0.25  # a model within this fraction of its VAE's reconstructions is capped by the VAE
PROBE_MARGIN = 0.25  # a model within this fraction of the probe's error on real images is as far as the probe sees
_HEADLINE_SUFFIXES = ("_length_mae_pct", "_angle_error_deg", "_mae_pct")  # the errors ceiling lines compare
_COUNTS = ("fid_num_real", "fid_min_real", "rfid_num_real", "rfid_min_real")  # said below the table, not rows
_ONLY = only_prefix("")[:-1]  # "only_": the columns of partial requests, "<name> only"
_LOGGED_ONLY = ("kid_std", "rkid_std")  # KID's spread over its subsets: logged; the table shows the ± interval


def format_metrics(metrics: dict[str, float]) -> str:
    """The evaluation table: one row per measure (eval/...), and a column each for the model, the model without
    guidance, shuffled requests (what ignoring the conditions scores), the probe on the VAE's reconstructions
    of the real images (the first stage's ceiling) and on the real images; `± x` is the bootstrap 95% interval.
    Below it, one line per condition the VAE caps or the probe cannot judge, and for a FID on too few images."""
    if not metrics:
        return "No metric could be computed (see the warning above)."
    rows: dict[str, dict[str, str]] = {}
    plain = {key.removeprefix("eval/"): value for key, value in metrics.items()}
    for name, value in plain.items():
        if name.endswith(CI_SUFFIX) or name in _COUNTS or name in _LOGGED_ONLY:
            continue
        prefix = next((p for p in COLUMNS if p and name.startswith(p)), "") or _only_prefix(name)
        interval = plain.get(f"{name}{CI_SUFFIX}")
        rows.setdefault(name[len(prefix):], {})[prefix] = f"{value:.4g}" + (f" ± {interval:.2g}" if interval else "")
    partial = sorted({prefix for row in rows.values() for prefix in row if prefix.startswith(_ONLY)})
    shown = [prefix for prefix in [*COLUMNS, *partial] if any(prefix in row for row in rows.values())]
    table = [["eval/...", *(COLUMNS.get(prefix) or f"{prefix[len(_ONLY):-1]} only" for prefix in shown)]]
    table += [[name, *(row.get(p, "") for p in shown)] for name, row in sorted(rows.items())]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]
    return "\n".join(lines + ceiling_lines(plain) + probe_limit_lines(plain) + fid_count_lines(plain))


def _only_prefix(name: str) -> str:
    """`only_temperature/` of `only_temperature/temperature_mae_pct` (requests giving temperature alone), else ''."""
    match = re.match(rf"{_ONLY}[A-Za-z_][A-Za-z0-9_]*/", name)
    return match.group(0) if match else ""


def ceiling_lines(metrics: dict[str, float]) -> list[str]:
    """One line per condition error of the samples within CEILING_MARGIN of the same error on the VAE's
    reconstructions, where those are clearly worse than the real images: the first stage caps it, and
    training the UNet longer will not help."""
    lines = []
    for name, ceiling, samples in _beside_samples(metrics, "recon/"):
        real = metrics.get(f"probe/{name}")
        if real is not None and ceiling <= (1 + CEILING_MARGIN) * real:
            continue  # the reconstructions read like the real images: the VAE keeps this condition
        if samples <= (1 + CEILING_MARGIN) * ceiling:
            measure, unit = _measure(name)
            lines.append(f"{measure}: limited by the VAE (reconstructions {ceiling:.3g}{unit} vs samples "
                         f"{samples:.3g}{unit}); see docs/training.md, 'When a condition is not learned'.")
    return lines


def _beside_samples(metrics: dict[str, float], prefix: str):
    """(name, its score under `prefix`, the samples' score) for each headline error of the samples, by name."""
    for key, value in sorted(metrics.items()):
        name = key.removeprefix(prefix)
        if name != key and name.endswith(_HEADLINE_SUFFIXES) and name in metrics:
            yield name, value, metrics[name]


def _measure(name: str) -> tuple[str, str]:
    """("wind angle", "°") for `wind_angle_error_deg`, ("temperature", "%") for `temperature_mae_pct`."""
    condition = next(name[:-len(s)] for s in _HEADLINE_SUFFIXES if name.endswith(s))
    measure = "angle" if name.endswith("_deg") else "length" if "_length_" in name else ""
    return f"{condition}{' ' + measure if measure else ''}", "°" if name.endswith("_deg") else "%"


def probe_limit_lines(metrics: dict[str, float]) -> list[str]:
    """One line per condition error of the samples within PROBE_MARGIN of the probe's own error on the real
    images: the probe misreads real images about as much, so the score says how well the probe reads, not how
    well the model follows the condition."""
    lines = []
    for name, real, samples in _beside_samples(metrics, "probe/"):
        if samples <= (1 + PROBE_MARGIN) * real:
            measure, unit = _measure(name)
            lines.append(f"{measure}: limited by the probe (real images {real:.3g}{unit} vs samples "
                         f"{samples:.3g}{unit}): it misreads real images about as much, so this score cannot tell "
                         "how well the model follows it; see docs/evaluation.md, 'The condition probe'.")
    return lines


def fid_count_lines(metrics: dict[str, float]) -> list[str]:
    """A line when FID (or rFID) came from fewer real images than it needs to be compared with another."""
    lines = []
    for name in ("fid", "rfid"):
        count, needed = metrics.get(f"{name}_num_real"), metrics.get(f"{name}_min_real")
        if name in metrics and count is not None and needed is not None and count < needed:
            lines.append(f"{name}: not comparable: {count:.0f} real images for {needed - 1:.0f}-dimensional features "
                         f"(at least {needed:.0f} are needed, more to compare small differences: evaluate on a "
                         "larger --split and --num_samples).")
    return lines
