"""Turning image files into the arrays the network takes, identically everywhere.

Training, evaluation, ``predict`` and the pyfunc all call these functions, so a model
never sees differently-prepared pixels at inference than it saw in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from alzstage.errors import ImageReadError

__all__ = ["ImageReadError", "load_batch", "load_gray", "to_model_array"]


def to_model_array(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Grayscale uint8 (H, W) at the model's input size from any 2D/3D pixel array."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        im = Image.fromarray(arr[..., :3].astype(np.uint8)).convert("L")
    elif arr.ndim == 3 and arr.shape[-1] == 1:
        im = Image.fromarray(arr[..., 0].astype(np.uint8))
    elif arr.ndim == 2:
        if arr.dtype != np.uint8:
            lo, hi = float(np.min(arr)), float(np.max(arr))
            arr = ((arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)).astype(
                np.uint8
            )
        im = Image.fromarray(arr)
    else:
        raise ImageReadError(f"expected a 2D grayscale or HxWxC image array, got shape {arr.shape}")
    h, w = size
    if im.size != (w, h):
        im = im.resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def load_gray(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Decode one image file to uint8 (H, W) at ``size`` = (height, width)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            gray = im.convert("L")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageReadError(
            f"{path}: not a readable image ({exc}); expected JPEG or PNG"
        ) from None
    return to_model_array(np.asarray(gray), size)


def load_batch(paths: Sequence[Path], size: tuple[int, int], workers: int = 4) -> np.ndarray:
    """Decode many files in parallel (Pillow releases the GIL while decoding)."""
    if not paths:
        return np.zeros((0, *size), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(lambda p: load_gray(Path(p), size), paths))
    return np.stack(arrays)
