"""The ``split`` stage: train/val/test assignment that keeps each brain in one split.

Why this module exists: the public Alzheimer MRI archive holds 32 adjacent axial slices
per subject, neighbouring slices correlate at ~0.99, and there are no subject ids. A
slice-level random split therefore puts the same brain in train and test, and the
archive's own train/test split is by slice *position*, so every subject is in both.
Models evaluated that way report "95 % accuracy" that says nothing about new patients.

So the default (``split.strategy: subject``) is a stratified, group-aware split over
subjects. When the source gives no subject ids, they are recovered as *pseudo-subjects*
by chaining near-identical neighbouring slices (mutual nearest neighbours over
downsampled pixels + connected components). The leaky strategies (``stratified``,
``source``) stay available for comparison, are labelled ``leaky: true`` in
``reports/split.json``, and every run measures leakage directly (val/test images with a
near-duplicate in train) so the claim is checked, not assumed.

Layout: pure functions over arrays / DataFrames first, the thin I/O shell
:func:`run_split` last.

Why one module of about 800 lines: subject recovery, the three strategies, the CV folds and
the leakage measurement are one concern, who may sit in which split and the proof that
no brain crossed; each part is a pure function on arrays and frames, the stage shell is
the last one (``run_split``).
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from alzstage.artifacts import SPLIT_CSV, SPLITS, PixelStore, SplitReport, read_manifest, read_split
from alzstage.config import Params, Paths
from alzstage.data.identity import dataset_name
from alzstage.errors import AlzstageError, ConfigError
from alzstage.files import atomic_path, write_json
from alzstage.result import StageResult

# The columns every split.csv has (the contract, alzstage.artifacts.SPLIT_CSV, adds sha256
# when the manifest has one).
SPLIT_COLUMNS = [c.name for c in SPLIT_CSV.columns if c.required]
# Neighbours per slice in the mutual-kNN graph: one slice above and one below. With k=1
# a volume falls apart into pairs; with k>=3 the spare slot lets the end slices of one
# brain link to another brain at the same height (measured on the real archive, see
# benchmarks/bench_split.py).
GROUP_NEIGHBOURS = 2
# Extra thresholds reported next to the configured one, so the near-duplicate numbers
# can be read without re-running (cross-subject slices at the same height can correlate
# above 0.97 at 32x32; adjacent slices of one brain stay above ~0.99).
LEAKAGE_SWEEP = (0.95, 0.97, 0.98, 0.99, 0.995)
_ROW_BLOCK = 1024  # rows per matrix-product block: bounds memory at ~block*N floats

LEAKY_WARNINGS = {
    "stratified": (
        "Slice-level split: neighbouring slices of the same brain (near-identical images) "
        "are spread over train, val and test, so val/test scores are inflated and do not "
        "measure performance on new patients. Use split.strategy: subject for real numbers."
    ),
    "source": (
        "The source's own train/test split is by slice position: every subject appears in "
        "both train and test, so test scores are inflated and do not measure performance on "
        "new patients. Use split.strategy: subject for real numbers."
    ),
}


# --------------------------------------------------------------------------- thumbnails


def _thumbnail(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            small = im.convert("L").resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(small, dtype=np.float32).reshape(-1)
    except FileNotFoundError:
        raise AlzstageError(
            f"{path}: image listed in the manifest is missing; re-run `alzstage download` "
            "(or `dvc repro download validate`) to restore data/raw"
        ) from None
    except Exception as exc:  # any decode error gets the same advice
        raise AlzstageError(
            f"{path}: cannot decode image for the split thumbnails ({exc}); re-run "
            "`alzstage validate` with validate.on_failure: quarantine, or remove the file"
        ) from None


def load_thumbnails(paths: Sequence[Path], size: int) -> np.ndarray:
    """Downsampled grayscale copies as zero-mean, unit-norm rows, so ``a @ b`` = correlation.

    Downsampling removes JPEG noise and makes the similarity search cheap (6,400 images
    at 32x32 is a 6,400 x 1,024 matrix). Decoding runs in threads: Pillow releases the
    GIL while decoding and resizing. Constant images (no variance) become all-zero rows:
    they correlate 0 with everything and so never join a group by accident.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        return np.zeros((0, size * size), dtype=np.float32)
    workers = max(1, min(16, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows = list(pool.map(lambda p: _thumbnail(p, size), paths))
    return correlation_rows(np.stack(rows))


def correlation_rows(images: np.ndarray) -> np.ndarray:
    """Each image flattened to a zero-mean, unit-norm float32 row, so ``a @ b`` = correlation.

    Split out of :func:`load_thumbnails` so that arrays already in memory (the evaluate
    stage's baselines) are compared exactly as the split's leakage report compares files.
    Idempotent: rows that are already zero-mean and unit-norm come back unchanged.
    Constant images become all-zero rows (correlation 0 with everything).
    """
    x = np.asarray(images, dtype=np.float32)
    x = x.reshape(len(x), int(np.prod(x.shape[1:]))).copy()  # (0, h, w) -> (0, h*w) too
    x -= x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norm, out=x, where=norm > 1e-6)
    x[(norm <= 1e-6).ravel()] = 0.0
    return x


# --------------------------------------------------------------------------- pseudo-subjects


def _top_k(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and correlations of each row's k most similar *other* rows (blocked)."""
    n = len(x)
    k = min(k, n - 1)
    idx = np.zeros((n, k), dtype=np.int64)
    val = np.zeros((n, k), dtype=np.float32)
    if k <= 0:
        return idx, val
    for start in range(0, n, _ROW_BLOCK):
        stop = min(n, start + _ROW_BLOCK)
        c = x[start:stop] @ x.T
        c[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # not its own neighbour
        part = np.argpartition(-c, k - 1, axis=1)[:, :k]
        idx[start:stop] = part
        val[start:stop] = np.take_along_axis(c, part, axis=1)
    return idx, val


def _mutual_knn_components(x: np.ndarray, threshold: float, k: int) -> np.ndarray:
    """Connected components of the mutual-kNN graph whose edges have corr >= threshold."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(x)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    idx, val = _top_k(x, k)
    rows = np.repeat(np.arange(n), idx.shape[1])
    cols = idx.ravel()
    keep = val.ravel() >= threshold
    adj = coo_matrix(
        (np.ones(int(keep.sum()), dtype=np.int8), (rows[keep], cols[keep])), shape=(n, n)
    ).tocsr()
    mutual = adj.multiply(adj.T)  # i->j and j->i: a slice's real neighbours point back
    _, comp = connected_components(mutual, directed=False)
    return comp


def pseudo_subjects(
    thumbs: np.ndarray,
    labels: np.ndarray | Sequence[str],
    threshold: float,
    *,
    k: int = GROUP_NEIGHBOURS,
) -> np.ndarray:
    """Recover subject groups from image similarity, separately within each class.

    Each slice is linked to its ``k`` (=2: the slice above and below) most correlated
    slices, an edge is kept only when the link is *mutual* and the correlation is at
    least ``threshold``, and connected components of that graph are the groups. Why
    this rather than plain thresholding: slices at the same height from two different
    brains can correlate above 0.97, so "all pairs above a threshold" chains whole
    classes together; a slice's mutual nearest neighbours, however, are almost always
    the adjacent slices of its own volume, so the chain follows each volume end to end.
    On the real archive this recovers the 160 subjects x 32 slices exactly.

    Ids are ``pseudo-<Class>-<n:04d>``, numbered within each class in order of the
    group's first row, so they depend only on the input order (sort rows first).
    """
    thumbs = np.asarray(thumbs, dtype=np.float32)
    labels = np.asarray(labels, dtype=object)
    if len(thumbs) != len(labels):
        raise ValueError(f"pseudo_subjects: {len(thumbs)} thumbnails but {len(labels)} labels")
    out = np.empty(len(labels), dtype=object)
    for cls in sorted(set(labels.tolist())):
        where = np.flatnonzero(labels == cls)
        comp = _mutual_knn_components(thumbs[where], threshold, k)
        # renumber by first appearance so ids do not depend on scipy's labelling
        _, first = np.unique(comp, return_index=True)
        order = np.argsort(first, kind="stable")
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        out[where] = [f"pseudo-{cls}-{r:04d}" for r in rank[comp]]
    return out.astype(str)


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


def _group_keys(df: pd.DataFrame) -> pd.Series:
    """Subject per row; rows without one are their own group (keyed by path)."""
    subj = df["subject"].astype(str)
    return subj.where(subj != "", "row:" + df["path"].astype(str))


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
    keys = _group_keys(df)
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
    keys = _group_keys(df)
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
    keys = _group_keys(df)
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
    keys = _group_keys(df)
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
    keys = _group_keys(df)
    n_splits = df.groupby(keys)["split"].nunique()
    bad = sorted(n_splits.index[n_splits > 1].tolist())
    if bad:
        where = {k: sorted(set(df.loc[keys == k, "split"].tolist())) for k in bad[:5]}
        raise AlzstageError(
            f"split.strategy=subject produced {len(bad)} subject(s) in more than one split, "
            f"e.g. {where}. This is a bug in alzstage.data.split (the subject split must "
            "keep every subject whole); please report it with data/interim/manifest.csv"
        )


def _max_corr(queries: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Each query's highest correlation with any row of ``pool`` (blocked products)."""
    return most_correlated(queries, pool)[0]


def most_correlated(queries: np.ndarray, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(highest correlation, index of that row of ``pool``) per query; index -1 if no pool.

    Rows must come from :func:`correlation_rows` (or :func:`load_thumbnails`), so that
    the dot product is the correlation. Ties go to the lowest pool index. Public because
    the evaluate stage's nearest-slice baseline is this same look-up.
    """
    best = np.full(len(queries), -1.0, dtype=np.float32)
    where = np.full(len(queries), -1, dtype=np.int64)
    if len(pool) == 0 or len(queries) == 0:
        return best, where
    for start in range(0, len(queries), _ROW_BLOCK):
        stop = min(len(queries), start + _ROW_BLOCK)
        corr = queries[start:stop] @ pool.T
        where[start:stop] = corr.argmax(axis=1)
        best[start:stop] = corr[np.arange(stop - start), where[start:stop]]
    return best, where


def nearest_neighbour_scores(truth: np.ndarray, copied: np.ndarray) -> dict[str, float]:
    """Accuracy and balanced accuracy of copying the most similar training slice's label.

    No learning at all, only look-up: on a split where a brain's neighbouring slices sit
    in train, this alone scores high, which is the ceiling a memorising network reaches
    too. On a subject-disjoint split it shows how much plain image similarity says.
    """
    if len(truth) == 0:
        return {"accuracy": 0.0, "balanced_accuracy": 0.0}
    recalls = [float((copied[truth == c] == c).mean()) for c in np.unique(truth)]
    return {
        "accuracy": round(float((copied == truth).mean()), 6),
        "balanced_accuracy": round(float(np.mean(recalls)), 6),
    }


def _shared(a: set, b: set) -> int:
    return len(a & b)


def leakage_report(df: pd.DataFrame, thumbs: np.ndarray, threshold: float) -> dict[str, Any]:
    """Measure leakage directly instead of trusting the strategy's label.

    For val and test: how many images have a near-duplicate in train (thumbnail
    correlation >= ``threshold``; rows of ``thumbs`` align with rows of ``df``), plus
    the same fraction at a few other thresholds, and how many images belong to a
    subject that is also in train. Subjects shared between each pair of splits are
    counted too (pseudo-subjects count: they are recovered volumes).
    """
    if len(thumbs) != len(df):
        raise ValueError(f"leakage_report: {len(thumbs)} thumbnails for {len(df)} rows")
    split = df["split"].to_numpy()
    keys = _group_keys(df).to_numpy()
    train_x = thumbs[split == "train"]
    labels = df["label"].to_numpy()
    train_labels = labels[split == "train"]
    subjects = {s: set(keys[split == s].tolist()) for s in SPLITS}
    report: dict[str, Any] = {"threshold": float(threshold)}
    for s in ("val", "test"):
        q = np.flatnonzero(split == s)
        best, nearest = most_correlated(thumbs[q], train_x)
        copied = train_labels[nearest] if len(train_labels) else np.full(len(q), "")
        n = len(q)
        n_dup = int((best >= threshold).sum())
        in_train = int(sum(k in subjects["train"] for k in keys[q]))
        report[s] = {
            "n_images": n,
            "n_near_duplicate_in_train": n_dup,
            "fraction_near_duplicate": round(n_dup / n, 6) if n else 0.0,
            "threshold": float(threshold),
            "median_max_corr_to_train": round(float(np.median(best)), 6) if n else 0.0,
            "fraction_by_threshold": {
                f"corr_{t:g}": round(float((best >= t).mean()), 6) if n else 0.0
                for t in LEAKAGE_SWEEP
            },
            "n_images_subject_in_train": in_train,
            "fraction_subject_in_train": round(in_train / n, 6) if n else 0.0,
            "nearest_train_neighbour": nearest_neighbour_scores(labels[q], copied),
        }
    report["shared_subjects"] = {
        "train_val": _shared(subjects["train"], subjects["val"]),
        "train_test": _shared(subjects["train"], subjects["test"]),
        "val_test": _shared(subjects["val"], subjects["test"]),
    }
    return report


# --------------------------------------------------------------------------- report


def split_csv_text(df: pd.DataFrame, path: Path) -> str:
    """The exact bytes of split.csv: its contract's columns, rows sorted by path, ``\\n`` ends."""
    return SPLIT_CSV.text(df.sort_values("path", kind="stable"), path)


def test_fingerprint(csv_text: str) -> str:
    """sha256 over the raw lines of split.csv whose ``split`` is ``test``.

    Promotion compares this between runs: equal fingerprints mean both models were
    scored on the same images with the same labels. Works on the file text, so any
    later stage can recompute it from ``data/processed/split.csv`` alone.
    """
    import csv

    lines = csv_text.splitlines(keepends=True)
    if not lines:
        return hashlib.sha256(b"").hexdigest()
    header = next(csv.reader([lines[0]]))
    if "split" not in header:
        raise AlzstageError("split.csv has no 'split' column; re-run `alzstage split`")
    col = header.index("split")
    h = hashlib.sha256()
    for line in lines[1:]:
        row = next(csv.reader([line]))
        if len(row) > col and row[col] == "test":
            h.update(line.encode())
    return h.hexdigest()


test_fingerprint.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def fingerprint_split_file(path: Path) -> str:
    """:func:`test_fingerprint` of a split.csv on disk that holds to its contract."""
    read_split(path)
    return test_fingerprint(Path(path).read_bytes().decode())


def _per_split_class(df: pd.DataFrame, classes: list[str], value: pd.Series) -> dict:
    table: dict[str, dict[str, int]] = {}
    for s in SPLITS:
        part = df["split"] == s
        row = {c: int(value[part & (df["label"] == c)].nunique()) for c in classes}
        table[s] = row
    return table


def summarize_split(
    df: pd.DataFrame,
    params: Params,
    leakage: dict[str, Any],
    fingerprint: str,
    all_labels: Sequence[str] = (),
) -> dict[str, Any]:
    """Build split.json (numbers in nested dicts so ``dvc metrics`` can diff them)."""
    strategy = params.split.strategy
    present = set(df["label"].tolist()) | set(all_labels)
    classes = [c for c in params.base.classes if c in present]
    classes += sorted(present - set(classes))
    keys = _group_keys(df)
    counts = {
        s: {c: int(((df["split"] == s) & (df["label"] == c)).sum()) for c in classes}
        for s in SPLITS
    }
    for s in SPLITS:
        counts[s]["total"] = int((df["split"] == s).sum())
    subjects = _per_split_class(df, classes, keys)
    for s in SPLITS:
        subjects[s]["total"] = int(keys[df["split"] == s].nunique())
    sizes = keys.value_counts().to_numpy()
    source = df["subject_source"].value_counts()
    pseudo = df["subject_source"] == "pseudo"
    groups = {
        "n_groups": len(sizes),
        "min_size": int(sizes.min()) if len(sizes) else 0,
        "median_size": float(np.median(sizes)) if len(sizes) else 0.0,
        "max_size": int(sizes.max()) if len(sizes) else 0,
        "per_class": {c: int(keys[df["label"] == c].nunique()) for c in classes},
        "rows_by_subject_source": {k: int(source.get(k, 0)) for k in ("given", "pseudo", "none")},
        "n_pseudo_groups": int(keys[pseudo].nunique()),
        "group_threshold": params.split.group_threshold,
        "thumb_size": params.split.thumb_size,
    }
    tiny = {c: dict(e) for c, e in df.attrs.get("tiny_classes", {}).items()}
    for cls, entry in tiny.items():
        if cls in classes:
            entry["subjects_per_split"] = {s: subjects[s][cls] for s in SPLITS}
            entry["absent_from"] = [s for s in SPLITS if counts[s][cls] == 0]
    dropped = sorted(c for c, e in tiny.items() if e.get("policy") == "drop")
    data_classes = sorted(set(df["label"].tolist()))
    absent = {s: [c for c in classes if c in data_classes and counts[s][c] == 0] for s in SPLITS}
    leaky = strategy != "subject"
    if leaky:
        warning = LEAKY_WARNINGS[strategy]
    elif int(source.get("pseudo", 0)):
        sp = params.split
        warning = (
            "Subject ids were recovered from image similarity (pseudo-subjects, "
            f"group_threshold={sp.group_threshold:g}, thumb_size={sp.thumb_size}): no "
            "recovered subject is in two splits; see groups for the recovered group sizes."
        )
    else:
        warning = ""
    return {
        "strategy": strategy,
        "leaky": leaky,
        "warning": warning,
        "subject_ids": (
            "pseudo"
            if int(source.get("pseudo", 0)) and not int(source.get("given", 0))
            else "given"
            if not int(source.get("pseudo", 0))
            else "mixed"
        ),
        "seed": params.base.seed,
        "test_size": params.split.test_size,
        "val_size": params.split.val_size,
        "n_images": len(df),
        "counts": counts,
        "subjects": subjects,
        "groups": groups,
        "leakage": leakage,
        "tiny_classes": tiny,
        "dropped_classes": dropped,
        "classes_without_data": [c for c in params.base.classes if c not in present],
        "absent": absent,
        "fingerprint": fingerprint,
    }


# --------------------------------------------------------------------------- I/O shell


def _read_input(params: Params, paths: Paths) -> pd.DataFrame:
    src = paths.validated_manifest
    df = read_manifest(src)
    if df.empty:
        raise AlzstageError(f"{src}: manifest has no rows; nothing to split (check data.source)")
    dup = df["path"][df["path"].duplicated()]
    if len(dup):
        raise AlzstageError(
            f"{src}: path {dup.iloc[0]!r} appears more than once; re-run `alzstage download`"
        )
    unknown = sorted(set(df["label"].tolist()) - set(params.base.classes))
    if unknown:
        raise AlzstageError(
            f"{src}: labels {unknown} are not in params.yaml base.classes "
            f"{params.base.classes}; add them (or base.class_aliases) and re-run download"
        )
    df["subject"] = df["subject"].astype(str).str.strip()
    return df.sort_values("path", kind="stable").reset_index(drop=True)


def assign_subjects(df: pd.DataFrame, thumbs: np.ndarray, threshold: float) -> pd.DataFrame:
    """Fill ``subject`` / ``subject_source``: given ids kept, missing ones recovered.

    Rows whose thumbnail has no variance (blank images) cannot be grouped and get
    ``subject_source = none``; the subject split then treats each as its own group.
    """
    df = df.copy()
    subject = df["subject"].astype(str).str.strip().to_numpy(dtype=object)
    source = np.where(subject != "", "given", "pseudo").astype(object)
    need = subject == ""
    if need.any():
        subject[need] = pseudo_subjects(thumbs[need], df["label"].to_numpy()[need], threshold)
        blank = need & ~np.any(thumbs != 0, axis=1)
        subject[blank] = ""
        source[blank] = "none"
    df["subject"] = subject.astype(str)
    df["subject_source"] = source.astype(str)
    return df


def run_split(params: Params, paths: Paths) -> StageResult:
    """Read the validated manifest, split it, write split.csv and reports/split.json."""
    import time

    sp = params.split
    df = _read_input(params, paths)
    t0 = time.perf_counter()
    store = PixelStore.read(paths.pixels)  # decoded once, by the decode stage
    thumbs = correlation_rows(store.thumbnails_for(df["path"], sp.thumb_size))
    t1 = time.perf_counter()
    df = assign_subjects(df, thumbs, sp.group_threshold)
    t2 = time.perf_counter()

    out = STRATEGIES[sp.strategy](df, params)
    if sp.strategy == "subject":
        assert_no_subject_leakage(out)
    pos = pd.Index(df["path"]).get_indexer(out["path"])
    leakage = leakage_report(out, thumbs[pos], sp.near_duplicate_threshold)

    csv_text = split_csv_text(out, paths.split_file)
    fingerprint = test_fingerprint(csv_text)
    report = summarize_split(out, params, leakage, fingerprint, all_labels=df["label"].tolist())
    # Named here, where the validated manifest is read anyway; promote reads it downstream.
    report["dataset"] = dataset_name(params.data.source, df["sha256"], params.data.name)
    report["data_source"] = params.data.source
    missing = [f"{c} ({s})" for s, cs in report["absent"].items() for c in cs]
    missing += [f"{c} (all: dropped)" for c in report["dropped_classes"]]
    missing += [f"{c} (all: no images in the manifest)" for c in report["classes_without_data"]]
    if missing:
        warnings.warn(
            f"split: classes without images in some splits: {', '.join(missing)}; "
            f"see 'absent' and 'tiny_classes' in {paths.split_report}",
            UserWarning,
            stacklevel=2,
        )
    if report["leaky"]:
        warnings.warn(
            f"split.strategy={sp.strategy}: {report['warning']}", UserWarning, stacklevel=2
        )

    SplitReport.check(report, paths.split_report)  # evaluate reads it through this contract
    with atomic_path(paths.split_file) as tmp:
        tmp.write_bytes(csv_text.encode())
    write_json(paths.split_report, report)

    counts = report["counts"]
    metrics = {
        "n_images": float(len(out)),
        "n_train": float(counts["train"]["total"]),
        "n_val": float(counts["val"]["total"]),
        "n_test": float(counts["test"]["total"]),
        "n_groups": float(report["groups"]["n_groups"]),
        "leaky": float(report["leaky"]),
        "leak_val_fraction": float(leakage["val"]["fraction_near_duplicate"]),
        "leak_test_fraction": float(leakage["test"]["fraction_near_duplicate"]),
        "nn_test_balanced_accuracy": float(
            leakage["test"]["nearest_train_neighbour"]["balanced_accuracy"]
        ),
        "shared_subjects_train_test": float(leakage["shared_subjects"]["train_test"]),
        "seconds_thumbnails": round(t1 - t0, 3),
        "seconds_grouping": round(t2 - t1, 3),
    }
    summary = (
        f"split ({sp.strategy}{', LEAKY' if report['leaky'] else ''}): "
        f"train {counts['train']['total']}, val {counts['val']['total']}, "
        f"test {counts['test']['total']} images in {report['groups']['n_groups']} subjects "
        f"({report['subject_ids']} ids); test near-duplicates in train "
        f"{leakage['test']['fraction_near_duplicate']:.1%} at corr>={sp.near_duplicate_threshold:g}"
    )
    return StageResult(
        metrics=metrics,
        artifacts=[paths.split_file, paths.split_report],
        tags={
            "split.strategy": sp.strategy,
            "split.leaky": str(report["leaky"]).lower(),
            "split.subject_ids": report["subject_ids"],
            "split.fingerprint": fingerprint,
            "data.name": report["dataset"],
        },
        summary=summary,
    )
