"""The ``split`` stage: train/val/test assignment that keeps each brain in one split.

Why this module exists: the public Alzheimer MRI archive holds 32 adjacent axial slices
per subject, neighbouring slices correlate at ~0.99, and there are no subject ids. A
slice-level random split therefore puts the same brain in train and test, and the
archive's own train/test split is by slice *position*, so every subject is in both.
Models evaluated that way report "95 % accuracy" that says nothing about new patients.

So the default (``split.strategy: subject``) is a stratified, group-aware split over
subjects. When the source gives no subject ids, they are recovered as *pseudo-subjects*
by chaining near-identical neighbouring slices (:func:`alzstage.data.similarity.pseudo_subjects`).
With several sources (``data.source: multi``), resized copies of one brain in two
sources are found and grouped as one brain first (:mod:`alzstage.data.duplicates`). The
leaky strategies (``stratified``, ``source``) stay available for comparison, are
labelled ``leaky: true`` in ``reports/split.json``, and every run measures leakage
directly (:mod:`alzstage.data.split_report`) so the claim is checked, not assumed.

Layout: pure functions over DataFrames first (allocation, strategies, CV folds), the thin
I/O shell :func:`alzstage.data.split_stage.run_split` is its own module.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from alzstage.artifacts import SPLIT_CSV
from alzstage.config import Params
from alzstage.data.split_report import (
    group_keys,
)
from alzstage.errors import AlzstageError, ConfigError

__all__ = [
    "SPLIT_COLUMNS",
    "STRATEGIES",
    "assert_no_subject_leakage",
    "split_by_source",
    "split_by_subject",
    "split_stratified",
    "subject_folds",
]

# The columns every split.csv has (the contract, alzstage.artifacts.SPLIT_CSV, adds sha256
# when the manifest has one).
SPLIT_COLUMNS = [c.name for c in SPLIT_CSV.columns if c.required]


# --------------------------------------------------------------------------- allocation


def _rng(seed: int, *parts: str) -> np.random.Generator:
    """A generator per (seed, class): results do not depend on class order or count."""
    return np.random.default_rng([seed, *(zlib.crc32(p.encode()) for p in parts)])


def _check_fractions(params: Params) -> None:
    sp = params.split
    if sp.test_size + sp.val_size >= 1:  # also refused when params load; kept for callers
        raise ConfigError(
            f"params.yaml: split.test_size ({sp.test_size}) + split.val_size ({sp.val_size}) "
            "must be < 1 so that train keeps some data; lower one of them"
        )


def _allocate(
    sizes: dict[str, int],
    fractions: dict[str, float],
    priority: Sequence[str],
    rng: np.random.Generator,
) -> dict[str, str]:
    """Assign whole groups to splits so that image counts approach ``fractions``.

    Groups are shuffled (sorted first, so only the seed matters). The first groups seed
    the splits in ``priority`` order, one each, so a small class still reaches train,
    then test, then val when it has the subjects for it; the rest go one at a time to
    the split furthest below its image target. StratifiedGroupKFold was not used: it
    only makes 1/n folds and gives no per-class guarantee, so a 2-subject class can end
    up missing from train.
    """
    keys = sorted(sizes)
    keys = [keys[i] for i in rng.permutation(len(keys))]
    total = sum(sizes.values())
    target = {s: fractions.get(s, 0.0) * total for s in priority}
    current = dict.fromkeys(priority, 0)
    out: dict[str, str] = {}
    seeds = [s for s in priority if fractions.get(s, 0.0) > 0]
    for key, split in zip(keys, seeds, strict=False):
        out[key] = split
        current[split] += sizes[key]
    for key in keys[len(seeds) :]:
        split = max(priority, key=lambda s: (target[s] - current[s], -priority.index(s)))
        out[key] = split
        current[split] += sizes[key]
    return out


def _subjects_per_class(df: pd.DataFrame) -> dict[str, int]:
    keys = group_keys(df)
    return {str(c): int(n) for c, n in keys.groupby(df["label"]).nunique().items()}


def _tiny_class_policy(df: pd.DataFrame, params: Params) -> tuple[pd.DataFrame, dict, set]:
    """Apply ``split.tiny_class_policy`` to classes with too few subjects.

    Returns the rows kept, one report entry per tiny class, and the classes to keep in
    train only. Each decision is also a ``warnings.warn``: a class silently missing
    from val or test would make per-class metrics meaningless without anyone noticing.
    """
    sp = params.split
    per_class = _subjects_per_class(df)
    decisions: dict[str, Any] = {}
    train_only: set[str] = set()
    drop: list[str] = []
    for cls in sorted(per_class):
        n = per_class[cls]
        if n >= sp.min_subjects_per_class:
            continue
        entry: dict[str, Any] = {
            "n_subjects": n,
            "n_images": int((df["label"] == cls).sum()),
            "min_subjects_per_class": sp.min_subjects_per_class,
            "policy": sp.tiny_class_policy,
        }
        if sp.tiny_class_policy == "drop":
            drop.append(cls)
            entry["decision"] = "dropped: excluded from every split"
        elif sp.tiny_class_policy == "train_only":
            train_only.add(cls)
            entry["decision"] = "train only: absent from val and test (not evaluated)"
        else:
            entry["decision"] = (
                "shared: whole subjects spread over train, then test, then val while "
                "subjects last; a split left without one is listed under absent"
            )
        decisions[cls] = entry
        warnings.warn(
            f"split: class {cls!r} has {n} subject(s) (< split.min_subjects_per_class="
            f"{sp.min_subjects_per_class}); split.tiny_class_policy={sp.tiny_class_policy!r}: "
            f"{entry['decision']}",
            UserWarning,
            stacklevel=3,
        )
    kept = df[~df["label"].isin(drop)].copy() if drop else df.copy()
    return kept, decisions, train_only


def _finish(out: pd.DataFrame, decisions: dict, strategy: str) -> pd.DataFrame:
    out = out.sort_values("path", kind="stable").reset_index(drop=True)
    out.attrs["tiny_classes"] = decisions
    out.attrs["strategy"] = strategy
    return out


def split_stratified(df: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Slice-level split, stratified by class. LEAKY: kept only to show the inflation.

    Neighbouring slices of one brain are near-identical, so shuffling slices puts the
    same brain in train and test; compare its test score with the subject split's.
    """
    _check_fractions(params)
    sp = params.split
    df, decisions, train_only = _tiny_class_policy(df, params)
    split = pd.Series("train", index=df.index, dtype=object)
    for cls, part in df.sort_values("path", kind="stable").groupby("label", sort=True):
        if cls in train_only:
            continue
        idx = part.index.to_numpy()[
            _rng(params.base.seed, "stratified", str(cls)).permutation(len(part))
        ]
        n = len(idx)
        n_test = min(round(sp.test_size * n), max(n - 1, 0))
        n_val = min(round(sp.val_size * n), max(n - 1 - n_test, 0))
        split[idx[:n_test]] = "test"
        split[idx[n_test : n_test + n_val]] = "val"
    out = df.copy()
    out["split"] = split
    return _finish(out, decisions, "stratified")


def split_by_subject(df: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Stratified, group-aware split: every subject's slices land in exactly one split.

    Allocation runs per class (that is the stratification) over whole subjects (that is
    the grouping); a subject spread over several classes (longitudinal data) follows its
    most frequent class. Raises :class:`AlzstageError` if a subject ends up in two
    splits, so a regression can never silently produce inflated scores.
    """
    _check_fractions(params)
    sp = params.split
    df, decisions, train_only = _tiny_class_policy(df, params)
    keys = group_keys(df)
    # primary class per subject: most rows, ties broken by class name
    counts = pd.DataFrame({"key": keys, "label": df["label"]}).value_counts().reset_index()
    counts.columns = ["key", "label", "n"]
    counts = counts.sort_values(["key", "n", "label"], ascending=[True, False, True])
    primary = counts.drop_duplicates("key").set_index("key")["label"]
    sizes = keys.value_counts()
    fractions = {"train": 1 - sp.test_size - sp.val_size, "test": sp.test_size, "val": sp.val_size}
    assign: dict[str, str] = {}
    for cls in sorted(set(primary.tolist())):
        members = {str(k): int(sizes[k]) for k in primary.index[primary == cls]}
        if cls in train_only:
            assign.update(dict.fromkeys(members, "train"))
            continue
        rng = _rng(params.base.seed, "subject", str(cls))
        assign.update(_allocate(members, fractions, ["train", "test", "val"], rng))
    out = df.copy()
    out["split"] = keys.map(assign)
    assert_no_subject_leakage(out)
    return _finish(out, decisions, "subject")


def split_by_source(df: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Keep the source's own train/test (``source_split``); carve val out of source train.

    LEAKY for the Kaggle archive (its split is by slice position, so each subject is in
    both). Val is carved by whole subjects (``split.val_size`` of each class's images)
    so at least val does not share subjects with train.
    """
    sp = params.split
    src = df["source_split"].astype(str).str.strip().str.lower()
    unknown = sorted(set(src.tolist()) - {"train", "test", "val", "validation"})
    if unknown:
        bad = df.loc[src.isin(unknown), "path"].iloc[0]
        raise AlzstageError(
            f"split.strategy=source: manifest column source_split has values {unknown} "
            f"(e.g. row {bad!r}); it must be train/val/test for every row. The source gives "
            "no usable split: set split.strategy to subject (or stratified) in params.yaml"
        )
    df = df.assign(source_split=src.replace({"validation": "val"}))
    df, decisions, train_only = _tiny_class_policy(df, params)
    split = df["source_split"].copy()
    split[df["label"].isin(train_only)] = "train"
    keys = group_keys(df)
    for cls in sorted(set(df["label"].tolist())):
        in_cls = df["label"] == cls
        if cls in train_only or (in_cls & (split == "val")).any():
            continue  # the source already has a val split for this class, or none wanted
        pool = in_cls & (split == "train")
        if not pool.any():
            continue
        sizes = {str(k): int(n) for k, n in keys[pool].value_counts().items()}
        frac_val = min(sp.val_size * int(in_cls.sum()) / max(int(pool.sum()), 1), 0.5)
        rng = _rng(params.base.seed, "source", str(cls))
        assign = _allocate(sizes, {"train": 1 - frac_val, "val": frac_val}, ["train", "val"], rng)
        split[pool] = keys[pool].map(assign)
    out = df.copy()
    out["split"] = split
    return _finish(out, decisions, "source")


def subject_folds(df: pd.DataFrame, params: Params, repeat: int = 0) -> pd.DataFrame:
    """Subject-level K-fold roles: one column ``fold_<i>`` (train/val/test) per fold.

    Test folds come from scikit-learn's ``StratifiedGroupKFold`` over subjects, so every
    subject is tested exactly once and the folds are stratified by class. Each fold's
    validation subjects (early stopping, temperature scaling) are then carved out of its
    training subjects per class by ``_allocate``, which seeds train first: a class with
    two subjects keeps one in training whenever the other is tested. ``drop`` and
    ``train_only`` from ``split.tiny_class_policy`` apply as in the single split.

    ``repeat`` r > 0 draws new folds from seed ``base.seed + r`` (repeated CV); repeat 0
    is the folds a single CV has always drawn.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    k = len(params.cv.folds)
    df, decisions, train_only = _tiny_class_policy(df, params)
    df = df.sort_values("path", kind="stable").reset_index(drop=True)
    keys = group_keys(df)
    testable = ~df["label"].isin(train_only).to_numpy()
    test_fold = np.full(len(df), -1)
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=params.base.seed + repeat)
    with warnings.catch_warnings():
        # "The least populated class in y has only 2 members": a tiny class is tested in
        # fewer than K folds. Recorded per class in ``tiny_classes`` instead.
        warnings.simplefilter("ignore", UserWarning)
        folds = sgkf.split(df.index[testable], df["label"][testable], keys[testable])
        for fold, (_, test_idx) in enumerate(folds):
            test_fold[np.flatnonzero(testable)[test_idx]] = fold
    out = df.copy()
    out["test_fold"] = test_fold
    sizes = keys.value_counts()
    for fold in range(k):
        role = pd.Series(np.where(test_fold == fold, "test", "train"), index=df.index)
        for cls in sorted(set(df["label"].tolist()) - train_only):
            pool = (df["label"] == cls) & (role == "train")
            members = {str(g): int(sizes[g]) for g in sorted(set(keys[pool].tolist()))}
            if len(members) < 2:
                continue
            keys_rng = ("cv", str(fold), str(cls)) + ((f"repeat{repeat}",) if repeat else ())
            rng = _rng(params.base.seed, *keys_rng)
            frac = params.cv.val_size
            assign = _allocate(members, {"train": 1 - frac, "val": frac}, ["train", "val"], rng)
            role[pool] = keys[pool].map(assign)
        out[f"fold_{fold}"] = role.to_numpy()
        assert_no_subject_leakage(out.assign(split=out[f"fold_{fold}"]))
    out.attrs["tiny_classes"] = decisions
    return out


STRATEGIES = {
    "subject": split_by_subject,
    "stratified": split_stratified,
    "source": split_by_source,
}


# --------------------------------------------------------------------------- leakage


def assert_no_subject_leakage(df: pd.DataFrame) -> None:
    """Raise :class:`AlzstageError` naming the subjects found in more than one split."""
    keys = group_keys(df)
    n_splits = df.groupby(keys)["split"].nunique()
    bad = sorted(n_splits.index[n_splits > 1].tolist())
    if bad:
        where = {k: sorted(set(df.loc[keys == k, "split"].tolist())) for k in bad[:5]}
        raise AlzstageError(
            f"split.strategy=subject produced {len(bad)} subject(s) in more than one split, "
            f"e.g. {where}. This is a bug in alzstage.data.split (the subject split must "
            "keep every subject whole); please report it with data/interim/manifest.csv"
        )


# --------------------------------------------------------------------------- I/O shell
