"""The ``split`` stage: read the validated manifest, recover brains, split, write the split.

The splitting rules (strategies, subject folds, the leak assertion) are
:mod:`alzstage.data.split`, which the CV's fold allocation uses too; this module is the
stage alone, so that no other stage depends on it (``tests/test_stages.py``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd

from alzstage.artifacts import PixelStore, SplitReport, read_manifest
from alzstage.config import Params, Paths
from alzstage.data.duplicates import (
    copies_across_splits,
    copies_report,
    find_copies,
    merge_brains,
    source_ids,
)
from alzstage.data.identity import dataset_name
from alzstage.data.similarity import (
    correlation_rows,
    pseudo_subjects,
)
from alzstage.data.split import STRATEGIES, assert_no_subject_leakage
from alzstage.data.split_report import (
    leakage_report,
    split_csv_text,
    stage_metrics,
    stage_summary,
    summarize_split,
    test_fingerprint,
    warn_missing,
)
from alzstage.errors import AlzstageError
from alzstage.files import atomic_path, write_json
from alzstage.result import StageResult


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


def assign_subjects(
    df: pd.DataFrame, thumbs: np.ndarray, threshold: float, sources: np.ndarray | None = None
) -> pd.DataFrame:
    """Fill ``subject`` / ``subject_source``: given ids kept, missing ones recovered.

    Rows whose thumbnail has no variance (blank images) cannot be grouped and get
    ``subject_source = none``; the subject split then treats each as its own group.
    With ``sources`` (one id per row, several sources) slices are chained within their
    own source, ids prefixed ``<source>:``: the neighbour search is tuned on one volume's
    adjacent slices, and a copy in another source is the cross-source check's to find.
    """
    df = df.copy()
    subject = df["subject"].astype(str).str.strip().to_numpy(dtype=object)
    source = np.where(subject != "", "given", "pseudo").astype(object)
    need = subject == ""
    labels = df["label"].to_numpy()
    if need.any() and sources is None:
        subject[need] = pseudo_subjects(thumbs[need], labels[need], threshold)
    elif need.any():
        for sid in sorted(set(sources[need].tolist())):
            rows = need & (sources == sid)
            subject[rows] = pseudo_subjects(thumbs[rows], labels[rows], threshold, prefix=f"{sid}:")
    if need.any():
        blank = need & ~np.any(thumbs != 0, axis=1)
        subject[blank] = ""
        source[blank] = "none"
    df["subject"] = subject.astype(str)
    df["subject_source"] = source.astype(str)
    return df


def _group(params: Params, paths: Paths) -> tuple[pd.DataFrame, np.ndarray, dict[str, Any]]:
    """The manifest with subjects filled in (and merged across sources), thumbnails, extras.

    The extras carry the timings and, with several sources, the copies found, the rows
    they refer to and the ``cross_source`` report.
    """
    sp = params.split
    df = _read_input(params, paths)
    t0 = time.perf_counter()
    store = PixelStore.read(paths.pixels)  # decoded once, by the decode stage
    raw = store.thumbnails_for(df["path"], sp.thumb_size)
    thumbs = correlation_rows(raw)
    t1 = time.perf_counter()
    sources = source_ids(df["path"].tolist(), params)
    df = assign_subjects(df, thumbs, sp.group_threshold, sources)
    extra: dict[str, Any] = {}
    if sources is not None:
        copies = find_copies(raw, sources, sp.near_duplicate_threshold)
        extra["cross_source"] = copies_report(df, copies, sources, sp.near_duplicate_threshold)
        extra["copies"], extra["grouped"] = copies, df
        df = merge_brains(df, copies)
    extra["seconds"] = (t1 - t0, time.perf_counter() - t1)
    return df, thumbs, extra


def _check_copies(out: pd.DataFrame, extra: dict[str, Any], strategy: str) -> None:
    """Count matched copies split apart; under the subject strategy none may be."""
    if "copies" not in extra:
        return
    apart = copies_across_splits(out, extra["grouped"], extra["copies"])
    extra["cross_source"]["n_matched_slices_in_two_splits"] = apart
    if apart and strategy == "subject":
        raise AlzstageError(
            f"split: {apart} cross-source copies ended up in different splits. This is a bug "
            "in alzstage.data.duplicates (merged brains must stay whole); please report it"
        )


def run_split(params: Params, paths: Paths) -> StageResult:
    """Read the validated manifest, split it, write split.csv and reports/split.json."""
    sp = params.split
    df, thumbs, extra = _group(params, paths)
    out = STRATEGIES[sp.strategy](df, params)
    if sp.strategy == "subject":
        assert_no_subject_leakage(out)
    _check_copies(out, extra, sp.strategy)
    pos = pd.Index(df["path"]).get_indexer(out["path"])
    leakage = leakage_report(out, thumbs[pos], sp.near_duplicate_threshold)

    csv_text = split_csv_text(out, paths.split_file)
    fingerprint = test_fingerprint(csv_text)
    report = summarize_split(out, params, leakage, fingerprint, all_labels=df["label"].tolist())
    # Named here, where the validated manifest is read anyway; promote reads it downstream.
    report["dataset"] = dataset_name(params.data.source, df["sha256"], params.data.name)
    report["data_source"] = params.data.source
    if "cross_source" in extra:  # one source: split.json exactly as before
        report["cross_source"] = extra["cross_source"]
    warn_missing(report, params, paths)

    SplitReport.check(report, paths.split_report)  # evaluate reads it through this contract
    with atomic_path(paths.split_file) as tmp:
        tmp.write_bytes(csv_text.encode())
    write_json(paths.split_report, report)
    return StageResult(
        metrics=stage_metrics(report, extra["seconds"]),
        artifacts=[paths.split_file, paths.split_report],
        tags={
            "split.strategy": sp.strategy,
            "split.leaky": str(report["leaky"]).lower(),
            "split.subject_ids": report["subject_ids"],
            "split.fingerprint": fingerprint,
            "data.name": report["dataset"],
        },
        summary=stage_summary(report, params),
    )
