"""``reports/headline.json``: the few rounded figures ``dvc metrics show`` prints."""

from __future__ import annotations

import numpy as np
from evaluate_cases import CLASSES, make_report

from alzstage.evaluate.report import json_safe


def _split_and_validation(subject_leak: float = 0.0, near_duplicates: float = 0.0):
    leakage = {
        "fraction_subject_in_train": subject_leak,
        "fraction_near_duplicate": near_duplicates,
    }
    return {"leakage": {"test": leakage}}, {"n_images": 5120, "n_valid": 5120}


def test_headline_is_eight_short_keys_rounded_for_a_narrow_row() -> None:
    from alzstage.evaluate.brain import bootstrap_brains
    from alzstage.evaluate.headline import headline
    from alzstage.model.conformal import coverage_report

    # given: a full report with a brain-level block, and an honest split
    report = make_report()
    y = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    pred = np.array([0, 1, 1, 1, 2, 0, 0, 1])
    subjects = np.array([f"s{i}" for i in range(8)])
    sets = np.eye(4, dtype=bool)[pred] | np.eye(4, dtype=bool)[y]
    report["brain_level"] = {
        "default": "brain_model",
        "scores": bootstrap_brains(
            y,
            {"brain_model": pred, "morphometric": y * 0},
            subjects,
            CLASSES,
            reference="brain_model",
            seed=0,
            n_resamples=200,
        ),
        "conformal": {
            "selected": "marginal",
            "marginal": coverage_report(sets, y, CLASSES, 0.9),
        },
    }
    report = json_safe(report)
    # when
    head = headline(report, *_split_and_validation())
    # then: the figures, rounded to 3 digits; the CI as text; the counts as valid/checked
    best = report["brain_level"]["scores"]["predictors"]["brain_model"]
    ci = best["ci"]["balanced_accuracy_main"]
    assert head == {
        "brain": round(best["balanced_accuracy_main"], 3),
        "brain_ci": f"{ci['low']:.2f}-{ci['high']:.2f}",
        # main classes: the two with 3 brains; always the first stage recalls one of them
        "morph": 0.5,
        "cover": 1.0,
        "set": 1.2,  # two sets of two stages among eight brains: 1.25
        "bacc": round(report["balanced_accuracy"], 3),
        "leak": 0.0,
        "valid": "5120/5120",
    }
    assert all(len(k) <= 9 for k in head)  # dvc metrics show: one column per key


def test_headline_leak_is_the_larger_measured_leak_and_missing_figures_are_null() -> None:
    from alzstage.evaluate.headline import headline

    # given: no subject ids, and a slice-level split that leaks subjects into test
    report = json_safe(make_report(subjects=False))
    report["quadratic_weighted_kappa"] = None  # undefined on this test set
    head = headline(report, *_split_and_validation(subject_leak=0.9, near_duplicates=0.4))
    assert head["leak"] == 0.9
    assert head["brain"] is None and head["cover"] is None
