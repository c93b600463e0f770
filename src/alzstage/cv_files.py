"""The CV's files: ``folds.csv``, ``folds.json`` and each fold's tables.

Contracts like those of :mod:`alzstage.artifacts` (which re-exports them, so every file one
stage writes and another reads is found there), kept apart because they are the CV's own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

# Re-exported: every stage-to-stage file is found here, whatever module defines it.
from alzstage.contract import Artifact as Artifact
from alzstage.contract import Column, CsvContract, rerun
from alzstage.errors import AlzstageError
from alzstage.pixel_store import PixelsMeta as PixelsMeta
from alzstage.pixel_store import PixelStore as PixelStore

if TYPE_CHECKING:
    import pandas as pd

    from alzstage.config import Paths


# --------------------------------------------------------------------------- the CV's files

#: A subject's role in one fold: trains, stops early and calibrates, or is tested.
CV_ROLES = ("train", "val", "test")
#: The slice baselines each fold predicts its test slices with (``baseline_<name>``).
CV_BASELINES = ("majority", "nearest", "pixel")


def role_column(fold: int, repeat: int = 0) -> str:
    """``folds.csv``'s role column of ``fold`` in ``repeat`` (repeat 0: ``fold_<i>``)."""
    return f"fold_{fold}" if repeat == 0 else f"r{repeat}_fold_{fold}"


def fold_test_column(repeat: int = 0) -> str:
    """``folds.csv``'s column naming the fold that tests each row in ``repeat`` (-1: none)."""
    return "test_fold" if repeat == 0 else f"r{repeat}_test_fold"


def fold_dir(paths: Paths, fold: int) -> Path:
    """Where cv_fold ``fold`` writes its files (``reports/cv/folds/fold_<i>``)."""
    return paths.cv_reports / "folds" / f"fold_{fold}"


def folds_csv(k: int, repeats: int) -> CsvContract:
    """``folds.csv`` of ``k`` folds and ``repeats`` repeats: per repeat its test column,
    then one role column per fold."""
    per_repeat = (
        (
            Column(fold_test_column(r), int),
            *(Column(role_column(i, r), allowed=CV_ROLES) for i in range(k)),
        )
        for r in range(repeats)
    )
    columns = (Column("path"), Column("label"), Column("subject"))
    return CsvContract(written_by="cv_split", columns=columns + sum(per_repeat, ()))


def _fold_shape(columns: Iterable[str]) -> tuple[int, int]:
    """(k, repeats) that ``folds.csv``'s header declares (0 folds: no role column)."""
    import re

    columns = list(columns)
    k = sum(1 for c in columns if re.fullmatch(r"fold_\d+", c))
    later = [int(m[1]) for c in columns if (m := re.fullmatch(r"r(\d+)_test_fold", c))]
    return k, 1 + max(later, default=0)


def _fold_problem(df: pd.DataFrame, k: int, repeats: int) -> str | None:
    """A row whose test column and role columns disagree, or None."""
    for r in range(repeats):
        test = df[fold_test_column(r)]
        outside = (test < -1) | (test >= k)
        if outside.any():
            return f"column {fold_test_column(r)} holds {test[outside].iloc[0]}, not -1..{k - 1}"
        for i in range(k):
            bad = (test == i) != (df[role_column(i, r)] == "test")
            if bad.any():
                row = int(bad.to_numpy().nonzero()[0][0])
                return (
                    f"row {row + 1}: {fold_test_column(r)} is {test.iloc[row]} but "
                    f"{role_column(i, r)} is {df[role_column(i, r)].iloc[row]!r}"
                )
    return None


def read_folds(path: Path) -> pd.DataFrame:
    """``folds.csv`` typed (test columns integers, roles checked) and self-consistent.

    The number of folds and repeats is read from the header: a caller checks that they
    are the ones params ask for.
    """
    import pandas as pd

    try:
        header = pd.read_csv(path, nrows=0).columns
    except (FileNotFoundError, pd.errors.EmptyDataError):
        header = pd.Index([])  # the contract's read names the problem
    k, repeats = _fold_shape(header)
    contract = folds_csv(max(k, 1), repeats)
    df = contract.read(path)
    problem = _fold_problem(df, k, repeats)
    if problem:
        raise AlzstageError(f"{path}: {problem}; {rerun('cv_split')} again")
    return df


def write_folds(df: pd.DataFrame, path: Path) -> Path:
    """Check ``df`` against the folds contract its columns declare, and write it."""
    k, repeats = _fold_shape(df.columns)
    typed = folds_csv(max(k, 1), repeats).check(df, path)
    problem = _fold_problem(typed, k, repeats)
    if problem:
        raise AlzstageError(f"{path}: not written, {problem}")
    return folds_csv(k, repeats).write(df, path)


class TinyClass(Artifact):
    """A class with fewer subjects than ``split.min_subjects_per_class``, and what was done."""

    written_by: ClassVar[str] = "cv_split"

    n_subjects: int
    n_images: int
    min_subjects_per_class: int
    policy: str
    decision: str


class FoldsReport(Artifact):
    """``reports/cv/folds.json``: subjects per fold, role and class; cv_report copies it."""

    written_by: ClassVar[str] = "cv_split"

    k: int
    repeats: int
    n_subjects: int
    n_images: int
    subjects_tested_once: int
    subjects_never_tested: list[str]
    #: fold -> role -> class -> subjects (repeat 0's folds)
    subjects_per_fold_role_class: dict[str, dict[str, dict[str, int]]]
    tiny_classes: dict[str, TinyClass]


def _fold_slices_columns(classes: Sequence[str], features: Sequence[str]) -> tuple[Column, ...]:
    return (
        Column("path"),
        Column("label", allowed=tuple(classes)),
        Column("subject"),
        Column("fold", int),
        Column("repeat", int),
        Column("role", required=False, allowed=("train", "val")),
        Column("predicted", allowed=tuple(classes)),
        *(Column(f"p_{c}", float) for c in classes),
        *(Column(name, float) for name in features),
    )


def fold_predictions_csv(classes: Sequence[str], features: Sequence[str]) -> CsvContract:
    """A fold's ``predictions.csv``: its test slices' calibrated probabilities, atrophy
    ``features`` and the baselines' predictions, one row per slice and repeat."""
    baselines = tuple(Column(f"baseline_{b}", allowed=tuple(classes)) for b in CV_BASELINES)
    columns = _fold_slices_columns(classes, features) + baselines
    return CsvContract(written_by="cv_fold", columns=columns, native_numbers=True)


def fit_slices_csv(classes: Sequence[str], features: Sequence[str]) -> CsvContract:
    """A fold's ``fit_slices.csv``: its training and validation slices (``role``), on
    which cv_report fits and calibrates the brain model."""
    columns = tuple(
        replace(c, required=True) if c.name == "role" else c
        for c in _fold_slices_columns(classes, features)
    )
    return CsvContract(written_by="cv_fold", columns=columns, native_numbers=True)
