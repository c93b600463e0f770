"""Intensity normalisation, and the mapping onto the 8-bit range the 2D model was trained on.

MRI intensities have no physical unit: two scanners (or two sessions) give the same
tissue different numbers. Clipping at percentiles removes the few hot or negative voxels
that would otherwise set the scale; z-score or min-max then puts every volume on one scale.

The 8-bit mapping reuses the demo's convention instead of inventing one: brain pixels
of the slices rendered by :mod:`alzstage.data.demo` (skull-stripped, black background)
have mean ~128 and SD ~77, with their 0.5th..99.5th percentiles spanning ~1..248
(measured over 12 rendered subjects, 30 slices each; ``tests/test_neuro_slices.py``
re-measures it). A z-scored brain is mapped onto that mean and SD, a min-max one onto
that range, so real volumes land in the intensity range the model saw in training.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

DEMO_BRAIN_MEAN = 128.0
DEMO_BRAIN_SD = 77.0
DEMO_BRAIN_RANGE = (1.0, 248.0)

Method = Literal["zscore", "minmax"]


def clip_percentiles(
    data: np.ndarray, mask: np.ndarray, percentiles: tuple[float, float]
) -> np.ndarray:
    """``data`` clipped to the given percentiles of the voxels inside ``mask`` (float32)."""
    inside = np.asarray(data, dtype=np.float32)[mask]
    if inside.size == 0:
        return np.zeros_like(data, dtype=np.float32)
    lo, hi = np.percentile(inside, percentiles)  # float64 scalars
    # Bounds as float32, so a float32 volume is clipped in float32: the same values as
    # clipping in float64 and casting back, without a float64 copy of the volume.
    lo32, hi32 = np.float32(lo), np.float32(hi)
    return np.clip(data, lo32, hi32).astype(np.float32, copy=False)


def normalise_intensity(
    data: np.ndarray,
    mask: np.ndarray,
    method: Method = "zscore",
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> np.ndarray:
    """Percentile-clip, then z-score or min-max, with statistics from ``mask`` voxels only.

    Statistics come from the brain, not the whole field of view: the share of background
    and neck in a scan depends on how it was acquired, not on the brain.
    """
    clipped = clip_percentiles(data, mask, percentiles)
    inside = clipped[mask]
    if inside.size == 0:
        return np.zeros_like(clipped)
    if method == "zscore":
        sd = float(inside.std())
        return ((clipped - float(inside.mean())) / (sd if sd > 1e-9 else 1.0)).astype(np.float32)
    if method == "minmax":
        lo, hi = float(inside.min()), float(inside.max())
        return ((clipped - lo) / (hi - lo if hi - lo > 1e-9 else 1.0)).astype(np.float32)
    raise ValueError(f"normalise: unknown method {method!r}; use zscore or minmax")


def to_uint8(normalised: np.ndarray, method: Method) -> np.ndarray:
    """Map normalised intensities onto the demo slices' 8-bit range (see module docstring)."""
    if method == "zscore":
        values = DEMO_BRAIN_MEAN + DEMO_BRAIN_SD * np.asarray(normalised, dtype=np.float32)
    else:
        lo, hi = DEMO_BRAIN_RANGE
        values = lo + (hi - lo) * np.asarray(normalised, dtype=np.float32)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
