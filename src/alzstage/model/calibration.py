"""Temperature scaling and calibration error.

A network trained with class weights on a few thousand slices is rarely calibrated: its
0.9 does not mean 90%. One scalar temperature, fitted on the validation split, fixes
most of that without changing any prediction's argmax, so it is safe to always apply.
"""

from __future__ import annotations

import itertools

import numpy as np


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Rescale probabilities as softmax(log(p) / T); T > 1 softens, T < 1 sharpens."""
    if temperature == 1.0:
        return np.asarray(probs, dtype=np.float64)
    logits = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0))))


def fit_temperature(
    probs: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)
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


def reliability(probs: np.ndarray, y: np.ndarray, n_bins: int = 10) -> list[dict[str, float]]:
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


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int = 10) -> float:
    """ECE: count-weighted mean |accuracy - confidence| over confidence bins."""
    bins = reliability(probs, y, n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        return 0.0
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / total)
