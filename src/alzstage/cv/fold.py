"""The ``cv_fold@<i>`` stage (DVC ``foreach`` over ``cv.folds``): one fold, every repeat.

Trains on fold i's training subjects, stops early and calibrates on its validation
subjects, and writes under ``reports/cv/folds/fold_<i>/``
(:func:`alzstage.artifacts.fold_dir`):

* ``predictions.csv``: network and baseline predictions of its test slices
  (:func:`alzstage.artifacts.fold_predictions_csv`);
* ``fit_slices.csv``: its training and validation slices' probabilities, on which
  cv_report fits the brain-level model (:func:`alzstage.artifacts.fit_slices_csv`);
* ``history.csv`` and ``train.json``: the training curves and summaries.

It reads ``folds.csv`` (:func:`alzstage.artifacts.read_folds`) and the decode stage's
pixels, never ``data/raw``.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from alzstage.artifacts import (
    fit_slices_csv,
    fold_dir,
    fold_predictions_csv,
    read_folds,
    role_column,
)
from alzstage.config import Params, Paths
from alzstage.errors import AlzstageError, ConfigError
from alzstage.files import write_csv, write_json
from alzstage.result import StageResult

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.tracking import StageRun


def _role_arrays(
    folds: pd.DataFrame, column: str, role: str, params: Params, paths: Paths
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    from alzstage.data.pixels import load_rows

    rows = folds[folds[column] == role].reset_index(drop=True)
    where = f"{paths.cv_folds}: {column} has no {role} rows"
    return load_rows(rows, params, paths, where, "too few subjects for cv.folds / cv.val_size")


def _slice_table(
    rows: pd.DataFrame, probs: np.ndarray, morph: np.ndarray, classes: list[str], **cols: object
) -> pd.DataFrame:
    """Rows' ids, labels, calibrated probabilities and atrophy measurements, one per slice."""
    from alzstage.data.morphometry import MORPH_FEATURES

    out = rows[["path", "label", "subject"]].copy()
    for name, value in cols.items():
        out[name] = value
    out["predicted"] = [classes[i] for i in probs.argmax(axis=1)]
    for i, c in enumerate(classes):
        out[f"p_{c}"] = np.round(probs[:, i], 6)
    for j, name in enumerate(MORPH_FEATURES):
        out[name] = np.round(morph[:, j], 6)
    return out


def _fold_repeat(
    params: Params, paths: Paths, folds: pd.DataFrame, fold: int, repeat: int, tracker: Any
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Train fold ``fold`` of ``repeat``; predict its test slices and its training and
    validation slices (the brain-level model is fitted on those in cv_report)."""
    from alzstage.artifacts import PixelStore
    from alzstage.data.morphometry import MORPH_FEATURES
    from alzstage.evaluate.baselines import baseline_predictions, thumbnail_rows
    from alzstage.model.calibration import apply_temperature
    from alzstage.train.feed import predict_array
    from alzstage.train.recipe import HISTORY_COLUMNS, train_model

    column = role_column(fold, repeat)
    x, y, train_rows = _role_arrays(folds, column, "train", params, paths)
    x_val, y_val, val_rows = _role_arrays(folds, column, "val", params, paths)
    x_test, _, test_rows = _role_arrays(folds, column, "test", params, paths)
    model, summary = train_model(params, x, y, x_val, y_val, tracker)

    def probs(images: np.ndarray) -> np.ndarray:
        raw = predict_array(model, images, params.train.batch_size).astype(np.float64)
        return apply_temperature(raw, summary["temperature"])

    store = PixelStore.read(paths.pixels)
    classes = params.base.classes

    def table(rows: pd.DataFrame, images: np.ndarray, **cols: object) -> pd.DataFrame:
        morph = store.feature_columns_for(rows["path"], MORPH_FEATURES)
        return _slice_table(rows, probs(images), morph, classes, fold=fold, repeat=repeat, **cols)

    preds = table(test_rows, x_test)
    # Baselines fitted on the same training subjects, scored on the same test subjects.
    base = baseline_predictions(
        thumbnail_rows(store, train_rows["path"]),
        y,
        thumbnail_rows(store, test_rows["path"]),
        len(classes),
        seed=params.base.seed,
    )
    for name, pred in base.items():
        preds[f"baseline_{name}"] = [classes[i] for i in pred]
    fit = pd.concat(
        [table(train_rows, x, role="train"), table(val_rows, x_val, role="val")],
        ignore_index=True,
    )
    history = pd.DataFrame(summary.pop("history"), columns=HISTORY_COLUMNS).assign(repeat=repeat)
    summary.update({"fold": fold, "repeat": repeat, "n_train": len(x), "n_val": len(x_val)})
    summary["n_test"] = len(x_test)
    return preds, fit, history, summary


def _read_fold_roles(params: Params, paths: Paths, fold: int) -> pd.DataFrame:
    """``folds.csv``, refused unless it holds ``fold`` in every repeat params ask for."""
    if fold not in params.cv.folds:
        raise ConfigError(
            f"--fold {fold} is not in cv.folds {params.cv.folds}; pass one of those, or "
            "run all folds with `dvc repro cv/dvc.yaml`"
        )
    folds = read_folds(paths.cv_folds)
    if role_column(fold, params.cv.repeats - 1) not in folds:
        raise AlzstageError(
            f"{paths.cv_folds}: has no folds for cv.repeats={params.cv.repeats}; re-run "
            "`alzstage cv-split` (or `dvc repro cv/dvc.yaml`)"
        )
    return folds


def run_cv_fold(params: Params, paths: Paths, fold: int, tracker: StageRun | None) -> StageResult:
    """Train on fold ``fold``'s training subjects, once per repeat; predict its brains.

    Writes ``predictions.csv`` (test slices, with the baselines), ``fit_slices.csv``
    (the training and validation slices' probabilities, for the brain-level model),
    ``history.csv`` and ``train.json`` under ``reports/cv/folds/fold_<i>/``. Repeat 0's
    training curves go to the stage's MLflow run; later repeats log their summaries.
    """
    from alzstage.data.morphometry import MORPH_FEATURES
    from alzstage.train.recipe import is_timing

    folds = _read_fold_roles(params, paths, fold)
    parts = [
        _fold_repeat(params, paths, folds, fold, r, tracker if r == 0 else None)
        for r in range(params.cv.repeats)
    ]
    out = fold_dir(paths, fold)
    classes = params.base.classes
    pred_file = fold_predictions_csv(classes, MORPH_FEATURES).write(
        pd.concat([p[0] for p in parts]), out / "predictions.csv"
    )
    fit_file = fit_slices_csv(classes, MORPH_FEATURES).write(
        pd.concat([p[1] for p in parts]), out / "fit_slices.csv"
    )
    # No durations in DVC outputs (they made identical folds hash differently); the
    # run's MLflow metrics keep them.
    history = pd.concat([p[2] for p in parts])
    hist_file = write_csv(out / "history.csv", history.drop(columns=filter(is_timing, history)))
    summaries = [p[3] for p in parts]
    timeless = [{k: v for k, v in s.items() if not is_timing(k)} for s in summaries]
    write_json(out / "train.json", {"fold": fold, "repeats": timeless})
    accs = [float((p[0]["predicted"] == p[0]["label"]).mean()) for p in parts]
    return StageResult(
        metrics=_fold_metrics(summaries, accs),
        artifacts=[pred_file, fit_file, hist_file, out / "train.json"],
        # cv.folds_sha links the K fold runs even when DVC re-ran only some of them (then
        # their pipeline ids differ): the same folds.csv means the same CV.
        tags={
            "cv.fold": str(fold),
            "cv.k": str(len(params.cv.folds)),
            "cv.repeats": str(params.cv.repeats),
            "cv.folds_sha": hashlib.sha256(paths.cv_folds.read_bytes()).hexdigest()[:12],
        },
        summary=(
            f"fold {fold}: {len(parts)} repeat(s), trained on {summaries[0]['n_train']} "
            f"slices, test accuracy {', '.join(f'{a:.3f}' for a in accs)}"
        ),
    )


def _fold_metrics(summaries: list[dict[str, Any]], accs: list[float]) -> dict[str, float]:
    """Each repeat's numeric summary and test accuracy (repeat r > 0 prefixed ``r<r>_``)."""
    metrics: dict[str, float] = {}
    for r, summary in enumerate(summaries):
        prefix = "" if r == 0 else f"r{r}_"
        metrics.update(
            {prefix + k: float(v) for k, v in summary.items() if isinstance(v, (int, float))}
        )
        metrics[prefix + "test_accuracy"] = accs[r]
    return metrics
