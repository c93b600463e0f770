"""What the split stage reports: leakage measured directly, split.json, the test fingerprint.

Split out of :mod:`alzstage.data.split` (issue #22): the split decides who sits where;
this module measures the result (near-duplicates of train in val and test, subjects in
two splits, the nearest-slice baseline), fingerprints the test rows and builds
``reports/split.json``. The similarity look-ups are :mod:`alzstage.data.similarity`'s.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from alzstage.artifacts import SPLIT_CSV, SPLITS, read_split
from alzstage.config import Params, Paths
from alzstage.data.similarity import most_correlated
from alzstage.errors import AlzstageError

# Extra thresholds reported next to the configured one, so the near-duplicate numbers
# can be read without re-running (cross-subject slices at the same height can correlate
# above 0.97 at 32x32; adjacent slices of one brain stay above ~0.99).
LEAKAGE_SWEEP = (0.95, 0.97, 0.98, 0.99, 0.995)

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


def group_keys(df: pd.DataFrame) -> pd.Series:
    """Subject per row; rows without one are their own group (keyed by path)."""
    subj = df["subject"].astype(str)
    return subj.where(subj != "", "row:" + df["path"].astype(str))


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
    keys = group_keys(df).to_numpy()
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


def _groups(df: pd.DataFrame, params: Params, classes: list[str]) -> dict[str, Any]:
    """The ``groups`` block: how many subject groups, how large, and where their ids came from."""
    keys = group_keys(df)
    sizes = keys.value_counts().to_numpy()
    source = df["subject_source"].value_counts()
    pseudo = df["subject_source"] == "pseudo"
    return {
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


def _warning(params: Params, n_pseudo: int) -> str:
    strategy = params.split.strategy
    if strategy != "subject":
        return LEAKY_WARNINGS[strategy]
    if n_pseudo:
        sp = params.split
        return (
            "Subject ids were recovered from image similarity (pseudo-subjects, "
            f"group_threshold={sp.group_threshold:g}, thumb_size={sp.thumb_size}): no "
            "recovered subject is in two splits; see groups for the recovered group sizes."
        )
    return ""


def _subject_ids(n_given: int, n_pseudo: int) -> str:
    if n_pseudo and not n_given:
        return "pseudo"
    return "given" if not n_pseudo else "mixed"


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
    keys = group_keys(df)
    counts = {
        s: {c: int(((df["split"] == s) & (df["label"] == c)).sum()) for c in classes}
        for s in SPLITS
    }
    for s in SPLITS:
        counts[s]["total"] = int((df["split"] == s).sum())
    subjects = _per_split_class(df, classes, keys)
    for s in SPLITS:
        subjects[s]["total"] = int(keys[df["split"] == s].nunique())
    source = df["subject_source"].value_counts()
    tiny = {c: dict(e) for c, e in df.attrs.get("tiny_classes", {}).items()}
    for cls, entry in tiny.items():
        if cls in classes:
            entry["subjects_per_split"] = {s: subjects[s][cls] for s in SPLITS}
            entry["absent_from"] = [s for s in SPLITS if counts[s][cls] == 0]
    dropped = sorted(c for c, e in tiny.items() if e.get("policy") == "drop")
    data_classes = sorted(set(df["label"].tolist()))
    absent = {s: [c for c in classes if c in data_classes and counts[s][c] == 0] for s in SPLITS}
    n_given, n_pseudo = int(source.get("given", 0)), int(source.get("pseudo", 0))
    return {
        "strategy": strategy,
        "leaky": strategy != "subject",
        "warning": _warning(params, n_pseudo),
        "subject_ids": _subject_ids(n_given, n_pseudo),
        "seed": params.base.seed,
        "test_size": params.split.test_size,
        "val_size": params.split.val_size,
        "n_images": len(df),
        "counts": counts,
        "subjects": subjects,
        "groups": _groups(df, params, classes),
        "leakage": leakage,
        "tiny_classes": tiny,
        "dropped_classes": dropped,
        "classes_without_data": [c for c in params.base.classes if c not in present],
        "absent": absent,
        "fingerprint": fingerprint,
    }


# --------------------------------------------------------------------------- stage output


def warn_missing(report: dict[str, Any], params: Params, paths: Paths) -> None:
    """Warn about classes missing from a split and about a leaky strategy (run_split's caller)."""
    missing = [f"{c} ({s})" for s, cs in report["absent"].items() for c in cs]
    missing += [f"{c} (all: dropped)" for c in report["dropped_classes"]]
    missing += [f"{c} (all: no images in the manifest)" for c in report["classes_without_data"]]
    if missing:
        warnings.warn(
            f"split: classes without images in some splits: {', '.join(missing)}; "
            f"see 'absent' and 'tiny_classes' in {paths.split_report}",
            UserWarning,
            stacklevel=3,
        )
    if report["leaky"]:
        warnings.warn(
            f"split.strategy={params.split.strategy}: {report['warning']}",
            UserWarning,
            stacklevel=3,
        )


def stage_metrics(report: dict[str, Any], seconds: tuple[float, float]) -> dict[str, float]:
    """The split stage's MLflow metrics, read off split.json."""
    counts, leakage = report["counts"], report["leakage"]
    metrics = {
        "n_images": float(report["n_images"]),
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
        "seconds_thumbnails": round(seconds[0], 3),
        "seconds_grouping": round(seconds[1], 3),
    }
    for pair, found in report.get("cross_source", {}).get("pairs", {}).items():
        metrics[f"cross_source.{pair}.n_matched_slices"] = float(found["n_matched_slices"])
    return metrics


def stage_summary(report: dict[str, Any], params: Params) -> str:
    """The one line the CLI prints after the split."""
    sp, counts, leakage = params.split, report["counts"], report["leakage"]
    text = (
        f"split ({sp.strategy}{', LEAKY' if report['leaky'] else ''}): "
        f"train {counts['train']['total']}, val {counts['val']['total']}, "
        f"test {counts['test']['total']} images in {report['groups']['n_groups']} subjects "
        f"({report['subject_ids']} ids); test near-duplicates in train "
        f"{leakage['test']['fraction_near_duplicate']:.1%} at corr>={sp.near_duplicate_threshold:g}"
    )
    pairs = report.get("cross_source", {}).get("pairs", {})
    if pairs:
        found = ", ".join(f"{p} {v['n_matched_slices']}" for p, v in pairs.items())
        text += f"; cross-source copies grouped as one brain: {found} slices"
    return text
