"""The check-manifest command's logic: load with every image decoded and summarise what was found."""

from __future__ import annotations

from pathlib import Path

from ldmflow.data.conditions import ConditionSpec
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
    return manifest.report.to_dict()


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
    return "\n".join(lines)
