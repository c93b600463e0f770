"""The evaluate stage's report (``reports/metrics.json``), from test labels and probabilities.

Pure: no file is read or written here (:mod:`alzstage.evaluate.stage` is the I/O shell),
and the cross-validation builds its pooled report with the same :func:`build_report`.

What "honest" means here, concretely:

* the reported probabilities are the calibrated ones (the temperature fitted on the
  validation split, never on test), with calibration shown before and after;
* slices of one brain are not independent, so confidence intervals resample subjects,
  and subject-level metrics (slices pooled per brain) are reported next to slice-level;
* the stages are ordinal, so quadratic weighted kappa is reported next to accuracy;
* a class that cannot be scored (absent from test) is named, never silently averaged.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from alzstage.model.calibration import DEFAULT_BINS, apply_temperature, calibration_report
from alzstage.model.metrics import (
    aggregate_by_subject,
    bootstrap_ci,
    confusion,
    normalized_confusion,
    one_vs_rest_auc,
    per_class_metrics,
    quadratic_weighted_kappa,
    summary_metrics,
)

N_RESAMPLES = 1000
CI_LEVEL = 0.95
KNOWN_SUBJECT_SOURCES = ("given", "pseudo")


def evaluate_predictions(
    y: np.ndarray, probs: np.ndarray, classes: list[str], n_bins: int = DEFAULT_BINS
) -> dict:
    """Every image-level number from labels and (calibrated) probabilities."""
    from alzstage.model.calibration import expected_calibration_error

    y = np.asarray(y, dtype=np.int64)
    pred = probs.argmax(axis=1)
    cm = confusion(y, pred, len(classes))
    auc = one_vs_rest_auc(y, probs, classes)
    return {
        **summary_metrics(y, pred, len(classes)),
        "n_test": len(y),
        "per_class": per_class_metrics(y, pred, classes),
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": np.round(normalized_confusion(cm), 4).tolist(),
        "classes_absent_from_test": [c for i, c in enumerate(classes) if not (y == i).any()],
        "quadratic_weighted_kappa": quadratic_weighted_kappa(y, pred, len(classes)),
        "roc_auc": auc["roc_auc"],
        "pr_auc": auc["pr_auc"],
        "auc_skipped_classes": auc["skipped"],
        "ece": expected_calibration_error(probs, y, n_bins),
    }


def confidence_intervals(
    y: np.ndarray,
    pred: np.ndarray,
    classes: list[str],
    *,
    groups: np.ndarray | None,
    seed: int,
    n_resamples: int = N_RESAMPLES,
    level: float = CI_LEVEL,
) -> dict:
    """Bootstrap CIs in report form; ``unit`` says what was resampled."""
    res = bootstrap_ci(
        y, pred, len(classes), groups=groups, n_resamples=n_resamples, seed=seed, level=level
    )

    def fmt(iv: tuple[float, float] | None) -> dict[str, float] | None:
        return None if iv is None else {"low": round(iv[0], 6), "high": round(iv[1], 6)}

    return {
        "method": "percentile bootstrap, stratified by class",
        "unit": "image" if groups is None else "subject",
        "n_units": res.n_units,
        "n_resamples": res.n_resamples,
        "level": res.level,
        "seed": seed,
        **{name: fmt(iv) for name, iv in res.intervals.items()},
        "recall": {c: fmt(iv) for c, iv in zip(classes, res.recall, strict=True)},
    }


def subject_level_report(
    probs: np.ndarray,
    y: np.ndarray,
    subjects: np.ndarray,
    classes: list[str],
    *,
    seed: int,
    n_resamples: int = N_RESAMPLES,
) -> dict:
    """Metrics after pooling each subject's slices (mean log-probability).

    A clinician decides per patient, not per slice; and a model that is right on 90% of
    slices can still be right on only half the brains if its errors concentrate.
    """
    agg = aggregate_by_subject(probs, y, subjects)
    pred = agg.probs.argmax(axis=1)
    cm = confusion(agg.y, pred, len(classes))
    auc = one_vs_rest_auc(agg.y, agg.probs, classes)
    return {
        "available": True,
        "aggregation": "mean of slice log-probabilities per subject, renormalised",
        "n_subjects": len(agg.y),
        "n_subjects_per_class": {c: int((agg.y == k).sum()) for k, c in enumerate(classes)},
        "slices_per_subject": {
            "min": int(agg.n_slices.min()),
            "median": float(np.median(agg.n_slices)),
            "max": int(agg.n_slices.max()),
        },
        **summary_metrics(agg.y, pred, len(classes)),
        "quadratic_weighted_kappa": quadratic_weighted_kappa(agg.y, pred, len(classes)),
        "per_class": per_class_metrics(agg.y, pred, classes),
        "confusion_matrix": cm.tolist(),
        "roc_auc": auc["roc_auc"],
        "pr_auc": auc["pr_auc"],
        # Units are subjects already; the subject (not the subject-stage unit) is drawn.
        "ci": confidence_intervals(
            agg.y, pred, classes, groups=agg.subjects, seed=seed, n_resamples=n_resamples
        ),
    }


def known_subjects(rows: pd.DataFrame) -> np.ndarray:
    """Boolean mask: rows whose subject id is real (given) or recovered (pseudo)."""
    subj = rows.get("subject", pd.Series([""] * len(rows))).astype(str).str.strip()
    known = (subj != "").to_numpy()
    if "subject_source" in rows:
        known &= rows["subject_source"].astype(str).isin(KNOWN_SUBJECT_SOURCES).to_numpy()
    return known


def build_report(
    y: np.ndarray,
    raw_probs: np.ndarray,
    classes: list[str],
    *,
    temperature: float | None,
    temperature_source: str,
    subjects: np.ndarray | None,
    subject_ids: str,
    seed: int,
    n_resamples: int = N_RESAMPLES,
    n_bins: int = DEFAULT_BINS,
) -> dict:
    """The whole metrics.json body (without the split labels) from test predictions.

    ``subjects`` holds a subject id per slice and "" where none is known; None when the
    test split has no subject information at all (then images are the bootstrap unit
    and there is no subject-level block). ``temperature`` None means none was recorded:
    the probabilities are then reported uncalibrated, and say so.
    """
    y = np.asarray(y, dtype=np.int64)
    t = 1.0 if temperature is None else float(temperature)
    probs = apply_temperature(raw_probs, t)
    report = evaluate_predictions(y, probs, classes, n_bins)
    report["probabilities"] = (
        "UNCALIBRATED (no temperature recorded)"
        if temperature is None
        else "calibrated (temperature scaling fitted on the validation split)"
    )
    report["calibration"] = calibration_report(raw_probs, y, t, temperature_source, n_bins)
    report["calibration"]["applied"] = temperature is not None
    pred = probs.argmax(axis=1)
    known = np.zeros(len(y), bool) if subjects is None else np.asarray(subjects).astype(str) != ""
    if known.any():
        # Slices without an id are their own unit: they are independent as far as we know.
        groups = np.where(
            known, np.asarray(subjects).astype(str), [f"row:{i}" for i in range(len(y))]
        )
    else:
        groups = None
    report["ci"] = confidence_intervals(
        y, pred, classes, groups=groups, seed=seed, n_resamples=n_resamples
    )
    if known.any():
        sub = subject_level_report(
            probs[known],
            y[known],
            np.asarray(subjects)[known],
            classes,
            seed=seed,
            n_resamples=n_resamples,
        )
        sub["subject_ids"] = subject_ids
        sub["n_slices_without_subject"] = int((~known).sum())
        report["subject_level"] = sub
    else:
        report["subject_level"] = {
            "available": False,
            "reason": "no subject ids (given or recovered) in the test split",
        }
    return report


def json_safe(obj: Any) -> Any:
    """NaN/inf become null: JSON has no NaN, and DVC and browsers reject files that use it."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def flat_metrics(report: dict) -> dict[str, float]:
    """The scalar metrics logged to MLflow (None = not computable, so not logged)."""
    out: dict[str, Any] = {
        k: report.get(k) for k in ("accuracy", "balanced_accuracy", "macro_f1", "ece")
    }
    out["qwk"] = report.get("quadratic_weighted_kappa")
    out["roc_auc_macro"] = report["roc_auc"]["macro"]
    out["pr_auc_macro"] = report["pr_auc"]["macro"]
    for side in ("uncalibrated", "calibrated"):
        for k, v in report["calibration"][side].items():
            out[f"{k}_{side}"] = v
    out["temperature"] = report["calibration"]["temperature"]
    for k in ("accuracy", "balanced_accuracy", "macro_f1"):
        iv = report["ci"].get(k)
        if iv:
            out[f"{k}_ci_low"], out[f"{k}_ci_high"] = iv["low"], iv["high"]
    for c, m in report["per_class"].items():
        out.update({f"{c}_{k}": v for k, v in m.items()})
        out[f"{c}_roc_auc"] = report["roc_auc"]["per_class"].get(c)
        out[f"{c}_pr_auc"] = report["pr_auc"]["per_class"].get(c)
    sub = report.get("subject_level", {})
    if sub.get("available"):
        for k in ("accuracy", "balanced_accuracy", "macro_f1", "quadratic_weighted_kappa"):
            out[f"subject_{k}"] = sub.get(k)
        out["n_test_subjects"] = sub["n_subjects"]
    out.update(
        (k, v) for k, v in report.items() if k.startswith(("baseline_", "beats_", "network_minus_"))
    )
    return {
        k: float(v)
        for k, v in out.items()
        if v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))
    }
