"""Classification metrics shared by training (model selection) and evaluation (reporting).

Plain accuracy rewards predicting the majority class on this imbalanced data, so model
selection uses balanced accuracy or macro-F1, and reports always show all of them.

Everything here is a pure function of labels and probabilities, so every number in
``reports/metrics.json`` can be checked against a hand computation in the tests.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd


def summary_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    labels = list(range(n_classes))
    present = sorted(set(np.asarray(y_true).tolist()))
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true": expected when a class has no test
        # subjects; the report names such classes, a warning per call adds nothing.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="A single label was found")
        balanced = float(balanced_accuracy_score(y_true, y_pred)) if present else 0.0
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        # Balanced accuracy averages recall over classes present in y_true only; a class
        # with no test subjects cannot be scored and is reported as such elsewhere.
        "balanced_accuracy": balanced,
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=present or labels, average="macro", zero_division=0)
        ),
    }


def per_class_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]
) -> dict[str, dict[str, float]]:
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(classes))), zero_division=0
    )
    return {
        c: {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(s[i]),
        }
        for i, c in enumerate(classes)
    }


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))


def normalized_confusion(cm: np.ndarray) -> np.ndarray:
    """Rows divided by their totals (recall on the diagonal); absent classes stay all-zero."""
    cm = np.asarray(cm, dtype=np.float64)
    totals = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)


# --------------------------------------------------------------------------- ordinal


def quadratic_weighted_kappa(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Cohen's kappa with quadratic weights: agreement beyond chance, scaled by distance.

    The stages are ordered, so calling Moderate "VeryMild" is worse than calling it
    "Mild"; accuracy and F1 score both errors the same, QWK does not. NaN when chance
    disagreement is zero (every label and prediction in one class): undefined, not 1.
    """
    cm = confusion(y_true, y_pred, n_classes).astype(np.float64)
    n = cm.sum()
    if n == 0 or n_classes < 2:
        return float("nan")
    idx = np.arange(n_classes)
    weights = (idx[:, None] - idx[None, :]) ** 2 / (n_classes - 1) ** 2
    expected = np.outer(cm.sum(axis=1), cm.sum(axis=0)) / n
    denom = float((weights * expected).sum())
    if denom == 0:
        return float("nan")
    return float(1.0 - (weights * cm).sum() / denom)


# --------------------------------------------------------------------------- ranking


def _ovr_skip_reason(y: np.ndarray, k: int) -> str | None:
    positives = int((y == k).sum())
    if positives == 0:
        return "absent from test: no positives"
    if positives == len(y):
        return "only class in test: no negatives"
    return None


def one_vs_rest_auc(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """One-vs-rest ROC-AUC and PR-AUC (average precision) per class, and their macro means.

    A class absent from the test split (or the only one present) has no ROC curve;
    it is listed under ``skipped`` with the reason and left out of the macro mean
    rather than counted as 0 or 0.5, either of which would be invented.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    roc: dict[str, float | None] = {}
    pr: dict[str, float | None] = {}
    prevalence: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for k, c in enumerate(classes):
        pos = y == k
        prevalence[c] = float(pos.mean()) if len(y) else 0.0
        reason = _ovr_skip_reason(y, k)
        if reason:
            roc[c] = pr[c] = None
            skipped[c] = reason
            continue
        roc[c] = float(roc_auc_score(pos, probs[:, k]))
        pr[c] = float(average_precision_score(pos, probs[:, k]))
    scored = [c for c in classes if c not in skipped]
    return {
        "roc_auc": {
            "macro": float(np.mean([roc[c] for c in scored])) if scored else None,
            "per_class": roc,
        },
        # Average precision; its chance level is the class prevalence, not 0.5.
        "pr_auc": {
            "macro": float(np.mean([pr[c] for c in scored])) if scored else None,
            "per_class": pr,
            "chance_level": prevalence,
        },
        "skipped": skipped,
    }


def roc_curves(
    y: np.ndarray, probs: np.ndarray, classes: list[str], points: int = 101
) -> pd.DataFrame:
    """One-vs-rest ROC curves on a shared false-positive-rate grid (one column per class).

    A shared x axis is what lets one CSV hold every class for ``dvc plots``; the AUCs
    in the report come from the exact curves, not from this grid. Skipped classes are
    NaN (empty cells), ``macro`` is the mean over scored classes.
    """
    from sklearn.metrics import roc_curve

    grid = np.linspace(0.0, 1.0, points)
    out = {"fpr": grid}
    scored = []
    for k, c in enumerate(classes):
        if _ovr_skip_reason(y, k):
            out[c] = np.full(points, np.nan)
            continue
        fpr, tpr, _ = roc_curve(y == k, probs[:, k])
        # At a repeated fpr (a vertical step) take the top of the step, then interpolate.
        ufpr, inv = np.unique(fpr, return_inverse=True)
        utpr = np.zeros_like(ufpr)
        np.maximum.at(utpr, inv, tpr)
        curve = np.interp(grid, ufpr, utpr)
        out[c] = curve
        scored.append(curve)
    out["macro"] = np.mean(scored, axis=0) if scored else np.full(points, np.nan)
    return pd.DataFrame(out).round(6)


def pr_curves(
    y: np.ndarray, probs: np.ndarray, classes: list[str], points: int = 101
) -> pd.DataFrame:
    """One-vs-rest precision-recall curves on a shared recall grid.

    Precision is the interpolated (upper-envelope) precision: the best precision at any
    recall at least this high, the standard way to make a PR curve a function of recall.
    """
    from sklearn.metrics import precision_recall_curve

    grid = np.linspace(0.0, 1.0, points)
    out = {"recall": grid}
    scored = []
    for k, c in enumerate(classes):
        if _ovr_skip_reason(y, k):
            out[c] = np.full(points, np.nan)
            continue
        precision, recall, _ = precision_recall_curve(y == k, probs[:, k])
        rec, prec = recall[::-1], precision[::-1]  # ascending recall
        envelope = np.maximum.accumulate(prec[::-1])[::-1]
        idx = np.clip(np.searchsorted(rec, grid, side="left"), 0, len(rec) - 1)
        curve = envelope[idx]
        out[c] = curve
        scored.append(curve)
    out["macro"] = np.mean(scored, axis=0) if scored else np.full(points, np.nan)
    return pd.DataFrame(out).round(6)


# --------------------------------------------------------------------------- bootstrap


def metrics_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy, macro-F1 and per-class recall from confusion matrices.

    Vectorised over leading axes: a (B, K, K) stack of bootstrap confusion matrices gives
    B values at once. Definitions match :func:`summary_metrics`: balanced accuracy and
    macro-F1 average over classes present in the truth; precision of a class never
    predicted is 0. Recall of an absent class is NaN.
    """
    cm = np.asarray(cm, dtype=np.float64)
    support = cm.sum(axis=-1)
    predicted = cm.sum(axis=-2)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    total = support.sum(axis=-1)
    present = support > 0
    n_present = present.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, tp / support, np.nan)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        r0 = np.nan_to_num(recall)
        f1 = np.where(precision + r0 > 0, 2 * precision * r0 / (precision + r0), 0.0)
        accuracy = tp.sum(axis=-1) / total
        balanced = np.where(n_present > 0, np.nansum(recall, axis=-1) / n_present, np.nan)
        macro_f1 = np.where(
            n_present > 0, np.where(present, f1, 0.0).sum(axis=-1) / n_present, np.nan
        )
    return {
        "accuracy": accuracy,
        "balanced_accuracy": balanced,
        "macro_f1": macro_f1,
        "recall": recall,
    }


def primary_labels(y: np.ndarray, units: np.ndarray, n_units: int, n_classes: int) -> np.ndarray:
    """Each unit's most frequent label (lowest index on ties): the stratum it is drawn in."""
    table = np.zeros((n_units, n_classes), dtype=np.int64)
    np.add.at(table, (units, y), 1)
    return table.argmax(axis=1)


def resample_counts(strata: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, n_units) draw counts of a bootstrap stratified by ``strata``.

    Within each stratum, as many units are drawn with replacement as the stratum holds,
    so every replicate keeps the test set's class composition in units (which the
    subject split fixed by design) and every class stays scorable in every replicate.
    """
    strata = np.asarray(strata)
    counts = np.zeros((n_resamples, len(strata)), dtype=np.int64)
    rows = np.arange(n_resamples)[:, None]
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        n = len(members)
        draws = rng.integers(0, n, size=(n_resamples, n)) + rows * n
        counts[:, members] = np.bincount(draws.ravel(), minlength=n_resamples * n).reshape(
            n_resamples, n
        )
    return counts


@dataclass
class BootstrapResult:
    """Percentile intervals plus what they were computed over (for the report)."""

    intervals: dict[str, tuple[float, float] | None]
    recall: list[tuple[float, float] | None]
    n_units: int
    n_resamples: int
    level: float
    replicates: dict[str, np.ndarray] = field(default_factory=dict, repr=False)


def _interval(values: np.ndarray, level: float) -> tuple[float, float] | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_ci(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    n_classes: int,
    *,
    groups: np.ndarray | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    stratify: bool = True,
    keep_replicates: bool = False,
) -> BootstrapResult:
    """Percentile bootstrap CIs for accuracy, balanced accuracy, macro-F1 and per-class recall.

    Slices of one brain are not independent, so the resampled unit is the subject
    (``groups``; every slice of a drawn subject comes along) and only single images when
    no groups are given. Resampling slices of a grouped test set would shrink the
    intervals by roughly the square root of the slices per subject, i.e. lie.

    Vectorised: each unit contributes its own small confusion matrix, a replicate's
    matrix is the draw-count-weighted sum of them (one matrix product for all
    replicates), and the metrics come from :func:`metrics_from_confusion`.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if groups is None:
        units = np.arange(len(y_true))
    else:
        _, units = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    n_units = int(units.max()) + 1 if len(units) else 0
    k = n_classes
    empty = BootstrapResult(
        intervals=dict.fromkeys(("accuracy", "balanced_accuracy", "macro_f1")),
        recall=[None] * k,
        n_units=n_units,
        n_resamples=n_resamples,
        level=level,
    )
    if n_units == 0 or n_resamples <= 0:
        return empty
    per_unit = np.zeros((n_units, k * k), dtype=np.float64)
    np.add.at(per_unit, (units, y_true * k + y_pred), 1.0)
    strata = primary_labels(y_true, units, n_units, k) if stratify else np.zeros(n_units, int)
    rng = np.random.default_rng(seed)
    block = max(1, min(n_resamples, 4_000_000 // max(n_units, 1)))  # bounds memory
    parts: dict[str, list[np.ndarray]] = {}
    done = 0
    while done < n_resamples:
        b = min(block, n_resamples - done)
        cms = (resample_counts(strata, b, rng) @ per_unit).reshape(b, k, k)
        for name, vals in metrics_from_confusion(cms).items():
            parts.setdefault(name, []).append(vals)
        done += b
    reps = {name: np.concatenate(v) for name, v in parts.items()}
    return BootstrapResult(
        intervals={
            name: _interval(reps[name], level)
            for name in ("accuracy", "balanced_accuracy", "macro_f1")
        },
        recall=[_interval(reps["recall"][:, i], level) for i in range(k)],
        n_units=n_units,
        n_resamples=n_resamples,
        level=level,
        replicates=reps if keep_replicates else {},
    )


# --------------------------------------------------------------------------- subjects


@dataclass
class SubjectAggregate:
    """Subject-level predictions: one row per (subject, label) unit."""

    subjects: np.ndarray
    y: np.ndarray
    probs: np.ndarray
    n_slices: np.ndarray


def pool_slices(probs: np.ndarray, rule: str = "mean_log") -> np.ndarray:
    """One subject's class probabilities from its slices' probabilities (n, k) -> (k,).

    ``mean_log`` (default) is the rule :func:`aggregate_by_subject` uses for the
    subject-level test metrics, so a volume at predict time is scored the way evaluation
    scored subjects. ``mean`` averages probabilities (one outlier slice weighs less);
    ``vote`` is the share of slices predicting each class (ties: the higher mean
    probability wins, because the returned vector's argmax is the stage).
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"pool_slices: expected (n_slices, n_classes) with n >= 1, got {p.shape}")
    if rule == "mean_log":
        mean = np.log(np.clip(p, 1e-12, 1.0)).mean(axis=0)
        out = np.exp(mean - mean.max())
    elif rule == "mean":
        out = p.mean(axis=0)
    elif rule == "vote":
        votes = np.bincount(p.argmax(axis=1), minlength=p.shape[1]).astype(np.float64)
        out = votes + 1e-6 * p.mean(axis=0)  # tie-break by mean probability
    else:
        raise ValueError(f"pool_slices: unknown rule {rule!r}; use mean_log, mean or vote")
    return out / out.sum()


def aggregate_by_subject(
    probs: np.ndarray, y: np.ndarray, subjects: np.ndarray
) -> SubjectAggregate:
    """Combine slice probabilities per subject by the mean of log-probabilities.

    The mean log-probability (a normalised geometric mean) is the product-of-experts
    vote of the slices, tempered by their number so correlated slices do not count as
    independent evidence; unlike averaging probabilities, one slice that confidently
    rules a class out pulls it down. A subject seen at several stages (longitudinal
    data) gives one unit per stage, since each visit has its own label.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    frame = pd.DataFrame({"subject": np.asarray(subjects).astype(str), "y": y})
    codes = frame.groupby(["subject", "y"], sort=True).ngroup().to_numpy()
    n_units = int(codes.max()) + 1 if len(codes) else 0
    logp = np.log(np.clip(probs, 1e-12, 1.0))
    sums = np.zeros((n_units, probs.shape[1]))
    np.add.at(sums, codes, logp)
    n_slices = np.bincount(codes, minlength=n_units)
    mean = sums / np.maximum(n_slices, 1)[:, None]
    mean -= mean.max(axis=1, keepdims=True)
    agg = np.exp(mean)
    agg /= agg.sum(axis=1, keepdims=True)
    _, first = np.unique(codes, return_index=True)  # first row of each unit
    return SubjectAggregate(
        subjects=frame["subject"].to_numpy()[first],
        y=y[first],
        probs=agg,
        n_slices=n_slices,
    )
