"""``alzstage predict``: image files in, stage and probabilities out.

By default the model is the registry's ``champion``; ``--model`` takes a version number,
an alias, a ``models:/`` or ``runs:/`` URI, or a local path (an MLflow model directory or
a ``.keras`` file), so the same command works on a laptop and against a team server.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from alzstage.model.inputs import ImageReadError, load_gray

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


class ModelNotFound(RuntimeError):
    """No model behind the reference; the message says how to create one."""


def expand_inputs(items: Iterable[str]) -> list[Path]:
    """Files, folders (recursively) and glob patterns → a sorted, de-duplicated file list."""
    found: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found += [q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES]
        elif p.exists():
            found.append(p)
        else:
            matches = [Path(m) for m in glob.glob(item, recursive=True)]
            if not matches:
                raise FileNotFoundError(f"{item}: no such file, folder or glob match")
            found += [m for m in matches if m.is_file()]
    return sorted(dict.fromkeys(q.resolve() for q in found))


def resolve_model_uri(ref: str | None, model_name: str) -> str:
    """Turn the user's ``--model`` into something MLflow or Keras can load."""
    if ref is None or ref == "":
        return f"models:/{model_name}@champion"
    if ref.isdigit():
        return f"models:/{model_name}/{ref}"
    if ref.startswith("@"):
        return f"models:/{model_name}{ref}"
    if "://" in ref or ref.startswith(("models:/", "runs:/")):
        return ref
    if Path(ref).exists():
        return str(Path(ref).resolve())
    return f"models:/{model_name}@{ref}"


class LoadedModel:
    """Either a pyfunc from MLflow or a bare ``.keras`` file, behind one ``predict``."""

    def __init__(self, uri: str, classes: list[str], input_size: tuple[int, int]) -> None:
        self.uri = uri
        if uri.endswith(".keras"):
            import keras

            import alzstage.model.build  # noqa: F401

            self._keras = keras.models.load_model(uri, compile=False)
            self.classes, self.size, self.temperature = classes, input_size, 1.0
            self._pyfunc = None
        else:
            import mlflow.pyfunc
            from mlflow.exceptions import MlflowException

            try:
                self._pyfunc = mlflow.pyfunc.load_model(uri)
            except MlflowException as exc:
                raise ModelNotFound(
                    f"{uri}: no such model ({exc.message.splitlines()[0]}). Run `dvc repro` or "
                    "`alzstage promote` to create a champion, or pass --model"
                ) from None
            inner: Any = self._pyfunc.unwrap_python_model()
            self.classes, self.size = inner.classes, inner.size
            self.temperature = inner.temperature

    def predict(self, images: np.ndarray) -> np.ndarray:
        from alzstage.model.pyfunc import probabilities

        if self._pyfunc is None:
            return probabilities(self._keras, images, self.size, self.temperature)
        out = self._pyfunc.predict(images)
        return out[self.classes].to_numpy(dtype=np.float64)


def predict_files(model: LoadedModel, files: list[Path], low_confidence: float) -> pd.DataFrame:
    """One row per file; unreadable files get an error row, the others still get results."""
    good, arrays, rows = [], [], []
    for f in files:
        try:
            arrays.append(load_gray(f, model.size))
            good.append(f)
        except ImageReadError as exc:
            rows.append({"file": str(f), "stage": "", "confidence": np.nan, "error": str(exc)})
    if arrays:
        probs = model.predict(np.stack(arrays))
        for f, p in zip(good, probs, strict=True):
            row = {
                "file": str(f),
                "stage": model.classes[int(p.argmax())],
                "confidence": float(p.max()),
                "error": "",
            }
            row.update({c: float(v) for c, v in zip(model.classes, p, strict=True)})
            rows.append(row)
    df = pd.DataFrame(rows)
    df["low_confidence"] = df["confidence"] < low_confidence
    order = {str(f): i for i, f in enumerate(files)}
    return df.sort_values("file", key=lambda s: s.map(order)).reset_index(drop=True)
