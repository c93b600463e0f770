"""Brain-level subject CV: the brain model fitted in every fold, scored on its test brains.

``cv_fold`` writes, per fold and repeat, the calibrated slice probabilities of the
fold's training, validation and test slices with their atrophy measurements. This
module then does, inside each (repeat, fold), exactly what ``train`` does for the model
that ships (:func:`alzstage.model.brain.fit_brain_model`): fit each aggregator on the
fold's training brains, calibrate its conformal sets on the fold's validation brains,
and predict the fold's test brains. So the CV measures the shipped procedure, and every
variant of it is compared on the same brains without training another network:

* ``pool``: the fixed mean-log-probability rule (the reference);
* ``logistic_cnn``: logistic over the pooled log-probabilities only;
* ``logistic``: logistic over those plus the brain's CSF fraction;
* ``morphometric``: logistic over the CSF fraction alone, **the morphometric baseline**;
* ``pixel``, ``nearest`` and ``majority``: the slice baselines' votes per brain.

``ensemble``: each brain's probabilities averaged over the repeats, i.e. over models
that each never saw it, measures what averaging several trained models would give.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from alzstage.data.morphometry import MORPH_FEATURES
from alzstage.evaluate.brain import (
    binary_view,
    bootstrap_brains,
    main_classes,
    point_scores,
)
from alzstage.model.brain import BrainTable, brain_table, fit_brain_model
from alzstage.model.conformal import coverage_report

#: The brain models compared in every fold: aggregator and features.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "pool": ("pool", ("cnn",)),
    "logistic_cnn": ("logistic", ("cnn",)),
    "logistic": ("logistic", ("cnn", "morphometry")),
    "morphometric": ("logistic", ("morphometry",)),
}
SLICE_BASELINES = ("pixel", "nearest")


def _table(frame: pd.DataFrame, classes: list[str]) -> BrainTable:
    index = {c: i for i, c in enumerate(classes)}
    return brain_table(
        frame["subject"].astype(str).to_numpy(),
        frame[[f"p_{c}" for c in classes]].to_numpy(np.float64),
        frame[list(MORPH_FEATURES)].to_numpy(np.float64),
        frame["label"].map(index).to_numpy(np.int64),
    )


def default_variant(aggregator: str, features: list[str]) -> str:
    """The :data:`VARIANTS` name of the configured brain model."""
    for name, (agg, feats) in VARIANTS.items():
        if agg == aggregator and (agg == "pool" or tuple(features) == feats):
            return name
    raise ValueError(f"brain.aggregator {aggregator} with features {features}: not a CV variant")


def _vote(frame: pd.DataFrame, column: str, classes: list[str]) -> pd.Series:
    """A brain's most frequent slice prediction (ties: the lower stage)."""
    codes = frame[column].map({c: i for i, c in enumerate(classes)})
    counts = pd.crosstab(frame["subject"].astype(str), codes)
    return counts.reindex(columns=range(len(classes)), fill_value=0).idxmax(axis=1)


def fold_brains(
    fit: pd.DataFrame, test: pd.DataFrame, classes: list[str], brain: Any, seed: int
) -> pd.DataFrame:
    """One (repeat, fold): every variant fitted on training brains, calibrated on
    validation brains, predicting test brains. One row per test brain."""
    train_t = _table(fit[fit["role"] == "train"], classes)
    val_t = _table(fit[fit["role"] == "val"], classes)
    test_t = _table(test, classes)
    out = pd.DataFrame({"subject": test_t.subjects, "y": test_t.y})
    for name, (aggregator, features) in VARIANTS.items():
        # Fitted once; its sets calibrated twice on the same validation brains.
        model = fit_brain_model(
            train_t,
            val_t,
            classes,
            aggregator=aggregator,
            features=features,
            C=brain.C,
            max_class_weight=brain.max_class_weight,
            confidence=brain.confidence,
            mondrian=False,
        )
        for kind in ("marginal", "mondrian"):
            model.calibrate(val_t, mondrian=kind == "mondrian")
            out[f"{name}_set_{kind}"] = [
                "|".join(c for c, keep in zip(classes, row, strict=True) if keep)
                for row in model.sets(test_t)
            ]
        probs = model.predict_proba(test_t)
        for i, c in enumerate(classes):
            out[f"{name}_p_{c}"] = np.round(probs[:, i], 6)
        out[f"{name}_pred"] = probs.argmax(axis=1)
    for name in SLICE_BASELINES:
        out[f"{name}_pred"] = (
            _vote(test, f"baseline_{name}", classes).loc[out["subject"]].to_numpy()
        )
    majority = np.bincount(train_t.y, minlength=len(classes)).argmax()
    out["majority_pred"] = int(majority)
    out["n_val_brains"] = len(val_t.y)
    return out


def cv_brains(
    pooled: pd.DataFrame, fit: pd.DataFrame, classes: list[str], brain: Any, seed: int
) -> pd.DataFrame:
    """Every (repeat, fold)'s test brains: the out-of-fold brain table of the CV."""
    frames = []
    for (repeat, fold), test in pooled.groupby(["repeat", "fold"], sort=True):
        part = fit[(fit["repeat"] == repeat) & (fit["fold"] == fold)]
        if part.empty or not (part["role"] == "val").any():
            raise ValueError(
                f"cv_report: fold {fold} of repeat {repeat} has no training or validation "
                "slices in fit_slices.csv; re-run `dvc repro cv/dvc.yaml`"
            )
        frames.append(
            fold_brains(part, test, classes, brain, seed).assign(repeat=repeat, fold=fold)
        )
    return pd.concat(frames, ignore_index=True)


def _sets(frame: pd.DataFrame, column: str, classes: list[str]) -> np.ndarray:
    members = frame[column].fillna("").astype(str).str.split("|")
    return np.array([[c in m for c in classes] for m in members], dtype=bool)


def ensemble_rows(brains: pd.DataFrame, variant: str, classes: list[str]) -> pd.DataFrame:
    """One row per brain: ``variant``'s probabilities averaged over the repeats."""
    cols = [f"{variant}_p_{c}" for c in classes]
    mean = brains.groupby("subject", sort=True).agg({**dict.fromkeys(cols, "mean"), "y": "first"})
    return mean.reset_index()


def ensemble_gain(
    brains: pd.DataFrame, variant: str, classes: list[str], *, seed: int, n_resamples: int
) -> dict[str, Any]:
    """Balanced accuracy (main classes) of the repeat-averaged ensemble minus the mean of
    the single repeats, resampling brains (the same brains for both: paired)."""
    from alzstage.evaluate.brain import CI_LEVEL, _scores_from_cms
    from alzstage.model.metrics import primary_labels, resample_counts

    k = len(classes)
    ens = ensemble_rows(brains, variant, classes)
    subjects = ens["subject"].astype(str).to_numpy()
    y = ens["y"].to_numpy(np.int64)
    main = main_classes(y, subjects, k)
    preds = [ens[[f"{variant}_p_{c}" for c in classes]].to_numpy().argmax(axis=1)]
    for _, part in brains.groupby("repeat", sort=True):
        single = part.set_index(part["subject"].astype(str))[f"{variant}_pred"]
        preds.append(single.loc[subjects].to_numpy(np.int64))
    draws = resample_counts(
        primary_labels(y, np.arange(len(y)), len(y), k), n_resamples, np.random.default_rng(seed)
    )
    unit = np.arange(len(y))
    scores = []
    for pred in preds:
        per_unit = np.zeros((len(y), k * k))
        np.add.at(per_unit, (unit, y * k + pred), 1.0)
        cms = np.vstack([per_unit.sum(axis=0)[None], draws @ per_unit]).reshape(-1, k, k)
        scores.append(_scores_from_cms(cms, main)["balanced_accuracy_main"])
    diff = scores[0] - np.mean(scores[1:], axis=0)
    tail = (1 - CI_LEVEL) / 2 * 100
    lo, hi = np.percentile(diff[1:], [tail, 100 - tail])
    return {
        "ensemble": round(float(scores[0][0]), 6),
        "single_mean": round(float(np.mean([s[0] for s in scores[1:]])), 6),
        "difference": round(float(diff[0]), 6),
        "ci": {"low": round(float(lo), 6), "high": round(float(hi), 6)},
        "beats": bool(lo > 0),
    }


def brain_cv_report(
    brains: pd.DataFrame, classes: list[str], brain: Any, *, seed: int, n_resamples: int
) -> dict[str, Any]:
    """Brain-level CV: every variant and baseline with CIs, paired differences against
    the configured model, conformal coverage, the binary view and the ensemble."""
    default = default_variant(brain.aggregator, list(brain.features))
    y = brains["y"].to_numpy(np.int64)
    subjects = brains["subject"].astype(str).to_numpy()
    preds = {name: brains[f"{name}_pred"].to_numpy(np.int64) for name in VARIANTS}
    preds.update({name: brains[f"{name}_pred"].to_numpy(np.int64) for name in ("pixel", "nearest")})
    preds["majority"] = brains["majority_pred"].to_numpy(np.int64)
    scores = bootstrap_brains(
        y, preds, subjects, classes, reference=default, seed=seed, n_resamples=n_resamples
    )
    conformal = {
        kind: coverage_report(
            _sets(brains, f"{default}_set_{kind}", classes), y, classes, brain.confidence
        )
        for kind in ("marginal", "mondrian")
    }
    probs = brains[[f"{default}_p_{c}" for c in classes]].to_numpy(np.float64)
    ens = ensemble_rows(brains, default, classes)
    ens_probs = ens[[f"{default}_p_{c}" for c in classes]].to_numpy(np.float64)
    ens_scores = bootstrap_brains(
        ens["y"].to_numpy(np.int64),
        {"ensemble": ens_probs.argmax(axis=1)},
        ens["subject"].astype(str).to_numpy(),
        classes,
        reference="ensemble",
        seed=seed,
        n_resamples=n_resamples,
    )["predictors"]["ensemble"]
    main = main_classes(y, subjects, len(classes))
    per_repeat = [
        point_scores(
            part["y"].to_numpy(np.int64),
            part[f"{default}_pred"].to_numpy(np.int64),
            len(classes),
            main,
        )["balanced_accuracy_main"]
        for _, part in brains.groupby("repeat", sort=True)
    ]
    return {
        "default": default,
        "aggregators": {
            k: {"aggregator": a, "features": list(f)} for k, (a, f) in VARIANTS.items()
        },
        "repeats": int(brains["repeat"].nunique()),
        "n_brains": int(brains["subject"].nunique()),
        "brains_per_class": {
            c: int(brains.loc[brains["y"] == i, "subject"].nunique()) for i, c in enumerate(classes)
        },
        "scores": scores,
        "conformal": {
            "confidence": brain.confidence,
            "selected": "mondrian" if brain.mondrian else "marginal",
            **conformal,
        },
        "binary": binary_view(y, probs, subjects, seed=seed, n_resamples=n_resamples),
        "ensemble_over_repeats": {
            "note": "each brain's probabilities averaged over the repeats' models, none of "
            "which trained on it",
            **ens_scores,
            "minus_single_repeats": None
            if brains["repeat"].nunique() < 2
            else ensemble_gain(brains, default, classes, seed=seed, n_resamples=n_resamples),
        },
        "per_repeat_balanced_accuracy_main": per_repeat,
        "fit_guard": "aggregators fitted on each fold's training brains, sets calibrated on "
        "its validation brains; cv_report asserts neither holds a test brain",
    }


def assert_disjoint(fit: pd.DataFrame, pooled: pd.DataFrame) -> None:
    """No test brain of a (repeat, fold) among that fold's fitting brains (the guard)."""
    for (repeat, fold), test in pooled.groupby(["repeat", "fold"]):
        part = fit[(fit["repeat"] == repeat) & (fit["fold"] == fold)]
        shared = set(part["subject"].astype(str)) & set(test["subject"].astype(str))
        if shared:
            raise ValueError(
                f"cv_report: fold {fold} of repeat {repeat} fitted its brain model on "
                f"{len(shared)} of its own test brains (e.g. {sorted(shared)[0]!r}); "
                "re-run `dvc repro cv/dvc.yaml` from cv_split"
            )
