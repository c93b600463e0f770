"""Reporting (pure): ``reports/validation.json`` and the failure message a person reads."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd

from alzstage.config import Params
from alzstage.data.validation.checks import IMAGE_CHECKS
from alzstage.data.validation.decision import Outcome
from alzstage.data.validation.rules import SuiteResult

EXAMPLES_PER_PROBLEM = 10


def build_report(
    manifest: pd.DataFrame,
    image_problems: pd.DataFrame,
    suite: SuiteResult,
    outcome: Outcome,
    params: Params,
) -> dict[str, Any]:
    """``reports/validation.json``: numbers and booleans only, so ``dvc metrics`` can diff it."""
    check_counts = (
        image_problems.groupby("check")["path"].nunique().to_dict() if len(image_problems) else {}
    )
    clean_data = image_problems.empty and suite.success
    report: dict[str, Any] = {
        "success": bool(clean_data),
        "stage_passed": _stage_passes(outcome, image_problems, suite, params),
        "n_images": len(manifest),
        "n_valid": len(outcome.clean),
        "n_quarantined": len(outcome.quarantine),
        "checks": {name: int(check_counts.get(name, 0)) for name in IMAGE_CHECKS},
        "expectations": {
            k: {"success": e.success, "unexpected": e.unexpected_count}
            for k, e in suite.expectations.items()
        },
        "class_counts_valid": outcome.class_counts,
    }
    if outcome.volumes is not None:
        v = outcome.volumes
        codes = [c for r in v["reasons"] for c in str(r).split(";") if c]
        report["volumes"] = {
            "n_volumes": len(v),
            "n_valid": int(v["passed"].sum()),
            "n_quarantined": int((~v["passed"]).sum()),
            "checks": {c: codes.count(c) for c in sorted(set(codes))},
        }
    return report


def _stage_passes(
    outcome: Outcome, image_problems: pd.DataFrame, suite: SuiteResult, params: Params
) -> bool:
    if outcome.dataset_problems:
        return False
    if params.validate_.on_failure == "fail":
        return image_problems.empty and suite.success
    return True


def _examples(items: Iterable[str], limit: int = EXAMPLES_PER_PROBLEM) -> list[str]:
    items = list(items)
    shown = [f"      - {x}" for x in items[:limit]]
    if len(items) > limit:
        shown.append(f"      ... and {len(items) - limit} more")
    return shown


def _found_sizes(manifest: pd.DataFrame, flagged: list[str]) -> str:
    """`` Found 128x128 (12 images).``: the sizes of the flagged images, most common first."""
    rows = manifest[manifest["path"].astype(str).isin(set(map(str, flagged)))]
    sizes = (rows["width"].astype(str) + "x" + rows["height"].astype(str)).value_counts()
    shown = ", ".join(f"{size} ({n} images)" for size, n in sizes.head(5).items())
    return f" Found {shown}." if shown else ""


def format_failure(
    manifest_name: str,
    manifest: pd.DataFrame,
    image_problems: pd.DataFrame,
    suite: SuiteResult,
    outcome: Outcome,
    params: Params,
    quarantine_csv: str,
    docs_index: str | None,
) -> str:
    """The AlzstageError message: what broke, which files, how to fix it."""
    policy = params.validate_.on_failure
    lines = [
        f"Validation of {manifest_name} failed ({len(manifest)} images, "
        f"validate.on_failure: {policy})."
    ]
    if not image_problems.empty:
        lines.append("  Image checks:")
        for check, group in image_problems.groupby("check", sort=True):
            lines.append(
                f"    {check}: {group['path'].nunique()} file(s). Fix: {IMAGE_CHECKS[check]}"
            )
            lines += _examples(
                f"{p}: {d}" for p, d in zip(group["path"], group["detail"], strict=True)
            )
    failed = {
        k: e for k, e in suite.expectations.items() if not e.success and e.spec.frame != "volumes"
    }
    vq = outcome.volume_quarantine
    if vq is not None and len(vq):
        lines.append(f"  Volumes (NIfTI QC, validate.nifti): {len(vq)} volume(s) failed.")
        lines += _examples(f"{f}: {d}" for f, d in zip(vq["file"], vq["details"], strict=True))
    if failed:
        lines.append("  Expectations (Great Expectations suite on the manifest):")
        for key, e in failed.items():
            spec = e.spec
            if spec.reason is None or e.exception:
                continue
            found = (
                _found_sizes(manifest, list(e.unexpected)) if spec.reason == "wrong_size" else ""
            )
            lines.append(
                f"    {key} ({e.type} on {spec.column}): {e.unexpected_count} row(s). "
                f"{spec.description}{found} Fix: {spec.hint}"
            )
            lines += _examples(
                f"{p}: {spec.column}={v!r}" for p, v in zip(e.unexpected, e.values, strict=False)
            )
    if outcome.dataset_problems:
        lines.append("  Dataset problems (excluding rows cannot fix these):")
        lines += [f"    {p}" for p in outcome.dataset_problems]
    lines.append(f"  Every failing row with its reasons: {quarantine_csv}")
    if docs_index:
        lines.append(f"  Great Expectations Data Docs: {docs_index}")
    if policy == "fail" and not outcome.dataset_problems:
        lines.append(
            "  To exclude the bad rows and continue instead, set `validate.on_failure: quarantine` "
            "in params.yaml (they stay listed in the quarantine CSV)."
        )
    return "\n".join(lines)
