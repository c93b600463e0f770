"""Typed contracts for the files one stage writes and another reads.

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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict
from pydantic import ValidationError as PydanticValidationError

from alzstage.errors import ArtifactError, MissingInputError
from alzstage.files import atomic_dir, json_text, write_json

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
            raise MissingInputError(f"{path}: not found; {rerun} first") from None
        try:
            return cls.model_validate_json(text)
        except PydanticValidationError as e:
            raise ArtifactError(f"{path}: {_problems(e)}; {rerun} again") from None

    @classmethod
    def check(cls: type[_A], data: dict[str, Any], path: Path) -> _A:
        """Validate ``data`` before it is written to ``path`` (a writer's own contract check)."""
        try:
            return cls.model_validate_json(json_text(data))
        except PydanticValidationError as e:
            raise ArtifactError(f"{path}: not written, {_problems(e)}") from None

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
      :func:`alzstage.model.inputs.load_batch` makes of each file;
    * ``thumbs_<side>.npy``: (N, side, side) uint8 grayscale thumbnails;
      ``correlation_rows`` of them is what :func:`alzstage.data.split.load_thumbnails` returns;
    * ``input_features.npy`` (N, F) float64 and ``sizes.npy`` (N, 2) the native (H, W):
      what the input check (``alzstage.model.ood``) measures on the full-size file;
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
            raise MissingInputError(
                f"{folder / 'paths.npy'}: not found; {cls._rerun()} first"
            ) from None
        if len(paths) != meta.n_images:
            raise ArtifactError(
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
            raise ArtifactError(f"{folder}: not written, the paths are not unique")
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
                raise ArtifactError(
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
            raise MissingInputError(
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
            raise ArtifactError(
                f"{self.folder}: images are {self.meta.input_size[0]}x"
                f"{self.meta.input_size[1]}, model.input_size is {size[0]}x{size[1]}; "
                f"{self._rerun()} again"
            )
        return self._take("images", paths)

    def thumbnails_for(self, paths: Iterable[str], side: int) -> Any:
        """uint8 (N, side, side) thumbnails of ``paths`` (``correlation_rows`` them to compare)."""
        if side not in self.meta.thumb_sizes:
            raise ArtifactError(
                f"{self.folder}: holds thumbnails of {list(self.meta.thumb_sizes)} px, not "
                f"{side} (decode stores split.thumb_size and 32); {self._rerun()} again"
            )
        return self._take(f"thumbs_{side}", paths)

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
