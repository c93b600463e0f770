"""Subject k-fold cross-validation: folds, pooling and the pooled report.

Fixtures are tables built here; no images are needed except for the fold-training test,
which writes its own separable JPEGs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score

from alzstage.artifacts import fold_dir, write_folds
from alzstage.config import Params, Paths
from alzstage.cv.fold import run_cv_fold
from alzstage.cv.report import fold_spread, pool_folds, run_cv_report
from alzstage.cv.split import folds_summary
from alzstage.data.split import subject_folds
from alzstage.errors import AlzstageError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CLASSES = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]
SUBJECTS = {"NonDemented": 12, "VeryMildDemented": 9, "MildDemented": 6, "ModerateDemented": 2}
SLICES = 4


def params(k: int = 5, **extra: object) -> Params:
    return Params.model_validate(
        {"base": {"classes": CLASSES}, "cv": {"folds": list(range(k)), **extra}}
    )


def table() -> pd.DataFrame:
    rows = [
        {"path": f"images/{c}/{s:02d}_{i}.jpg", "label": c, "subject": f"{c}-{s:02d}"}
        for c, n in SUBJECTS.items()
        for s in range(n)
        for i in range(SLICES)
    ]
    return pd.DataFrame(rows)


def test_every_subject_is_tested_exactly_once() -> None:
    # given / when
    folds = subject_folds(table(), params())
    # then: one test fold per subject, and it is the fold where it has role "test"
    per_subject = folds.groupby("subject")["test_fold"].nunique()
    assert (per_subject == 1).all()
    assert set(folds["subject"]) == set(table()["subject"])
    for k in range(5):
        tested = set(folds.loc[folds[f"fold_{k}"] == "test", "subject"])
        assert tested == set(folds.loc[folds["test_fold"] == k, "subject"])
        assert tested, f"fold {k} tests nobody"


def test_no_subject_has_two_roles_within_a_fold() -> None:
    folds = subject_folds(table(), params())
    for k in range(5):
        roles = folds.groupby("subject")[f"fold_{k}"].nunique()
        assert (roles == 1).all(), f"fold {k}: {roles[roles > 1].index.tolist()}"
        assert set(folds[f"fold_{k}"]) == {"train", "val", "test"}


def test_folds_are_stratified_and_tiny_class_keeps_a_training_subject() -> None:
    folds = subject_folds(table(), params())
    for k in range(5):
        test = folds[folds[f"fold_{k}"] == "test"]
        # 12 NonDemented subjects over 5 folds: 2 or 3 per fold
        assert 2 <= test.loc[test["label"] == "NonDemented", "subject"].nunique() <= 3
        train = folds[folds[f"fold_{k}"] == "train"]
        assert (train["label"] == "ModerateDemented").any(), f"fold {k} trains no Moderate"


def test_folds_are_deterministic_and_seeded() -> None:
    a = subject_folds(table(), params())
    b = subject_folds(table(), params())
    pd.testing.assert_frame_equal(a, b)
    other = Params.model_validate(
        {"base": {"classes": CLASSES, "seed": 7}, "cv": {"folds": [0, 1, 2, 3, 4]}}
    )
    assert not subject_folds(table(), other)["test_fold"].equals(a["test_fold"])


@pytest.mark.parametrize("folds", [[0], [1, 2], [0, 2, 1]])
def test_fold_ids_must_be_zero_to_k_minus_one(folds: list[int]) -> None:
    with pytest.raises(ValueError, match=r"fold ids 0\.\.K-1"):
        Params.model_validate({"cv": {"folds": folds}})


def _with_probabilities(rows: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Random slice probabilities, and CSF fractions that grow with the stage."""
    probs = rng.dirichlet(np.ones(len(CLASSES)), size=len(rows))
    rows = rows.copy()
    rows["predicted"] = [CLASSES[i] for i in probs.argmax(axis=1)]
    for i, c in enumerate(CLASSES):
        rows[f"p_{c}"] = probs[:, i]
    stage = rows["label"].map(CLASSES.index).to_numpy()
    rows["morph_csf_fraction"] = 0.1 + 0.05 * stage + rng.normal(0, 0.01, len(rows))
    rows["morph_head_fraction"] = 0.5
    return rows


def _fold_predictions(folds: pd.DataFrame, rng: np.random.Generator) -> list[pd.DataFrame]:
    """Per fold: its test rows with random probabilities and baseline predictions."""
    frames = []
    for k in sorted(folds["test_fold"].unique()):
        rows = folds[folds["test_fold"] == k][["path", "label", "subject"]].copy()
        rows = _with_probabilities(rows, rng).assign(fold=k, repeat=0)
        for name in ("majority", "nearest", "pixel"):
            rows[f"baseline_{name}"] = rng.choice(CLASSES, size=len(rows))
        frames.append(rows)
    return frames


def _fit_slices(folds: pd.DataFrame, k: int, rng: np.random.Generator) -> pd.DataFrame:
    """Fold ``k``'s training and validation rows as cv_fold writes them."""
    rows = folds[folds[f"fold_{k}"].isin(["train", "val"])]
    out = _with_probabilities(rows[["path", "label", "subject"]], rng)
    return out.assign(fold=k, repeat=0, role=rows[f"fold_{k}"].to_numpy())


def test_pooling_refuses_duplicates_and_missing_folds() -> None:
    folds = subject_folds(table(), params())
    frames = _fold_predictions(folds, np.random.default_rng(0))
    assert len(pool_folds(frames, folds)) == len(folds)
    with pytest.raises(AlzstageError, match="more than one fold"):
        pool_folds([*frames, frames[0]], folds)
    with pytest.raises(AlzstageError, match="no out-of-fold prediction"):
        pool_folds(frames[:-1], folds)


def test_fold_spread_by_hand() -> None:
    pooled = pd.DataFrame(
        {
            "fold": [0, 0, 1, 1],
            "label": ["NonDemented", "MildDemented", "NonDemented", "MildDemented"],
            "predicted": ["NonDemented", "MildDemented", "NonDemented", "NonDemented"],
        }
    )
    spread = fold_spread(pooled, CLASSES)
    # fold 0: both right (1.0); fold 1: recall 1 and 0 over the two present classes (0.5)
    assert [r["balanced_accuracy"] for r in spread["per_fold"]] == [1.0, 0.5]
    assert spread["balanced_accuracy"]["mean"] == pytest.approx(0.75)
    assert spread["balanced_accuracy"]["sd"] == pytest.approx(np.std([1.0, 0.5], ddof=1))


def test_pooled_metrics_equal_those_recomputed_from_out_of_fold_predictions(
    tmp_path: Path,
) -> None:
    # given: a project with folds.csv, folds.json and five folds' predictions
    paths = Paths(tmp_path)
    p = params(bootstrap=200, repeats=1)
    folds = subject_folds(table(), p)
    paths.cv_folds.parent.mkdir(parents=True)
    folds.to_csv(paths.cv_folds, index=False)
    paths.cv_reports.mkdir(parents=True)
    summary = {**folds_summary(folds, CLASSES, 5), "repeats": 1, "tiny_classes": {}}
    (paths.cv_reports / "folds.json").write_text(json.dumps(summary))
    rng = np.random.default_rng(1)
    for k, frame in enumerate(_fold_predictions(folds, rng)):
        fold_dir(paths, k).mkdir(parents=True)
        frame.to_csv(fold_dir(paths, k) / "predictions.csv", index=False)
        _fit_slices(folds, k, rng).to_csv(fold_dir(paths, k) / "fit_slices.csv", index=False)
    # when
    run_cv_report(p, paths)
    # then: the pooled numbers are those of the out-of-fold table
    oof = pd.read_csv(paths.cv_reports / "predictions_oof.csv")
    report = json.loads((paths.cv_reports / "report.json").read_text())
    head = json.loads((paths.cv_reports / "metrics.json").read_text())
    expected = balanced_accuracy_score(oof["label"], oof["predicted"])
    assert report["balanced_accuracy"] == pytest.approx(expected)
    assert head["bacc"] == pytest.approx(expected, abs=1e-3)
    # and every brain is scored once, by models that never saw it
    brains = pd.read_csv(paths.cv_reports / "brains_oof.csv")
    assert sorted(brains["subject"]) == sorted(folds["subject"].unique())
    brain = report["brain_level"]
    assert brain["n_brains"] == folds["subject"].nunique()
    assert head["brain"] == pytest.approx(
        brain["scores"]["predictors"][brain["default"]]["balanced_accuracy_main"], abs=1e-3
    )
    assert report["n_test"] == len(folds) == len(oof)
    assert report["subject_level"]["n_subjects"] == folds["subject"].nunique()
    pixel = report["baselines"]["baselines"]["pixel"]
    assert pixel["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(oof["label"], oof["baseline_pixel"]), abs=1e-6
    )
    low, high = (float(v) for v in head["brain_ci"].split("-"))
    assert low <= head["brain"] <= high
    assert set(head) == {"brain", "brain_ci", "morph", "cover", "set", "bacc"}
    spread = report["fold_spread"]["balanced_accuracy"]
    assert len(report["fold_spread"]["per_fold"]) == 5 and spread["sd"] >= 0


def test_cv_report_names_a_missing_fold_file_and_the_stage_that_writes_it(tmp_path: Path) -> None:
    # given folds.csv and folds.json, and the first fold's files only
    paths = Paths(tmp_path)
    p = params(bootstrap=100, repeats=1)
    folds = subject_folds(table(), p)
    write_folds(folds[["path", "label", "subject", "test_fold", *_roles(5)]], paths.cv_folds)
    rng = np.random.default_rng(2)
    fold_dir(paths, 0).mkdir(parents=True)
    _fold_predictions(folds, rng)[0].to_csv(fold_dir(paths, 0) / "predictions.csv", index=False)
    # when cv_report runs, then one line names the first missing file and cv_fold
    missing = fold_dir(paths, 1) / "predictions.csv"
    with pytest.raises(AlzstageError) as caught:
        run_cv_report(p, paths)
    how = "run `alzstage cv-fold --fold <i>` (or `dvc repro cv/dvc.yaml`)"
    assert str(caught.value) == f"{missing}: not found; {how} first"


def test_cv_fold_refuses_folds_made_for_fewer_repeats_before_training(tmp_path: Path) -> None:
    # given folds.csv of one repeat, and params asking for two
    paths = Paths(tmp_path)
    folds = subject_folds(table(), params())
    write_folds(folds[["path", "label", "subject", "test_fold", *_roles(5)]], paths.cv_folds)
    # when fold 0 runs, then it stops at the read and names cv_split (nothing is trained)
    with pytest.raises(
        AlzstageError, match=r"no folds for cv\.repeats=2; re-run `alzstage cv-split`"
    ):
        run_cv_fold(params(repeats=2), paths, 0, None)
    assert not fold_dir(paths, 0).exists()


def _roles(k: int) -> list[str]:
    return [f"fold_{i}" for i in range(k)]
