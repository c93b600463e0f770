"""Baselines that every evaluation scores the network against, on the same test subjects.

Why this module exists: a balanced accuracy of 0.45 means nothing on its own. It could be
a network that learned the disease, or one that does no better than copying the label of
the most similar training slice. So the evaluate stage scores three baselines that need
no deep learning, on exactly the test slices the network saw:

* ``majority``: the most frequent training label for every slice (balanced accuracy
  1/k whenever the test split has k classes): the floor;
* ``nearest``: the label of the most correlated training thumbnail, the same look-up
  the split stage's leakage report runs (on a leaky split it scores near 1.0);
* ``pixel``: PCA plus class-balanced logistic regression on 32x32 thumbnails, the
  cheapest model that actually learns from pixels. A network that cannot beat it has
  not shown that its depth buys anything.

Each comparison is a *paired* subject bootstrap of the network's balanced accuracy
minus the baseline's: both are scored on the same resampled subjects, so the
variation shared by the two (which subjects happened to be drawn) cancels, and the
interval measures the gap only. "Beats" means the whole 95% interval lies above 0.

Every function is pure (arrays in, arrays or JSON-able dicts out); the evaluate stage
loads the thumbnails and writes ``reports/baselines.json``. Inputs are plain arrays so
that a cross-validation aggregate can call :func:`baseline_predictions` per fold and
:func:`compare_with_baselines` on the pooled out-of-fold predictions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from alzstage.data.similarity import correlation_rows, most_correlated
from alzstage.model.metrics import (
    metrics_from_confusion,
    primary_labels,
    resample_counts,
    summary_metrics,
)

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.artifacts import PixelStore

BASELINES = ("majority", "nearest", "pixel")
LABELS = {
    "majority": "majority-class baseline",
    "nearest": "nearest-training-slice baseline",
    "pixel": "pixel baseline",
}
DESCRIPTIONS = {
    "majority": "the most frequent training label, predicted for every test slice",
    "nearest": (
        "the label of the most correlated training thumbnail (the split stage's "
        "near-duplicate look-up)"
    ),
    "pixel": (
        "StandardScaler + PCA + logistic regression (class_weight=balanced) on flattened thumbnails"
    ),
}
# 32x32 is the split's thumbnail size: the nearest baseline then reproduces the split
# report's nearest-neighbour number, and 1,024 pixels keep the pixel model to seconds.
THUMB_SIZE = 32
PCA_COMPONENTS = 50
LR_MAX_ITER = 2000
N_RESAMPLES = 1000
CI_LEVEL = 0.95
_BLOCK_CELLS = 4_000_000  # replicates x units per bootstrap block: bounds memory


# --------------------------------------------------------------------------- predictions


def _check_rows(name: str, x: np.ndarray, y: np.ndarray) -> None:
    if len(x) != len(y):
        raise ValueError(
            f"{name}: {len(x)} images but {len(y)} labels (shapes {x.shape}, {y.shape})"
        )


def majority_baseline(train_y: np.ndarray, n_test: int, n_classes: int) -> np.ndarray:
    """The most frequent training label (lowest index on ties), once per test slice."""
    train_y = np.asarray(train_y, dtype=np.int64)
    if train_y.size == 0:
        raise ValueError("majority_baseline: no training labels; the train split is empty")
    winner = int(np.bincount(train_y, minlength=n_classes).argmax())
    return np.full(n_test, winner, dtype=np.int64)


def nearest_baseline(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> np.ndarray:
    """Copy the label of the most correlated training image (no learning, only look-up).

    Images of any shape are flattened and made zero-mean and unit-norm first, so raw
    slices and :func:`~alzstage.data.split.load_thumbnails` rows give the same answer.
    """
    train_x, test_x = np.asarray(train_x), np.asarray(test_x)
    train_y = np.asarray(train_y, dtype=np.int64)
    _check_rows("nearest_baseline", train_x, train_y)
    if len(train_x) == 0:
        raise ValueError("nearest_baseline: no training images; the train split is empty")
    _, where = most_correlated(correlation_rows(test_x), correlation_rows(train_x))
    return train_y[where]


def pixel_baseline(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    *,
    seed: int,
    n_components: int = PCA_COMPONENTS,
) -> np.ndarray:
    """PCA + class-balanced logistic regression on flattened pixels.

    PCA to at most 50 components keeps the fit to seconds on ~4,000 slices and stops
    the linear model from memorising single pixels; ``class_weight="balanced"`` makes
    it aim at balanced accuracy, the metric it is compared on, instead of the majority
    class. A training set with a single class cannot fit a classifier and predicts
    that class.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_y = np.asarray(train_y, dtype=np.int64)
    _check_rows("pixel_baseline", np.asarray(train_x), train_y)
    if len(train_y) == 0:
        raise ValueError("pixel_baseline: no training images; the train split is empty")
    classes = np.unique(train_y)
    if len(classes) < 2:
        return np.full(len(test_x), int(classes[0]), dtype=np.int64)
    xtr = np.asarray(train_x, dtype=np.float32).reshape(len(train_x), -1)
    xte = np.asarray(test_x, dtype=np.float32).reshape(len(test_x), -1)
    k = max(1, min(n_components, xtr.shape[0] - 1, xtr.shape[1]))
    model = make_pipeline(
        StandardScaler(),
        PCA(n_components=k, whiten=True, random_state=seed),
        LogisticRegression(class_weight="balanced", max_iter=LR_MAX_ITER),
    )
    model.fit(xtr, train_y)
    if len(xte) == 0:
        return np.zeros(0, dtype=np.int64)
    return model.predict(xte).astype(np.int64)


def baseline_predictions(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    n_classes: int,
    *,
    seed: int,
) -> dict[str, np.ndarray]:
    """Test-slice predictions of every baseline, keyed as in :data:`BASELINES`."""
    return {
        "majority": majority_baseline(train_y, len(test_x), n_classes),
        "nearest": nearest_baseline(train_x, train_y, test_x),
        "pixel": pixel_baseline(train_x, train_y, test_x, seed=seed),
    }


# --------------------------------------------------------------------------- paired bootstrap


def _units(subjects: np.ndarray | None, n: int) -> tuple[np.ndarray, str, int]:
    """Bootstrap unit per slice, the unit's name, and how many slices lack a subject.

    Slices without an id are their own unit, as in the evaluate stage's CIs: as far as
    we know they are independent. With no id at all the unit is the image.
    """
    if subjects is None:
        return np.arange(n), "image", 0
    subj = np.asarray(subjects).astype(str)
    if len(subj) != n:
        raise ValueError(f"paired_bootstrap_difference: {len(subj)} subjects for {n} slices")
    unknown = subj == ""
    if unknown.all():
        return np.arange(n), "image", n
    keys = np.where(unknown, np.char.add("row:", np.arange(n).astype(str)), subj)
    _, units = np.unique(keys, return_inverse=True)
    return units.reshape(-1), "subject", int(unknown.sum())


def _per_unit_confusion(
    units: np.ndarray, y: np.ndarray, pred: np.ndarray, n_units: int, k: int
) -> np.ndarray:
    """(n_units, k*k): each unit's own confusion counts, summed by a draw-count product."""
    out = np.zeros((n_units, k * k), dtype=np.float64)
    np.add.at(out, (units, y * k + pred), 1.0)
    return out


def _balanced(cm_rows: np.ndarray, k: int) -> np.ndarray:
    return metrics_from_confusion(cm_rows.reshape(*cm_rows.shape[:-1], k, k))["balanced_accuracy"]


def paired_bootstrap_difference(
    y_true: np.ndarray,
    pred_model: np.ndarray,
    pred_baseline: np.ndarray,
    subjects: np.ndarray | None,
    n_classes: int,
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> dict[str, Any]:
    """Balanced accuracy of the model minus the baseline's, with a paired bootstrap CI.

    Whole subjects are drawn with replacement, stratified by each subject's class (the
    same draw as :func:`~alzstage.model.metrics.bootstrap_ci`), and both predictions are
    scored on the *same* draw: that pairing is what makes the interval about the gap and
    not about which subjects happened to be in the test set. A subject's 32 slices count
    as one draw; drawing slices would treat near-identical neighbours as independent and
    shrink the interval. ``subjects`` None (or all "") falls back to drawing slices, and
    ``unit`` says so.

    Returns the point difference, its ``level`` percentile interval and ``beats``:
    True only when the interval's lower end is above 0.
    """
    y = np.asarray(y_true, dtype=np.int64)
    pm = np.asarray(pred_model, dtype=np.int64)
    pb = np.asarray(pred_baseline, dtype=np.int64)
    if not (y.shape == pm.shape == pb.shape) or y.ndim != 1:
        raise ValueError(
            "paired_bootstrap_difference: y_true, pred_model and pred_baseline must be 1-D "
            f"and of one length, got {y.shape}, {pm.shape}, {pb.shape}"
        )
    units, unit, n_without = _units(subjects, len(y))
    n_units = int(units.max()) + 1 if len(units) else 0
    out: dict[str, Any] = {
        "metric": "balanced_accuracy",
        "method": "paired percentile bootstrap, stratified by class",
        "unit": unit,
        "n_units": n_units,
        "n_slices_without_subject": n_without,
        "n_resamples": n_resamples,
        "level": level,
        "seed": seed,
        "difference": None,
        "ci": None,
        "beats": False,
    }
    if n_units == 0:
        return out
    k = n_classes
    cm_m = _per_unit_confusion(units, y, pm, n_units, k)
    cm_b = _per_unit_confusion(units, y, pb, n_units, k)
    out["difference"] = float(_balanced(cm_m.sum(0), k) - _balanced(cm_b.sum(0), k))
    if n_resamples <= 0:
        return out
    strata = primary_labels(y, units, n_units, k)
    rng = np.random.default_rng(seed)
    block = max(1, min(n_resamples, _BLOCK_CELLS // n_units))
    diffs: list[np.ndarray] = []
    done = 0
    while done < n_resamples:
        b = min(block, n_resamples - done)
        counts = resample_counts(strata, b, rng).astype(np.float64)
        diffs.append(_balanced(counts @ cm_m, k) - _balanced(counts @ cm_b, k))
        done += b
    values = np.concatenate(diffs)
    values = values[np.isfinite(values)]
    tail = (1.0 - level) / 2 * 100
    lo, hi = (float(v) for v in np.percentile(values, [tail, 100 - tail]))
    out["ci"] = {"low": lo, "high": hi}
    out["beats"] = bool(lo > 0)
    return out


def verdict(name: str, comparison: dict[str, Any]) -> str:
    """One plain-English sentence: does the network beat this baseline, and by how much."""
    label = LABELS.get(name, f"{name} baseline")
    diff, ci = comparison.get("difference"), comparison.get("ci")
    if diff is None or ci is None:
        return f"not enough test data to compare the network with the {label}"
    units = f"{comparison['n_units']} {comparison['unit']}s"
    gap = (
        f"balanced accuracy {diff:+.3f}, {comparison['level']:.0%} CI "
        f"{ci['low']:+.3f} to {ci['high']:+.3f}, resampling {units}"
    )
    if comparison["beats"]:
        return f"the network beats the {label} ({gap})"
    if ci["high"] < 0:
        return f"the network does NOT beat the {label}: the baseline is better ({gap})"
    return f"the network does NOT beat the {label}: the interval includes 0 ({gap})"


# --------------------------------------------------------------------------- report


def _round(v: float | None, digits: int = 6) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), digits)


def compare_with_baselines(
    y_true: np.ndarray,
    pred_network: np.ndarray,
    baseline_preds: dict[str, np.ndarray],
    subjects: np.ndarray | None,
    classes: list[str],
    *,
    seed: int,
    n_resamples: int = N_RESAMPLES,
) -> dict[str, Any]:
    """Score given baseline predictions next to the network's (JSON-able).

    Split from :func:`score_baselines` so that pooled out-of-fold predictions (one
    baseline fit per fold) are compared exactly as a single test split is.
    """
    y = np.asarray(y_true, dtype=np.int64)
    net = np.asarray(pred_network, dtype=np.int64)
    k = len(classes)
    report: dict[str, Any] = {
        "classes": list(classes),
        "n_test": len(y),
        "network": {m: _round(v) for m, v in summary_metrics(y, net, k).items()},
        "baselines": {},
    }
    for name, pred in baseline_preds.items():
        pred = np.asarray(pred, dtype=np.int64)
        if pred.shape != y.shape:
            raise ValueError(
                f"compare_with_baselines: {name} has {pred.shape} predictions for {y.shape} labels"
            )
        diff = paired_bootstrap_difference(
            y, net, pred, subjects, k, n_resamples=n_resamples, seed=seed
        )
        diff["difference"] = _round(diff["difference"])
        if diff["ci"]:
            diff["ci"] = {side: _round(v) for side, v in diff["ci"].items()}
        report["baselines"][name] = {
            "description": DESCRIPTIONS.get(name, name),
            **{m: _round(v) for m, v in summary_metrics(y, pred, k).items()},
            "network_minus_baseline": diff,
            "beats": diff["beats"],
            "verdict": verdict(name, diff),
        }
    report["beats_all"] = all(b["beats"] for b in report["baselines"].values())
    return report


def thumbnail_rows(store: PixelStore, image_paths: Iterable[str]) -> np.ndarray:
    """The 32x32 thumbnail rows of ``image_paths``, from the decode stage's store.

    Equal to :func:`~alzstage.data.split.load_thumbnails` of the files, so the nearest
    baseline reproduces the nearest-neighbour number in split.json (at the default
    ``split.thumb_size`` of 32).
    """
    return correlation_rows(store.thumbnails_for(image_paths, THUMB_SIZE))


def score_baselines(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    test_subjects: np.ndarray | None,
    pred_network: np.ndarray,
    classes: list[str],
    *,
    seed: int,
    n_resamples: int = N_RESAMPLES,
) -> dict[str, Any]:
    """Fit every baseline on the training slices and compare it with the network on test.

    ``train_x`` / ``test_x`` are images or thumbnails of any shape (n, ...); pass the
    split's 32x32 thumbnails (:func:`thumbnail_rows`) to keep the
    pixel model fast. ``test_subjects`` holds a subject id per test slice ("" where none
    is known), or None. Returns the body of ``reports/baselines.json``.
    """
    test_y = np.asarray(test_y, dtype=np.int64)
    _check_rows("score_baselines (test)", np.asarray(test_x), test_y)
    preds = baseline_predictions(train_x, train_y, test_x, len(classes), seed=seed)
    report = compare_with_baselines(
        test_y, pred_network, preds, test_subjects, classes, seed=seed, n_resamples=n_resamples
    )
    report["n_train"] = len(train_y)
    report["n_pixels"] = int(np.prod(np.asarray(train_x).shape[1:]))
    return report


def headline_metrics(report: dict[str, Any]) -> dict[str, float | bool | None]:
    """The flat keys that ``reports/metrics.json`` carries, so ``dvc metrics`` shows them."""
    out: dict[str, float | bool | None] = {}
    for name, block in report.get("baselines", {}).items():
        out[f"baseline_{name}_balanced_accuracy"] = block["balanced_accuracy"]
        out[f"beats_{name}_baseline"] = bool(block["beats"])
    pixel = report.get("baselines", {}).get("pixel")
    if pixel:
        out["network_minus_pixel_balanced_accuracy"] = pixel["network_minus_baseline"]["difference"]
    return out
