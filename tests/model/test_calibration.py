"""Calibration numbers by hand, and temperature scaling fixing an over-confident model."""

from __future__ import annotations

import numpy as np
import pytest

from alzstage.model.calibration import (
    apply_temperature,
    brier_score,
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_table,
)


def test_brier_nll_ece_by_hand() -> None:
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    y = np.array([0, 0])
    assert brier_score(probs, y) == pytest.approx((0 + 0.25 + 0.25) / 2)
    assert nll(probs, y) == pytest.approx(-np.log(0.5) / 2)
    # Two slices at confidence 0.9 (bin 0.8-0.9), one right: |0.5 - 0.9| = 0.4.
    over = np.array([[0.9, 0.1], [0.9, 0.1]])
    assert expected_calibration_error(over, np.array([0, 1])) == pytest.approx(0.4)


def _overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """About 70% right but ~99% sure: logits with the right signal, scaled far too high."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    logits = rng.normal(0, 1, (n, 4))
    logits[np.arange(n), y] += 1.8
    logits *= 6.0
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True), y


def test_temperature_fitted_on_val_reduces_test_ece_and_keeps_argmax() -> None:
    p_val, y_val = _overconfident(800, 0)
    p_test, y_test = _overconfident(800, 1)
    t = fit_temperature(p_val, y_val)
    assert t > 2  # it softens an over-confident model
    cal = apply_temperature(p_test, t)
    before = expected_calibration_error(p_test, y_test)
    after = expected_calibration_error(cal, y_test)
    assert before > 0.15 and after < before / 3
    assert nll(cal, y_test) < nll(p_test, y_test)
    assert brier_score(cal, y_test) < brier_score(p_test, y_test)
    np.testing.assert_array_equal(cal.argmax(1), p_test.argmax(1))


def test_calibration_report_uses_the_given_temperature_not_a_refit() -> None:
    p, y = _overconfident(300, 2)
    rep = calibration_report(p, y, 1.0, "test")
    assert rep["calibrated"] == rep["uncalibrated"]  # T = 1: nothing re-fitted on test
    rep = calibration_report(p, y, 4.0, "validation")
    assert rep["temperature"] == 4.0 and rep["temperature_source"] == "validation"
    assert rep["calibrated"]["ece"] < rep["uncalibrated"]["ece"]


def test_reliability_table_leaves_empty_bins_empty() -> None:
    p, y = _overconfident(200, 3)
    rows = reliability_table(p, apply_temperature(p, 3.0), y, n_bins=10)
    assert len(rows) == 10
    assert sum(r["count_uncalibrated"] for r in rows) == 200
    assert sum(r["count_calibrated"] for r in rows) == 200
    empty = [r for r in rows if r["count_uncalibrated"] == 0]
    assert empty and all(r["uncalibrated"] is None for r in empty)
    assert [r["ideal"] for r in rows] == pytest.approx(np.arange(0.05, 1, 0.1))
