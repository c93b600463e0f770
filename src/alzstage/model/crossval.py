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
from alzstage.errors import ConfigError, DataError, MissingInputError
from alzstage.files import read_json, write_csv, write_json
from alzstage.result import StageResult

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.tracking import StageRun

ROLES = ("train", "val", "test")


def fold_dir(paths: Paths, fold: int) -> Path:
    return paths.cv_reports / "folds" / f"fold_{fold}"


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
    keep = ["path", "label", "subject", "test_fold", *[f"fold_{i}" for i in range(k)]]
    write_csv(paths.cv_folds, folds[keep])
    summary = folds_summary(folds, params.base.classes, k)
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


# --------------------------------------------------------------------------- cv_fold


def _role_arrays(
    folds: pd.DataFrame, fold: int, role: str, params: Params, paths: Paths
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    from alzstage.model.train import load_rows

    rows = folds[folds[f"fold_{fold}"] == role].reset_index(drop=True)
    where = f"{paths.cv_folds}: fold {fold} has no {role} rows"
    return load_rows(rows, params, paths, where, "too few subjects for cv.folds / cv.val_size")


def run_cv_fold(params: Params, paths: Paths, fold: int, tracker: StageRun | None) -> StageResult:
    """Train on fold ``fold``'s training subjects; predict its test subjects."""
    from alzstage.artifacts import PixelStore
    from alzstage.model.baselines import baseline_predictions, thumbnail_rows
    from alzstage.model.calibration import apply_temperature
    from alzstage.model.feed import predict_array
    from alzstage.model.train import HISTORY_COLUMNS, train_model

    if fold not in params.cv.folds:
        raise ConfigError(
            f"--fold {fold} is not in cv.folds {params.cv.folds}; pass one of those, or "
            "run all folds with `dvc repro cv/dvc.yaml`"
        )
    folds = pd.read_csv(paths.cv_folds, dtype={"test_fold": int}, keep_default_na=False)
    folds = folds.astype({c: str for c in folds.columns if c != "test_fold"})
    x, y, _ = _role_arrays(folds, fold, "train", params, paths)
    x_val, y_val, _ = _role_arrays(folds, fold, "val", params, paths)
    x_test, y_test, test_rows = _role_arrays(folds, fold, "test", params, paths)

    model, summary = train_model(params, x, y, x_val, y_val, tracker)
    probs = apply_temperature(
        predict_array(model, x_test, params.train.batch_size).astype(np.float64),
        summary["temperature"],
    )
    # Baselines fitted on the same training subjects, scored on the same test subjects.
    train_rows = folds[folds[f"fold_{fold}"] == "train"]
    store = PixelStore.read(paths.pixels)
    thumbs_train = thumbnail_rows(store, train_rows["path"])
    thumbs_test = thumbnail_rows(store, test_rows["path"])
    base = baseline_predictions(
        thumbs_train, y, thumbs_test, len(params.base.classes), seed=params.base.seed
    )

    classes = params.base.classes
    preds = test_rows[["path", "label", "subject"]].copy()
    preds["fold"] = fold
    preds["predicted"] = [classes[i] for i in probs.argmax(axis=1)]
    for i, c in enumerate(classes):
        preds[f"p_{c}"] = np.round(probs[:, i], 6)
    for name, pred in base.items():
        preds[f"baseline_{name}"] = [classes[i] for i in pred]
    out = fold_dir(paths, fold)
    pred_file = write_csv(out / "predictions.csv", preds)
    history = pd.DataFrame(summary.pop("history"), columns=HISTORY_COLUMNS)
    hist_file = write_csv(out / "history.csv", history)
    summary.update({"fold": fold, "n_train": len(x), "n_val": len(x_val), "n_test": len(x_test)})
    write_json(out / "train.json", summary)
    acc = float((probs.argmax(axis=1) == y_test).mean())
    metrics = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float))}
    return StageResult(
        metrics={**metrics, "test_accuracy": acc},
        artifacts=[pred_file, hist_file, out / "train.json"],
        # cv.folds_sha links the K fold runs even when DVC re-ran only some of them (then
        # their pipeline ids differ): the same folds.csv means the same CV.
        tags={
            "cv.fold": str(fold),
            "cv.k": str(len(params.cv.folds)),
            "cv.folds_sha": hashlib.sha256(paths.cv_folds.read_bytes()).hexdigest()[:12],
        },
        summary=f"fold {fold}: trained on {len(x)} slices, test accuracy {acc:.3f}",
    )


# --------------------------------------------------------------------------- cv_report


def pool_folds(frames: list[pd.DataFrame], folds: pd.DataFrame) -> pd.DataFrame:
    """Concatenate the folds' test predictions; every testable slice exactly once."""
    pooled = pd.concat(frames, ignore_index=True)
    dup = pooled["path"][pooled["path"].duplicated()]
    if not dup.empty:
        raise DataError(
            f"cv_report: {dup.iloc[0]!r} is predicted by more than one fold; re-run "
            "`dvc repro cv/dvc.yaml` so that every fold comes from the same folds.csv"
        )
    expected = set(folds.loc[folds["test_fold"].astype(int) >= 0, "path"])
    missing = sorted(expected - set(pooled["path"]))
    if missing:
        raise DataError(
            f"cv_report: {len(missing)} slices have no out-of-fold prediction (e.g. "
            f"{missing[0]!r}); a fold is missing or stale: re-run `dvc repro cv/dvc.yaml`"
        )
    return pooled.sort_values("path", kind="stable").reset_index(drop=True)


def fold_spread(pooled: pd.DataFrame, classes: list[str]) -> dict[str, Any]:
    """Balanced accuracy and macro-F1 per fold, then mean and sample sd over folds."""
    from alzstage.model.metrics import summary_metrics

    index = {c: i for i, c in enumerate(classes)}
    rows = []
    for fold, part in pooled.groupby("fold", sort=True):
        y = part["label"].map(index).to_numpy()
        pred = part["predicted"].map(index).to_numpy()
        m = summary_metrics(y, pred, len(classes))
        rows.append({"fold": int(fold), "n_test": len(part), **m})
    out: dict[str, Any] = {"per_fold": rows}
    for key in ("balanced_accuracy", "macro_f1", "accuracy"):
        vals = np.array([r[key] for r in rows], dtype=float)
        out[key] = {
            "mean": float(vals.mean()),
            "sd": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
        }
    return out


def run_cv_report(params: Params, paths: Paths) -> StageResult:
    """Pool the K folds' out-of-fold predictions into one honest estimate."""
    from alzstage.model.baselines import compare_with_baselines
    from alzstage.model.evaluate import build_report, json_safe
    from alzstage.model.headline import model_headline

    classes = params.base.classes
    k = len(params.cv.folds)
    folds = pd.read_csv(paths.cv_folds, dtype=str, keep_default_na=False)
    frames = []
    for fold in params.cv.folds:
        f = fold_dir(paths, fold) / "predictions.csv"
        if not f.exists():
            raise MissingInputError(f"cv_report: {f} is missing; run `dvc repro cv/dvc.yaml`")
        frames.append(pd.read_csv(f, dtype={"path": str, "subject": str}, keep_default_na=False))
    pooled = pool_folds(frames, folds)
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
    report["k"] = k
    report["protocol"] = "subject k-fold (StratifiedGroupKFold), out-of-fold predictions pooled"
    report["recipe"] = params.recipe
    report["fold_spread"] = fold_spread(pooled, classes)
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
    report["folds"] = read_json(paths.cv_reports / "folds.json")
    report = json_safe(report)
    write_json(paths.cv_reports / "report.json", report)
    head = json_safe(model_headline(report))
    write_json(paths.cv_reports / "metrics.json", head)
    oof = write_csv(paths.cv_reports / "predictions_oof.csv", pooled)
    ci = report["ci"].get("balanced_accuracy") or {}
    spread = report["fold_spread"]["balanced_accuracy"]
    verdict = report["baselines"]["baselines"]["pixel"]["verdict"]
    return StageResult(
        metrics={
            **{key: float(v) for key, v in head.items() if isinstance(v, (int, float))},
            "fold_bacc_mean": spread["mean"],
            "fold_bacc_sd": spread["sd"],
            **{
                f"{name}_baseline_bacc": float(b["balanced_accuracy"])
                for name, b in report["baselines"]["baselines"].items()
            },
            "beats_pixel_baseline": float(report["baselines"]["baselines"]["pixel"]["beats"]),
        },
        artifacts=[paths.cv_reports / "report.json", paths.cv_reports / "metrics.json", oof],
        tags={
            "cv.k": str(k),
            "cv.folds_sha": hashlib.sha256(paths.cv_folds.read_bytes()).hexdigest()[:12],
        },
        summary=(
            f"{k}-fold subject CV: pooled balanced accuracy {report['balanced_accuracy']:.3f} "
            f"[95% CI {ci.get('low', float('nan')):.3f}-{ci.get('high', float('nan')):.3f}], "
            f"per fold {spread['mean']:.3f} ± {spread['sd']:.3f}; {verdict}"
        ),
    )
