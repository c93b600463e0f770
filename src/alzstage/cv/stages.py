"""Subject-level K-fold cross-validation: fold roles, one training per fold, pooled report.

One test split of 32 subjects gives a balanced accuracy whose 95% CI is about 0.12 wide
on the real archive, and one lucky or unlucky draw of test subjects can move it more
than a change of recipe does. K-fold tests every subject exactly once, so the pooled
out-of-fold predictions cover all 160 subjects and the subject bootstrap narrows.

The three stages live in ``cv/dvc.yaml`` (``dvc repro cv/dvc.yaml``), separate from the
default pipeline because K trainings cost K times the default run:

- ``cv_split``: ``data/processed/split.csv`` (its recovered subjects) ->
  ``data/processed/cv/folds.csv``, one ``fold_<i>`` role column per fold
  (:func:`alzstage.data.split.subject_folds`) and ``reports/cv/folds.json``;
- ``cv_fold@<i>`` (DVC ``foreach`` over ``cv.folds``): trains on fold i's training
  subjects, stops early and calibrates on its validation subjects, and writes
  ``reports/cv/folds/fold_<i>/predictions.csv`` (network and baseline predictions for its
  test subjects) and ``reports/cv/folds/fold_<i>/train.json``;
- ``cv_report``: pools the folds into ``reports/cv/predictions_oof.csv``,
  ``reports/cv/report.json`` (subject-bootstrap CIs, per-fold spread, baselines with
  paired CIs) and the headline ``reports/cv/metrics.json`` (a DVC metric).

Promotion does not use fold models: they are not saved. The model that ``promote``
registers is the default pipeline's single-split model, whose test subjects are the ones
its metrics describe; CV says how much to trust that recipe, not which weights to serve.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from alzstage.artifacts import read_split
from alzstage.config import Params, Paths
from alzstage.errors import AlzstageError, ConfigError
from alzstage.files import read_json, write_csv, write_json
from alzstage.result import StageResult

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.tracking import StageRun

ROLES = ("train", "val", "test")


def fold_dir(paths: Paths, fold: int) -> Path:
    return paths.cv_reports / "folds" / f"fold_{fold}"


def role_column(fold: int, repeat: int = 0) -> str:
    """``folds.csv``'s role column of ``fold`` in ``repeat`` (repeat 0: ``fold_<i>``)."""
    return f"fold_{fold}" if repeat == 0 else f"r{repeat}_fold_{fold}"


def test_column(repeat: int = 0) -> str:
    """``folds.csv``'s column naming the fold that tests each row in ``repeat``."""
    return "test_fold" if repeat == 0 else f"r{repeat}_test_fold"


# --------------------------------------------------------------------------- cv_split


def folds_summary(folds: pd.DataFrame, classes: list[str], k: int) -> dict[str, Any]:
    """Subjects and images per fold, role and class; and the every-subject-once check."""
    per_fold: dict[str, Any] = {}
    for fold in range(k):
        role = folds[f"fold_{fold}"]
        per_fold[str(fold)] = {
            r: {
                c: int(folds.loc[(role == r) & (folds["label"] == c), "subject"].nunique())
                for c in classes
            }
            for r in ROLES
        }
    tested = folds.loc[folds["test_fold"] >= 0].groupby("subject")["test_fold"].nunique()
    never = sorted(set(folds["subject"]) - set(tested.index))
    return {
        "k": k,
        "n_subjects": int(folds["subject"].nunique()),
        "n_images": len(folds),
        "subjects_tested_once": int((tested == 1).sum()),
        "subjects_never_tested": never,
        "subjects_per_fold_role_class": per_fold,
    }


def run_cv_split(params: Params, paths: Paths) -> StageResult:
    """``data/processed/split.csv`` -> ``data/processed/cv/folds.csv`` + folds.json."""
    from alzstage.data.split import subject_folds

    split = read_split(paths.split_file)
    k = len(params.cv.folds)
    folds = subject_folds(split.drop(columns=["split"]), params)
    for r in range(1, params.cv.repeats):  # new folds per repeat, same rows (sorted by path)
        again = subject_folds(split.drop(columns=["split"]), params, repeat=r)
        folds[test_column(r)] = again["test_fold"].to_numpy()
        for i in range(k):
            folds[role_column(i, r)] = again[f"fold_{i}"].to_numpy()
    keep = [
        "path",
        "label",
        "subject",
        *[c for r in range(params.cv.repeats) for c in (test_column(r), *_roles(k, r))],
    ]
    write_csv(paths.cv_folds, folds[keep])
    summary = folds_summary(folds, params.base.classes, k)
    summary["repeats"] = params.cv.repeats
    summary["tiny_classes"] = folds.attrs.get("tiny_classes", {})
    write_json(paths.cv_reports / "folds.json", summary)
    return StageResult(
        metrics={"k": float(k), "n_subjects": float(summary["n_subjects"])},
        artifacts=[paths.cv_folds, paths.cv_reports / "folds.json"],
        summary=(
            f"{k} subject folds over {summary['n_subjects']} subjects "
            f"({summary['subjects_tested_once']} tested exactly once)"
        ),
    )


def _roles(k: int, repeat: int) -> list[str]:
    return [role_column(i, repeat) for i in range(k)]


# --------------------------------------------------------------------------- cv_fold


def _role_arrays(
    folds: pd.DataFrame, column: str, role: str, params: Params, paths: Paths
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    from alzstage.data.pixels import load_rows

    rows = folds[folds[column] == role].reset_index(drop=True)
    where = f"{paths.cv_folds}: {column} has no {role} rows"
    return load_rows(rows, params, paths, where, "too few subjects for cv.folds / cv.val_size")


def read_folds(paths: Paths) -> pd.DataFrame:
    """``folds.csv`` with its test-fold columns as integers and every other as text."""
    folds = pd.read_csv(paths.cv_folds, dtype=str, keep_default_na=False)
    tests = [c for c in folds.columns if c == "test_fold" or c.endswith("_test_fold")]
    return folds.astype(dict.fromkeys(tests, int))


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


def run_cv_fold(params: Params, paths: Paths, fold: int, tracker: StageRun | None) -> StageResult:
    """Train on fold ``fold``'s training subjects, once per repeat; predict its brains.

    Writes ``predictions.csv`` (test slices, with the baselines), ``fit_slices.csv``
    (the training and validation slices' probabilities, for the brain-level model),
    ``history.csv`` and ``train.json`` under ``reports/cv/folds/fold_<i>/``. Repeat 0's
    training curves go to the stage's MLflow run; later repeats log their summaries.
    """
    if fold not in params.cv.folds:
        raise ConfigError(
            f"--fold {fold} is not in cv.folds {params.cv.folds}; pass one of those, or "
            "run all folds with `dvc repro cv/dvc.yaml`"
        )
    folds = read_folds(paths)
    if role_column(fold, params.cv.repeats - 1) not in folds:
        raise AlzstageError(
            f"{paths.cv_folds}: has no folds for cv.repeats={params.cv.repeats}; re-run "
            "`alzstage cv-split` (or `dvc repro cv/dvc.yaml`)"
        )
    parts = [
        _fold_repeat(params, paths, folds, fold, r, tracker if r == 0 else None)
        for r in range(params.cv.repeats)
    ]
    out = fold_dir(paths, fold)
    pred_file = write_csv(out / "predictions.csv", pd.concat([p[0] for p in parts]))
    fit_file = write_csv(out / "fit_slices.csv", pd.concat([p[1] for p in parts]))
    hist_file = write_csv(out / "history.csv", pd.concat([p[2] for p in parts]))
    summaries = [p[3] for p in parts]
    write_json(out / "train.json", {"fold": fold, "repeats": summaries})
    accs = [float((p[0]["predicted"] == p[0]["label"]).mean()) for p in parts]
    metrics: dict[str, float] = {}
    for r, summary in enumerate(summaries):
        prefix = "" if r == 0 else f"r{r}_"
        metrics.update(
            {prefix + k: float(v) for k, v in summary.items() if isinstance(v, (int, float))}
        )
        metrics[prefix + "test_accuracy"] = accs[r]
    return StageResult(
        metrics=metrics,
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


# --------------------------------------------------------------------------- cv_report


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
        column = test_column(int(repeat))
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


def _read_fold_files(paths: Paths, params: Params, name: str) -> list[pd.DataFrame]:
    frames = []
    for fold in params.cv.folds:
        f = fold_dir(paths, fold) / name
        if not f.exists():
            raise AlzstageError(f"cv_report: {f} is missing; run `dvc repro cv/dvc.yaml`")
        frames.append(pd.read_csv(f, dtype={"path": str, "subject": str}, keep_default_na=False))
    return frames


def slice_cv_report(pooled: pd.DataFrame, params: Params) -> dict[str, Any]:
    """The slice-level pooled report (every repeat's out-of-fold slices) with baselines."""
    from alzstage.evaluate.baselines import compare_with_baselines
    from alzstage.evaluate.stage import build_report

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
    base_preds = {
        name: pooled[f"baseline_{name}"].map(index).to_numpy()
        for name in ("majority", "nearest", "pixel")
    }
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


def run_cv_report(params: Params, paths: Paths) -> StageResult:
    """Pool the folds' out-of-fold predictions (every repeat) into one honest estimate:
    slice level, and brain level with the brain model fitted inside each fold."""
    from alzstage.cv.brain import assert_disjoint, brain_cv_report, cv_brains
    from alzstage.evaluate.headline import cv_headline
    from alzstage.evaluate.stage import json_safe

    classes = params.base.classes
    k = len(params.cv.folds)
    folds = read_folds(paths)
    pooled = pool_folds(_read_fold_files(paths, params, "predictions.csv"), folds)
    fit = pd.concat(_read_fold_files(paths, params, "fit_slices.csv"), ignore_index=True)
    assert_disjoint(fit, pooled)
    report = slice_cv_report(pooled, params)
    report.update(k=k, repeats=int(pooled["repeat"].nunique()), recipe=params.recipe)
    report["protocol"] = "subject k-fold (StratifiedGroupKFold), out-of-fold predictions pooled"
    report["fold_spread"] = fold_spread(pooled, classes)
    brains = cv_brains(pooled, fit, classes, params.brain, params.base.seed)
    report["brain_level"] = brain_cv_report(
        brains, classes, params.brain, seed=params.base.seed, n_resamples=params.cv.bootstrap
    )
    report["folds"] = read_json(paths.cv_reports / "folds.json")
    report = json_safe(report)
    write_json(paths.cv_reports / "report.json", report)
    head = json_safe(cv_headline(report))
    write_json(paths.cv_reports / "metrics.json", head)
    oof = write_csv(paths.cv_reports / "predictions_oof.csv", pooled)
    brains_file = write_csv(paths.cv_reports / "brains_oof.csv", brains)
    brain = report["brain_level"]
    best = brain["scores"]["predictors"][brain["default"]]
    ci = best["ci"]["balanced_accuracy_main"] or {}
    cover = brain["conformal"][brain["conformal"]["selected"]]
    return StageResult(
        metrics={
            **{key: float(v) for key, v in head.items() if isinstance(v, (int, float))},
            "slice_bacc": float(report["balanced_accuracy"]),
            **{
                f"brain_{name}_bacc_main": float(p["balanced_accuracy_main"])
                for name, p in brain["scores"]["predictors"].items()
            },
            "coverage": float(cover["coverage"]),
            "mean_set_size": float(cover["mean_set_size"]),
        },
        artifacts=[
            paths.cv_reports / "report.json",
            paths.cv_reports / "metrics.json",
            oof,
            brains_file,
        ],
        tags={
            "cv.k": str(k),
            "cv.repeats": str(report["repeats"]),
            "cv.folds_sha": hashlib.sha256(paths.cv_folds.read_bytes()).hexdigest()[:12],
        },
        summary=(
            f"{k}-fold subject CV x{report['repeats']}: brain-level ({brain['default']}) "
            f"balanced accuracy {best['balanced_accuracy_main']:.3f} over "
            f"{len(brain['scores']['main_classes'])} classes [95% CI "
            f"{ci.get('low', float('nan')):.3f}-{ci.get('high', float('nan')):.3f}], "
            f"{best['balanced_accuracy']:.3f} over all; {cover['nominal']:.0%} sets cover "
            f"{cover['coverage']:.3f} at mean size {cover['mean_set_size']:.2f}"
        ),
    )
