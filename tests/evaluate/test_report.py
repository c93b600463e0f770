"""The evaluate report (``reports/metrics.json``): assembly from labels and probabilities."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from evaluate_cases import CLASSES, LEGACY_KEYS, make_baselines, make_report, make_slices

from alzstage.evaluate.report import build_report, flat_metrics, json_safe, known_subjects


def test_report_keeps_legacy_keys_and_adds_the_rest() -> None:
    rep = make_report()
    for key in LEGACY_KEYS:
        assert key in rep
    assert sum(map(sum, rep["confusion_matrix"])) == rep["n_test"] == 72
    for key in ("quadratic_weighted_kappa", "roc_auc", "pr_auc", "ece", "calibration", "ci"):
        assert key in rep
    assert rep["ci"]["unit"] == "subject" and rep["ci"]["n_units"] == 12
    cal = rep["calibration"]
    assert cal["temperature"] == 2.0
    assert rep["ece"] == pytest.approx(cal["calibrated"]["ece"])  # reported = calibrated
    assert cal["applied"] and rep["probabilities"].startswith("calibrated")
    lo, hi = rep["ci"]["balanced_accuracy"]["low"], rep["ci"]["balanced_accuracy"]["high"]
    assert lo <= rep["balanced_accuracy"] <= hi


def test_subject_level_block() -> None:
    rep = make_report()
    sub = rep["subject_level"]
    assert sub["available"] and sub["n_subjects"] == 12
    assert sub["n_subjects_per_class"] == dict.fromkeys(CLASSES, 3)
    assert sum(map(sum, sub["confusion_matrix"])) == 12
    assert sub["ci"]["unit"] == "subject"


def test_without_subjects_images_are_the_unit() -> None:
    rep = make_report(subjects=False)
    assert rep["ci"]["unit"] == "image" and rep["ci"]["n_units"] == 72
    assert rep["subject_level"]["available"] is False


def test_unknown_subject_rows_are_their_own_unit() -> None:
    y, p, s = make_slices()
    s = s.copy()
    s[:6] = ""  # subject s0's slices lose their id: six independent units
    rep = build_report(
        y,
        p,
        CLASSES,
        temperature=1.0,
        temperature_source="x",
        subjects=s,
        subject_ids="mixed",
        seed=0,
        n_resamples=50,
    )
    assert rep["ci"]["n_units"] == 11 + 6
    assert rep["subject_level"]["n_subjects"] == 11
    assert rep["subject_level"]["n_slices_without_subject"] == 6


def test_known_subjects_mask() -> None:
    rows = pd.DataFrame(
        {
            "subject": ["a", "", "c", "d"],
            "subject_source": ["given", "none", "none", "pseudo"],
        }
    )
    assert known_subjects(rows).tolist() == [True, False, False, True]


def test_report_is_strict_json_and_flat_metrics_are_finite() -> None:
    y = np.zeros(6, int)  # one class only: QWK and AUCs are undefined
    p = np.tile([0.7, 0.1, 0.1, 0.1], (6, 1))
    rep = json_safe(
        build_report(
            y,
            p,
            CLASSES,
            temperature=1.0,
            temperature_source="x",
            subjects=None,
            subject_ids="none",
            seed=0,
            n_resamples=20,
        )
    )
    json.dumps(rep, allow_nan=False)
    assert rep["quadratic_weighted_kappa"] is None
    assert rep["classes_absent_from_test"] == CLASSES[1:]
    flat = flat_metrics(rep)
    assert all(np.isfinite(v) for v in flat.values())
    assert "qwk" not in flat and flat["accuracy"] == 1.0


def test_flat_metrics_carry_the_baseline_headline() -> None:
    from alzstage.evaluate.baselines import headline_metrics

    rep = json_safe(make_report())
    rep.update(headline_metrics(make_baselines(pixel_beaten=False)))
    flat = flat_metrics(rep)
    assert flat["beats_pixel_baseline"] == 0.0 and flat["beats_majority_baseline"] == 1.0
    assert flat["baseline_pixel_balanced_accuracy"] == 1.0
    assert flat["network_minus_pixel_balanced_accuracy"] < 0
