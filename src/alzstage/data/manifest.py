"""The manifest: one row per raw image, the contract between download and later stages.

Hashes are computed here once so that validation (exact duplicates, label conflicts) and
the split (leakage) never have to re-read every file to answer those questions.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from alzstage.artifacts import RAW_MANIFEST_CSV

# The columns, their types and their readers are the contract in alzstage.artifacts.
MANIFEST_COLUMNS = RAW_MANIFEST_CSV.names


@dataclass(frozen=True)
class RawRecord:
    """An image placed under data/raw/images by a download source."""

    path: Path  # absolute path of the placed file
    label: str
    source_split: str = ""
    subject: str = ""


def describe_image(path: Path) -> dict[str, object]:
    """Bytes hash plus what Pillow can tell about the image; tolerant of broken files.

    Broken files still get a row (with empty pixel fields): validation, not download,
    decides what to do with them, so nothing disappears between stages.
    """
    from PIL import Image

    data = Path(path).read_bytes()
    row: dict[str, object] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "pixel_hash": "",
        "width": 0,
        "height": 0,
        "mode": "",
        "format": "",
    }
    try:
        with Image.open(io.BytesIO(data)) as im:  # decode the bytes hashed, read once
            row["format"] = im.format or ""
            row["mode"] = im.mode
            row["width"], row["height"] = im.size
            im.load()
            pixels = im.tobytes()
            row["pixel_hash"] = hashlib.sha256(f"{im.mode}{im.size}".encode() + pixels).hexdigest()
    except Exception:  # any decode failure is recorded, judged in validate
        pass
    return row


def build_manifest(records: Iterable[RawRecord], raw_dir: Path, workers: int = 4) -> pd.DataFrame:
    """Describe every placed file; rows sorted by path so the CSV is deterministic.

    Files are hashed and decoded in a thread pool: Pillow and hashlib release the GIL,
    so this scales with cores on the 6,400-image archive.
    """
    records = list(records)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        described = list(pool.map(lambda r: describe_image(r.path), records))
    rows = [
        {
            "path": Path(rec.path).relative_to(raw_dir).as_posix(),
            "label": rec.label,
            **info,
            "source_split": rec.source_split,
            "subject": rec.subject,
        }
        for rec, info in zip(records, described, strict=True)
    ]
    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    return df.sort_values("path", kind="stable").reset_index(drop=True)


__all__ = ["MANIFEST_COLUMNS", "RawRecord", "build_manifest", "describe_image"]
