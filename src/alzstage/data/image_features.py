"""Size-free features of one grayscale slice, and the 32 px thumbnail every check compares.

Measured once per image by the decode stage (:mod:`alzstage.data.pixels`) and again on
every input at prediction time (:mod:`alzstage.inference.ood`), so both must be the same
function: the input check compares one with the other.
"""

from __future__ import annotations

import numpy as np

# Features are measured on a fixed-size copy, so a 4096-pixel export and a 96-pixel
# network-size slice are judged alike; 64 px keeps the ring and the fraction precise.
ANALYSIS_SIZE = 64

THUMB_SIZE = 32  # the split stage's thumbnails, so correlations mean the same thing

BORDER_PX = 4  # outer ring of the 64 px analysis image (1/16 of a side)

FOREGROUND_LEVEL = 0.1  # of the 99th percentile

# Fine texture (the grain a scanner and its reconstruction leave) is measured on a
# 128 px copy: 64 px averages it away. Only the core of the foreground counts (eroded
# by 2 px), so the brain's outline, which every slice has, is not mistaken for grain.
FINE_SIZE = 128

FEATURES = (
    "aspect",
    "contrast",
    "foreground_fraction",
    "border_brightness",
    "foreground_texture",
    "fine_texture",
    "mean_correlation",  # last: it needs every training thumbnail (ood.fit_reference)
)


def _resized(gray: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray(np.asarray(gray, dtype=np.uint8))
    return np.asarray(im.resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32)


def thumbnail(gray: np.ndarray, side: int = THUMB_SIZE) -> np.ndarray:
    """uint8 ``side`` x ``side`` copy, made exactly as the split stage makes its thumbnails."""
    return _resized(gray, side).astype(np.uint8)


def fine_texture(gray: np.ndarray) -> float:
    """Mean distance of each foreground pixel from its 3x3 median, over the 99th percentile.

    Smooth synthetic slices score about 0.013, the Kaggle archive's real scans 0.02
    (both at 128 px): the grain of a scanner the model never saw shows here. Shrinking
    an image lowers it, so only an upper bound uses it.
    """
    from PIL import Image, ImageFilter
    from scipy import ndimage

    small = Image.fromarray(np.asarray(gray, dtype=np.uint8)).resize(
        (FINE_SIZE, FINE_SIZE), Image.Resampling.BILINEAR
    )
    a = np.asarray(small, dtype=np.float32)
    p99 = float(np.percentile(a, 99))
    core = ndimage.binary_erosion(a > FOREGROUND_LEVEL * p99, iterations=2)
    if p99 <= 0 or not core.any():
        return 0.0
    # Pillow's median (C, releases the GIL): the decode stage measures in threads
    median = np.asarray(small.filter(ImageFilter.MedianFilter(3)), dtype=np.float32)
    return float(np.abs(a - median)[core].mean() / p99)


def image_features(gray: np.ndarray) -> dict[str, float]:
    """The size-free features of one uint8 (H, W) image (all but the mean correlation)."""
    a = _resized(gray, ANALYSIS_SIZE)
    p1, p99 = (float(v) for v in np.percentile(a, (1, 99)))
    fg = a > FOREGROUND_LEVEL * p99 if p99 > 0 else np.zeros(a.shape, dtype=bool)
    ring = np.ones(a.shape, dtype=bool)
    ring[BORDER_PX:-BORDER_PX, BORDER_PX:-BORDER_PX] = False
    inside = a[fg]
    h, w = np.asarray(gray).shape[:2]
    return {
        "aspect": w / h,
        "contrast": (p99 - p1) / 255.0,
        "foreground_fraction": float(fg.mean()),
        "border_brightness": float(a[ring].mean()) / max(p99, 1.0),
        "foreground_texture": float(inside.std() / max(inside.mean(), 1e-6)) if fg.any() else 0.0,
        "fine_texture": fine_texture(gray),
    }
