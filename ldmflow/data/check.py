"""The check-manifest command's logic: load with every image decoded and summarise what was found."""

from __future__ import annotations

from pathlib import Path

from ldmflow.data.conditions import ConditionSpec
from ldmflow.data.image_io import UnreadableImageError, decode_image, image_header
from ldmflow.data.manifest import ManifestReport, load_manifest
from ldmflow.settings import CheckManifestSettings


def check_manifest(
    manifest_path: str | Path,
    split: str | None = CheckManifestSettings.split,
    condition_spec: str | ConditionSpec = CheckManifestSettings.condition_spec,
    data_root: str | Path | None = None,
    allow_outside_root: bool = False,
    max_image_pixels: int = CheckManifestSettings.max_image_pixels,
) -> dict:
    """The report (``ManifestReport.to_dict()``) of loading ``split`` with every image fully decoded.

    Raises NothingUsableError (its ``report`` is a ManifestReport) when nothing is usable, and LdmflowError
    for a malformed manifest or spec.
    """
    manifest = load_manifest(
        manifest_path,
        split=split,
        condition_spec=condition_spec,
        data_root=data_root,
        allow_outside_root=allow_outside_root,
        verify_images="full",
        max_image_pixels=max_image_pixels,
    )
    report = manifest.report.to_dict()
    flagged = [problem for record in manifest.records
               if (problem := _usable_but_flawed(record.image_path, record.output_rel, max_image_pixels))]
    report["flagged_images"] = len(flagged)
    report["flagged_examples"] = flagged[:_EXAMPLES]
    return report


_EXAMPLES = 10
MAX_ASPECT_RATIO = 4.0  # beyond it, training's square crop keeps under a quarter of the image


def _usable_but_flawed(path: Path, name: str, max_pixels: int) -> str | None:
    """What is wrong with an image training can read but learns little from: an extreme aspect ratio (the
    square crop keeps a sliver of it) or pixels that are NaN or infinite (read as 0, or 1 for +inf)."""
    try:
        width, height, floats = image_header(path)
        ratio = max(width, height) / max(min(width, height), 1)
        if ratio > MAX_ASPECT_RATIO:
            return (f"{name}: {width}x{height} pixels, aspect ratio {ratio:.3g}:1 (over {MAX_ASPECT_RATIO:g}:1); "
                    f"training crops it to a square, {100 / ratio:.2g}% of it")
        non_finite = decode_image(path, True, max_pixels)[1] if floats else 0
    except (OSError, ValueError, UnreadableImageError):
        return None  # read once already; a file changed since is training's to find
    if non_finite:
        return f"{name}: {non_finite} of {width * height} pixels are NaN or infinite (read as 0, or 1 for +inf)"
    return None


def _format_numbers(values: list[float]) -> str:
    text = ", ".join(f"{v:.4g}" for v in values)
    return text if len(values) == 1 else f"[{text}]"


def format_report(report: dict | ManifestReport) -> str:
    """A few human-readable lines: counts, condition bookkeeping, statistics and the first bad files."""
    if isinstance(report, ManifestReport):
        report = report.to_dict()
    lines = [
        f"Split {report['split']!r}: {report['usable']} usable of {report['in_split']} entries in the split "
        f"({report['total']} in the manifest); {report['missing_files']} missing, "
        f"{report['unreadable_files']} unreadable.",
    ]
    spec = report["condition_spec"]
    if spec == "none":
        lines.append("Conditions: none (unconditional).")
    else:
        filled = ", ".join(f"{name} {count}" for name, count in report["zero_filled"].items() if count) or "none"
        computed = ", ".join(f"{name} {count}" for name, count in report["computed"].items() if count) or "none"
        lines.append(f"Conditions {spec}: zero-filled {filled}; computed {computed}.")
        for name, stats in report["condition_stats"].items():
            lines.append(f"  {name}: mean {_format_numbers(stats['mean'])}, std {_format_numbers(stats['std'])}")
    if report["missing_examples"]:
        lines.append(f"Missing (first {len(report['missing_examples'])}): {', '.join(report['missing_examples'])}")
    for example in report["unreadable_examples"]:
        lines.append(f"Unreadable: {example}")
    if report.get("flagged_images"):
        lines.append(f"{report['flagged_images']} usable image(s) flagged:")
        lines += [f"  {example}" for example in report["flagged_examples"]]
    return "\n".join(lines)
