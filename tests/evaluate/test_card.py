"""The model card: byte for byte the card the string renderer wrote before the template.

``golden/<case>.json`` holds a fixed report, split.json body, provenance and baselines;
``golden/<case>.md`` the card :func:`render_model_card` made of them at f9906b2, before
the card moved into a Jinja2 template. The cases cover every branch of the card: a leaky
split with its warning, a lost pixel baseline, brain level with and without conformal
sets, pseudo and mixed subject ids, one class only, no calibration, the temperature at
either end of its range, the demo run's own reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from evaluate_cases import CLASSES, make_baselines, make_report, make_slices

from alzstage.evaluate.card import LEAKAGE_CAVEAT, RESEARCH_NOTICE, render_model_card
from alzstage.evaluate.report import build_report, json_safe

GOLDEN = Path(__file__).parent / "golden"
CASES = (
    "leaky_full",
    "honest_transfer",
    "uncalibrated_one_class",
    "cold_temperature_mixed",
    "demo",  # the demo dvc repro's own reports (f9906b2 + the brain_metrics import fix)
)


@pytest.mark.parametrize("case", CASES)
def test_the_card_is_byte_identical_to_the_one_the_string_renderer_wrote(case: str) -> None:
    # given: the inputs of one captured card, and that card's bytes
    inputs = json.loads((GOLDEN / f"{case}.json").read_text())
    expected = (GOLDEN / f"{case}.md").read_bytes().decode("utf-8")
    # when
    card = render_model_card(**inputs)
    # then
    assert card == expected


def test_missing_temperature_is_reported_as_uncalibrated() -> None:
    y, p, s = make_slices()
    rep = build_report(
        y,
        p,
        CLASSES,
        temperature=None,
        temperature_source="missing",
        subjects=s,
        subject_ids="given",
        seed=0,
        n_resamples=20,
    )
    assert rep["calibration"]["applied"] is False
    assert rep["calibration"]["calibrated"] == rep["calibration"]["uncalibrated"]
    assert rep["probabilities"].startswith("UNCALIBRATED")
    card = render_model_card(json_safe(rep), SPLIT_INFO, PROVENANCE)
    assert "probabilities are uncalibrated" in card


SPLIT_INFO = {
    "strategy": "stratified",
    "leaky": True,
    "warning": "Slice-level split: neighbouring slices...",
    "subject_ids": "given",
    "n_images": 72,
    "test_size": 0.2,
    "val_size": 0.15,
    "counts": {"test": {**dict.fromkeys(CLASSES, 18), "total": 72}},
    "subjects": {"test": {**dict.fromkeys(CLASSES, 3), "total": 12}},
}
PROVENANCE = {"classes": CLASSES, "weights": "none", "data_source": "demo", "backbone": "resnet50"}


def test_model_card_carries_leakage_caveat_and_research_notice() -> None:
    rep = json_safe(make_report())
    rep.update(split_strategy="stratified", split_leaky=True, split_warning="w")
    card = render_model_card(rep, SPLIT_INFO, PROVENANCE)
    assert RESEARCH_NOTICE in card
    assert LEAKAGE_CAVEAT.format(strategy="stratified") in card
    assert "not a medical device" in card
    assert f"{rep['balanced_accuracy']:.3f}" in card
    ci = rep["ci"]["balanced_accuracy"]
    assert f"{ci['low']:.3f} - {ci['high']:.3f}" in card
    assert "SYNTHETIC" in card and "random initialisation" in card


def test_model_card_without_leak_and_with_few_subjects() -> None:
    y, p, s = make_slices()
    s = np.where(y == 3, "only-one", s)  # ModerateDemented: a single test subject
    rep = json_safe(
        build_report(
            y,
            p,
            CLASSES,
            temperature=1.0,
            temperature_source="v",
            subjects=s,
            subject_ids="given",
            seed=0,
            n_resamples=50,
        )
    )
    rep.update(split_strategy="subject", split_leaky=False)
    card = render_model_card(rep, {**SPLIT_INFO, "leaky": False}, PROVENANCE)
    assert "Leakage caveat" not in card and RESEARCH_NOTICE in card
    assert "fewer than 3 test subjects: ModerateDemented (1)" in card
    assert "top of its search range" not in card
    rep["calibration"]["temperature"] = 19.99997
    assert "top of its search range" in render_model_card(rep, SPLIT_INFO, PROVENANCE)


def test_model_card_reports_a_network_that_does_not_beat_the_pixel_baseline() -> None:
    # given: a pixel baseline that is right everywhere, a network that is not
    rep = json_safe(make_report())
    baselines = make_baselines(pixel_beaten=False)
    # when
    card = render_model_card(rep, SPLIT_INFO, PROVENANCE, baselines)
    # then: said at the top and in the table, next to the numbers
    top = card[: card.index("## Model")]
    assert "> **The network does NOT beat the pixel baseline" in top
    section = card[card.index("## Baselines") : card.index("## Calibration")]
    assert "**NO**" in section and "| yes |" in section  # majority is beaten
    assert "paired percentile bootstrap" in section and "8 subjects" in section
    assert "- The network beats the majority-class baseline (" in section


def test_model_card_of_a_network_that_beats_every_baseline_has_no_warning() -> None:
    rep = json_safe(make_report())
    card = render_model_card(rep, SPLIT_INFO, PROVENANCE, make_baselines(pixel_beaten=True))
    assert "does NOT beat" not in card and "**NO**" not in card
    assert "## Baselines" not in render_model_card(rep, SPLIT_INFO, PROVENANCE)


def _brain_level(brain_pred: np.ndarray, morph_pred: np.ndarray) -> dict:
    """A brain_level block as brain_test_report writes it, for 12 test brains."""
    from alzstage.evaluate.brain import binary_view, bootstrap_brains
    from alzstage.model.conformal import coverage_report

    y = np.repeat([0, 1, 2], 4)
    subjects = np.array([f"b{i}" for i in range(len(y))])
    probs = np.full((len(y), 4), 0.05)
    probs[np.arange(len(y)), brain_pred] = 0.85
    sets = np.eye(4, dtype=bool)[brain_pred] | np.eye(4, dtype=bool)[y]
    preds = {"brain_model": brain_pred, "pool": y * 0, "morphometric": morph_pred}
    return json_safe(
        {
            "default": "brain_model",
            "aggregator": "logistic",
            "features": ["cnn", "morphometry"],
            "n_brains": len(y),
            "scores": bootstrap_brains(
                y, preds, subjects, CLASSES, reference="brain_model", seed=0, n_resamples=300
            ),
            "conformal": {
                "confidence": 0.9,
                "selected": "marginal",
                "marginal": coverage_report(sets, y, CLASSES, 0.9),
                "calibration_brains": 20,
            },
            "binary": binary_view(y, probs, subjects, seed=0, n_resamples=200),
        }
    )


def test_model_card_says_the_brain_model_does_not_beat_the_morphometric_baseline() -> None:
    # given: a brain model and a morphometric baseline that are right on the same brains
    y = np.repeat([0, 1, 2], 4)
    pred = y.copy()
    pred[[1, 5]] = 2
    rep = json_safe(make_report())
    rep["brain_level"] = _brain_level(pred, pred.copy())
    # when
    card = render_model_card(rep, SPLIT_INFO, PROVENANCE)
    # then: the section scores both, with the paired difference and a plain verdict
    section = card[card.index("## Brain level") : card.index("## Calibration")]
    best = rep["brain_level"]["scores"]["predictors"]["brain_model"]
    assert f"| brain model | {best['balanced_accuracy_main']:.3f} |" in section
    assert "morphometric baseline (CSF fraction only)" in section
    assert (
        "- The brain model does not beat the morphometric baseline (paired difference "
        "+0.000, 95% CI +0.000 to +0.000: the interval includes 0), main classes."
    ) in section
    # ... beats the pooling rule that is always wrong on two thirds of the brains
    assert "- The brain model beats the fixed pooling rule (paired difference +0.500" in section
    # ... the conformal coverage on the test brains and the number of calibration brains
    assert "coverage 1.000 on 12 test brains, mean set size 1.17; calibrated on 20" in section
    # ... and the binary view with intervals
    assert "Binary view (not demented vs any dementia, 12 brains): sensitivity 1.000" in section
    assert "specificity 0.750" in section and "ROC AUC 0.875" in section


def test_model_card_without_a_brain_level_block_has_no_brain_section() -> None:
    rep = json_safe(make_report())
    assert "## Brain level" not in render_model_card(rep, SPLIT_INFO, PROVENANCE)
    rep["brain_level"] = {"available": False, "reason": "test slices without subject ids"}
    card = render_model_card(rep, SPLIT_INFO, PROVENANCE)
    assert "## Brain level\n\nNot scored: test slices without subject ids." in card
