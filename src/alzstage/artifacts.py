"""Typed contracts for the files one stage writes and another reads: JSON, CSV and arrays.

A stage that reads another stage's output parses it through one of these types, so a
missing or mistyped key fails at the read with the file and the key named, instead of a
``KeyError`` deep inside, or a silent fallback that tags a model with an empty string.
Each type says which stage writes its file; the error names the stage to run again.

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
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict
from pydantic import ValidationError as PydanticValidationError

from alzstage.errors import AlzstageError
from alzstage.files import atomic_dir, json_text, write_csv, write_json

if TYPE_CHECKING:
    import pandas as pd

_A = TypeVar("_A", bound="Artifact")  # typing.Self needs Python 3.11; 3.10 is supported


class Artifact(BaseModel):
    """A stage output read by a later stage: :meth:`read` it, :meth:`write` it."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    #: The stage that writes the file: the one to run again when it is missing or stale.
    written_by: ClassVar[str]

    @classmethod
    def read(cls: type[_A], path: Path) -> _A:
        """Parse ``path``; a missing file or key is an :class:`AlzstageError` naming both."""
        path = Path(path)
        rerun = f"run `alzstage {cls.written_by}` (or `dvc repro {cls.written_by}`)"
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise AlzstageError(f"{path}: not found; {rerun} first") from None
        try:
            return cls.model_validate_json(text)
        except PydanticValidationError as e:
            raise AlzstageError(f"{path}: {_problems(e)}; {rerun} again") from None

    @classmethod
    def check(cls: type[_A], data: dict[str, Any], path: Path) -> _A:
        """Validate ``data`` before it is written to ``path`` (a writer's own contract check)."""
        try:
            return cls.model_validate_json(json_text(data))
        except PydanticValidationError as e:
            raise AlzstageError(f"{path}: not written, {_problems(e)}") from None

    def write(self, path: Path) -> Path:
        """Write the file (atomically, as every stage output)."""
        write_json(path, self.model_dump(mode="json"))
        return Path(path)


def _problems(e: PydanticValidationError) -> str:
    """One line: each offending key with what is wrong with it."""
    parts = []
    for err in e.errors(include_url=False):
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "missing":
            parts.append(f"key {key!r} is missing")
        else:
            parts.append(f"key {key!r}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)


class TrainRun(Artifact):
    """``models/train_run.json``: where the train stage logged the model, and what it ran."""

    written_by: ClassVar[str] = "train"

    run_id: str
    #: Where the logged pyfunc lives (promote registers this one).
    model_uri: str
    runs_uri: str
    #: Fitted on the validation split; ``None`` means the probabilities are uncalibrated.
    temperature: float | None
    input_size: tuple[int, int]
    #: What promote tags on the registry version: the recipe that actually trained.
    recipe: str
    backbone: str
    weights: str


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


@dataclass(frozen=True)
class Column:
    """One column of a CSV contract.

    ``str`` columns keep every value as text (subject ``'007'`` stays ``'007'``; an empty
    cell is ``''``); ``int`` columns hold whole numbers in every row; ``float`` columns
    hold numbers, an empty cell being a missing measurement (NaN). ``allowed`` lists the
    only values a ``str`` column may take (empty: any).
    """

    name: str
    dtype: type = str
    required: bool = True
    allowed: tuple[str, ...] = ()


@dataclass(frozen=True)
class CsvContract:
    """The columns of one CSV file one stage writes and another reads."""

    #: The stage that writes the file: the one to run again when it breaks its contract.
    written_by: str
    columns: tuple[Column, ...]

    @property
    def names(self) -> list[str]:
        """Every declared column, in file order."""
        return [c.name for c in self.columns]

    def _rerun(self) -> str:
        return f"run `alzstage {self.written_by}` (or `dvc repro {self.written_by}`)"

    def read(self, path: Path) -> pd.DataFrame:
        """The file as a frame of the declared types; undeclared columns stay text."""
        import pandas as pd

        path = Path(path)
        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        except FileNotFoundError:
            raise AlzstageError(f"{path}: not found; {self._rerun()} first") from None
        return self._typed(df, path, f"{self._rerun()} again")

    def check(self, df: pd.DataFrame, path: Path) -> pd.DataFrame:
        """``df`` as the file would be read back; an error says why it may not be written."""
        return self._typed(df, path, None)

    def frame(self, rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
        """Rows (dicts) as a frame in file order: how tests build the file's fixtures."""
        import pandas as pd

        df = pd.DataFrame(list(rows), columns=self._present(rows[0].keys() if rows else ()))
        return self.check(df, Path(f"<{self.written_by} rows>"))

    def text(self, df: pd.DataFrame, path: Path) -> str:
        """The exact CSV text: declared columns in file order, ``\\n`` line endings."""
        self.check(df, path)
        return df[self._present(df.columns)].to_csv(index=False, lineterminator="\n")

    def write(self, df: pd.DataFrame, path: Path) -> Path:
        """Check ``df`` and write its declared columns, in file order, atomically."""
        self.check(df, path)
        return write_csv(path, df[self._present(df.columns)])

    def _present(self, have: Any) -> list[str]:
        have = set(have)
        return [c.name for c in self.columns if c.required or c.name in have]

    def _typed(self, df: pd.DataFrame, path: Path, fix: str | None) -> pd.DataFrame:
        """``df`` with its declared columns typed; ``fix`` None marks a writer's own check."""
        import pandas as pd

        def refuse(problem: str) -> AlzstageError:
            if fix is None:
                return AlzstageError(f"{path}: not written, {problem}")
            return AlzstageError(f"{path}: {problem}; {fix}")

        missing = [c.name for c in self.columns if c.required and c.name not in df.columns]
        if missing:
            raise refuse(f"no column {', '.join(missing)}")
        out = df.copy()
        for col in self.columns:
            if col.name not in out.columns:
                continue
            values = out[col.name]
            if col.dtype is str:
                values = values.where(values.notna(), "").astype(str)
                bad = ~values.isin(col.allowed) if col.allowed else None
                allowed = f"one of {list(col.allowed)}"
            else:
                blank = values.isna() | (values.astype(str).str.strip() == "")
                # blanks as NaN first: a column of whole numbers then comes back as int64
                values = pd.to_numeric(values.where(~blank), errors="coerce")
                bad = values.isna() & ~blank
                if col.dtype is int:
                    bad |= blank | (values % 1 != 0)
                    values = values.where(~bad, 0).astype("int64")
                allowed = "a whole number" if col.dtype is int else "a number or empty"
            if bad is not None and bad.any():
                rows = bad.to_numpy().nonzero()[0]
                more = f" (and {len(rows) - 1} more rows)" if len(rows) > 1 else ""
                raise refuse(
                    f"column {col.name} is {df[col.name].iloc[rows[0]]!r} in row "
                    f"{rows[0] + 1}{more}, must be {allowed}"
                )
            out[col.name] = values
        return out


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
# --------------------------------------------------------------------------- pixels


class PixelsMeta(Artifact):
    """``data/processed/pixels/meta.json``: what the decode stage stored, at which sizes."""

    written_by: ClassVar[str] = "decode"

    n_images: int
    #: (height, width) of ``images.npy``: params ``model.input_size`` when decode ran.
    input_size: tuple[int, int]
    #: Sides of the square thumbnails stored, one ``thumbs_<side>.npy`` each.
    thumb_sizes: tuple[int, ...]
    #: Column names of ``input_features.npy`` (the input check's per-image features).
    input_features: tuple[str, ...]


class PixelStore:
    """``data/processed/pixels/``: every validated image, decoded once by the decode stage.

    Rows follow the validated manifest; later stages look them up by its ``path``:

    * ``paths.npy``: (N,) the manifest paths, relative to ``data/raw``;
    * ``images.npy``: (N, H, W) uint8 at ``model.input_size``, what
      :func:`alzstage.data.images.load_batch` makes of each file;
    * ``thumbs_<side>.npy``: (N, side, side) uint8 grayscale thumbnails;
      ``correlation_rows`` of them is what :func:`alzstage.data.split.load_thumbnails` returns;
    * ``input_features.npy`` (N, F) float64 and ``sizes.npy`` (N, 2) the native (H, W):
      what the input check (``alzstage.inference.ood``) measures on the full-size file;
    * ``meta.json``: :class:`PixelsMeta`.

    Plain ``.npy`` files, so that a reader maps them and copies only the rows it asks for:
    a stage holds its own rows, never the whole store.
    """

    written_by: ClassVar[str] = "decode"
    ARRAYS: ClassVar[tuple[str, ...]] = ("images", "input_features", "sizes")

    def __init__(self, folder: Path, meta: PixelsMeta, paths: Any) -> None:
        self.folder = Path(folder)
        self.meta = meta
        self.paths = paths
        self._row = {p: i for i, p in enumerate(paths.tolist())}

    @classmethod
    def read(cls, folder: Path) -> PixelStore:
        """Open the store (its meta and paths only); a missing store names the stage to run."""
        import numpy as np

        folder = Path(folder)
        meta = PixelsMeta.read(folder / "meta.json")
        try:
            paths = np.load(folder / "paths.npy", allow_pickle=False)
        except FileNotFoundError:
            raise AlzstageError(
                f"{folder / 'paths.npy'}: not found; {cls._rerun()} first"
            ) from None
        if len(paths) != meta.n_images:
            raise AlzstageError(
                f"{folder}: {len(paths)} paths for {meta.n_images} images; {cls._rerun()} again"
            )
        return cls(folder, meta, paths)

    @classmethod
    def write(
        cls,
        folder: Path,
        paths: Sequence[str],
        images: Any,
        thumbnails: dict[int, Any],
        input_features: dict[str, Any],
        sizes: Any,
    ) -> PixelStore:
        """Write every array, then swap the folder in whole (a killed run leaves the old one)."""
        import numpy as np

        paths_arr = np.asarray(list(paths), dtype=str)
        if len(set(paths_arr.tolist())) != len(paths_arr):
            raise AlzstageError(f"{folder}: not written, the paths are not unique")
        names = tuple(input_features)
        arrays = {
            "paths": paths_arr,
            "images": np.asarray(images, dtype=np.uint8),
            "sizes": np.asarray(sizes, dtype=np.int32).reshape(len(paths_arr), 2),
            "input_features": np.stack(
                [np.asarray(input_features[n], dtype=np.float64) for n in names], axis=1
            ).reshape(len(paths_arr), len(names)),
            **{f"thumbs_{s}": np.asarray(t, dtype=np.uint8) for s, t in thumbnails.items()},
        }
        for name, arr in arrays.items():
            if len(arr) != len(paths_arr):
                raise AlzstageError(
                    f"{folder}: not written, {name} has {len(arr)} rows for {len(paths_arr)} paths"
                )
        meta = PixelsMeta(
            n_images=len(paths_arr),
            input_size=(int(arrays["images"].shape[1]), int(arrays["images"].shape[2])),
            thumb_sizes=tuple(sorted(int(s) for s in thumbnails)),
            input_features=names,
        )
        with atomic_dir(Path(folder)) as staging:
            for name, arr in arrays.items():
                np.save(staging / f"{name}.npy", arr, allow_pickle=False)
            meta.write(staging / "meta.json")
        return cls(Path(folder), meta, paths_arr)

    @classmethod
    def _rerun(cls) -> str:
        return f"run `alzstage {cls.written_by}` (or `dvc repro {cls.written_by}`)"

    def rows(self, paths: Iterable[str]) -> Any:
        """Row numbers of ``paths``; one missing is a one-line error naming the store."""
        import numpy as np

        paths = list(paths)
        missing = [p for p in paths if p not in self._row]
        if missing:
            raise AlzstageError(
                f"{self.folder}: no decoded pixels for {missing[0]!r} ({len(missing)} of "
                f"{len(paths)} paths missing); the store is older than its input, "
                f"{self._rerun()} again"
            )
        return np.fromiter((self._row[p] for p in paths), dtype=np.int64, count=len(paths))

    def _take(self, name: str, paths: Iterable[str]) -> Any:
        import numpy as np

        rows = self.rows(paths)
        # Mapped, so only these rows are read and copied (np.array: a plain in-memory copy).
        return np.array(np.load(self.folder / f"{name}.npy", mmap_mode="r")[rows])

    def images_for(self, paths: Iterable[str], size: tuple[int, int]) -> Any:
        """uint8 (N, H, W) network inputs of ``paths``, checked to be at ``size``."""
        if tuple(size) != self.meta.input_size:
            raise AlzstageError(
                f"{self.folder}: images are {self.meta.input_size[0]}x"
                f"{self.meta.input_size[1]}, model.input_size is {size[0]}x{size[1]}; "
                f"{self._rerun()} again"
            )
        return self._take("images", paths)

    def thumbnails_for(self, paths: Iterable[str], side: int) -> Any:
        """uint8 (N, side, side) thumbnails of ``paths`` (``correlation_rows`` them to compare)."""
        if side not in self.meta.thumb_sizes:
            raise AlzstageError(
                f"{self.folder}: holds thumbnails of {list(self.meta.thumb_sizes)} px, not "
                f"{side} (decode stores split.thumb_size and 32); {self._rerun()} again"
            )
        return self._take(f"thumbs_{side}", paths)

    def feature_columns_for(self, paths: Iterable[str], columns: Sequence[str]) -> Any:
        """(N, len(columns)) float64 measurements of ``paths`` that decode made on the
        full-size file, e.g. the atrophy features of :mod:`alzstage.data.morphometry`."""
        names = list(self.meta.input_features)
        missing = [m for m in columns if m not in names]
        if missing:
            raise AlzstageError(
                f"{self.folder}: no {missing[0]} measurements (written by an older decode); "
                f"{self._rerun()} again"
            )
        table = self._take("input_features", paths)
        return table[:, [names.index(m) for m in columns]]

    def input_features_for(
        self, paths: Iterable[str]
    ) -> tuple[list[dict[str, float]], list[tuple[int, int]]]:
        """The input check's features and the native (H, W) of each of ``paths``."""
        paths = list(paths)
        names = self.meta.input_features
        table = self._take("input_features", paths)
        features = [dict(zip(names, map(float, row), strict=True)) for row in table]
        sizes = [(int(h), int(w)) for h, w in self._take("sizes", paths)]
        return features, sizes
