"""Axial slices in MNI space, drawn exactly like the demo (and hence Kaggle) slices.

The grid is the demo's (:mod:`alzstage.neuro.space` holds it for both):
square pixels sized so the 208 x 176 mm Kaggle field of view fits the image, centred on
the brain centre in MNI space, radiological orientation (anterior at the top, the
patient's right on the image's left). Slices are evenly spaced over a z-range in MNI mm.

Each output pixel is sampled once from the subject's original voxels, through the
registration: there is no intermediate resampled volume, so no double interpolation.
"""

from __future__ import annotations

import numpy as np

from alzstage.neuro.register import resample
from alzstage.neuro.space import BRAIN_CENTRE_MM, pixel_mm


def slice_positions(z_range_mm: tuple[float, float], n_slices: int) -> np.ndarray:
    """MNI z (mm) of ``n_slices`` evenly spaced slices over the range (its centre for one)."""
    lo, hi = z_range_mm
    if n_slices == 1:
        return np.array([(lo + hi) / 2.0])
    return np.linspace(lo, hi, n_slices)


def slice_grid(
    image_size: tuple[int, int], z_mm: np.ndarray
) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of the slice stack as a 3D grid: axes (column, row, slice) -> MNI mm.

    Column index grows towards the patient's left (x decreasing) and row index towards
    posterior (y decreasing): radiological view with anterior at the top, as in
    ``alzstage.data.demo.render_subject``.
    """
    height, width = int(image_size[0]), int(image_size[1])
    mm = pixel_mm((height, width))
    z = np.asarray(z_mm, dtype=np.float64)
    dz = float(z[1] - z[0]) if len(z) > 1 else 1.0
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-mm, -mm, dz])
    affine[:3, 3] = [
        BRAIN_CENTRE_MM[0] + (width - 1) / 2.0 * mm,
        BRAIN_CENTRE_MM[1] + (height - 1) / 2.0 * mm,
        float(z[0]),
    ]
    return (width, height, len(z)), affine


def sample_slices(
    data: np.ndarray,
    affine: np.ndarray,
    template_to_subject: np.ndarray,
    image_size: tuple[int, int],
    z_mm: np.ndarray,
    nearest: bool = False,
) -> np.ndarray:
    """Slices (n, height, width) of a subject volume at MNI positions, through the registration."""
    shape, grid = slice_grid(image_size, z_mm)
    stack = resample(data, affine, shape, grid, template_to_subject, nearest=nearest)
    return np.ascontiguousarray(stack.transpose(2, 1, 0))


def slice_ncc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-slice normalised cross-correlation of two (n, height, width) slice stacks.

    Computed over the pixels that are brain (non-zero) in either slice, so a brain mask
    that differs counts against the agreement, and the black background cannot inflate
    it. Two empty slices agree (1.0). Used to hold faster preprocessing settings against
    the reference ones (``benchmarks/bench_neuro.py --compare``, tests/neuro/test_neuro.py).
    """
    out = np.empty(len(a))
    for k, (x, y) in enumerate(zip(a.astype(np.float64), b.astype(np.float64), strict=True)):
        inside = (x > 0) | (y > 0)
        if not inside.any():
            out[k] = 1.0
            continue
        xs, ys = x[inside] - x[inside].mean(), y[inside] - y[inside].mean()
        denom = float(np.sqrt((xs * xs).sum() * (ys * ys).sum()))
        if denom > 0:
            out[k] = float((xs * ys).sum()) / denom
        else:  # a constant brain: agreement is equality
            out[k] = float(np.array_equal(x, y))
    return out
