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
brain         brain-level balanced accuracy of the brain model (``brain_level`` in the
              report), over the classes with more than two brains
brain_ci      its 95% CI, ``low-high``, bootstrap over brains
morph         the morphometric baseline's figure on the same brains (CSF fraction +
              logistic regression): the number ``brain`` has to beat
cover         empirical coverage of the conformal sets (nominal ``brain.confidence``)
set           their mean size (number of stages in a brain's set)
bacc          balanced accuracy on the test slices (every stage)
leak          share of test slices whose subject, or a near-duplicate slice, is in train
              (the larger of the two; ``leakage.test`` in split.json)
valid         images that passed validation / images checked
============  ===========================================================================

The CV's headline (``reports/cv/metrics.json``) has the same keys but ``leak`` and
``valid``, which belong to the single split. A figure that cannot be computed on this
test set (no subject ids, no held-out brain to calibrate sets) is null; ``dvc metrics
show`` then prints ``-``.
"""

from __future__ import annotations

from typing import Any

DIGITS = 3  # the CIs on a few dozen test subjects are ~0.15 wide: a 4th digit is noise
CI_DIGITS = 2


def _rounded(value: Any, digits: int = DIGITS) -> float | None:
    return None if value is None else round(float(value), digits)


def _brain(report: dict[str, Any]) -> dict:
    brain = report.get("brain_level") or {}
    if "scores" not in brain:
        return dict.fromkeys(("brain", "brain_ci", "morph", "cover", "set"))
    best = brain["scores"]["predictors"][brain["default"]]
    ci = best["ci"]["balanced_accuracy_main"]
    morph = brain["scores"]["predictors"].get("morphometric", {})
    cover = brain["conformal"].get(brain["conformal"]["selected"]) or {}
    return {
        "brain": _rounded(best["balanced_accuracy_main"]),
        "brain_ci": f"{ci['low']:.{CI_DIGITS}f}-{ci['high']:.{CI_DIGITS}f}" if ci else None,
        "morph": _rounded(morph.get("balanced_accuracy_main")),
        "cover": _rounded(cover.get("coverage"), CI_DIGITS),
        "set": _rounded(cover.get("mean_set_size"), 1),
    }


def model_headline(report: dict[str, Any]) -> dict:
    """The keys any test report has (evaluate's, or the pooled CV's), same names in both.

    ``dvc metrics show`` then lines the default run and the CV up in shared columns.
    """
    return {**_brain(report), "bacc": _rounded(report["balanced_accuracy"])}


def cv_headline(report: dict[str, Any]) -> dict:
    """``reports/cv/metrics.json``: :func:`model_headline` of the pooled CV report."""
    return model_headline(report)


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
