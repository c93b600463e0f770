"""The ``decode`` stage: every validated image decoded once, for every later stage.

Before it, split, augment, train, evaluate and each CV fold opened the JPEGs of
``data/raw`` themselves, so one ``dvc repro`` decoded each image four to six times and
five stages depended on ``data/raw``. Now this stage alone reads ``data/raw``: it
decodes each file of the validated manifest once (threads: Pillow releases the GIL
while decoding and resizing) and keeps what later stages look at, in
``data/processed/pixels/`` (:class:`alzstage.artifacts.PixelStore`):

* the network input at ``model.input_size``: the very pixels
  :func:`alzstage.data.images.load_batch` makes of the file;
* grayscale thumbnails at ``split.thumb_size`` and at 32 px (the baselines' and the input
  check's size): :func:`alzstage.data.split.load_thumbnails` is ``correlation_rows`` of them;
* the input check's features and native size (:func:`alzstage.data.image_features.image_features`)
  and the atrophy measurements (:func:`alzstage.data.morphometry.slice_morphometry`),
  which need the full-size image.

Cost: at the defaults (56x48 inputs, 32x32 thumbnails) a row is 2,688 + 1,024 bytes of
pixels, 48 of features and size, and its path (4 bytes a character, ~200): about 4 KB,
so 20 MB for the 5,120-image archive and 400 MB per 100,000 images (112x96 inputs:
1.2 GB per 100,000). The stage holds its output in memory while it writes; readers map
the files and copy only the rows they ask for (plus the paths, to look rows up).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from alzstage.artifacts import PixelStore, read_split
from alzstage.config import Params, Paths
from alzstage.data.image_features import FEATURES, THUMB_SIZE, image_features, thumbnail
from alzstage.data.images import decode_slice, to_model_array
from alzstage.data.morphometry import MORPH_FEATURES, slice_morphometry
from alzstage.errors import AlzstageError, ImageReadError

# The input check's features (the last, mean_correlation, needs every thumbnail first),
# then the atrophy measurements the brain-level model reads: both need the full-size image.
INPUT_FEATURES = (*FEATURES[:-1], *MORPH_FEATURES)


def thumbnail_sizes(params: Params) -> tuple[int, ...]:
    """The split's thumbnail side and the fixed 32 px of the baselines and input check."""
    return tuple(sorted({params.split.thumb_size, THUMB_SIZE}))


def _gray(path: Path) -> np.ndarray:
    """The file as grayscale uint8 at its own size, decoded as ``load_batch`` decodes it."""
    try:
        # Any format Pillow reads: these are the project's own validated files.
        return decode_slice(path, max_pixels=2**31, formats=None).gray
    except FileNotFoundError:
        raise AlzstageError(
            f"{path}: image listed in the validated manifest is missing; re-run "
            "`alzstage download` (or `dvc repro download validate`) to restore data/raw"
        ) from None
    except ImageReadError as exc:
        raise AlzstageError(
            f"{path}: cannot decode ({exc}); re-run `alzstage validate` with "
            "validate.on_failure: quarantine, or remove the file"
        ) from None


def decode_files(
    raw: Path,
    rel_paths: Sequence[str],
    input_size: tuple[int, int],
    thumb_sizes: Sequence[int],
    workers: int | None = None,
) -> dict[str, np.ndarray]:
    """Decode each file under ``raw`` once: the arrays of a :class:`PixelStore`, by name.

    Every worker writes its rows into arrays allocated up front, so memory is the output
    plus one full-size image per thread.
    """
    n = len(rel_paths)
    h, w = input_size
    out = {
        "images": np.zeros((n, h, w), dtype=np.uint8),
        "sizes": np.zeros((n, 2), dtype=np.int32),
        **{name: np.zeros(n, dtype=np.float64) for name in INPUT_FEATURES},
        **{f"thumbs_{s}": np.zeros((n, s, s), dtype=np.uint8) for s in thumb_sizes},
    }

    def one(i: int) -> None:
        gray = _gray(Path(raw) / rel_paths[i])
        out["images"][i] = to_model_array(gray, (h, w))
        out["sizes"][i] = gray.shape[:2]
        for name, value in (*image_features(gray).items(), *slice_morphometry(gray).items()):
            out[name][i] = value
        for s in thumb_sizes:
            out[f"thumbs_{s}"][i] = thumbnail(gray, s)

    workers = workers or max(1, min(16, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, range(n)))  # list(): re-raises the first worker's error
    return out


def write_pixels(raw: Path, rel_paths: Sequence[str], params: Params, target: Path) -> PixelStore:
    """Decode ``rel_paths`` under ``raw`` and write them to ``target`` as a store."""
    sizes = thumbnail_sizes(params)
    arrays = decode_files(raw, rel_paths, params.model.input_size, sizes)
    return PixelStore.write(
        target,
        rel_paths,
        images=arrays["images"],
        thumbnails={s: arrays[f"thumbs_{s}"] for s in sizes},
        input_features={name: arrays[name] for name in INPUT_FEATURES},
        sizes=arrays["sizes"],
    )


def load_rows(
    rows: pd.DataFrame, params: Params, paths: Paths, where: str, why_empty: str
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Images at network size and class indices for ``rows`` (path, label) of a split table.

    Shared by the single split and the CV folds, so both feed identical pixels: the
    decode stage's (``data/processed/pixels``), never a file of ``data/raw``.
    """
    if rows.empty:
        raise AlzstageError(f"{where}; {why_empty}, or the split stage needs re-running")
    index = {c: i for i, c in enumerate(params.base.classes)}
    y = rows["label"].map(index).to_numpy(np.int64)
    x = PixelStore.read(paths.pixels).images_for(rows["path"], params.model.input_size)
    return x, y, rows


def load_split_images(
    paths: Paths, params: Params, which: str
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    split = read_split(paths.split_file)
    rows = split[split["split"] == which].reset_index(drop=True)
    where = f"{paths.split_file}: no rows with split == {which!r}"
    return load_rows(
        rows, params, paths, where, "the dataset is too small for split.val_size / split.test_size"
    )
