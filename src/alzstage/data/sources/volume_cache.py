"""Preprocessed volumes cached by content: what lets a killed ``nifti`` download resume.

:func:`preprocess_cached` is the Dask task of the ``nifti`` source, one per volume. It
hashes the volume's bytes, and returns the cache entry of that hash + the preprocessing
params if one exists; otherwise it preprocesses the volume, writes the slices as PNG
and a ``result.json`` into a temp folder and renames it into place
(:func:`alzstage.files.atomic_new_dir`). An entry is complete or absent, never half
written, so a stage killed at any moment loses only the volumes still running.

The key is ``sha256(volume bytes, neuro.preprocess but max_volume_mb, base.image_size,
code)``, where *code* is the source of :mod:`alzstage.neuro` and the versions of the
libraries that shape the slices. So renaming or relabelling a volume reuses its entry,
a changed preprocessing param or library recomputes every volume, and a changed
``max_volume_mb`` only re-judges the volumes the limit now refuses (the entry records
the bytes the volume decompresses to). A volume refused as too large is not cached: the
header check that refuses it takes milliseconds.

The task returns a small :class:`CachedVolume` (QC row, status, where the slices are),
never the pixels, so the client holds metadata only, however many volumes there are.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alzstage.config import NeuroPreprocessParams
from alzstage.errors import VolumeError, VolumeTooLarge
from alzstage.files import atomic_new_dir, sha256_file

CACHE_FORMAT = 1  # bump when the entry layout changes
RESULT_FILE = "result.json"
# The file's path in cached error messages: the same bytes may come back under another name.
_NAME = "<<volume>>"
# Libraries whose version can change the slices (registration, masks, resampling, PNG).
LIBRARIES = ("numpy", "scipy", "nibabel", "SimpleITK", "nilearn", "scikit-learn", "pillow")
# A temp folder older than this was left by a killed worker, not one still writing.
STALE_TEMP_S = 6 * 3600


@dataclass(frozen=True)
class PreprocessSpec:
    """What every volume task gets besides its path: the params and where the cache is."""

    preprocess: NeuroPreprocessParams
    image_size: tuple[int, int]
    cache_root: str

    @property
    def max_bytes(self) -> int:
        return int(self.preprocess.max_volume_mb * 2**20)

    def params_text(self) -> str:
        """The params that shape the slices, as canonical JSON (max_volume_mb only refuses)."""
        pre = self.preprocess.model_dump(mode="json", exclude={"max_volume_mb"})
        return json.dumps({"preprocess": pre, "image_size": list(self.image_size)}, sort_keys=True)


@dataclass(frozen=True)
class CachedVolume:
    """One volume's outcome, as the task returns it: small enough to collect thousands."""

    path: str
    status: str  # "ok" or the VolumeError's check (QC_COLUMNS' status)
    error: str = ""
    qc: dict[str, Any] = field(default_factory=dict)
    n_slices: int = 0
    key: str | None = None  # None: not cached (no file, or refused as too large)
    computed: bool = True  # False: reused from the cache

    def slice_files(self, cache_root: Path) -> list[Path]:
        assert self.key is not None
        return [Path(cache_root) / self.key / slice_name(k) for k in range(self.n_slices)]


def slice_name(k: int) -> str:
    return f"s{k:03d}.png"


@functools.cache
def code_fingerprint() -> str:
    """Hash of :mod:`alzstage.neuro`'s source and the versions in :data:`LIBRARIES`.

    Computed on the worker, once per process: it is the worker's code that made the
    slices, and on a cluster it may differ from the client's.
    """
    from importlib import metadata

    import alzstage.neuro

    h = hashlib.sha256()
    for f in sorted(Path(alzstage.neuro.__file__).parent.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    for lib in LIBRARIES:
        try:
            h.update(f"{lib}={metadata.version(lib)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{lib}=none".encode())
    return h.hexdigest()


def volume_key(volume_sha256: str, spec: PreprocessSpec, code: str) -> str:
    text = f"alzstage-volume-cache {CACHE_FORMAT}\n{volume_sha256}\n{spec.params_text()}\n{code}"
    return hashlib.sha256(text.encode()).hexdigest()


def preprocess_cached(path: str, spec: PreprocessSpec) -> CachedVolume:
    """The Dask task: one volume's cache entry, made if it is not there yet."""
    source = Path(path)
    if not source.is_file():
        return CachedVolume(
            path,
            "missing_file",  # a VolumeError check code
            f"{path}: no such file; fix the file column of data.subjects_csv (paths are "
            "relative to data.path; on a cluster every worker must see data.path at this path)",
        )
    key = volume_key(sha256_file(source), spec, code_fingerprint())
    entry = Path(spec.cache_root) / key
    cached = read_entry(entry, path, source.stat().st_size, spec.max_bytes)
    if cached is not None:
        return cached
    return _compute(source, spec, entry)


def read_entry(entry: Path, path: str, file_bytes: int, max_bytes: int) -> CachedVolume | None:
    """The entry as this run's result, or None when it is absent or the limit refuses it."""
    try:
        doc = json.loads((entry / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if doc.get("format") != CACHE_FORMAT or max(file_bytes, doc["needed_bytes"]) > max_bytes:
        return None
    n = int(doc["n_slices"])
    if any(not (entry / slice_name(k)).is_file() for k in range(n)):
        return None  # someone deleted files inside the cache: make it again
    return CachedVolume(
        path,
        doc["status"],
        doc["error"].replace(_NAME, path),
        doc["qc"],
        n,
        key=entry.name,
        computed=False,
    )


def _compute(source: Path, spec: PreprocessSpec, entry: Path) -> CachedVolume:
    """Preprocess one volume and publish its entry (slices + result.json) atomically."""
    from PIL import Image

    from alzstage.neuro.preprocess import preprocess_volume
    from alzstage.neuro.volume import read_nifti

    path = str(source)
    try:
        result = preprocess_volume(source, spec.preprocess, spec.image_size, name=path)
    except VolumeTooLarge as exc:  # decided by the header in milliseconds: not worth a file
        return CachedVolume(path, exc.check, str(exc))
    except VolumeError as exc:
        doc = {"status": exc.check, "error": str(exc).replace(path, _NAME), "qc": {}}
        doc.update(n_slices=0, needed_bytes=0)
        with atomic_new_dir(entry) as tmp:
            (tmp / RESULT_FILE).write_text(json.dumps({"format": CACHE_FORMAT, **doc}))
        return CachedVolume(path, exc.check, str(exc), key=entry.name)
    header = read_nifti(source, name=path, max_bytes=spec.max_bytes)
    needed = int(header.get_data_offset()) + int(
        np.prod(header.get_data_shape(), dtype=np.int64)
    ) * int(header.get_data_dtype().itemsize)
    qc = {k: _plain(v) for k, v in result.qc.items()}
    doc = {
        "format": CACHE_FORMAT,
        "status": "ok",
        "error": "",
        "qc": qc,
        "n_slices": len(result.slices),
        "z_mm": [float(z) for z in result.z_mm],
        "needed_bytes": needed,
        "made": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with atomic_new_dir(entry) as tmp:
        for k, pixels in enumerate(result.slices):
            # As the serial download wrote them: same call, same bytes.
            Image.fromarray(np.ascontiguousarray(pixels)).save(tmp / slice_name(k), format="PNG")
        (tmp / RESULT_FILE).write_text(json.dumps(doc, indent=1))
    return CachedVolume(path, "ok", "", qc, len(result.slices), key=entry.name)


def _plain(v: Any) -> Any:
    """numpy scalars as Python numbers, so the QC row survives JSON unchanged."""
    return v.item() if hasattr(v, "item") else v


def remove_stale_temps(cache_root: Path, older_than_s: float = STALE_TEMP_S) -> int:
    """Delete temp folders that killed workers left in the cache; returns how many."""
    import shutil

    now, removed = time.time(), 0
    for tmp in Path(cache_root).glob(".*.tmp"):
        try:
            if tmp.is_dir() and now - tmp.stat().st_mtime > older_than_s:
                shutil.rmtree(tmp, ignore_errors=True)
                removed += 1
        except OSError:
            continue
    return removed
