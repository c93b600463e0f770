"""The ``cv_split`` stage: every subject to one test fold, plus validation subjects per fold.

``data/processed/split.csv`` (its recovered subjects) -> ``data/processed/cv/folds.csv``,
one ``fold_<i>`` role column per fold and repeat (:func:`alzstage.data.split.subject_folds`,
the contract :func:`alzstage.artifacts.read_folds`) and its summary
``reports/cv/folds.json`` (:class:`alzstage.artifacts.FoldsReport`).

Why K folds at all: one test split of 32 subjects gives a balanced accuracy whose 95% CI
is about 0.12 wide on the real archive, and one lucky or unlucky draw of test subjects
can move it more than a change of recipe does. K-fold tests every subject exactly once,
so the pooled out-of-fold predictions cover all 160 subjects and the subject bootstrap
narrows. The three CV stages live in ``cv/dvc.yaml`` (``dvc repro cv/dvc.yaml``),
separate from the default pipeline because K trainings cost K times the default run;
``cv_fold`` (:mod:`alzstage.cv.fold`) trains each fold and ``cv_report``
(:mod:`alzstage.cv.report`) pools them.

Promotion does not use fold models: they are not saved. The model that ``promote``
registers is the default pipeline's single-split model, whose test subjects are the ones
its metrics describe; CV says how much to trust that recipe, not which weights to serve.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from alzstage.artifacts import (
    CV_ROLES,
    FoldsReport,
    fold_test_column,
    read_split,
    role_column,
    write_folds,
)
from alzstage.config import Params, Paths
from alzstage.result import StageResult


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
            for r in CV_ROLES
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
        folds[fold_test_column(r)] = again["test_fold"].to_numpy()
        for i in range(k):
            folds[role_column(i, r)] = again[f"fold_{i}"].to_numpy()
    keep = [
        "path",
        "label",
        "subject",
        *[c for r in range(params.cv.repeats) for c in (fold_test_column(r), *_roles(k, r))],
    ]
    write_folds(folds[keep], paths.cv_folds)
    summary = folds_summary(folds, params.base.classes, k)
    summary["repeats"] = params.cv.repeats
    summary["tiny_classes"] = folds.attrs.get("tiny_classes", {})
    folds_json = FoldsReport.check(summary, paths.cv_reports / "folds.json").write(
        paths.cv_reports / "folds.json"
    )
    return StageResult(
        metrics={"k": float(k), "n_subjects": float(summary["n_subjects"])},
        artifacts=[paths.cv_folds, folds_json],
        summary=(
            f"{k} subject folds over {summary['n_subjects']} subjects "
            f"({summary['subjects_tested_once']} tested exactly once)"
        ),
    )


def _roles(k: int, repeat: int) -> list[str]:
    return [role_column(i, repeat) for i in range(k)]
