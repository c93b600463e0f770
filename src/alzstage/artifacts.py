"""Typed contracts for the files one stage writes and another reads: JSON, CSV and arrays.

A stage that reads another stage's output parses it through one of these types, so a
missing or mistyped key fails at the read with the file and the key named, instead of a
``KeyError`` deep inside, or a silent fallback that tags a model with an empty string.
Each type says which stage writes its file; the error names the stage to run again.

* :class:`TrainReport`: ``reports/train.json``, what training ran and its calibration
  (train writes; the train stage's pyfunc step reads the temperature and recipe back);
* :class:`TrainRun`: ``models/train_run.json`` (train writes; evaluate and promote read);
* :class:`SplitReport`: the fields of ``reports/split.json`` that evaluate reads (split
  writes); the rest of the report stays as it is, for the model card and the headline;
* :class:`MetricsReport`: the fields of ``reports/metrics.json`` that promote reads
  (evaluate writes); the rest of the report passes through untouched;
* :class:`PixelStore`: ``data/processed/pixels/``, every image decoded once (decode
  writes; split, augment, train, evaluate and cv_fold read), with :class:`PixelsMeta`.

Only the keys a reader uses are declared: a report may carry more, and gains nothing
from being re-typed here.

The CSV files stages hand to each other have a :class:`CsvContract` each (column name,
type, whether it must be there, the values allowed), read and written only through
their ``read_*`` / ``write_*`` functions:

* :data:`RAW_MANIFEST_CSV`: ``data/raw/manifest.csv`` (download writes; validate reads);
* :data:`MANIFEST_CSV`: ``data/interim/manifest.csv``, the same columns (validate writes
  the rows it kept; split reads);
* :data:`SPLIT_CSV`: ``data/processed/split.csv`` (split writes; augment, train,
  evaluate and the cross-validation read);
* :data:`VOLUMES_CSV`: ``data/raw/volumes.csv``, per-volume QC of a NIfTI source
  (download writes; validate reads).

A file that breaks its contract fails at the read, in one line naming the file, the
column and the stage to run again.

The machinery (:class:`Artifact`, :class:`CsvContract`) is :mod:`alzstage.contract`, the
pixel store :mod:`alzstage.pixel_store`; both are re-exported here, so that every file
one stage hands another is found in this module. The contracts added in issue #22 step
two are listed in their own block at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import ConfigDict, Field, StringConstraints

# Re-exported: every stage-to-stage file is found here, whatever module defines it.
from alzstage.contract import Artifact as Artifact
from alzstage.contract import Column, CsvContract, rerun
from alzstage.cv_files import (
    CV_BASELINES as CV_BASELINES,
)
from alzstage.cv_files import (  # the CV's files, re-exported
    CV_ROLES as CV_ROLES,
)
from alzstage.cv_files import (
    FoldsReport as FoldsReport,
)
from alzstage.cv_files import (
    TinyClass as TinyClass,
)
from alzstage.cv_files import (
    fit_slices_csv as fit_slices_csv,
)
from alzstage.cv_files import (
    fold_dir as fold_dir,
)
from alzstage.cv_files import (
    fold_predictions_csv as fold_predictions_csv,
)
from alzstage.cv_files import (
    fold_test_column as fold_test_column,
)
from alzstage.cv_files import (
    folds_csv as folds_csv,
)
from alzstage.cv_files import (
    read_folds as read_folds,
)
from alzstage.cv_files import (
    role_column as role_column,
)
from alzstage.cv_files import (
    write_folds as write_folds,
)
from alzstage.errors import AlzstageError
from alzstage.files import atomic_dir, write_json
from alzstage.pixel_store import PixelsMeta as PixelsMeta
from alzstage.pixel_store import PixelStore as PixelStore

if TYPE_CHECKING:
    pass


class TrainRun(Artifact):
    """``models/train_run.json``: what the train stage ran, and which model file it wrote.

    No MLflow id: an id differs on every run, and this file is a DVC output that must hash
    alike when the training does. The train run is found by the model file's md5, which
    the run is tagged with (:func:`alzstage.tracking.trained_model`).
    """

    written_by: ClassVar[str] = "train"

    #: md5 of ``models/model.keras`` (canonical bytes: the same weights, the same md5).
    model_md5: str = Field(pattern=r"^[0-9a-f]{32}$")
    #: Fitted on the validation split; ``None`` means the probabilities are uncalibrated.
    temperature: float | None
    input_size: tuple[int, int]
    #: What promote tags on the registry version: the recipe that actually trained.
    recipe: str
    backbone: str
    weights: str


#: A per-phase figure of the train report: ``<phase>_<figure>``, phases ``scratch`` (one
#: phase) or ``head`` then ``fine_tune`` (transfer); ``best_`` is followed by train.monitor.
TrainPhaseKey = Annotated[
    str,
    StringConstraints(
        pattern=r"^(scratch|head|fine_tune)_"
        r"(epochs|best_\w+)$"
    ),
]


class TrainReport(Artifact):
    """``reports/train.json``: what the train stage ran and its calibration.

    No durations or throughput: they vary with the machine and its load, so identical
    training would hash differently under DVC; the stage logs them to MLflow instead.

    The train stage's last step reads the temperature and the recipe back from it. The
    per-phase figures are the keys :data:`TrainPhaseKey` allows, each a number; the
    optional keys are written only by the runs they describe (the transfer recipe's cache,
    a run stopped at its target), and only the keys that were written are written back.
    """

    model_config = ConfigDict(extra="allow")
    written_by: ClassVar[str] = "train"
    #: The undeclared keys: per-phase figures, whole numbers kept whole.
    __pydantic_extra__: dict[TrainPhaseKey, int | float] = Field(init=False)

    strategy: str  # the tf.distribute strategy that ran, and on how many replicas
    replicas: int
    recipe: str  # resolved: "scratch" or "transfer", never params' "auto"
    backbone: str
    parameters: int
    n_train_samples: int
    n_val: int
    class_weight: dict[str, float]  # empty: no class weighting
    #: Fitted on the validation split: predict and evaluate divide the logits by it.
    temperature: float
    val_ece_before: float
    val_ece_after: float
    stopped_at_target_epoch: int | None = None
    cut_cache_mb: float | None = None
    activation_cache: list[dict[str, str]] | None = None

    def write(self, path: Path) -> Path:
        """Write the keys the writer gave, no ``null`` for an optional one it did not."""
        write_json(path, self.model_dump(mode="json", exclude_unset=True))
        return Path(path)


class SplitReport(Artifact):
    """The fields of ``reports/split.json`` that evaluate copies into its report.

    Read from the file (a declared dependency), never from ``params.split``: the split
    that ran, not the one params would run now.
    """

    model_config = ConfigDict(extra="allow")
    written_by: ClassVar[str] = "split"

    strategy: str
    leaky: bool
    fingerprint: str
    warning: str
    subject_ids: str
    dataset: str
    data_source: str


class MetricsReport(Artifact):
    """The fields of ``reports/metrics.json`` that promote tags on the registry version."""

    model_config = ConfigDict(extra="allow")
    written_by: ClassVar[str] = "evaluate"

    balanced_accuracy: float
    macro_f1: float
    accuracy: float
    split_fingerprint: str
    split_strategy: str
    split_leaky: bool
    dataset: str
    data_source: str


# --------------------------------------------------------------------------- CSV files

SPLITS = ("train", "val", "test")
SUBJECT_SOURCES = ("given", "pseudo", "none")

RAW_MANIFEST_CSV = CsvContract(
    written_by="download",
    columns=(
        Column("path"),  # relative to data/raw, posix
        Column("label"),  # canonical class name from base.classes
        Column("sha256"),  # of the file bytes
        Column("pixel_hash"),  # sha256 of the decoded pixels (+ shape); "" when undecodable
        Column("width", int),
        Column("height", int),
        Column("mode"),
        Column("format"),
        Column("source_split"),  # the source's own split (train/test) or ""
        Column("subject"),  # subject id when the source provides one, else ""
    ),
)

#: ``data/interim/manifest.csv``: the rows of the raw manifest that validation kept.
MANIFEST_CSV = replace(RAW_MANIFEST_CSV, written_by="validate")

SPLIT_CSV = CsvContract(
    written_by="split",
    columns=(
        Column("path"),
        Column("label"),
        Column("subject"),  # given or recovered id; "" for a blank slice (its own group)
        Column("subject_source", allowed=SUBJECT_SOURCES),
        Column("source_split"),
        Column("split", allowed=SPLITS),
        Column("sha256", required=False),  # copied from the manifest when it has one
    ),
)

#: ``data/raw/volumes.csv``: text columns, then the measurements (empty when a volume
#: stopped before it was measured). ``alzstage.neuro.qc.QC_COLUMNS`` names the same columns.
VOLUMES_CSV = CsvContract(
    written_by="download",
    columns=(
        Column("subject"),
        Column("file"),  # as written in subjects.csv
        Column("label"),
        Column("status"),  # "ok", or the check that stopped preprocessing (no slices then)
        Column("error"),  # the message for a stopped volume, naming the file and the fix
        Column("shape"),  # on disk, e.g. "182x218x182"
        *(
            Column(name, float)
            for name in (
                "voxel_min_mm",
                "voxel_max_mm",
                "n_nonfinite",
                "brain_ml",
                "registration_score",
                "csf_fraction",
                "gm_fraction",
                "wm_fraction",
                "n_slices",
                "seconds",
            )
        ),
        Column("slice_prefix"),  # the volume's slices in the manifest: paths starting with this
    ),
)


# The readers and writers stages call: each checks the file against its contract.
read_raw_manifest, write_raw_manifest = RAW_MANIFEST_CSV.read, RAW_MANIFEST_CSV.write
read_manifest, write_manifest = MANIFEST_CSV.read, MANIFEST_CSV.write
read_split, write_split = SPLIT_CSV.read, SPLIT_CSV.write
read_volumes, write_volumes = VOLUMES_CSV.read, VOLUMES_CSV.write


# =========================================================================== step two
# Contracts added by issue #22 (house step two): the files that had none.
#
# * :class:`ValidationReport`: the fields of ``reports/validation.json`` that evaluate
#   reads (validate writes);
# * :class:`AugmentedSet`: ``data/processed/augmented/train.npz`` (augment writes; train
#   reads);
# * :func:`read_folds` / :func:`write_folds`: ``data/processed/cv/folds.csv`` (cv_split
#   writes; cv_fold and cv_report read), with :class:`FoldsReport`, its summary
#   ``reports/cv/folds.json`` (cv_report copies it into its report);
# * :func:`fold_predictions_csv` and :func:`fit_slices_csv`: each fold's
#   ``predictions.csv`` and ``fit_slices.csv`` under :func:`fold_dir` (cv_fold writes;
#   cv_report reads).
# * :data:`SKIPPED_CSV`: ``data/raw/skipped.csv``, the files download saw but did not
#   keep (download writes; validate reads).


#: ``data/raw/skipped.csv``: ``alzstage.data.sources.layout.SKIPPED_COLUMNS``, one row a
#: file (``reason``: a key of ``layout.SKIP_REASONS``).
SKIPPED_CSV = CsvContract(
    written_by="download",
    columns=(Column("path"), Column("label"), Column("reason"), Column("detail")),
)


class ValidationReport(Artifact):
    """The fields of ``reports/validation.json`` that evaluate reads (the headline's
    ``valid``: images that passed validation / images checked)."""

    model_config = ConfigDict(extra="allow")
    written_by: ClassVar[str] = "validate"

    n_images: int
    n_valid: int


@dataclass(frozen=True)
class AugmentedSet:
    """``data/processed/augmented/train.npz``: the training slices and their views.

    * ``images`` (M, H, W) uint8: the N original training slices, then their views;
    * ``labels`` (M,) class indices of ``base.classes``;
    * ``source`` (M,) the original row each sample was made from (an original: itself);
    * ``paths`` and ``subjects`` (N,): the originals' rows of ``split.csv``.
    """

    written_by: ClassVar[str] = "augment"
    FILE: ClassVar[str] = "train.npz"

    images: Any
    labels: Any
    source: Any
    paths: Any
    subjects: Any

    def problem(self) -> str | None:
        """What makes the arrays inconsistent with one another, or None."""
        m, n = len(self.images), len(self.paths)
        if self.images.dtype != "uint8" or self.images.ndim != 3:
            return f"images are {self.images.dtype} {self.images.shape}, not uint8 (N, H, W)"
        for name in ("labels", "source"):
            arr = getattr(self, name)
            if arr.shape != (m,) or arr.dtype.kind not in "iu":
                return f"{name} is {arr.dtype} {arr.shape}, not {m} whole numbers"
        if len(self.subjects) != n or n > m:
            return f"{n} paths, {len(self.subjects)} subjects for {m} images"
        if m and (self.labels.min() < 0 or self.source.min() < 0 or self.source.max() >= n):
            return "labels or source indices out of range"
        return None

    @classmethod
    def read(cls, folder: Path) -> AugmentedSet:
        """Load and check ``folder/train.npz``; a missing or broken file names the stage."""
        import zipfile

        import numpy as np

        path = Path(folder) / cls.FILE
        how = rerun(cls.written_by)
        names = [f.name for f in fields(cls)]
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in names if name in npz.files}
        except FileNotFoundError:
            raise AlzstageError(f"{path}: not found; {how} first") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise AlzstageError(f"{path}: not a readable .npz ({e}); {how} again") from None
        missing = [name for name in names if name not in arrays]
        if missing:
            raise AlzstageError(f"{path}: no array {missing[0]!r}; {how} again")
        out = cls(**arrays)
        problem = out.problem()
        if problem:
            raise AlzstageError(f"{path}: {problem}; {how} again")
        return out

    def write(self, folder: Path) -> Path:
        """Check the arrays, then swap in the whole folder (a killed run leaves the old one)."""
        import numpy as np

        path = Path(folder) / self.FILE
        problem = self.problem()
        if problem:
            raise AlzstageError(f"{path}: not written, {problem}")
        with atomic_dir(Path(folder)) as staging, open(staging / self.FILE, "wb") as out:
            np.savez(out, **{f.name: getattr(self, f.name) for f in fields(self)})
        return path
