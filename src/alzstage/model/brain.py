"""The brain-level model: one stage per brain from its slices, with a conformal set.

Users ask about a brain, not a slice. The network scores slices; this module turns a
brain's slices into one answer:

1. a :class:`BrainTable` per brain: the slices' probabilities pooled by the fixed rule
   (mean log-probability, the reference), and the brain's mean atrophy measurements
   (:mod:`alzstage.data.morphometry`);
2. an *aggregator*: ``pool`` keeps the fixed rule; ``logistic`` is a regularised,
   class-weighted logistic regression over the pooled log-probabilities and the atrophy
   features, fitted on **training brains only**;
3. a conformal calibration (:mod:`alzstage.model.conformal`) on **validation brains**,
   which neither the network nor the aggregator trained on.

The same :class:`BrainModel` serves as the morphometric baseline (``logistic`` over the
atrophy features alone), so the network is compared with what a radiologist's simple
measurement would say, fitted and scored the same way.

Why the aggregator trains on the training brains (whose slice probabilities the network
has seen) and not on the validation brains: the validation brains are the only held-out
brains a single split has, and the conformal sets need them. The price is that the
aggregator sees the network more confident than it is on new brains; subject CV
measures whether it still helps (docs/models.md). Which aggregator is the default is
decided by the repeated subject CV, never by a test split.

Stored as plain numbers (:meth:`BrainModel.to_dict`), so the MLflow model, the API and
``predict`` compute the same probabilities with numpy, no pickle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from alzstage.artifacts import PixelStore
from alzstage.data.morphometry import MORPH_FEATURES
from alzstage.errors import AlzstageError
from alzstage.files import read_json
from alzstage.model.conformal import ConformalCalibration, calibrate, prediction_sets

AGGREGATORS = ("pool", "logistic")
FEATURE_KINDS = ("cnn", "morphometry")
#: The atrophy features a brain is described by: the mean over its slices.
BRAIN_MORPH = ("morph_csf_fraction",)
_EPS = 1e-12


@dataclass(frozen=True)
class BrainTable:
    """One row per brain: pooled network probabilities and mean atrophy features."""

    subjects: np.ndarray  # (b,) ids
    y: np.ndarray  # (b,) class index, -1 when unknown (prediction time)
    pooled: np.ndarray  # (b, k) mean-log pooled slice probabilities
    morph: np.ndarray  # (b, len(BRAIN_MORPH)) mean over the brain's slices
    n_slices: np.ndarray  # (b,)


def brain_table(
    subjects: np.ndarray,
    probs: np.ndarray,
    morph: np.ndarray | pd.DataFrame,
    y: np.ndarray | None = None,
) -> BrainTable:
    """Group slices by brain (sorted by id): pool probabilities, average atrophy.

    ``morph`` holds the per-slice :data:`~alzstage.data.morphometry.MORPH_FEATURES`
    (columns in that order, or a frame with those names). A brain whose slices carry two
    labels is an error: a brain has one stage.
    """
    subjects = np.asarray(subjects).astype(str)
    probs = np.asarray(probs, dtype=np.float64)
    if isinstance(morph, pd.DataFrame):
        morph = morph[list(MORPH_FEATURES)].to_numpy(np.float64)
    morph = np.asarray(morph, dtype=np.float64).reshape(len(subjects), -1)
    if not (len(probs) == len(morph) == len(subjects)):
        raise ValueError(
            f"brain_table: {len(subjects)} subjects, {len(probs)} probability rows and "
            f"{len(morph)} morphometry rows; give one of each per slice"
        )
    keep = [MORPH_FEATURES.index(f) for f in BRAIN_MORPH]
    labels = np.full(len(subjects), -1) if y is None else np.asarray(y, dtype=np.int64)
    frame = pd.DataFrame({"subject": subjects, "y": labels})
    if (frame.groupby("subject")["y"].nunique() > 1).any():
        bad = frame.groupby("subject")["y"].nunique().idxmax()
        raise ValueError(f"brain_table: brain {bad!r} has slices with different labels")
    codes, ids = pd.factorize(frame["subject"], sort=True)
    b = len(ids)
    logp = np.log(np.clip(probs, _EPS, 1.0))
    sums = np.zeros((b, probs.shape[1]))
    np.add.at(sums, codes, logp)
    msum = np.zeros((b, len(keep)))
    np.add.at(msum, codes, morph[:, keep])
    n = np.bincount(codes, minlength=b)
    mean = sums / n[:, None]
    pooled = np.exp(mean - mean.max(axis=1, keepdims=True))
    pooled /= pooled.sum(axis=1, keepdims=True)
    first = np.unique(codes, return_index=True)[1]
    return BrainTable(
        subjects=np.asarray(ids, dtype=str),
        y=labels[first],
        pooled=pooled,
        morph=msum / n[:, None],
        n_slices=n,
    )


def feature_matrix(table: BrainTable, kinds: tuple[str, ...]) -> np.ndarray:
    """The aggregator's inputs: centred pooled log-probabilities and/or atrophy features."""
    parts = []
    for kind in kinds:
        if kind == "cnn":
            logp = np.log(np.clip(table.pooled, _EPS, 1.0))
            parts.append(logp - logp.mean(axis=1, keepdims=True))
        elif kind == "morphometry":
            parts.append(table.morph)
        else:
            raise ValueError(f"feature_matrix: unknown feature kind {kind!r}; use {FEATURE_KINDS}")
    return np.concatenate(parts, axis=1)


def capped_balanced_weights(y: np.ndarray, n_classes: int, cap: float | None) -> np.ndarray:
    """Per-sample ``balanced`` weights (n / (k * n_c)), capped: one brain of a class
    would otherwise weigh ~25 brains and the model would call every doubt that class."""
    y = np.asarray(y, dtype=np.int64)
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = len(y) / (present.sum() * counts[present])
    if cap is not None:
        w = np.minimum(w, cap)
    return w[y]


@dataclass
class BrainModel:
    """Aggregator (+ optional conformal calibration) from brain tables to brain stages."""

    classes: list[str]
    aggregator: str = "logistic"
    features: tuple[str, ...] = ("cnn", "morphometry")
    C: float = 1.0
    max_class_weight: float | None = 5.0
    confidence: float = 0.9
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    coef: np.ndarray | None = None  # (k, f); rows of classes absent from training: 0
    intercept: np.ndarray | None = None  # (k,); absent classes: -inf
    conformal: ConformalCalibration | None = None
    fitted_on: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"unknown brain aggregator {self.aggregator!r}; use {AGGREGATORS}")
        self.features = tuple(self.features)
        bad = [f for f in self.features if f not in FEATURE_KINDS]
        if bad or not self.features:
            raise ValueError(f"brain features {list(self.features)}: use some of {FEATURE_KINDS}")
        if self.aggregator == "pool" and self.features != ("cnn",):
            self.features = ("cnn",)  # the fixed rule reads the network only

    # ------------------------------------------------------------------ fit / predict

    def fit(self, table: BrainTable) -> BrainModel:
        """Fit the aggregator on training brains (``pool`` has nothing to fit)."""
        from sklearn.linear_model import LogisticRegression

        k = len(self.classes)
        self.fitted_on = {"brains": len(table.y), "per_class": np.bincount(table.y, minlength=k)}
        if self.aggregator == "pool":
            return self
        x = feature_matrix(table, self.features)
        self.mean = x.mean(axis=0)
        self.scale = np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
        seen = np.unique(table.y)
        self.coef = np.zeros((k, x.shape[1]))
        self.intercept = np.full(k, -np.inf)
        if len(seen) == 1:  # one class: nothing to separate, always that class
            self.intercept[seen[0]] = 0.0
            return self
        lr = LogisticRegression(C=self.C, max_iter=5000)
        weights = capped_balanced_weights(table.y, k, self.max_class_weight)
        lr.fit((x - self.mean) / self.scale, table.y, sample_weight=weights)
        coef, icpt = lr.coef_, lr.intercept_
        if len(seen) == 2:  # sklearn's binary form: one row for the second class
            coef = np.vstack([-coef[0] / 2, coef[0] / 2])
            icpt = np.array([-icpt[0] / 2, icpt[0] / 2])
        self.coef[seen] = coef
        self.intercept[seen] = icpt
        return self

    def predict_proba(self, table: BrainTable) -> np.ndarray:
        """(b, k) brain-level class probabilities."""
        if self.aggregator == "pool":
            return table.pooled
        if self.coef is None:
            raise ValueError("BrainModel.predict_proba: fit the model first")
        x = (feature_matrix(table, self.features) - self.mean) / self.scale
        with np.errstate(invalid="ignore"):
            z = x @ self.coef.T + self.intercept
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def calibrate(self, table: BrainTable, *, mondrian: bool = False) -> BrainModel:
        """Conformal calibration on held-out brains (never the training brains)."""
        self.conformal = calibrate(self.predict_proba(table), table.y, mondrian=mondrian)
        return self

    def sets(self, table: BrainTable, confidence: float | None = None) -> np.ndarray | None:
        """(b, k) boolean conformal sets, or None when the model was not calibrated."""
        if self.conformal is None:
            return None
        conf = self.confidence if confidence is None else confidence
        return prediction_sets(self.conformal, self.predict_proba(table), conf)

    # ------------------------------------------------------------------ storage

    def to_dict(self) -> dict:
        """Plain JSON: what the MLflow model, the API and ``predict`` rebuild it from."""

        def lst(a: np.ndarray | None) -> list | None:
            if a is None:
                return None
            return np.where(np.isfinite(a), np.round(a, 10), -1e9).tolist()

        return {
            "classes": list(self.classes),
            "aggregator": self.aggregator,
            "features": list(self.features),
            "brain_morphometry": list(BRAIN_MORPH),
            "C": self.C,
            "max_class_weight": self.max_class_weight,
            "confidence": self.confidence,
            "mean": lst(self.mean),
            "scale": lst(self.scale),
            "coef": lst(self.coef),
            "intercept": lst(self.intercept),
            "conformal": None if self.conformal is None else self.conformal.to_dict(),
            "fitted_on": {
                "brains": int(self.fitted_on.get("brains", 0)),
                "per_class": [int(v) for v in self.fitted_on.get("per_class", [])],
            },
        }

    @classmethod
    def from_dict(cls, d: dict) -> BrainModel:
        def arr(key: str) -> np.ndarray | None:
            return None if d.get(key) is None else np.asarray(d[key], dtype=np.float64)

        return cls(
            classes=list(d["classes"]),
            aggregator=d["aggregator"],
            features=tuple(d["features"]),
            C=float(d["C"]),
            max_class_weight=d.get("max_class_weight"),
            confidence=float(d["confidence"]),
            mean=arr("mean"),
            scale=arr("scale"),
            coef=arr("coef"),
            intercept=arr("intercept"),
            conformal=None
            if d.get("conformal") is None
            else ConformalCalibration.from_dict(d["conformal"]),
            fitted_on=dict(d.get("fitted_on") or {}),
        )


def fit_brain_model(
    train: BrainTable,
    calibration: BrainTable | None,
    classes: list[str],
    *,
    aggregator: str,
    features: tuple[str, ...],
    C: float,
    max_class_weight: float | None,
    confidence: float,
    mondrian: bool,
) -> BrainModel:
    """Fit on training brains, calibrate on held-out brains; asserts they are disjoint.

    The assertion is the guard the issue asks for: an aggregator or a conformal set that
    saw a brain it is later scored on would report coverage it does not have.
    """
    overlap = set(train.subjects.tolist())
    if calibration is not None:
        shared = overlap & set(calibration.subjects.tolist())
        if shared:
            raise ValueError(
                f"fit_brain_model: {len(shared)} brain(s) both fit the aggregator and "
                f"calibrate its sets (e.g. {sorted(shared)[0]!r}); they must be disjoint"
            )
    model = BrainModel(
        classes=list(classes),
        aggregator=aggregator,
        features=features,
        C=C,
        max_class_weight=max_class_weight,
        confidence=confidence,
    ).fit(train)
    if calibration is not None and len(calibration.y):
        model.calibrate(calibration, mondrian=mondrian)
    return model


def fit_from_params(
    train: BrainTable, calibration: BrainTable | None, classes: list[str], brain: Any
) -> BrainModel:
    """:func:`fit_brain_model` with the ``brain`` params section's choices (train, demo)."""
    return fit_brain_model(
        train,
        calibration,
        classes,
        aggregator=brain.aggregator,
        features=tuple(brain.features),
        C=brain.C,
        max_class_weight=brain.max_class_weight,
        confidence=brain.confidence,
        mondrian=brain.mondrian,
    )


def split_brain_table(
    rows: pd.DataFrame,
    store: PixelStore,
    classes: list[str],
    probs: np.ndarray | None,
) -> BrainTable:
    """A brain table of split rows (path, label, subject); ``probs`` None: uniform
    (a table for the atrophy-only model, which reads no network output)."""
    index = {c: i for i, c in enumerate(classes)}
    if probs is None:
        probs = np.full((len(rows), len(classes)), 1.0 / len(classes))
    return brain_table(
        rows["subject"].astype(str).to_numpy(),
        probs,
        store.feature_columns_for(rows["path"], MORPH_FEATURES),
        rows["label"].map(index).to_numpy(np.int64),
    )


def subset_table(table: BrainTable, keep: np.ndarray) -> BrainTable:
    return BrainTable(
        subjects=table.subjects[keep],
        y=table.y[keep],
        pooled=table.pooled[keep],
        morph=table.morph[keep],
        n_slices=table.n_slices[keep],
    )


def read_brain_model(path: Path) -> BrainModel:
    """``models/brain_model.json`` as a model; a missing or foreign file names the fix."""
    if not Path(path).exists():
        raise AlzstageError(f"{path}: not found; run `alzstage train` (or `dvc repro train`)")
    try:
        return BrainModel.from_dict(read_json(path))
    except (KeyError, TypeError, ValueError) as exc:
        raise AlzstageError(
            f"{path}: not a brain model written by train ({exc}); re-run `dvc repro train`"
        ) from None
