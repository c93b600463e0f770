"""Turning image files and arrays into the pixels the network takes, identically everywhere.

Training (the decode stage), evaluation, ``predict``, the REST API and the MLflow model
all call these functions, so a model never sees differently-prepared pixels at
inference than it saw in training. The rules (``docs/threat-model.md``, "The pixels
the model sees are the pixels in the file"):

* **8-bit** grayscale, palette, RGB(A) JPEG and PNG: Pillow's ``convert("L")``, the
  pixels training has always seen (not a single pixel differs from before).
* **EXIF orientation**: applied first (``ImageOps.exif_transpose``), so a JPEG stored
  sideways with "rotate 90" in its EXIF is the upright slice a viewer shows; the size
  reported is the upright one.
* **High bit depth** (16-bit PNG, 32-bit integer) is scaled by the bit depth its values
  actually use (:func:`high_depth_to_8bit`): ``v * 255 / (2**n - 1)`` with ``n`` the
  fewest bits, 8 or more, that hold the image's largest value. A 16-bit copy of an
  8-bit slice (``v * 257``) decodes to the 8-bit slice exactly; a 12-bit DICOM export
  (0-4095) fills 0-255 instead of being clipped to white; values up to 255 stay as
  they are. Negative values (signed data): the image's min..max is stretched to 0-255.
* **Float images** (Pillow mode ``F``) and **arrays** follow :func:`pixels_8bit`:
  0-255 as is, 0-1 (detected or declared) times 255, anything else refused.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alzstage.errors import ImageReadError, RequestTooLarge, UnsupportedImage

__all__ = [
    "DecodedImage",
    "PixelBudget",
    "decode_image",
    "decode_slice",
    "display_image",
    "float_to_8bit",
    "high_depth_to_8bit",
    "load_batch",
    "load_gray",
    "pixels_8bit",
    "to_model_array",
]

#: How the pixel values of an array are read (:func:`pixels_8bit`).
PIXEL_RANGES = ("auto", "0-255", "0-1")

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
            upright = _upright(im)
            if upright is not im and upright.size == im.size[::-1]:
                w, h = h, w  # turned by 90 degrees: the upright width and height
            gray = _to_gray(upright)
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


_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _upright(im: Any) -> Any:
    """``im`` turned as its EXIF orientation tag says (``im`` itself when it says nothing)."""
    from PIL import ImageOps

    if im.getexif().get(0x0112, 1) in (1, None):  # 0x0112: Orientation; 1 = upright
        return im
    return ImageOps.exif_transpose(im)


def _to_gray(im: Any) -> Any:
    """8-bit grayscale: ``convert("L")`` for 8-bit modes, the bit-depth rule otherwise."""
    from PIL import Image

    if im.mode not in _HIGH_DEPTH_MODES:
        return im.convert("L")
    values = np.asarray(im)
    if im.mode == "F":
        return Image.fromarray(float_to_8bit(values))
    return Image.fromarray(high_depth_to_8bit(values))


def float_to_8bit(values: np.ndarray) -> np.ndarray:
    """uint8 from a float image: 0-1 times 255, 0-255 as is, any other range stretched.

    Unlike an array sent to the model (:func:`pixels_8bit`, which refuses what does not
    fit), a float image *file* carries no other statement of its scale, so its real
    min..max is the only range there is. Not-a-number pixels are a damaged file.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return v.astype(np.uint8)
    if not np.isfinite(v).all():
        raise ImageReadError("float image with NaN or infinite pixels; re-export it")
    lo, hi = float(v.min()), float(v.max())
    if lo >= 0 and hi <= 1:
        return np.rint(v * 255.0).astype(np.uint8)
    if lo >= 0 and hi <= 255:
        return np.rint(v).astype(np.uint8)
    return np.rint((v - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def high_depth_to_8bit(values: np.ndarray) -> np.ndarray:
    """uint8 from integer pixels of any depth, scaled by the bits the values use.

    ``n`` is the fewest bits (at least 8) that hold the largest value, and each value
    becomes ``round(v * 255 / (2**n - 1))``: black stays black, and the brightest value
    the data's depth allows becomes 255. So a 16-bit copy of an 8-bit slice is the
    8-bit slice, a 12-bit export fills the 8-bit range, and nothing is clipped (Pillow's
    ``convert("L")`` clipped every value over 255 to white). Data with negative values
    has no such zero: its min..max is stretched to 0..255.
    """
    v = np.asarray(values)
    lo, hi = (int(v.min()), int(v.max())) if v.size else (0, 0)
    if lo < 0:
        span = hi - lo
        scaled = (v.astype(np.float64) - lo) * (255.0 / span) if span else np.zeros(v.shape)
        return np.rint(scaled).astype(np.uint8)
    bits = max(8, int(hi).bit_length())
    if bits == 8:
        return v.astype(np.uint8)
    return np.rint(v.astype(np.float64) * (255.0 / (2**bits - 1))).astype(np.uint8)


def pixels_8bit(values: Any, pixel_range: str = "auto", name: str = "array") -> np.ndarray:
    """uint8 pixels from an array sent by a client (any shape), or ImageReadError.

    The rule: ``uint8`` is 0-255. Other numbers are read as ``pixel_range`` says:
    ``"0-255"`` (each value rounded), ``"0-1"`` (times 255), or ``"auto"``: floats
    that all lie in 0..1 with some value not a whole number are 0-1, everything else
    is 0-255. Values outside the range read, NaN, infinities, text and booleans are
    refused with a message naming what was found, never cast (a 0.4 cast to uint8 is
    a black pixel, so a 0-1 slice used to become a black image without a word).
    """
    if pixel_range not in PIXEL_RANGES:
        raise ImageReadError(
            f"{name}: pixel_range {pixel_range!r} is not one of {', '.join(PIXEL_RANGES)}"
        )
    arr = np.asarray(values)
    if arr.dtype == np.uint8 and pixel_range != "0-1":
        return arr
    if arr.dtype.kind not in "iuf":
        raise ImageReadError(
            f"{name}: pixel values must be numbers (0-255, or 0-1 floats), got {arr.dtype} "
            "values; send each slice as rows of numbers"
        )
    a = arr.astype(np.float64)
    if a.size == 0:
        return a.astype(np.uint8)
    if not np.isfinite(a).all():
        raise ImageReadError(f"{name}: pixel values include NaN or infinity; send finite numbers")
    lo, hi = float(a.min()), float(a.max())
    if pixel_range == "auto":
        fractional = arr.dtype.kind == "f" and not np.array_equal(a, np.rint(a))
        pixel_range = "0-1" if fractional and lo >= 0 and hi <= 1 else "0-255"
    top = 1.0 if pixel_range == "0-1" else 255.0
    if lo < 0 or hi > top:
        raise ImageReadError(
            f"{name}: pixel values run from {lo:.6g} to {hi:.6g}, outside {pixel_range}; "
            "send 8-bit values (0-255) or floats in 0-1 (pixel_range declares which), "
            "and 16-bit or other high-bit-depth slices as PNG files"
        )
    return np.rint(a * (255.0 / top)).astype(np.uint8)


def decode_image(
    source: Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
) -> np.ndarray:
    """Decode a JPEG or PNG to grayscale uint8 (H, W) at its own size (see :func:`decode_slice`)."""
    return decode_slice(source, max_pixels, name).gray


def to_model_array(
    image: np.ndarray, size: tuple[int, int], pixel_range: str = "auto"
) -> np.ndarray:
    """Grayscale uint8 (H, W) at the model's input size from any 2D/3D pixel array.

    uint8 arrays are taken as they are; other values are read by :func:`pixels_8bit`'s
    rule (``pixel_range``) and refused when they do not fit it.
    """
    from PIL import Image

    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = np.ascontiguousarray(pixels_8bit(arr[..., :3], pixel_range))
        im = Image.fromarray(rgb).convert("L")
    elif arr.ndim == 3 and arr.shape[-1] == 1:
        im = Image.fromarray(np.ascontiguousarray(pixels_8bit(arr[..., 0], pixel_range)))
    elif arr.ndim == 2:
        im = Image.fromarray(pixels_8bit(arr, pixel_range))
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
    """Decode one image file to uint8 (H, W) at ``size`` = (height, width).

    Through :func:`decode_slice`, as the decode stage and ``predict`` decode files (any
    format Pillow reads: these are the caller's own files, not uploads).
    """
    return to_model_array(decode_slice(Path(path), max_pixels=2**31, formats=None).gray, size)


def load_batch(paths: Sequence[Path], size: tuple[int, int], workers: int = 4) -> np.ndarray:
    """Decode many files in parallel (Pillow releases the GIL while decoding)."""
    if not paths:
        return np.zeros((0, *size), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(lambda p: load_gray(Path(p), size), paths))
    return np.stack(arrays)
