"""Simple atrophy measurements of a slice, and where each slice sits in its brain.

Why this module exists: on the real archive most of what separates the stages is global
atrophy, i.e. how much of the brain is CSF (dark). A radiologist would eyeball exactly
that, so every brain-level report compares the network with a logistic model on these
numbers (the *morphometric baseline*), and the brain-level model may use them too.

Measured on the 5,120-slice archive (160 brains; brain-level logistic regression on the
mean over a brain's slices, 5-fold subject CV repeated 5 times;
``benchmarks/bench_brain_features.py``, docs/models.md): this dark fraction, below 25% of
the head's 99th percentile, scores a 3-class balanced accuracy of 0.498 at the native
208x176, 0.476 at half size and 0.471 at the network's 56x48. That is why the decode
stage measures it on the full-size image, next to the input check's features, and why
``predict`` measures it on the file, not on the network input. A relative threshold
(not a fixed grey level) keeps it meaningful for 16-bit or differently windowed sources;
at full size it matches the fixed level 60 (0.496) and beats 40% of the median (0.459).
The CSF fraction by quarters of the recovered slice order scored 0.506: no clear gain for
four features instead of one on ~128 training brains, so the brain model uses the mean.

:func:`slice_order` recovers the order of a brain's slices from the images alone
(adjacent slices are near-duplicates): the Fiedler vector of the slices' similarity
graph. On the archive's test folder, whose file names carry the slice number, it
recovered the order exactly for all 156 brains with more than 3 named slices (Spearman
|rho| = 1.0). It is oriented so that the head area shrinks along the order.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Per-slice measurements, in the order the pixel store and the brain model keep them.
MORPH_FEATURES = ("morph_csf_fraction", "morph_head_fraction")
#: A head pixel darker than this fraction of the head's 99th percentile counts as CSF.
CSF_LEVEL = 0.25
#: Background: darker than this fraction of the image's maximum (the slices are
#: skull-stripped on black, so the head is everything clearly above zero).
HEAD_LEVEL = 0.1
#: Similarity bandwidth for :func:`slice_order` (correlations of neighbours are ~0.99).
ORDER_BANDWIDTH = 0.01


def slice_morphometry(gray: np.ndarray) -> dict[str, float]:
    """CSF fraction of the head and the head's share of the image, for one 2-D slice.

    The head is the filled mask of pixels above 10% of the image maximum; CSF is the
    head pixels below 25% of the head's 99th percentile (ventricles, widened sulci).
    A blank image measures 0 and 0: nothing to measure is not an error here; the input
    check flags blank inputs.
    """
    g = np.asarray(gray, dtype=np.float32)
    if g.ndim != 2:
        raise ValueError(f"slice_morphometry: expected a 2-D grayscale slice, got {g.shape}")
    top = float(g.max()) if g.size else 0.0
    if top <= 0:
        return dict.fromkeys(MORPH_FEATURES, 0.0)
    head = ndimage.binary_fill_holes(g > HEAD_LEVEL * top)
    inside = g[head]
    if inside.size == 0:
        return dict.fromkeys(MORPH_FEATURES, 0.0)
    p99 = float(np.percentile(inside, 99))
    return {
        "morph_csf_fraction": float((inside < CSF_LEVEL * p99).mean()),
        "morph_head_fraction": float(head.mean()),
    }


def slice_order(thumbs: np.ndarray, head_fraction: np.ndarray | None = None) -> np.ndarray:
    """Indices that put one brain's slices in anatomical order (spectral seriation).

    ``thumbs`` (n, ...) are any same-size copies of the slices; ``head_fraction`` (n,)
    orients the order so that the head area shrinks along it (without it the direction
    is the eigenvector's sign). One or two slices are returned as they are.
    """
    x = np.asarray(thumbs, dtype=np.float64).reshape(len(thumbs), -1)
    n = len(x)
    if n < 3:
        return np.arange(n)
    x = x - x.mean(axis=1, keepdims=True)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    weights = np.exp((x @ x.T - 1.0) / ORDER_BANDWIDTH)
    np.fill_diagonal(weights, 0.0)
    laplacian = np.diag(weights.sum(axis=1)) - weights
    _, vectors = np.linalg.eigh(laplacian)
    order = np.argsort(vectors[:, 1], kind="stable")
    if head_fraction is not None:
        area = np.asarray(head_fraction, dtype=np.float64)[order]
        if area[0] < area[-1]:
            order = order[::-1]
    return order
