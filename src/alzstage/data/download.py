"""The ``download`` stage: every data source ends as one normalised raw layout.

``data/raw/images/[<source split>/]<Class>/<file>`` plus ``data/raw/manifest.csv``. Later
stages read only that, so adding a source never touches validation, split or training.
Each source is one module of :mod:`alzstage.data.sources` with one signature,
:data:`Source`; :data:`SOURCES` maps every ``data.source`` value onto it.

The whole raw tree is built in a temporary directory and renamed into place at the end:
an interrupted download or a refused archive leaves no half-extracted ``data/raw``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alzstage.artifacts import read_volumes, write_raw_manifest
from alzstage.config import Params, Paths
from alzstage.data.manifest import RawRecord, build_manifest
from alzstage.data.sources.archive import collect_archive
from alzstage.data.sources.demo import collect_demo
from alzstage.data.sources.folder import collect_folder
from alzstage.data.sources.huggingface import collect_huggingface
from alzstage.data.sources.kaggle import collect_kaggle
from alzstage.data.sources.layout import (
    SKIPPED_FILE,
    describe_skipped,
    read_skipped,
    write_skipped,
)
from alzstage.data.sources.multi import collect_sources
from alzstage.data.sources.nifti import collect_nifti
from alzstage.errors import ConfigError
from alzstage.files import atomic_dir
from alzstage.result import StageResult

# Fills ``staging`` (the future data/raw) and returns the records of the images written.
Source = Callable[[Params, Paths, Path], list[RawRecord]]

SOURCES: dict[str, Source] = {
    "demo": collect_demo,
    "archive": collect_archive,
    "folder": collect_folder,
    "kaggle": collect_kaggle,
    "huggingface": collect_huggingface,
    "nifti": collect_nifti,
}


def collect_multi(params: Params, paths: Paths, staging: Path) -> list[RawRecord]:
    """``data.source: multi``: each ``data.sources`` entry through its own source above."""
    return collect_sources(params, paths, staging, SOURCES)


SOURCES["multi"] = collect_multi


def source_for(name: str) -> Source:
    """The collect function of ``data.source``; an unknown name is a one-line ConfigError."""
    if name not in SOURCES:
        raise ConfigError(f"data.source: must be one of {sorted(SOURCES)} (got {name!r})")
    return SOURCES[name]


def run_download(params: Params, paths: Paths) -> StageResult:
    """Build data/raw atomically and describe every file in the manifest."""
    collect = source_for(params.data.source)
    with atomic_dir(paths.raw) as staging:
        records = collect(params, paths, staging)
        manifest = build_manifest(records, staging)
        write_raw_manifest(manifest, staging / "manifest.csv")
        if not (staging / SKIPPED_FILE).exists():  # sources that place every file they see
            write_skipped([], staging / SKIPPED_FILE)
    skipped = read_skipped(paths.raw / SKIPPED_FILE)
    counts = manifest["label"].value_counts().to_dict()
    metrics = {"n_images": float(len(manifest)), "n_skipped": float(len(skipped))}
    metrics.update({f"n_{k}": float(v) for k, v in counts.items()})
    artifacts = [paths.raw_manifest, paths.raw / SKIPPED_FILE]
    if params.data.source == "nifti":
        statuses = read_volumes(paths.raw_volumes)["status"].tolist()
        metrics["n_volumes"] = float(len(statuses))
        metrics["n_volumes_not_preprocessed"] = float(sum(s != "ok" for s in statuses))
        artifacts.append(paths.raw_volumes)
    return StageResult(
        metrics=metrics,
        artifacts=artifacts,
        tags={"data.source": params.data.source},
        summary=f"{len(manifest)} images from source {params.data.source!r}: {counts}"
        + (
            f"; skipped {describe_skipped(skipped)}, listed in data/raw/{SKIPPED_FILE}"
            if skipped
            else ""
        ),
    )
