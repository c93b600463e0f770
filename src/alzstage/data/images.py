"""Turning image files into the arrays the network takes, identically everywhere.

Training, evaluation, ``predict`` and the pyfunc all call these functions, so a model
never sees differently-prepared pixels at inference than it saw in training.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alzstage.errors import ImageReadError, RequestTooLarge, UnsupportedImage

__all__ = [
    "DecodedImage",
    "PixelBudget",
    "decode_image",
    "decode_slice",
    "display_image",
    "load_batch",
    "load_gray",
    "to_model_array",
]

IMAGE_FORMATS = ("JPEG", "PNG")
# A 4096 x 4096 slice is already far beyond any MRI export; the cap exists so a tiny
# compressed file cannot make the decoder allocate gigabytes (a decompression bomb).
DEFAULT_MAX_PIXELS = 4096 * 4096
# Decoded slices are kept at most this large (shrunk while decoding): the Grad-CAM
# display size, well above the network input and the input check's 64 px.
DISPLAY_MAX_SIDE = 512


class PixelBudget:
    """Pixels one request may still decode, charged from each header before decoding.

    The per-file cap alone lets 64 files of 4096x4096 through in one request (a GiB of
    pixels); this bounds their sum. Thread-safe, so decoding may run in a pool.
    """

    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self.used = 0
        self._lock = threading.Lock()

    def charge(self, width: int, height: int, name: str) -> None:
        with self._lock:
            if self.used + width * height > self.limit:
                raise RequestTooLarge(
                    f"{name}: {width}x{height} pixels would take this request past its limit "
                    f"of {self.limit:,} decoded pixels in total; send fewer or smaller images "
                    "per request (alzstage serve: max_request_pixels)"
                )
            self.used += width * height


@dataclass(frozen=True)
class DecodedImage:
    """A decoded slice: grayscale pixels, possibly shrunk while decoding, and its real size."""

    gray: np.ndarray  # uint8 (h, w); at most ``max_side`` on the longer side if one was given
    width: int  # as stored in the file
    height: int


def decode_slice(
    source: Path | bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    max_side: int | None = None,
    budget: PixelBudget | None = None,
    formats: tuple[str, ...] | None = IMAGE_FORMATS,
) -> DecodedImage:
    """Decode a JPEG or PNG (path or bytes) to grayscale uint8, checked before decoding.

    Only JPEG and PNG decoders are tried (``formats``; ``None`` for trusted local
    training files), so an upload cannot reach Pillow's rarer (and historically buggier)
    format plugins. The pixel count is checked from the header against ``max_pixels``
    and ``budget`` before any pixel is decoded.

    With ``max_side``, a larger image is shrunk *while* decoding: a JPEG by the decoder
    itself (``draft``: DCT scaling by 1/2..1/8, so a 4096 px JPEG never exists at full
    size), then any format by integer box reduction (``reduce``), to between
    ``max_side`` and ``2 * max_side`` on the longer side. Images up to ``2 * max_side``
    are decoded exactly as training decoded them.

    Errors are :class:`ImageReadError` subclasses whose ``status`` is the HTTP code the
    API answers with; ``name`` labels bytes in messages.
    """
    from PIL import Image, UnidentifiedImageError

    name = name or (str(source) if isinstance(source, Path) else "upload")
    fp = source if isinstance(source, Path) else io.BytesIO(source)
    try:
        with Image.open(fp, formats=formats) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageReadError(
                    f"{name}: {w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} "
                    "(decompression-bomb guard); downscale the image (alzstage serve: --max-pixels)"
                )
            if budget is not None:
                budget.charge(w, h, name)
            shrink = max_side is not None and max(w, h) > 2 * max_side
            if shrink and im.format == "JPEG":
                scale = max_side / max(w, h)
                im.draft(None, (max(1, int(w * scale)), max(1, int(h * scale))))
            im.load()
            gray = im.convert("L")
            if shrink and max(gray.size) > 2 * max_side:
                gray = gray.reduce(max(gray.size) // max_side)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{name}: {exc}") from None
    except UnidentifiedImageError:
        raise UnsupportedImage(
            f"{name}: not a JPEG or PNG image; send a .jpg/.jpeg or .png MRI slice"
        ) from None
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(
            f"{name}: the image is damaged or truncated ({exc}); re-export it as JPEG or PNG"
        ) from None
    return DecodedImage(gray=np.asarray(gray, dtype=np.uint8), width=w, height=h)


def decode_image(
    source: Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
) -> np.ndarray:
    """Decode a JPEG or PNG to grayscale uint8 (H, W) at its own size (see :func:`decode_slice`)."""
    return decode_slice(source, max_pixels, name).gray


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


def display_image(gray: np.ndarray, max_side: int = DISPLAY_MAX_SIDE) -> np.ndarray:
    """The original slice, shrunk to at most ``max_side`` so overlays stay small files."""
    h, w = gray.shape
    scale = max_side / max(h, w)
    if scale >= 1:
        return gray
    return to_model_array(gray, (max(1, round(h * scale)), max(1, round(w * scale))))


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
