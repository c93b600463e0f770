"""``data.source: folder``: a local directory of class folders, copied as it is."""

from __future__ import annotations

from pathlib import Path

from alzstage.config import Params, Paths
from alzstage.data.manifest import RawRecord
from alzstage.data.sources.fetch import project_path
from alzstage.data.sources.layout import place_images
from alzstage.errors import AlzstageError


def collect_folder(params: Params, paths: Paths, staging: Path) -> list[RawRecord]:
    """Copy the images under ``data.path`` (relative to the project root) into ``staging``."""
    assert params.data.path is not None  # enforced by DataParams
    folder = project_path(params.data.path, paths.root)
    if not folder.is_dir():
        raise AlzstageError(f"data.path: {folder} is not a directory of class folders")
    return place_images(folder, staging, params.base, move=False)
