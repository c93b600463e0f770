"""Near-duplicate detection: the one place that says when two slices are "the same image".

Every question of the form "is this slice (nearly) that one?" is answered here, so the
answers agree: the split's subject recovery (:func:`pseudo_subjects`) and leakage report,
the cross-source duplicate check (:func:`mutual_matches` on :func:`aspect_free`
thumbnails), the evaluate stage's nearest-slice baseline and the input check's
"seen in training" leak guard (:func:`most_correlated`).

The measure is the Pearson correlation of small grayscale thumbnails: each thumbnail
becomes a zero-mean, unit-norm row (:func:`correlation_rows`), so a matrix product is a
table of correlations. Downsampling removes JPEG noise and makes the search cheap.
Products run in row blocks (and, for the cross-source search, column blocks too) so that
memory stays bounded whatever the number of images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from alzstage.errors import AlzstageError

# Neighbours per slice in the mutual-kNN graph: one slice above and one below. With k=1
# a volume falls apart into pairs; with k>=3 the spare slot lets the end slices of one
# brain link to another brain at the same height (measured on the real archive, see
# benchmarks/bench_split.py).
GROUP_NEIGHBOURS = 2
_ROW_BLOCK = 1024  # rows per matrix-product block: bounds memory at ~block*N floats
# Rows x columns per block of the cross-source search: 4096 x 4096 float32 = 64 MB at
# most, whatever the size of the two sources.
_PAIR_BLOCK = 4096
# Half-width of the aspect-free frame in standard deviations of the image's intensity
# mass: 2.2 keeps the whole brain (the mass is spread like a disc, whose edge is at 2 SD).
_MOMENT_SPREAD = 2.2


# --------------------------------------------------------------------------- thumbnails


def _thumbnail(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    from alzstage.data.images import decode_slice

    try:
        # the one decode path (16-bit PNGs, EXIF orientation), as the decode stage reads it
        gray = Image.fromarray(decode_slice(path, max_pixels=2**31, formats=None).gray)
        small = gray.resize((size, size), Image.Resampling.BILINEAR)
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


def _aspect_free_one(image: np.ndarray, side: int) -> np.ndarray:
    from scipy import ndimage

    a = np.asarray(image, dtype=np.float32)
    total = float(a.sum())
    if total <= 0:
        return np.zeros((side, side), dtype=np.float32)
    ys, xs = np.arange(a.shape[0]) + 0.5, np.arange(a.shape[1]) + 0.5
    py, px = a.sum(axis=1) / total, a.sum(axis=0) / total
    cy, cx = float(py @ ys), float(px @ xs)
    sy = max(float(np.sqrt(py @ (ys - cy) ** 2)), 1e-3)
    sx = max(float(np.sqrt(px @ (xs - cx) ** 2)), 1e-3)
    grid = ((np.arange(side) + 0.5) / side * 2 - 1) * _MOMENT_SPREAD
    yy, xx = np.meshgrid(cy + grid * sy - 0.5, cx + grid * sx - 0.5, indexing="ij")
    return ndimage.map_coordinates(a, [yy, xx], order=1, mode="constant", cval=0.0)


def aspect_free(thumbs: np.ndarray) -> np.ndarray:
    """Thumbnails re-framed on the brain itself, as correlation rows: size and aspect drop out.

    Why: public copies of one dataset are the same slices saved at other sizes. A plain
    squash (176x208 to 128x128) survives the fixed-size thumbnail (correlation 0.9999
    on the demo), but a copy padded or cropped to a square does not: its thumbnail
    correlates only 0.80-0.89 with the original and its most similar slice is another
    brain's two times out of three. So each thumbnail is resampled on a frame centred
    on its intensity mass, each axis scaled by that mass's spread along it (first and
    second moments, exact to a fraction of a pixel even at 32 px): padding, cropping of
    the black border, stretching and shifting all give the same frame. Measured on the
    640 demo slices against copies resized to 128x128: squashed 0.9999, padded to a
    square at least 0.996, cut to the central square (losing brain) median 0.995.
    """
    x = np.asarray(thumbs)
    if len(x) == 0:
        return np.zeros((0, int(np.prod(x.shape[1:]))), dtype=np.float32)
    side = x.shape[1]
    rows = correlation_rows(np.stack([_aspect_free_one(t, side) for t in x]))
    flat = x.reshape(len(x), -1)
    rows[flat.min(axis=1) == flat.max(axis=1)] = 0.0  # constant: no frame, matches nothing
    return rows


# --------------------------------------------------------------------------- look-ups


def most_correlated(queries: np.ndarray, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(highest correlation, index of that row of ``pool``) per query; index -1 if no pool.

    Rows must come from :func:`correlation_rows` (or :func:`load_thumbnails`), so that
    the dot product is the correlation. Ties go to the lowest pool index. Public because
    the evaluate stage's nearest-slice baseline and the input check's leak guard are this
    same look-up.
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


def best_both_ways(
    a: np.ndarray, b: np.ndarray, block: int = _PAIR_BLOCK
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each row's best match in the other set, both ways, in ``block`` x ``block`` tiles.

    Returns (best of a in b, its index, best of b in a, its index); ties go to the lowest
    index. One pass over the tiles answers both directions, and memory is one tile
    (64 MB at the default) however large ``a`` and ``b`` are.
    """
    best_a = np.full(len(a), -np.inf, dtype=np.float32)
    arg_a = np.full(len(a), -1, dtype=np.int64)
    best_b = np.full(len(b), -np.inf, dtype=np.float32)
    arg_b = np.full(len(b), -1, dtype=np.int64)
    for i in range(0, len(a), block):
        for j in range(0, len(b), block):
            tile = a[i : i + block] @ b[j : j + block].T
            rows, cols = tile.argmax(axis=1), tile.argmax(axis=0)
            row_best = tile[np.arange(len(tile)), rows]
            col_best = tile[cols, np.arange(tile.shape[1])]
            better = row_best > best_a[i : i + block]  # strict: the earlier tile wins ties
            best_a[i : i + block][better] = row_best[better]
            arg_a[i : i + block][better] = rows[better] + j
            better = col_best > best_b[j : j + block]
            best_b[j : j + block][better] = col_best[better]
            arg_b[j : j + block][better] = cols[better] + i
    return best_a, arg_a, best_b, arg_b


def mutual_matches(
    a: np.ndarray, b: np.ndarray, threshold: float, block: int = _PAIR_BLOCK
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i in a, j in b) that are each other's best match with correlation >= threshold.

    Why mutual: a slice that has no copy in the other set still has a best match there
    (the same height of another brain, up to 0.994 on the demo's aspect-free
    thumbnails), but that match's own best is its real original, so the pair is not
    mutual. On the demo against a resized copy of 40 of its 80 brains plus 20 brains it
    lacks, this found every copied slice and no false pair (squashed or padded copies).
    Returns (indices into a, indices into b, correlations), ordered by i.
    """
    empty = np.zeros(0, dtype=np.int64)
    if len(a) == 0 or len(b) == 0:
        return empty, empty, np.zeros(0, dtype=np.float32)
    best_a, arg_a, _, arg_b = best_both_ways(a, b, block)
    i = np.flatnonzero((arg_b[arg_a] == np.arange(len(a))) & (best_a >= threshold))
    return i, arg_a[i], best_a[i]


# --------------------------------------------------------------------------- grouping


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
    prefix: str = "",
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

    Ids are ``<prefix>pseudo-<Class>-<n:04d>``, numbered within each class in order of
    the group's first row, so they depend only on the input order (sort rows first).
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
        out[where] = [f"{prefix}pseudo-{cls}-{r:04d}" for r in rank[comp]]
    return out.astype(str)
