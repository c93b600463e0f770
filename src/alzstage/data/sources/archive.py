"""``data.source: archive``: a zip or tar(.gz/.bz2/.xz) of class folders, local or a URL."""

from __future__ import annotations

import shutil
from pathlib import Path

from alzstage.config import Params, Paths
from alzstage.data.manifest import RawRecord
from alzstage.data.sources.extract import ArchiveLimits, extract_archive
from alzstage.data.sources.fetch import fetch
from alzstage.data.sources.layout import place_images


def collect_archive(params: Params, paths: Paths, staging: Path) -> list[RawRecord]:
    """Fetch ``data.path`` (checked against ``data.sha256``), extract it safely, place it.

    The archive is unpacked next to ``staging`` and its images moved, not copied, into
    place; the unpacked rest is removed whatever happens.
    """
    data = params.data
    assert data.path is not None  # enforced by DataParams
    archive = fetch(data.path, paths.cache / "downloads", data.sha256, base_dir=paths.root)
    limits = ArchiveLimits(
        max_total_bytes=data.max_extract_bytes, max_ratio=data.max_compression_ratio
    )
    unpack = staging.parent / f".{staging.name}.unpack"
    if unpack.exists():
        shutil.rmtree(unpack)
    unpack.mkdir()
    try:
        extract_archive(archive, unpack, limits)
        return place_images(unpack, staging, params.base, move=True)
    finally:
        shutil.rmtree(unpack, ignore_errors=True)
