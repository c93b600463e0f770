"""Temperature scaling and calibration error.

A network trained with class weights on a few thousand slices is rarely calibrated: its
0.9 does not mean 90%. One scalar temperature, fitted on the validation split, fixes
most of that without changing any prediction's argmax, so it is safe to always apply.

Calibration is reported with three numbers because each hides something the others
show: ECE (the gap in the reliability diagram, blind to per-sample sharpness), NLL (the
quantity temperature scaling optimises, dominated by confident mistakes) and the Brier
score (a proper score on the whole probability vector, bounded, so one catastrophic
slice cannot swamp it).
"""

from __future__ import annotations

import itertools

import numpy as np

DEFAULT_BINS = 10  # the same binning in training (val) and evaluation (test) reports
# Search range of the fitted temperature; a fit that ends on a bound is a warning sign.
TEMPERATURE_BOUNDS = (0.05, 20.0)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Rescale probabilities as softmax(log(p) / T); T > 1 softens, T < 1 sharpens."""
    if temperature == 1.0:
        return np.asarray(probs, dtype=np.float64)
    logits = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (clipped so one zero cannot give inf)."""
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0))))


def brier_score(probs: np.ndarray, y: np.ndarray) -> float:
    """Multi-class Brier score: mean over samples of sum_k (p_k - [y == k])^2, in [0, 2]."""
    probs = np.asarray(probs, dtype=np.float64)
    if len(y) == 0:
        return 0.0
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def fit_temperature(
    probs: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = TEMPERATURE_BOUNDS
) -> float:
    """The temperature minimising validation negative log-likelihood (bounded 1-D search)."""
    from scipy.optimize import minimize_scalar

    if len(y) == 0:
        return 1.0
    res = minimize_scalar(
        lambda log_t: nll(apply_temperature(probs, float(np.exp(log_t))), y),
        bounds=(np.log(bounds[0]), np.log(bounds[1])),
        method="bounded",
    )
    return float(np.exp(res.x))


def reliability(
    probs: np.ndarray, y: np.ndarray, n_bins: int = DEFAULT_BINS
) -> list[dict[str, float]]:
    """Per confidence bin: mean confidence, accuracy and count (the reliability diagram)."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    rows = []
    for lo, hi in itertools.pairwise(edges):
        mask = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        n = int(mask.sum())
        rows.append(
            {
                "bin_lower": float(lo),
                "bin_upper": float(hi),
                "count": n,
                "confidence": float(conf[mask].mean()) if n else 0.0,
                "accuracy": float(correct[mask].mean()) if n else 0.0,
            }
        )
    return rows


def expected_calibration_error(
    probs: np.ndarray, y: np.ndarray, n_bins: int = DEFAULT_BINS
) -> float:
    """ECE: count-weighted mean |accuracy - confidence| over confidence bins."""
    bins = reliability(probs, y, n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        return 0.0
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / total)


def calibration_scores(
    probs: np.ndarray, y: np.ndarray, n_bins: int = DEFAULT_BINS
) -> dict[str, float]:
    """ECE, NLL and Brier score of one set of probabilities (see the module docstring)."""
    return {
        "ece": expected_calibration_error(probs, y, n_bins),
        "nll": nll(probs, y) if len(y) else 0.0,
        "brier": brier_score(probs, y),
    }


def calibration_report(
    raw_probs: np.ndarray,
    y: np.ndarray,
    temperature: float,
    temperature_source: str,
    n_bins: int = DEFAULT_BINS,
) -> dict:
    """Calibration before and after the validation-fitted temperature.

    The temperature is never re-fitted here: fitting it on the test split would make the
    "after" numbers optimistic by construction. Reporting both sides shows whether the
    validation fit transferred to unseen subjects.
    """
    calibrated = apply_temperature(raw_probs, temperature)
    return {
        "temperature": float(temperature),
        "temperature_source": temperature_source,
        "n_bins": n_bins,
        "uncalibrated": calibration_scores(raw_probs, y, n_bins),
        "calibrated": calibration_scores(calibrated, y, n_bins),
    }


def reliability_table(
    raw_probs: np.ndarray, calibrated_probs: np.ndarray, y: np.ndarray, n_bins: int = DEFAULT_BINS
) -> list[dict[str, float | None]]:
    """Rows for the reliability-diagram CSV: accuracy per bin before and after scaling.

    One row per bin keyed by the bin centre, so both curves share an x axis with the
    ``ideal`` diagonal. Empty bins get ``None`` (an empty CSV cell): plotting a 0 there
    would draw a calibration failure that no sample showed.
    """
    before = reliability(raw_probs, y, n_bins)
    after = reliability(calibrated_probs, y, n_bins)
    rows: list[dict[str, float | None]] = []
    for b, a in zip(before, after, strict=True):
        centre = round((b["bin_lower"] + b["bin_upper"]) / 2, 6)
        rows.append(
            {
                "confidence": centre,
                "ideal": centre,
                "calibrated": a["accuracy"] if a["count"] else None,
                "uncalibrated": b["accuracy"] if b["count"] else None,
                "mean_confidence_calibrated": a["confidence"] if a["count"] else None,
                "mean_confidence_uncalibrated": b["confidence"] if b["count"] else None,
                "count_calibrated": a["count"],
                "count_uncalibrated": b["count"],
            }
        )
    return rows
