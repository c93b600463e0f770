"""``data.source: kaggle``: a Kaggle dataset through ``kagglehub`` (cached by it)."""

from __future__ import annotations

import os
from pathlib import Path

from alzstage.config import Params, Paths
from alzstage.data.manifest import RawRecord
from alzstage.data.sources.layout import place_images
from alzstage.errors import AlzstageError


def kaggle_credentials(env: dict[str, str] | None = None, home: Path | None = None) -> str | None:
    """Where Kaggle credentials would come from, or None when there are none.

    Checked here, before ``kagglehub`` is imported or the network touched, so that a
    missing login fails in a second with what to set, not with a 401 deep in a download.
    """
    env = dict(os.environ) if env is None else env
    home = Path(env.get("HOME") or Path.home()) if home is None else home
    if env.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    folder = Path(env["KAGGLE_CONFIG_DIR"]) if env.get("KAGGLE_CONFIG_DIR") else home / ".kaggle"
    for name in ("kaggle.json", "access_token"):
        if (folder / name).is_file():
            return str(folder / name)
    return None


def download_kaggle(handle: str) -> Path:
    """Download (or reuse kagglehub's cache of) a Kaggle dataset; return its folder."""
    if kaggle_credentials() is None:
        partial = [k for k in ("KAGGLE_USERNAME", "KAGGLE_KEY") if os.environ.get(k)]
        note = f" (only {partial[0]} is set)" if len(partial) == 1 else ""
        raise AlzstageError(
            f"data.source=kaggle: no Kaggle credentials found{note}. Set KAGGLE_USERNAME and "
            "KAGGLE_KEY (from kaggle.com > Settings > API > Create New Token), or save that "
            "kaggle.json as ~/.kaggle/kaggle.json; or use data.source: archive with a "
            "downloaded copy of the zip"
        )
    try:
        import kagglehub
    except ImportError:
        raise AlzstageError(
            "data.source=kaggle needs the kagglehub package: pip install 'alzstage[kaggle]'"
        ) from None
    try:
        folder = Path(kagglehub.dataset_download(handle))
    except Exception as exc:  # network, auth and 404s all mean "could not fetch"
        raise AlzstageError(
            f"data.kaggle_dataset={handle!r}: Kaggle download failed ({type(exc).__name__}: "
            f"{exc}); check the handle, your credentials and network access to kaggle.com"
        ) from None
    if not folder.is_dir():
        raise AlzstageError(
            f"data.kaggle_dataset={handle!r}: kagglehub returned {folder}, not a folder"
        )
    return folder


def collect_kaggle(params: Params, paths: Paths, staging: Path) -> list[RawRecord]:
    """Copy the class folders of ``data.kaggle_dataset`` into ``staging``."""
    folder = download_kaggle(params.data.kaggle_dataset)
    return place_images(folder, staging, params.base, move=False)
