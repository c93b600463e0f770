"""``data/processed/pixels/``: the decode stage's store, read by every later stage.

Declared here and re-exported by :mod:`alzstage.artifacts` (where every stage-to-stage
file is listed); the store is big enough to want its own module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from alzstage.contract import Artifact, rerun
from alzstage.errors import AlzstageError
from alzstage.files import atomic_dir


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
        return rerun(cls.written_by)

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
