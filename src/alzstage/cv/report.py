"""The ``cv_report`` stage: the folds' out-of-fold predictions pooled into one estimate.

Reads ``folds.csv`` (:func:`alzstage.artifacts.read_folds`), its summary
``reports/cv/folds.json`` (:class:`alzstage.artifacts.FoldsReport`) and every fold's
``predictions.csv`` and ``fit_slices.csv``
(:func:`alzstage.artifacts.fold_predictions_csv`, :func:`~alzstage.artifacts.fit_slices_csv`),
and writes ``reports/cv/predictions_oof.csv``, ``reports/cv/brains_oof.csv``,
``reports/cv/report.json`` (subject-bootstrap CIs, per-fold spread, baselines with paired
CIs, the brain level of :mod:`alzstage.cv.brain`) and its headline
``reports/cv/metrics.json``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pandas as pd

from alzstage.artifacts import (
    CV_BASELINES,
    FoldsReport,
    fit_slices_csv,
    fold_dir,
    fold_predictions_csv,
    fold_test_column,
    read_folds,
)
from alzstage.config import Params, Paths
from alzstage.contract import CsvContract
from alzstage.errors import AlzstageError
from alzstage.files import write_csv, write_json
from alzstage.result import StageResult


def pool_folds(frames: list[pd.DataFrame], folds: pd.DataFrame) -> pd.DataFrame:
    """Concatenate the folds' test predictions; every testable slice once per repeat."""
    pooled = pd.concat(frames, ignore_index=True)
    if "repeat" not in pooled:
        pooled["repeat"] = 0
    dup = pooled["path"][pooled.duplicated(["repeat", "path"])]
    if not dup.empty:
        raise AlzstageError(
            f"cv_report: {dup.iloc[0]!r} is predicted by more than one fold; re-run "
            "`dvc repro cv/dvc.yaml` so that every fold comes from the same folds.csv"
        )
    for repeat, part in pooled.groupby("repeat"):
        column = fold_test_column(int(repeat))
        expected = (
            set(folds.loc[folds[column].astype(int) >= 0, "path"]) if column in folds else set()
        )
        missing = sorted(expected - set(part["path"]))
        if missing or column not in folds:
            raise AlzstageError(
                f"cv_report: {len(missing)} slices of repeat {repeat} have no out-of-fold "
                f"prediction (e.g. {missing[0] if missing else column!r}); a fold is missing or "
                "stale: re-run `dvc repro cv/dvc.yaml`"
            )
    return pooled.sort_values(["repeat", "path"], kind="stable").reset_index(drop=True)


def fold_spread(pooled: pd.DataFrame, classes: list[str]) -> dict[str, Any]:
    """Balanced accuracy and macro-F1 per fold, then mean and sample sd over folds."""
    from alzstage.model.metrics import summary_metrics

    index = {c: i for i, c in enumerate(classes)}
    rows = []
    keys = ["repeat", "fold"] if "repeat" in pooled else ["fold"]
    for key, part in pooled.groupby(keys, sort=True):
        fold = key[-1] if isinstance(key, tuple) else key
        y = part["label"].map(index).to_numpy()
        pred = part["predicted"].map(index).to_numpy()
        m = summary_metrics(y, pred, len(classes))
        repeat = int(key[0]) if isinstance(key, tuple) else 0
        rows.append({"repeat": repeat, "fold": int(fold), "n_test": len(part), **m})
    out: dict[str, Any] = {"per_fold": rows}
    for key in ("balanced_accuracy", "macro_f1", "accuracy"):
        vals = np.array([r[key] for r in rows], dtype=float)
        out[key] = {
            "mean": float(vals.mean()),
            "sd": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
        }
    return out


def _read_fold_files(
    paths: Paths, params: Params, name: str, contract: CsvContract
) -> list[pd.DataFrame]:
    """Every fold's ``name``, each checked against ``contract``."""
    return [contract.read(fold_dir(paths, fold) / name) for fold in params.cv.folds]


def slice_cv_report(pooled: pd.DataFrame, params: Params) -> dict[str, Any]:
    """The slice-level pooled report (every repeat's out-of-fold slices) with baselines."""
    from alzstage.evaluate.baselines import compare_with_baselines
    from alzstage.evaluate.report import build_report

    classes = params.base.classes
    index = {c: i for i, c in enumerate(classes)}
    y = pooled["label"].map(index).to_numpy(np.int64)
    probs = pooled[[f"p_{c}" for c in classes]].to_numpy(np.float64)
    subjects = pooled["subject"].astype(str).to_numpy()
    # Each fold's probabilities are already calibrated by its own temperature.
    report = build_report(
        y,
        probs,
        classes,
        temperature=1.0,
        temperature_source="per fold (each fold's validation subjects)",
        subjects=subjects,
        subject_ids="pseudo" if pooled["subject"].str.startswith("pseudo-").any() else "given",
        seed=params.base.seed,
        n_resamples=params.cv.bootstrap,
    )
    base_preds = {name: pooled[f"baseline_{name}"].map(index).to_numpy() for name in CV_BASELINES}
    report["baselines"] = compare_with_baselines(
        y,
        probs.argmax(axis=1),
        base_preds,
        subjects,
        classes,
        seed=params.base.seed,
        n_resamples=params.cv.bootstrap,
    )
    return report


def cv_report(params: Params, paths: Paths) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """The pooled report, the out-of-fold slices and the out-of-fold brain table."""
    from alzstage.cv.brain import assert_disjoint, brain_cv_report, cv_brains
    from alzstage.data.morphometry import MORPH_FEATURES

    classes = params.base.classes
    folds = read_folds(paths.cv_folds)
    preds = fold_predictions_csv(classes, MORPH_FEATURES)
    pooled = pool_folds(_read_fold_files(paths, params, "predictions.csv", preds), folds)
    fits = _read_fold_files(
        paths, params, "fit_slices.csv", fit_slices_csv(classes, MORPH_FEATURES)
    )
    fit = pd.concat(fits, ignore_index=True)
    assert_disjoint(fit, pooled)
    report = slice_cv_report(pooled, params)
    report.update(k=len(params.cv.folds), repeats=int(pooled["repeat"].nunique()))
    report["recipe"] = params.recipe
    report["protocol"] = "subject k-fold (StratifiedGroupKFold), out-of-fold predictions pooled"
    report["fold_spread"] = fold_spread(pooled, classes)
    brains = cv_brains(pooled, fit, classes, params.brain, params.base.seed)
    report["brain_level"] = brain_cv_report(
        brains, classes, params.brain, seed=params.base.seed, n_resamples=params.cv.bootstrap
    )
    report["folds"] = FoldsReport.read(paths.cv_reports / "folds.json").model_dump(mode="json")
    return report, pooled, brains


def run_cv_report(params: Params, paths: Paths) -> StageResult:
    """Pool the folds' out-of-fold predictions (every repeat) into one honest estimate:
    slice level, and brain level with the brain model fitted inside each fold."""
    from alzstage.evaluate.headline import cv_headline
    from alzstage.evaluate.report import json_safe

    report, pooled, brains = cv_report(params, paths)
    report = json_safe(report)
    write_json(paths.cv_reports / "report.json", report)
    head = json_safe(cv_headline(report))
    write_json(paths.cv_reports / "metrics.json", head)
    oof = write_csv(paths.cv_reports / "predictions_oof.csv", pooled)
    brains_file = write_csv(paths.cv_reports / "brains_oof.csv", brains)
    return StageResult(
        metrics=_report_metrics(report, head),
        artifacts=[
            paths.cv_reports / "report.json",
            paths.cv_reports / "metrics.json",
            oof,
            brains_file,
        ],
        tags={
            "cv.k": str(report["k"]),
            "cv.repeats": str(report["repeats"]),
            "cv.folds_sha": hashlib.sha256(paths.cv_folds.read_bytes()).hexdigest()[:12],
        },
        summary=_summary(report),
    )


def _report_metrics(report: dict[str, Any], head: dict[str, Any]) -> dict[str, float]:
    """What the stage's MLflow run logs: the headline, slice and brain accuracies, cover."""
    brain = report["brain_level"]
    cover = brain["conformal"][brain["conformal"]["selected"]]
    return {
        **{key: float(v) for key, v in head.items() if isinstance(v, (int, float))},
        "slice_bacc": float(report["balanced_accuracy"]),
        **{
            f"brain_{name}_bacc_main": float(p["balanced_accuracy_main"])
            for name, p in brain["scores"]["predictors"].items()
        },
        "coverage": float(cover["coverage"]),
        "mean_set_size": float(cover["mean_set_size"]),
    }


def _summary(report: dict[str, Any]) -> str:
    """One line: the configured brain model's accuracy with its CI, and the set coverage."""
    brain = report["brain_level"]
    best = brain["scores"]["predictors"][brain["default"]]
    ci = best["ci"]["balanced_accuracy_main"] or {}
    cover = brain["conformal"][brain["conformal"]["selected"]]
    return (
        f"{report['k']}-fold subject CV x{report['repeats']}: brain-level ({brain['default']}) "
        f"balanced accuracy {best['balanced_accuracy_main']:.3f} over "
        f"{len(brain['scores']['main_classes'])} classes [95% CI "
        f"{ci.get('low', float('nan')):.3f}-{ci.get('high', float('nan')):.3f}], "
        f"{best['balanced_accuracy']:.3f} over all; {cover['nominal']:.0%} sets cover "
        f"{cover['coverage']:.3f} at mean size {cover['mean_set_size']:.2f}"
    )
