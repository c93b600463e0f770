"""``reports/headline.json``: the figures of one run that ``dvc metrics show`` prints.

It is the pipeline's only metrics file; the detail stays in the stage outputs
``reports/metrics.json``, ``split.json``, ``validation.json`` and ``train.json``
(``dvc metrics show reports/metrics.json`` still prints any of them).

``dvc metrics show`` prints one column per key, sorted by name, after a path column as
wide as ``reports/cv/metrics.json``. Eight short keys with rounded values keep the row
under 100 columns (94 on the Kaggle archive); long names or a ninth key push it over.

============  ===========================================================================
key           meaning
============  ===========================================================================
bacc          balanced accuracy on the test slices
bacc_ci       its 95% CI, ``low-high``, bootstrap over subjects (``ci.unit`` in metrics)
f1            macro-F1 on the test slices
qwk           quadratic weighted kappa (the stages are ordinal)
ece           expected calibration error of the calibrated probabilities
subj_bacc     balanced accuracy per subject (slices pooled per brain)
leak          share of test slices whose subject, or a near-duplicate slice, is in train
              (the larger of the two; ``leakage.test`` in split.json)
valid         images that passed validation / images checked
============  ===========================================================================

A figure that cannot be computed on this test set (QWK with one class, subject-level
without subject ids) is null; ``dvc metrics show`` then leaves its column out.
"""

from __future__ import annotations

from typing import Any

DIGITS = 3  # the CIs on a few dozen test subjects are ~0.15 wide: a 4th digit is noise
CI_DIGITS = 2


def _rounded(value: Any, digits: int = DIGITS) -> float | None:
    return None if value is None else round(float(value), digits)


def model_headline(report: dict[str, Any]) -> dict:
    """The keys any test report has (evaluate's, or the pooled CV's), same names in both.

    ``dvc metrics show`` then lines the default run and the CV up in shared columns.
    """
    ci = report["ci"].get("balanced_accuracy")
    subject = report["subject_level"]
    return {
        "bacc": _rounded(report["balanced_accuracy"]),
        "bacc_ci": f"{ci['low']:.{CI_DIGITS}f}-{ci['high']:.{CI_DIGITS}f}" if ci else None,
        "f1": _rounded(report["macro_f1"]),
        "qwk": _rounded(report["quadratic_weighted_kappa"]),
        "ece": _rounded(report["ece"]),
        "subj_bacc": _rounded(subject.get("balanced_accuracy") if subject["available"] else None),
    }


def headline(report: dict[str, Any], split: dict[str, Any], validation: dict[str, Any]) -> dict:
    """The headline from evaluate's report, split.json and validation.json (all JSON-safe)."""
    leakage = split["leakage"]["test"]
    return {
        **model_headline(report),
        "leak": _rounded(
            max(leakage["fraction_subject_in_train"], leakage["fraction_near_duplicate"])
        ),
        "valid": f"{validation['n_valid']}/{validation['n_images']}",
    }
