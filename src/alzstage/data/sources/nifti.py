"""``data.source: nifti``: a folder of volumes + a subjects CSV -> slices in data/raw.

``data.path`` holds the volumes and ``data.subjects_csv`` (default ``subjects.csv``) with
one row per volume::

    subject,file,label
    sub-001,sub-001_T1w.nii.gz,CN
    sub-002,scans/sub-002.nii,AD

Labels go through ``base.classes`` / ``base.class_aliases`` like folder names do, so a
CN / MCI / LMCI / AD scheme works as well as the four Kaggle stages. Each volume is
preprocessed (:func:`alzstage.neuro.preprocess.preprocess_volume`) into
``images/<Class>/<subject>[_<file>]_sNNN.png`` with the true subject id in the manifest,
so the subject split needs no guessing. Every volume also gets a row in
``data/raw/volumes.csv`` (:data:`alzstage.neuro.qc.QC_COLUMNS`): its measurements, or
why it could not be preprocessed. A bad volume never stops the others; the validate
stage decides what its QC means.

The volumes are preprocessed on the compute engine (:mod:`alzstage.compute`: a local
cluster of worker processes, or ``compute.scheduler``), one task per volume, and cached
by content (:mod:`alzstage.data.sources.volume_cache`): a killed download run again
redoes only the volumes that had not finished, and prints how many it computed and
reused (docs/scale.md).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from alzstage.artifacts import write_volumes
from alzstage.config import Params, Paths
from alzstage.data.manifest import RawRecord
from alzstage.data.sources.fetch import project_path
from alzstage.data.sources.volume_cache import (
    CachedVolume,
    PreprocessSpec,
    preprocess_cached,
    remove_stale_temps,
)
from alzstage.errors import AlzstageError, SubjectsCsvError
from alzstage.neuro.qc import QC_COLUMNS

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.compute import Outcome

log = logging.getLogger(__name__)
CSV_COLUMNS = ("subject", "file", "label")
VOLUMES_FILE = "volumes.csv"
# Statuses of volumes that never got a result from their task (besides VolumeError checks).
WORKER_KILLED = "worker_killed"  # it killed its Dask worker compute.retries + 1 times
TASK_ERROR = "error"  # the task raised something other than a VolumeError


def read_subjects_csv(csv: Path, params: Params) -> pd.DataFrame:
    """Rows (subject, file, label) with labels mapped onto ``base.classes``.

    Problems with the table itself (not with one volume) stop the stage, listing every
    bad row, because guessing would put a volume under the wrong label.
    """
    if not csv.is_file():
        raise SubjectsCsvError(
            f"{csv}: not found; data.source: nifti needs a CSV with columns "
            f"{', '.join(CSV_COLUMNS)} in data.path (name: data.subjects_csv)"
        )
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in CSV_COLUMNS if c not in df.columns]
    if missing:
        raise SubjectsCsvError(
            f"{csv}: missing column(s) {missing} (found {list(df.columns)}); the header must be "
            f"{','.join(CSV_COLUMNS)}"
        )
    df = df[list(CSV_COLUMNS)].apply(lambda s: s.str.strip())
    problems = []
    for i, row in df.iterrows():
        line = int(i) + 2  # header is line 1
        if not row["subject"] or not row["file"]:
            problems.append(f"line {line}: empty subject or file")
        elif params.base.canonical_label(row["label"]) is None:
            problems.append(f"line {line}: label {row['label']!r} is not in base.classes")
    dup = df[df.duplicated("file", keep=False) & (df["file"] != "")]
    if len(dup):
        problems.append(f"files listed more than once: {sorted(set(dup['file']))}")
    if problems:
        raise SubjectsCsvError(
            f"{csv}: "
            + "; ".join(problems[:20])
            + (f"; ... and {len(problems) - 20} more" if len(problems) > 20 else "")
            + f". Labels map onto base.classes {params.base.classes} (add base.class_aliases "
            "for other spellings)"
        )
    df["label"] = [params.base.canonical_label(v) for v in df["label"]]
    return df.reset_index(drop=True)


def _stem(subject: str, file: str, repeated: bool) -> str:
    """A safe file stem; the volume's name is added when a subject has several volumes."""
    raw = subject
    if repeated:
        name = Path(file).name
        raw += "_" + re.sub(r"\.nii(\.gz)?$", "", name, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("._") or "subject"


def slice_stems(table: pd.DataFrame) -> list[str]:
    """Every row's slice file stem, checked to be unique before any volume is touched."""
    repeated = set(table.loc[table["subject"].duplicated(), "subject"])
    stems = [
        _stem(s, f, s in repeated) for s, f in zip(table["subject"], table["file"], strict=True)
    ]
    first: dict[str, str] = {}
    for subject, stem in zip(table["subject"], stems, strict=True):
        if stem in first:
            raise SubjectsCsvError(
                f"subjects {first[stem]!r} and {subject!r} map to the same file names ({stem}); "
                "make the subject ids differ by more than punctuation"
            )
        first[stem] = subject
    return stems


def _place(source: Path, target: Path) -> None:
    """A hard link to the cached slice (no copy of the pixels), or a copy across devices."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _volume_of(outcome: Outcome[CachedVolume], path: str) -> CachedVolume:
    """A task's result, or the reason it has none (the worker died, the task raised)."""
    if outcome.ok:
        assert outcome.value is not None
        return outcome.value
    status = WORKER_KILLED if outcome.killed else TASK_ERROR
    return CachedVolume(path, status, f"{path}: {outcome.error}")


def preprocess_subjects(
    table: pd.DataFrame, folder: Path, params: Params, images_dir: Path, cache_root: Path
) -> tuple[list[RawRecord], pd.DataFrame]:
    """Preprocess every row on the compute engine; place its slices; records + QC table.

    One Dask task per volume (:func:`preprocess_cached`) writes the slices into the
    volume cache and returns a small result; here, in input order, they are linked into
    ``images_dir`` under the row's label and stem. A volume that fails, or kills its
    workers, gets its reason in the QC table and the others go on.
    """
    from alzstage.compute import Progress, engine

    stems = slice_stems(table)
    files = [str(_volume_path(f, folder)) for f in table["file"]]
    spec = PreprocessSpec(params.neuro.preprocess, tuple(params.base.image_size), str(cache_root))
    remove_stale_temps(cache_root)
    records: list[RawRecord] = []
    qc_rows: list[dict[str, Any]] = []
    computed = reused = 0
    progress = Progress(len(files), "preprocess", "volume")
    try:
        with engine(params.compute, f"preprocess: {len(files)} volumes") as eng:
            outcomes = eng.map_ordered(
                preprocess_cached,
                files,
                spec,
                name="volume",
                progress=progress,
                failures=lambda v: int(v.status != "ok"),
            )
            for row, stem, outcome in zip(
                table.itertuples(index=False), stems, outcomes, strict=True
            ):
                volume = _volume_of(outcome, files[outcome.index])
                computed += volume.key is not None and volume.computed
                reused += not volume.computed
                qc: dict[str, Any] = {"subject": row.subject, "file": row.file, "label": row.label}
                if volume.status != "ok":
                    qc.update(status=volume.status, error=volume.error)
                    qc_rows.append(qc)
                    log.warning("nifti: %s", volume.error)
                    continue
                qc.update(volume.qc, status="ok", error="")
                # Lets validate map a volume's verdict onto exactly its slices in the manifest.
                qc["slice_prefix"] = f"{images_dir.name}/{row.label}/{stem}_s"
                qc_rows.append(qc)
                target = images_dir / row.label
                target.mkdir(parents=True, exist_ok=True)
                for k, cached in enumerate(volume.slice_files(cache_root)):
                    out = target / f"{stem}_s{k:03d}.png"
                    _place(cached, out)
                    records.append(RawRecord(path=out, label=row.label, subject=row.subject))
    finally:
        progress.close()
    failed = sum(r["status"] != "ok" for r in qc_rows)
    _say(
        f"preprocess: {len(files)} volumes: computed {computed}, reused {reused} from "
        f"{cache_root}, {failed} not preprocessed"
    )
    qc_table = pd.DataFrame(qc_rows).reindex(columns=QC_COLUMNS)
    return records, qc_table


def _volume_path(file: str, folder: Path) -> Path:
    path = Path(file).expanduser()
    return path if path.is_absolute() else folder / path


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def collect_nifti(params: Params, paths: Paths, staging: Path) -> list[RawRecord]:
    """Fill ``staging`` (the future data/raw) from ``data.path`` + ``data.subjects_csv``.

    Also writes ``staging/volumes.csv``, the per-volume QC the validate stage judges.
    """
    assert params.data.path is not None  # enforced by DataParams
    folder = project_path(params.data.path, paths.root)
    if not folder.is_dir():
        raise AlzstageError(
            f"data.path: {folder} is not a directory (data.source: nifti expects a folder of "
            f"volumes holding {params.data.subjects_csv})"
        )
    try:
        table = read_subjects_csv(folder / params.data.subjects_csv, params)
    except SubjectsCsvError as exc:
        raise AlzstageError(str(exc)) from None
    if table.empty:
        raise AlzstageError(f"{folder / params.data.subjects_csv}: no rows")
    try:
        records, qc = preprocess_subjects(
            table, folder, params, staging / "images", paths.volume_cache
        )
    except SubjectsCsvError as exc:
        raise AlzstageError(str(exc)) from None
    write_volumes(qc, staging / VOLUMES_FILE)
    failed = qc[qc["status"] != "ok"]
    if not records:
        listing = "; ".join(failed["error"].astype(str).head(10))
        raise AlzstageError(f"no volume could be preprocessed ({len(failed)} failed): {listing}")
    if len(failed):
        log.warning(
            "nifti: %d of %d volumes could not be preprocessed (listed in data/raw/%s; the "
            "validate stage reports them): %s",
            len(failed),
            len(qc),
            VOLUMES_FILE,
            ", ".join(failed["subject"].astype(str)),
        )
    return records
