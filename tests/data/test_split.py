"""Tests for the split stage: subjects stay whole, leaks are measured, tiny classes handled.

Fixtures are synthetic volumes generated here (never real data): every subject is a
smooth random 3-D field, so neighbouring slices are near-duplicates (r ~ 0.99) like real
MRI slices, and all subjects share a common "anatomy" so slices at the same height from
different subjects are also similar - the situation that makes naive grouping over-merge.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter
from sklearn.metrics import adjusted_rand_score

from alzstage.artifacts import read_manifest, read_split, write_manifest
from alzstage.config import Params, Paths
from alzstage.data.decode import run_decode
from alzstage.data.manifest import RawRecord, build_manifest
from alzstage.data.similarity import load_thumbnails, pseudo_subjects
from alzstage.data.split import (
    SPLIT_COLUMNS,
    assert_no_subject_leakage,
    split_by_source,
    split_by_subject,
    split_stratified,
)
from alzstage.data.split_report import (
    fingerprint_split_file,
    leakage_report,
    nearest_neighbour_scores,
    test_fingerprint,
)
from alzstage.data.split_stage import run_split
from alzstage.errors import AlzstageError

# Stage warnings (leaky strategy, tiny classes) are asserted with pytest.warns where they
# matter; elsewhere they are expected noise.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CLASSES = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]
SUBJECTS = {"NonDemented": 6, "VeryMildDemented": 5, "MildDemented": 4, "ModerateDemented": 2}
SLICES = 12
SIZE = 32
SOURCE_TEST_FROM = 9  # slices >= this are in the "source" test split, like the archive


def _volumes(n_subjects: int, seed: int) -> np.ndarray:
    """(subjects, slices, SIZE, SIZE): shared template + per-subject smooth field."""
    rng = np.random.default_rng(seed)
    pad = 16  # in z, so the edge slices are as smooth as the middle ones
    shape = (SLICES + 2 * pad, SIZE, SIZE)

    def field() -> np.ndarray:
        f = gaussian_filter(rng.normal(size=shape), sigma=(8, 2.5, 2.5))[pad:-pad]
        return f / f.std()

    template = field()
    return np.stack([template + 0.3 * field() for _ in range(n_subjects)])


def _to_uint8(v: np.ndarray) -> np.ndarray:
    return np.clip(128 + 40 * v, 0, 255).astype(np.uint8)


def make_project(
    root: Path, *, with_subjects: bool = False, seed: int = 0, subjects: dict | None = None
) -> Paths:
    """PNG slices, a validated manifest and their decoded pixels under ``root``."""
    paths = Paths(root)
    records = []
    for ci, cls in enumerate(CLASSES):
        if not (subjects or SUBJECTS)[cls]:
            continue
        vols = _volumes((subjects or SUBJECTS)[cls], seed * 10 + ci)
        for s, vol in enumerate(vols):
            for z, sl in enumerate(vol):
                path = paths.raw_images / cls / f"subj{s:02d}_z{z:02d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(_to_uint8(sl)).save(path)
                records.append(
                    RawRecord(
                        path=path,
                        label=cls,
                        source_split="test" if z >= SOURCE_TEST_FROM else "train",
                        subject=f"{cls}-{s}" if with_subjects else "",
                    )
                )
    paths.interim.mkdir(parents=True, exist_ok=True)
    write_manifest(build_manifest(records, paths.raw), paths.validated_manifest)
    run_decode(Params(), paths)  # the split reads its thumbnails from the decode stage
    return paths


def params(**split: object) -> Params:
    return Params.model_validate({"split": split})


def true_subject(path: str) -> str:
    """Ground truth from the fixture file name: <class>/subjNN_zMM.png."""
    parts = path.split("/")
    return f"{parts[-2]}-{parts[-1].split('_')[0]}"


def run(paths: Paths, p: Params) -> tuple[pd.DataFrame, dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_split(p, paths)
    df = read_split(paths.split_file)
    return df, json.loads(paths.split_report.read_text())


@pytest.fixture
def project(tmp_path: Path) -> Paths:
    return make_project(tmp_path)


# --------------------------------------------------------------------------- thumbnails


def test_load_thumbnails_rows_are_zero_mean_unit_norm(tmp_path: Path) -> None:
    arr = _to_uint8(_volumes(1, 0)[0, 0])
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(np.full((40, 30), 7, np.uint8)).save(tmp_path / "blank.png")
    Image.fromarray(arr).convert("RGB").save(tmp_path / "rgb.jpg", quality=95)
    x = load_thumbnails([tmp_path / "a.png", tmp_path / "blank.png", tmp_path / "rgb.jpg"], 16)
    assert x.shape == (3, 256) and x.dtype == np.float32
    assert np.allclose(x[[0, 2]].mean(axis=1), 0, atol=1e-5)
    assert np.allclose(np.linalg.norm(x[[0, 2]], axis=1), 1, atol=1e-5)
    assert not x[1].any(), "a blank image must not correlate with anything"
    assert x[0] @ x[2] > 0.99  # same picture, JPEG + RGB: still the same thumbnail


def test_load_thumbnails_names_the_broken_file(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(AlzstageError, match=r"bad\.jpg.*validate"):
        load_thumbnails([tmp_path / "bad.jpg"], 16)


# --------------------------------------------------------------------------- pseudo-subjects


def _flat(vols: np.ndarray) -> np.ndarray:
    x = vols.reshape(-1, SIZE * SIZE).astype(np.float32)
    x -= x.mean(axis=1, keepdims=True)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_pseudo_subjects_recover_synthetic_subjects() -> None:
    vols = np.concatenate([_volumes(8, 1), _volumes(6, 2)])
    x = _flat(vols)
    truth = np.repeat(np.arange(len(vols)), SLICES)
    labels = np.array(["A"] * 8 * SLICES + ["B"] * 6 * SLICES)
    # same-height slices of different subjects are similar (shared template) ...
    assert x[0] @ x[SLICES] > 0.85
    ids = pseudo_subjects(x, labels, threshold=0.97)
    assert adjusted_rand_score(truth, ids) > 0.9
    assert all(i.startswith(("pseudo-A-", "pseudo-B-")) for i in ids)
    assert ids[0] == "pseudo-A-0000"  # numbered by first row: deterministic
    # ... and groups never cross classes
    assert not set(ids[labels == "A"]) & set(ids[labels == "B"])


def test_pseudo_subjects_do_not_depend_on_row_order_beyond_numbering() -> None:
    x = _flat(_volumes(5, 3))
    labels = np.array(["A"] * len(x))
    perm = np.random.default_rng(0).permutation(len(x))
    a = pseudo_subjects(x, labels, 0.97)
    b = pseudo_subjects(x[perm], labels[perm], 0.97)
    assert adjusted_rand_score(a[perm], b) == 1.0


# --------------------------------------------------------------------------- strategies


def test_subject_split_keeps_subjects_whole(project: Paths) -> None:
    df, rep = run(project, params(strategy="subject"))
    assert list(df.columns[: len(SPLIT_COLUMNS)]) == SPLIT_COLUMNS
    assert (df.groupby("subject")["split"].nunique() == 1).all()
    assert set(df["subject_source"]) == {"pseudo"}
    # recovered groups match the true subjects
    assert adjusted_rand_score(df["path"].map(true_subject), df["subject"]) > 0.9
    # every true subject is in one split too (pseudo-ids did not split a brain)
    assert (df.groupby(df["path"].map(true_subject))["split"].nunique() == 1).all()
    train = df[df["split"] == "train"]
    assert set(train["label"]) == set(CLASSES)
    assert rep["leaky"] is False and "pseudo" in rep["warning"]
    assert rep["subject_ids"] == "pseudo"
    assert rep["leakage"]["shared_subjects"] == {"train_val": 0, "train_test": 0, "val_test": 0}
    assert rep["leakage"]["test"]["fraction_subject_in_train"] == 0
    assert rep["groups"]["n_groups"] == sum(SUBJECTS.values())
    assert rep["counts"]["test"]["total"] + rep["counts"]["train"]["total"] + rep["counts"]["val"][
        "total"
    ] == len(df)


def test_subject_split_uses_given_ids(tmp_path: Path) -> None:
    paths = make_project(tmp_path, with_subjects=True)
    df, rep = run(paths, params())
    assert set(df["subject_source"]) == {"given"}
    assert (
        df["subject"] == df["path"].map(true_subject).str.replace("subj0", "", regex=False)
    ).all()
    assert rep["subject_ids"] == "given" and rep["warning"] == ""
    assert "cross_source" not in rep  # one source: split.json as before issue #24


def test_leak_check_raises_with_the_subject_named() -> None:
    df = pd.DataFrame(
        {"path": ["a", "b", "c"], "label": ["X"] * 3, "subject": ["s1", "s1", "s2"]}
    ).assign(split=["train", "test", "train"])
    with pytest.raises(AlzstageError, match="s1"):
        assert_no_subject_leakage(df)


def test_stratified_is_flagged_leaky_and_near_duplicates_are_counted(tmp_path: Path) -> None:
    leaky_df, leaky = run(make_project(tmp_path / "a"), params(strategy="stratified"))
    _, clean = run(make_project(tmp_path / "b"), params(strategy="subject"))
    assert leaky["leaky"] is True and "inflated" in leaky["warning"]
    lt = leaky["leakage"]["test"]
    assert lt["threshold"] == Params().split.near_duplicate_threshold
    assert lt["n_images"] == (leaky_df["split"] == "test").sum()
    assert lt["fraction_near_duplicate"] > 0.8  # neighbouring slices sit in train
    assert leaky["leakage"]["shared_subjects"]["train_test"] > 0
    assert clean["leakage"]["test"]["fraction_near_duplicate"] < 0.2
    # Copying the nearest training slice's label: near-perfect when the brain is in train
    # (this fixture's classes are separable, so the clean split scores high too).
    nn_leaky = lt["nearest_train_neighbour"]["balanced_accuracy"]
    nn_clean = clean["leakage"]["test"]["nearest_train_neighbour"]["balanced_accuracy"]
    assert nn_leaky > 0.9 and nn_clean <= nn_leaky


def test_leakage_report_counts_exact_near_duplicates() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 64)).astype(np.float32)
    x[3] = x[0] + 0.01 * rng.normal(size=64)  # test row 3 ~ train row 0
    x -= x.mean(axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    df = pd.DataFrame(
        {
            "path": list("abcdef"),
            "subject": list("abcdef"),
            "split": ["train", "train", "train", "test", "test", "val"],
            "label": ["A", "B", "B", "A", "A", "B"],
        }
    )
    rep = leakage_report(df, x, threshold=0.95)
    assert rep["test"]["n_near_duplicate_in_train"] == 1
    assert rep["test"]["fraction_near_duplicate"] == 0.5
    assert rep["val"]["n_near_duplicate_in_train"] == 0
    # Row 3 copies train row 0's label (A, right); row 4 copies whatever is closest.
    corr = x[4] @ x[:3].T
    row4 = "A" if corr.argmax() == 0 else "B"
    expected = (1 + (row4 == "A")) / 2
    nn = rep["test"]["nearest_train_neighbour"]
    assert nn == {"accuracy": expected, "balanced_accuracy": expected}


def test_nearest_neighbour_scores_by_hand() -> None:
    truth = np.array(["a", "a", "a", "b"])
    copied = np.array(["a", "b", "b", "b"])
    # accuracy 2/4; recall a = 1/3, b = 1 -> balanced 2/3
    assert nearest_neighbour_scores(truth, copied) == {
        "accuracy": 0.5,
        "balanced_accuracy": round(2 / 3, 6),
    }


def test_source_strategy_keeps_source_test_rows_in_test(project: Paths) -> None:
    df, rep = run(project, params(strategy="source"))
    manifest = read_manifest(project.validated_manifest).set_index("path")
    src = df["path"].map(manifest["source_split"])
    assert (df.loc[src == "test", "split"] == "test").all()
    assert (df.loc[src == "train", "split"] != "test").all()
    assert (df["split"] == "val").any()
    assert rep["leaky"] is True and "slice position" in rep["warning"]


def test_source_strategy_without_source_split_explains(project: Paths) -> None:
    df = read_manifest(project.validated_manifest).assign(source_split="")
    with pytest.raises(AlzstageError, match=r"source_split.*split\.strategy"):
        split_by_source(df, params(strategy="source"))


def test_fractions_must_leave_room_for_train(project: Paths) -> None:
    with pytest.raises(ValueError, match=r"split\.test_size.*split\.val_size"):
        run_split(params(test_size=0.5, val_size=0.5), project)


def test_missing_manifest_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(AlzstageError, match="alzstage validate"):
        run_split(params(), Paths(tmp_path))


# --------------------------------------------------------------------------- tiny classes


def _moderate(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["label"] == "ModerateDemented"]


@pytest.mark.parametrize("strategy", ["subject", "stratified", "source"])
def test_tiny_class_share_subjects(project: Paths, strategy: str) -> None:
    p = params(strategy=strategy, tiny_class_policy="share_subjects")
    with pytest.warns(UserWarning, match=r"ModerateDemented.*2 subject"):
        run_split(p, project)
    df = read_split(project.split_file)
    rep = json.loads(project.split_report.read_text())
    assert rep["tiny_classes"]["ModerateDemented"]["policy"] == "share_subjects"
    assert rep["tiny_classes"]["ModerateDemented"]["n_subjects"] == 2
    if strategy == "subject":
        per_split = _moderate(df).groupby("split")["subject"].nunique().to_dict()
        assert per_split == {"train": 1, "test": 1}
        assert rep["absent"]["val"] == ["ModerateDemented"]
        entry = rep["tiny_classes"]["ModerateDemented"]
        assert entry["subjects_per_split"] == {"train": 1, "val": 0, "test": 1}
        assert entry["absent_from"] == ["val"]


def test_tiny_class_train_only(project: Paths) -> None:
    with pytest.warns(UserWarning, match="train only"):
        run_split(params(tiny_class_policy="train_only"), project)
    df = read_split(project.split_file)
    rep = json.loads(project.split_report.read_text())
    assert set(_moderate(df)["split"]) == {"train"}
    assert len(_moderate(df)) == SUBJECTS["ModerateDemented"] * SLICES
    assert "ModerateDemented" in rep["absent"]["test"]
    assert rep["counts"]["test"]["ModerateDemented"] == 0


def test_tiny_class_drop(project: Paths) -> None:
    with pytest.warns(UserWarning, match="dropped"):
        run_split(params(tiny_class_policy="drop"), project)
    df = read_split(project.split_file)
    rep = json.loads(project.split_report.read_text())
    assert _moderate(df).empty
    assert rep["dropped_classes"] == ["ModerateDemented"]
    assert rep["tiny_classes"]["ModerateDemented"]["n_images"] == 2 * SLICES
    assert rep["counts"]["train"]["ModerateDemented"] == 0


def test_single_subject_class_is_never_silently_empty(tmp_path: Path) -> None:
    paths = make_project(tmp_path, subjects={**SUBJECTS, "ModerateDemented": 1})
    with pytest.warns(UserWarning, match=r"ModerateDemented \(test\)"):
        run_split(params(), paths)
    rep = json.loads(paths.split_report.read_text())
    assert rep["counts"]["train"]["ModerateDemented"] == SLICES
    assert rep["absent"]["test"] == ["ModerateDemented"]


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_different_seed_different_split(tmp_path: Path) -> None:
    a, b, c = (make_project(tmp_path / n) for n in "abc")
    for paths, seed in ((a, 1), (b, 1), (c, 2)):
        run(paths, Params.model_validate({"base": {"seed": seed}}))
    assert a.split_file.read_bytes() == b.split_file.read_bytes()
    assert a.split_report.read_text() == b.split_report.read_text()
    assert a.split_file.read_bytes() != c.split_file.read_bytes()


def test_direct_calls_are_deterministic(project: Paths) -> None:
    df = read_manifest(project.validated_manifest).assign(
        subject=lambda d: d["path"].map(true_subject), subject_source="given"
    )
    p = params()
    shuffled = df.sample(frac=1, random_state=0)
    for fn in (split_by_subject, split_stratified):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x, y = fn(df, p), fn(shuffled, p)
        assert x.equals(y), fn.__name__


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_tracks_test_rows_only(project: Paths) -> None:
    _, rep = run(project, params())
    text = project.split_file.read_text()
    assert (
        rep["fingerprint"] == test_fingerprint(text) == fingerprint_split_file(project.split_file)
    )
    lines = text.splitlines(keepends=True)
    col = lines[0].rstrip("\n").split(",").index("split")
    split = [line.rstrip("\n").split(",")[col] for line in lines]
    first_test, first_train = split.index("test"), split.index("train")
    # a test row moved to train: a different test set
    moved = lines.copy()
    moved[first_test] = moved[first_test].replace(",test,", ",train,")
    assert moved[first_test] != lines[first_test]
    assert test_fingerprint("".join(moved)) != rep["fingerprint"]
    # a relabelled test row: a different test set
    relabelled = lines.copy()
    old = relabelled[first_test].split(",")[1]
    relabelled[first_test] = relabelled[first_test].replace(f",{old},", ",Other,", 1)
    assert test_fingerprint("".join(relabelled)) != rep["fingerprint"]
    # a train row dropped: same test set
    fewer = lines[:first_train] + lines[first_train + 1 :]
    assert test_fingerprint("".join(fewer)) == rep["fingerprint"]


def test_configured_class_without_images_is_reported(tmp_path: Path) -> None:
    paths = make_project(tmp_path, subjects={**SUBJECTS, "ModerateDemented": 0})
    with pytest.warns(UserWarning, match="ModerateDemented.*no images"):
        run_split(params(), paths)
    rep = json.loads(paths.split_report.read_text())
    assert rep["classes_without_data"] == ["ModerateDemented"]
