"""Two sources, one brain: resized copies across ``data.sources`` found and grouped (issue #24).

The public copies of the Alzheimer MRI slices are repackagings of the same brains under
other folder names and at other sizes (128x128 instead of 176x208). Trained on one and
tested on the other, a model meets its own training brains again. So, when
``data.source`` is ``multi``, the split runs this check before it assigns anyone:

1. every pair of sources is searched for slices that are each other's best match with
   correlation >= ``split.near_duplicate_threshold`` on aspect-free thumbnails
   (:func:`alzstage.data.similarity.aspect_free`, :func:`~alzstage.data.similarity.mutual_matches`:
   size, padding and stretching drop out, memory is one 64 MB tile);
2. the subject groups (given or recovered) of both slices of every match become one
   group (union-find), so the whole brain, every slice of it in every source, lands in
   one split;
3. the report counts, per pair of sources, the matched slices, the brains merged and
   the matches whose labels disagree, and after the split the matches whose two slices
   sit in different splits (0 under ``split.strategy: subject``, or the stage fails).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

from alzstage.config import Params
from alzstage.data.similarity import aspect_free, mutual_matches
from alzstage.data.split_report import group_keys


def source_ids(rel_paths: Sequence[str], params: Params) -> np.ndarray | None:
    """The ``data.sources`` id of each manifest path (its first folder); None for one source.

    Read from the paths, not from ``data.sources``: the rows say where they came from,
    and the split stage then depends on no key but ``data.source``.
    """
    if params.data.source != "multi":
        return None
    return np.asarray([str(p).split("/", 1)[0] for p in rel_paths]).astype(str)


def pair_name(a: str, b: str) -> str:
    """``a/b`` for a pair of source ids, in sorted order: its key in split.json and MLflow."""
    return "/".join(sorted((a, b)))


def find_copies(thumbs: np.ndarray, sources: np.ndarray, threshold: float) -> pd.DataFrame:
    """Matched slices across every pair of sources: columns i, j (row numbers), corr, pair.

    ``thumbs`` are the decode stage's uint8 thumbnails (N, side, side), one per row.
    Slices of one source are never compared here: within a source the subject grouping
    already chains a brain's slices.
    """
    rows = aspect_free(thumbs)
    ids = sorted(set(sources.tolist()))
    found = []
    for a, b in combinations(ids, 2):
        ia, ib = np.flatnonzero(sources == a), np.flatnonzero(sources == b)
        i, j, corr = mutual_matches(rows[ia], rows[ib], threshold)
        found.append(pd.DataFrame({"i": ia[i], "j": ib[j], "corr": corr, "pair": pair_name(a, b)}))
    columns = ["i", "j", "corr", "pair"]
    return pd.concat(found, ignore_index=True)[columns] if found else pd.DataFrame(columns=columns)


def _roots(keys: list[str], edges: list[tuple[str, str]]) -> dict[str, str]:
    """Union-find: each key onto the smallest key of its component (deterministic ids)."""
    parent = {k: k for k in keys}

    def find(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {k: find(k) for k in keys}


def merge_brains(df: pd.DataFrame, copies: pd.DataFrame) -> pd.DataFrame:
    """``df`` with the subject of every matched slice's group set to one shared id.

    The shared id is the smallest of the merged groups' ids, so it depends only on the
    data. Rows in no match keep their subject.
    """
    if copies.empty:
        return df
    keys = group_keys(df).to_numpy()
    edges = list(zip(keys[copies["i"]], keys[copies["j"]], strict=True))
    root = _roots(sorted(set(keys.tolist())), edges)
    merged = np.asarray([root[k] for k in keys], dtype=object)
    out = df.copy()
    changed = merged != keys
    out.loc[changed, "subject"] = merged[changed]
    return out


def copies_report(
    df: pd.DataFrame, copies: pd.DataFrame, sources: np.ndarray, threshold: float
) -> dict[str, Any]:
    """split.json's ``cross_source``: per pair of sources, what was found and merged.

    ``df`` holds the rows before :func:`merge_brains` (their own subject groups), so
    ``n_brains`` counts, for each side, how many of its groups have a copy on the other.
    """
    keys = group_keys(df).to_numpy()
    labels = df["label"].to_numpy()
    ids = sorted(set(sources.tolist()))
    pairs: dict[str, Any] = {}
    for a, b in combinations(ids, 2):
        part = copies[copies["pair"] == pair_name(a, b)]
        i, j = part["i"].to_numpy(), part["j"].to_numpy()
        pairs[pair_name(a, b)] = {
            "n_matched_slices": len(part),
            "n_brains": {a: len(set(keys[i].tolist())), b: len(set(keys[j].tolist()))},
            "n_label_conflicts": int((labels[i] != labels[j]).sum()),
            "min_corr": round(float(part["corr"].min()), 6) if len(part) else 0.0,
        }
    return {
        "method": "mutual best match on aspect-free thumbnails (alzstage.data.similarity)",
        "threshold": float(threshold),
        "n_images": {s: int((sources == s).sum()) for s in ids},
        "pairs": pairs,
    }


def copies_across_splits(out: pd.DataFrame, df: pd.DataFrame, copies: pd.DataFrame) -> int:
    """How many matched pairs have their two slices in different splits of ``out``.

    ``df`` is the frame the row numbers of ``copies`` refer to; ``out`` the split table
    (same paths, maybe reordered, dropped classes gone).
    """
    if copies.empty:
        return 0
    split = out.set_index("path")["split"]
    paths = df["path"].to_numpy()
    a = split.reindex(paths[copies["i"]]).to_numpy()
    b = split.reindex(paths[copies["j"]]).to_numpy()
    both = pd.notna(a) & pd.notna(b)
    return int((a[both] != b[both]).sum())
