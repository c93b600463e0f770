"""Brain-level scores with subject-bootstrap CIs, paired comparisons and the binary view.

One row per (brain, test occasion): a repeated CV tests each brain once per repeat, so a
brain can have several rows. The bootstrap resamples *brains* (all their rows come
along), stratified by class, and every predictor is scored on the same draws, so a
paired difference measures the gap only (as :mod:`alzstage.evaluate.baselines` does for
slices).

``main`` classes are those with more than two brains in the data: with two brains
(ModerateDemented in the Kaggle set) a recall is 0, 0.5 or 1 by luck, and averaging it
into the headline would make the headline a coin toss. Both averages are reported: over
the main classes and over all classes present.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from alzstage.artifacts import PixelStore, read_split
from alzstage.model.brain import BrainModel, read_brain_model, split_brain_table
from alzstage.model.metrics import (
    primary_labels,
    quadratic_weighted_kappa,
    resample_counts,
)

MIN_BRAINS_MAIN = 3
CI_LEVEL = 0.95


def main_classes(y: np.ndarray, subjects: np.ndarray, n_classes: int) -> list[int]:
    """Class indices with at least :data:`MIN_BRAINS_MAIN` distinct brains in ``y``
    (every class present when fewer than two classes have that many: a tiny test set)."""
    pairs = {(str(s), int(c)) for s, c in zip(subjects, y, strict=True)}
    counts = np.bincount([c for _, c in pairs], minlength=n_classes)
    main = [k for k in range(n_classes) if counts[k] >= MIN_BRAINS_MAIN]
    return main if len(main) >= 2 else [k for k in range(n_classes) if counts[k] > 0]


def _recalls(cms: np.ndarray) -> np.ndarray:
    """(..., k) recall per class from (..., k, k) confusion matrices (NaN: class absent)."""
    support = cms.sum(axis=-1)
    diag = np.diagonal(cms, axis1=-2, axis2=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, diag / np.maximum(support, 1e-12), np.nan)


def _scores_from_cms(cms: np.ndarray, main: list[int]) -> dict[str, np.ndarray]:
    rec = _recalls(cms)
    with np.errstate(invalid="ignore"):
        return {
            "balanced_accuracy": np.nanmean(rec, axis=-1),
            "balanced_accuracy_main": np.nanmean(rec[..., main], axis=-1),
            "recall": rec,
        }


def _confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    cm = np.zeros((k, k))
    np.add.at(cm, (y, pred), 1.0)
    return cm


def point_scores(y: np.ndarray, pred: np.ndarray, k: int, main: list[int]) -> dict[str, Any]:
    """Balanced accuracy (all present / main classes), QWK, mean absolute stage error."""
    y = np.asarray(y, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    s = _scores_from_cms(_confusion(y, pred, k), main)
    return {
        "balanced_accuracy": float(s["balanced_accuracy"]),
        "balanced_accuracy_main": float(s["balanced_accuracy_main"]),
        "accuracy": float((y == pred).mean()) if len(y) else None,
        "qwk": quadratic_weighted_kappa(y, pred, k),
        "mean_absolute_stage_error": float(np.abs(y - pred).mean()) if len(y) else None,
        "recall": [None if np.isnan(r) else float(r) for r in s["recall"]],
    }


def _interval(values: np.ndarray) -> dict[str, float] | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    tail = (1 - CI_LEVEL) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return {"low": round(float(lo), 6), "high": round(float(hi), 6)}


def bootstrap_brains(
    y: np.ndarray,
    preds: dict[str, np.ndarray],
    subjects: np.ndarray,
    classes: list[str],
    *,
    reference: str,
    seed: int,
    n_resamples: int = 1000,
) -> dict[str, Any]:
    """Point scores and CIs of every predictor; paired differences against ``reference``.

    ``beats`` means the whole 95% interval of ``reference - other`` lies above 0, for
    the main-class balanced accuracy (the headline) and for all classes.
    """
    y = np.asarray(y, dtype=np.int64)
    k = len(classes)
    subjects = np.asarray(subjects).astype(str)
    main = main_classes(y, subjects, k)
    _, units = np.unique(subjects, return_inverse=True)
    n_units = int(units.max()) + 1
    strata = primary_labels(y, units, n_units, k)
    draws = resample_counts(strata, n_resamples, np.random.default_rng(seed))
    reps: dict[str, dict[str, np.ndarray]] = {}
    out: dict[str, Any] = {
        "unit": "brain",
        "n_brains": n_units,
        "n_rows": len(y),
        "main_classes": [classes[c] for c in main],
        "n_resamples": n_resamples,
        "seed": seed,
        "predictors": {},
    }
    for name, pred in preds.items():
        pred = np.asarray(pred, dtype=np.int64)
        per_unit = np.zeros((n_units, k * k))
        np.add.at(per_unit, (units, y * k + pred), 1.0)
        reps[name] = _scores_from_cms((draws @ per_unit).reshape(-1, k, k), main)
        point = point_scores(y, pred, k, main)
        out["predictors"][name] = {
            **{key: v for key, v in point.items() if key != "recall"},
            "recall": dict(zip(classes, point["recall"], strict=True)),
            "ci": {
                "balanced_accuracy": _interval(reps[name]["balanced_accuracy"]),
                "balanced_accuracy_main": _interval(reps[name]["balanced_accuracy_main"]),
                "recall": {c: _interval(reps[name]["recall"][:, i]) for i, c in enumerate(classes)},
            },
        }
    for name in preds:
        if name == reference:
            continue
        entry = out["predictors"][name]
        entry["vs_reference"] = {}
        for metric in ("balanced_accuracy_main", "balanced_accuracy"):
            diff = reps[reference][metric] - reps[name][metric]
            ci = _interval(diff)
            point = out["predictors"][reference][metric] - entry[metric]
            entry["vs_reference"][metric] = {
                "difference": round(float(point), 6),
                "ci": ci,
                "beats": bool(ci is not None and ci["low"] > 0),
            }
    return out


def binary_view(
    y: np.ndarray,
    probs: np.ndarray,
    subjects: np.ndarray,
    *,
    seed: int,
    n_resamples: int = 1000,
) -> dict[str, Any]:
    """Not demented (class 0) vs any dementia: sensitivity, specificity, ROC AUC, CIs.

    The screening question. The decision is the brain's stage (any stage above the
    first counts as positive); the AUC ranks brains by ``1 - p(first class)``.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, dtype=np.int64)
    positive = y > 0
    score = 1.0 - np.asarray(probs, dtype=np.float64)[:, 0]
    called = np.asarray(probs).argmax(axis=1) > 0
    subjects = np.asarray(subjects).astype(str)

    def stats(idx: np.ndarray) -> tuple[float, float, float]:
        pos, call, sc = positive[idx], called[idx], score[idx]
        sens = call[pos].mean() if pos.any() else np.nan
        spec = (~call[~pos]).mean() if (~pos).any() else np.nan
        auc = roc_auc_score(pos, sc) if 0 < pos.sum() < len(pos) else np.nan
        return float(sens), float(spec), float(auc)

    point = stats(np.arange(len(y)))
    ids, units = np.unique(subjects, return_inverse=True)
    members = [np.flatnonzero(units == u) for u in range(len(ids))]
    unit_pos = np.array([positive[m[0]] for m in members])
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_resamples):  # stratified by positive/negative brains
        chosen = np.concatenate(
            [
                rng.choice(np.flatnonzero(unit_pos == v), size=(unit_pos == v).sum())
                for v in (0, 1)
                if (unit_pos == v).any()
            ]
        )
        reps.append(stats(np.concatenate([members[u] for u in chosen])))
    reps_arr = np.array(reps)
    names = ("sensitivity", "specificity", "roc_auc")
    return {
        "positive": "any stage above the first (any dementia)",
        "n_brains": len(ids),
        "n_positive_rows": int(positive.sum()),
        "n_negative_rows": int((~positive).sum()),
        **{n: (None if np.isnan(v) else round(v, 6)) for n, v in zip(names, point, strict=True)},
        "ci": {n: _interval(reps_arr[:, i]) for i, n in enumerate(names)},
    }


if TYPE_CHECKING:  # pragma: no cover
    from alzstage.config import Params, Paths


def brain_test_report(
    params: Params, paths: Paths, test_rows: pd.DataFrame, test_probs: np.ndarray
) -> dict:
    """The test brains scored by the trained brain model, with its conformal sets, the
    fixed pooling rule, the morphometric baseline (fitted here on the training brains)
    and the majority class, paired against the brain model; and the binary view.

    Same shape as the CV's ``brain_level`` block, so one headline reads both.
    """
    from alzstage.model.conformal import coverage_report

    classes = list(params.base.classes)
    model = read_brain_model(paths.brain_model)
    split = read_split(paths.split_file)
    store = PixelStore.read(paths.pixels)
    train_rows = split[split["split"] == "train"].reset_index(drop=True)
    train_t = split_brain_table(train_rows, store, classes, None)
    test_t = split_brain_table(test_rows, store, classes, test_probs)
    b = params.brain
    morph = BrainModel(
        classes, "logistic", ("morphometry",), b.C, b.max_class_weight, b.confidence
    ).fit(train_t)
    probs = model.predict_proba(test_t)
    preds = {
        "brain_model": probs.argmax(axis=1),
        "pool": test_t.pooled.argmax(axis=1),
        "morphometric": morph.predict_proba(test_t).argmax(axis=1),
        "majority": np.full(len(test_t.y), np.bincount(train_t.y).argmax()),
    }
    seed = params.base.seed
    scores = bootstrap_brains(
        test_t.y, preds, test_t.subjects, classes, reference="brain_model", seed=seed
    )
    sets = model.sets(test_t)
    conformal: dict = {"confidence": model.confidence, "selected": "marginal"}
    if sets is None:
        conformal["available"] = False
        conformal["reason"] = "no held-out validation brains to calibrate on (leaky split?)"
    else:
        conformal["selected"] = "mondrian" if model.conformal.mondrian else "marginal"
        conformal[conformal["selected"]] = coverage_report(
            sets, test_t.y, classes, model.confidence
        )
        conformal["calibration_brains"] = len(model.conformal.labels)
    return {
        "default": "brain_model",
        "aggregator": model.aggregator,
        "features": list(model.features),
        "n_brains": len(test_t.y),
        "scores": scores,
        "conformal": conformal,
        "binary": binary_view(test_t.y, probs, test_t.subjects, seed=seed),
        "brains": {
            "subject": test_t.subjects.tolist(),
            "stage": [classes[i] for i in probs.argmax(axis=1)],
            "set": None
            if sets is None
            else ["|".join(c for c, k in zip(classes, row, strict=True) if k) for row in sets],
        },
    }
