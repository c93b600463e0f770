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
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from alzstage.artifacts import write_volumes
from alzstage.config import Params, Paths
from alzstage.data.manifest import RawRecord
from alzstage.data.sources.fetch import project_path
from alzstage.errors import DownloadError, SubjectsCsvError
from alzstage.neuro.errors import MissingVolume, VolumeError
from alzstage.neuro.qc import QC_COLUMNS

log = logging.getLogger(__name__)
CSV_COLUMNS = ("subject", "file", "label")
VOLUMES_FILE = "volumes.csv"


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


def preprocess_subjects(
    table: pd.DataFrame, folder: Path, params: Params, images_dir: Path
) -> tuple[list[RawRecord], pd.DataFrame]:
    """Preprocess every row; write slices as PNG; return records and the QC table."""
    from PIL import Image
    from tqdm import tqdm

    from alzstage.neuro.preprocess import preprocess_volume

    records: list[RawRecord] = []
    qc_rows: list[dict[str, Any]] = []
    repeated = set(table.loc[table["subject"].duplicated(), "subject"])
    taken: set[str] = set()
    for row in tqdm(
        table.itertuples(index=False), total=len(table), desc="preprocess", disable=None
    ):
        path = Path(row.file).expanduser()
        path = path if path.is_absolute() else folder / path
        qc: dict[str, Any] = {"subject": row.subject, "file": row.file, "label": row.label}
        try:
            if not path.is_file():
                raise MissingVolume(
                    f"{path}: no such file; fix the file column of data.subjects_csv "
                    "(paths are relative to data.path)"
                )
            result = preprocess_volume(
                path, params.neuro.preprocess, params.base.image_size, name=str(path)
            )
        except VolumeError as exc:
            qc.update(status=exc.check, error=str(exc))
            qc_rows.append(qc)
            log.warning("nifti: %s", exc)
            continue
        qc.update(result.qc, status="ok", error="")
        qc_rows.append(qc)
        stem = _stem(row.subject, row.file, row.subject in repeated)
        if stem in taken:
            raise SubjectsCsvError(
                f"subjects {row.subject!r} and another map to the same file names ({stem}); "
                "make the subject ids differ by more than punctuation"
            )
        taken.add(stem)
        target = images_dir / row.label
        target.mkdir(parents=True, exist_ok=True)
        # Lets validate map a volume's verdict onto exactly its slices in the manifest.
        qc["slice_prefix"] = f"{images_dir.name}/{row.label}/{stem}_s"
        for k, pixels in enumerate(result.slices):
            out = target / f"{stem}_s{k:03d}.png"
            Image.fromarray(np.ascontiguousarray(pixels)).save(out, format="PNG")
            records.append(RawRecord(path=out, label=row.label, subject=row.subject))
    qc_table = pd.DataFrame(qc_rows).reindex(columns=QC_COLUMNS)
    return records, qc_table


def collect_nifti(params: Params, paths: Paths, staging: Path) -> list[RawRecord]:
    """Fill ``staging`` (the future data/raw) from ``data.path`` + ``data.subjects_csv``.

    Also writes ``staging/volumes.csv``, the per-volume QC the validate stage judges.
    """
    assert params.data.path is not None  # enforced by DataParams
    folder = project_path(params.data.path, paths.root)
    if not folder.is_dir():
        raise DownloadError(
            f"data.path: {folder} is not a directory (data.source: nifti expects a folder of "
            f"volumes holding {params.data.subjects_csv})"
        )
    try:
        table = read_subjects_csv(folder / params.data.subjects_csv, params)
    except SubjectsCsvError as exc:
        raise DownloadError(str(exc)) from None
    if table.empty:
        raise DownloadError(f"{folder / params.data.subjects_csv}: no rows")
    try:
        records, qc = preprocess_subjects(table, folder, params, staging / "images")
    except SubjectsCsvError as exc:
        raise DownloadError(str(exc)) from None
    write_volumes(qc, staging / VOLUMES_FILE)
    failed = qc[qc["status"] != "ok"]
    if not records:
        listing = "; ".join(failed["error"].astype(str).head(10))
        raise DownloadError(f"no volume could be preprocessed ({len(failed)} failed): {listing}")
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
