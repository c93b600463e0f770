"""Conformal prediction sets for brains: "VeryMildDemented or MildDemented (90%)".

A calibrated probability says how sure the model is on average; a conformal set says
which stages cannot be ruled out for *this* brain at a stated coverage, with a guarantee
that needs only that new brains are exchangeable with the calibration brains. We use the
maintained ``crepes`` library (Boström) for the p-values rather than hand-written
quantiles, with the hinge (``1 - p(true class)``) non-conformity score.

Choices, and why:

* **Non-smoothed p-values.** Smoothing draws a random number per prediction: the same
  brain could get two different sets on two calls. Non-smoothed sets are deterministic
  and conservative (coverage >= nominal), at the price of slightly larger sets.
* **Marginal by default, Mondrian (class-conditional) as an option.** Mondrian sets hold
  the coverage per true class, which matters when classes are this unbalanced, but each
  class then needs its own calibration brains: with ~20 calibration brains of which 3-4
  are MildDemented and none ModerateDemented, a class with fewer than
  ``ceil(1/alpha) - 1`` calibration brains is in every set. The CV report measures both.
* **Calibrated on brains the model did not train on**, always for the model that ships:
  ``train`` calibrates the registered model on its validation brains; each CV fold
  calibrates its own model on its own validation brains, so the CV coverage measures
  the procedure that ships (``alzstage.model.brain``).

Pure functions on arrays; the calibration is stored as plain numbers (JSON) so that the
MLflow model, the API and ``predict`` rebuild the same sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ConformalCalibration:
    """What a conformal predictor needs: calibration scores (and their classes)."""

    scores: np.ndarray  # (n,) hinge scores 1 - p(true class) of the calibration brains
    labels: np.ndarray  # (n,) their true class indices
    n_classes: int
    mondrian: bool

    def to_dict(self) -> dict:
        return {
            "score": "hinge (1 - probability of the true class)",
            "scores": [round(float(s), 8) for s in self.scores],
            "labels": [int(v) for v in self.labels],
            "n_classes": self.n_classes,
            "mondrian": self.mondrian,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ConformalCalibration:
        return cls(
            scores=np.asarray(d["scores"], dtype=np.float64),
            labels=np.asarray(d["labels"], dtype=np.int64),
            n_classes=int(d["n_classes"]),
            mondrian=bool(d["mondrian"]),
        )


def hinge_scores(probs: np.ndarray) -> np.ndarray:
    """Non-conformity of every class for every row: ``1 - p`` (crepes' ``hinge``)."""
    from crepes.extras import hinge

    return np.asarray(hinge(np.asarray(probs, dtype=np.float64)), dtype=np.float64)


def calibrate(probs: np.ndarray, y: np.ndarray, *, mondrian: bool) -> ConformalCalibration:
    """Calibration scores from held-out brains' probabilities (n, k) and true classes."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(y):
        raise ValueError(
            f"calibrate: expected (n, k) probabilities and n labels, got {probs.shape} and "
            f"{y.shape}"
        )
    if len(y) == 0:
        raise ValueError("calibrate: no calibration brains; conformal sets need some")
    scores = 1.0 - probs[np.arange(len(y)), y]
    return ConformalCalibration(scores, y, probs.shape[1], mondrian)


def p_values(cal: ConformalCalibration, probs: np.ndarray) -> np.ndarray:
    """(n, k) conformal p-values of every class for every row of ``probs``."""
    from crepes import ConformalClassifier

    alphas = hinge_scores(probs)
    if alphas.shape[1] != cal.n_classes:
        raise ValueError(
            f"p_values: probabilities have {alphas.shape[1]} classes, the calibration "
            f"{cal.n_classes}"
        )
    cc = ConformalClassifier()
    if not cal.mondrian:
        cc.fit(cal.scores)
        return np.asarray(cc.predict_p(alphas, smoothing=False), dtype=np.float64)
    # Mondrian: class c's p-value compares with calibration brains of class c only
    # (crepes' WrapClassifier does the same for class_cond=True).
    cc.fit(cal.scores, bins=cal.labels)
    out = np.ones_like(alphas)
    present = set(cal.labels.tolist())
    for c in range(cal.n_classes):
        if c in present:  # a class with no calibration brain cannot be ruled out
            bins = np.full(len(alphas), c)
            out[:, c] = np.asarray(cc.predict_p(alphas, bins, smoothing=False))[:, c]
    return out


def prediction_sets(cal: ConformalCalibration, probs: np.ndarray, confidence: float) -> np.ndarray:
    """Boolean (n, k): the classes whose p-value reaches ``1 - confidence``."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"prediction_sets: confidence must be in (0, 1), got {confidence}")
    return p_values(cal, probs) > 1.0 - confidence


def coverage_report(sets: np.ndarray, y: np.ndarray, classes: list[str], confidence: float) -> dict:
    """Empirical coverage and mean set size, overall and per true class."""
    sets = np.asarray(sets, dtype=bool)
    y = np.asarray(y, dtype=np.int64)
    hit = sets[np.arange(len(y)), y]
    size = sets.sum(axis=1)
    per_class = {}
    for k, c in enumerate(classes):
        m = y == k
        per_class[c] = {
            "n": int(m.sum()),
            "coverage": float(hit[m].mean()) if m.any() else None,
            "mean_set_size": float(size[m].mean()) if m.any() else None,
        }
    return {
        "nominal": confidence,
        "n": len(y),
        "coverage": float(hit.mean()) if len(y) else None,
        "mean_set_size": float(size.mean()) if len(y) else None,
        "empty_sets": int((size == 0).sum()),
        "singletons": int((size == 1).sum()),
        "per_class": per_class,
    }


def describe_set(members: list[str], confidence: float) -> str:
    """``"VeryMildDemented or MildDemented (90%)"``: the stages that cannot be ruled out."""
    pct = f"{confidence * 100:.0f}%"
    if not members:
        return f"no stage fits ({pct})"
    return f"{' or '.join(members)} ({pct})"
