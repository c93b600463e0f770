"""Prediction for ``alzstage predict`` and ``alzstage serve``: pixels in, stage + probabilities out.

By default the model is the ``champion`` of the dataset params.yaml configures (one per
dataset, see :func:`choose_model`); ``--model`` takes a version number or an alias of
that dataset's model, a ``models:/`` or ``runs:/`` URI, or a local path (an MLflow model
directory or a ``.keras`` file), so the same command works on a laptop and against a team
server.

The CLI and the REST API share everything here (decoding, the model wrapper, the batch
summary), so a file gets the same numbers whichever way it is sent; the probabilities
come from the registered pyfunc, so they also match ``mlflow models serve``.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from alzstage import tracking
from alzstage.data.identity import DEMO, ConfiguredDataset, configured_dataset
from alzstage.errors import ImageReadError, ModelError, ModelNotFound  # re-exported
from alzstage.model.inputs import to_model_array

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.config import Params, Paths

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
IMAGE_FORMATS = ("JPEG", "PNG")
# A 4096 x 4096 slice is already far beyond any MRI export; the cap exists so a tiny
# compressed file cannot make the decoder allocate gigabytes (a decompression bomb).
DEFAULT_MAX_PIXELS = 4096 * 4096
# Registry tags (written by ``promote``) that describe how good the model is.
METRIC_TAGS = ("balanced_accuracy", "macro_f1", "accuracy")


class UnsupportedImage(ImageReadError):
    """Not a JPEG or PNG at all (HTTP 415)."""

    status = 415


class CorruptImage(ImageReadError):
    """Looks like a JPEG/PNG but cannot be decoded: truncated or damaged (HTTP 422)."""

    status = 422


class ImageTooLarge(ImageReadError):
    """More pixels than the decompression-bomb guard allows (HTTP 422)."""

    status = 422


# --------------------------------------------------------------------------- inputs


def expand_inputs(items: Iterable[str]) -> list[Path]:
    """Files, folders (recursively) and glob patterns → a sorted, de-duplicated file list.

    A file named explicitly is always kept, whatever its suffix, so that a wrong file is
    reported instead of silently skipped; folders and globs contribute image files and
    NIfTI volumes (``.nii``, ``.nii.gz``) only.
    """
    from alzstage.neuro.volume import is_volume_path

    found: list[Path] = []

    def wanted(q: Path) -> bool:
        return q.suffix.lower() in IMAGE_SUFFIXES or is_volume_path(q)

    def images_under(folder: Path) -> list[Path]:
        return [q for q in folder.rglob("*") if q.is_file() and wanted(q)]

    for item in items:
        p = Path(item)
        if p.is_dir():
            found += images_under(p)
        elif p.exists():
            found.append(p)
        else:
            matches = [Path(m) for m in glob.glob(item, recursive=True)]
            if not matches:
                raise FileNotFoundError(f"{item}: no such file, folder or glob match")
            for m in matches:
                if m.is_dir():
                    found += images_under(m)
                elif wanted(m):
                    found.append(m)
    return sorted(dict.fromkeys(q.resolve() for q in found))


def decode_image(
    source: Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
) -> np.ndarray:
    """Decode a JPEG or PNG (path or bytes) to grayscale uint8 (H, W) at its own size.

    Only JPEG and PNG decoders are tried, so an upload cannot reach Pillow's rarer (and
    historically buggier) format plugins. The pixel count is checked from the header
    before any pixel is decoded. Errors are :class:`ImageReadError` subclasses whose
    ``status`` is the HTTP code the API answers with; ``name`` labels bytes in messages.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    name = name or (str(source) if isinstance(source, Path) else "upload")
    fp = source if isinstance(source, Path) else io.BytesIO(source)
    try:
        with Image.open(fp, formats=IMAGE_FORMATS) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageTooLarge(
                    f"{name}: {w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} "
                    "(decompression-bomb guard); downscale the image (alzstage serve: --max-pixels)"
                )
            im.load()
            gray = im.convert("L")
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{name}: {exc}") from None
    except UnidentifiedImageError:
        raise UnsupportedImage(
            f"{name}: not a JPEG or PNG image; send a .jpg/.jpeg or .png MRI slice"
        ) from None
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CorruptImage(
            f"{name}: the image is damaged or truncated ({exc}); re-export it as JPEG or PNG"
        ) from None
    return np.asarray(gray, dtype=np.uint8)


# --------------------------------------------------------------------------- model


def refers_to_dataset_model(ref: str | None) -> bool:
    """Nothing, a version number or an alias: a model of the configured dataset.

    Anything else (a URI, a path, a missing path) names its model by itself.
    """
    if not ref or ref.isdigit() or ref.startswith("@"):
        return True
    return re.fullmatch(r"[A-Za-z0-9_-]+", ref) is not None and not Path(ref).exists()


def resolve_model_uri(ref: str | None, model_name: str) -> str:
    """Turn the user's ``--model`` into something MLflow or Keras can load.

    ``model_name`` is the registered model that a bare version or alias refers to.
    """
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
    if ref.endswith(".keras") or any(c in ref for c in "/\\") or ref.startswith((".", "~")):
        # An alias cannot hold these, so the person meant a file that is not there.
        raise ModelNotFound(
            f"--model {ref}: no such file; give the path of an existing .keras file or MLflow "
            "model folder, a version number or an alias (e.g. champion)"
        )
    return f"models:/{model_name}@{ref}"


@dataclass(frozen=True)
class ModelChoice:
    """The model predict or serve will load, and why that one (said to the user)."""

    uri: str
    dataset: ConfiguredDataset | None = None  # None: --model named the model by itself

    @property
    def reason(self) -> str:
        if self.dataset is None:
            return f"{self.uri}, as given by --model"
        return f"{self.uri}, for dataset {self.dataset.name} ({self.dataset.why})"


def choose_model(ref: str | None, params: Params, paths: Paths) -> ModelChoice:
    """``--model`` as given, or (by default) the champion of the configured dataset.

    A bare version number or alias also refers to the configured dataset's registered
    model. Raises :class:`~alzstage.errors.DatasetUnknown` when that dataset cannot be
    named (a non-demo source that the pipeline has not split yet, and no ``data.name``).
    """
    if not refers_to_dataset_model(ref):
        return ModelChoice(resolve_model_uri(ref, params.promote.model_name))
    dataset = configured_dataset(params, paths)
    name = tracking.registered_name(params.promote.model_name, dataset.name)
    return ModelChoice(resolve_model_uri(ref, name), dataset)


def missing_champion_hint(
    choice: ModelChoice, model_name: str, tracking_uri: str | None, registry_uri: str | None
) -> str:
    """When the configured dataset has no such model: which datasets have a champion."""
    if choice.dataset is None:
        return ""
    others = [
        d
        for d in tracking.dataset_champions(model_name, tracking_uri, registry_uri)
        if d != choice.dataset.name
    ]
    hint = f"dataset {choice.dataset.name} ({choice.dataset.why}) has no such model"
    if others:
        hint += (
            f"; champions exist for dataset(s) {', '.join(others)}: configure that data "
            f"(or data.name) in params.yaml, or pass --model models:/{model_name}-<dataset>"
            "@champion"
        )
    return hint


_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def parse_registry_uri(uri: str) -> tuple[str, str | None, str | None] | None:
    """``(name, version, alias)`` of ``models:/name@alias`` / ``models:/name/3``, else None."""
    m = _REGISTRY_URI.match(uri)
    if not m:
        return None
    return m["name"], m["version"], m["alias"]


@dataclass
class ModelInfo:
    """What is being served: the reference asked for and the registry version behind it."""

    uri: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        """The champion's test metrics, as ``promote`` tagged them on the version."""
        out = {}
        for k in METRIC_TAGS:
            try:
                out[k] = float(self.tags[k])
            except (KeyError, ValueError):
                continue
        return out

    @property
    def split_strategy(self) -> str | None:
        return self.tags.get("split_strategy") or None

    @property
    def split_leaky(self) -> bool | None:
        v = self.tags.get("split_leaky")
        return None if v in (None, "") else v == "True"

    @property
    def dataset(self) -> str | None:
        return self.tags.get("dataset") or None

    @property
    def recipe(self) -> str | None:
        return self.tags.get("recipe") or None

    @property
    def synthetic_demo(self) -> bool:
        """Trained on the synthetic demo images (``data.name: demo`` is reserved for them)."""
        return self.tags.get("data_source") == DEMO or self.dataset == DEMO

    @property
    def provenance(self) -> str:
        """What the model was trained on, one line for the CLI, the API and the page."""
        if not self.dataset:
            return "training dataset not recorded (a file, or registered without a dataset tag)"
        text = f"trained on dataset {self.dataset}"
        if self.synthetic_demo:
            text += " (SYNTHETIC demo images, not real MRI: meaningless on real scans)"
        if self.recipe:
            backbone = self.tags.get("backbone")
            text += f", recipe {self.recipe}" + (f" ({backbone})" if backbone else "")
        return text

    @property
    def label(self) -> str:
        """``alzstage v3 (@champion)`` or the path, for titles."""
        if self.name and self.version:
            alias = f" (@{self.alias})" if self.alias else ""
            return f"{self.name} v{self.version}{alias}"
        return self.uri


def _no_model(uri: str, why: str) -> ModelNotFound:
    return ModelNotFound(
        f"{uri}: no such model ({why}). Run `dvc repro` or `alzstage promote` to create a "
        "champion, or pass --model with a version, alias or path"
    )


def _resolve_registry(
    uri: str, tracking_uri: str | None, registry_uri: str | None
) -> tuple[ModelInfo, str]:
    """Pin an alias to the version it names *now*, and find that version's files.

    Loading from the version's artifact location (not the alias) means the version we
    report is exactly the one whose weights were loaded, even if the alias moves while
    loading, and a local store needs no download into a temp folder.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    parsed = parse_registry_uri(uri)
    assert parsed is not None
    name, version, alias = parsed
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)
    try:
        mv = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, str(version))
        )
        location = client.get_model_version_download_uri(name, mv.version)
    except MlflowException as exc:
        raise _no_model(uri, exc.message.splitlines()[0]) from None
    info = ModelInfo(uri=uri, name=name, version=str(mv.version), alias=alias, tags=dict(mv.tags))
    return info, location


def _load_keras_file(path: Path) -> Any:
    """A ``.keras`` file, or a :class:`ModelError` that tells a missing file from a bad one."""
    import zipfile

    if not path.is_file():
        raise ModelNotFound(
            f"--model {path}: no such file; give the path of an existing .keras file "
            "(`alzstage train` writes models/model.keras)"
        )
    if not zipfile.is_zipfile(path):  # Keras says "File not found" for these
        raise ModelError(
            f"--model {path}: not a Keras model file (a .keras file is a zip archive); it is "
            "damaged or something else renamed: re-export it with model.save() or re-run "
            "`alzstage train`"
        )
    import keras

    import alzstage.model.build  # noqa: F401

    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a damaged archive
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"--model {path}: cannot load this Keras model ({first}); it is damaged or was "
            "saved by an incompatible Keras: re-export it or re-run `alzstage train`"
        ) from None


class LoadedModel:
    """Either a pyfunc from MLflow or a bare ``.keras`` file, behind one ``predict``.

    ``tracking_uri`` / ``registry_uri`` (default: MLflow's current ones) name the store
    explicitly, so neither the CLI nor the API server has to change MLflow's process-wide
    settings (which MLflow also copies into ``os.environ``) just to read a model.
    """

    def __init__(
        self,
        uri: str,
        classes: list[str],
        input_size: tuple[int, int],
        tracking_uri: str | None = None,
        registry_uri: str | None = None,
    ) -> None:
        self.uri = uri
        self.info = ModelInfo(uri=uri)
        if uri.endswith(".keras"):
            self._keras = _load_keras_file(Path(uri))
            self.classes, self.size, self.temperature = list(classes), tuple(input_size), 1.0
            self._pyfunc = None
            return
        import mlflow.pyfunc
        from mlflow.exceptions import MlflowException

        location = uri
        if parse_registry_uri(uri):
            self.info, location = _resolve_registry(uri, tracking_uri, registry_uri)
        try:
            self._pyfunc = mlflow.pyfunc.load_model(location)
        except (MlflowException, OSError) as exc:
            first = getattr(exc, "message", str(exc)).splitlines()[0]
            raise _no_model(uri, first) from None
        inner: Any = self._pyfunc.unwrap_python_model()
        self.classes, self.size = list(inner.classes), tuple(inner.size)
        self.temperature = float(inner.temperature)
        self._keras = inner.model

    @property
    def keras_model(self) -> Any:
        """The Keras network itself (for Grad-CAM, which needs gradients, not a pyfunc)."""
        return self._keras

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N, n_classes) for uint8 (N, H, W) images."""
        from alzstage.model.pyfunc import probabilities

        if self._pyfunc is None:
            return probabilities(self._keras, images, self.size, self.temperature)
        out = self._pyfunc.predict(np.asarray(images, dtype=np.uint8))
        return out[self.classes].to_numpy(dtype=np.float64)

    def gradcam_overlays(
        self, model_arrays: np.ndarray, display: Sequence[np.ndarray]
    ) -> list[np.ndarray]:
        """RGB Grad-CAM overlays of the predicted class, drawn on each ``display`` image.

        The map is computed at the network's input size (what the model saw) and
        stretched over the display image, which can be the full-resolution original.
        """
        from alzstage.model.explain import gradcam, overlay

        if len(model_arrays) == 0:
            return []
        maps = gradcam(self._keras, np.asarray(model_arrays, dtype=np.uint8))
        return [overlay(img, m) for img, m in zip(display, maps, strict=True)]


# --------------------------------------------------------------------------- batch


def display_image(gray: np.ndarray, max_side: int = 512) -> np.ndarray:
    """The original slice, shrunk to at most ``max_side`` so overlays stay small files."""
    h, w = gray.shape
    scale = max_side / max(h, w)
    if scale >= 1:
        return gray
    return to_model_array(gray, (max(1, round(h * scale)), max(1, round(w * scale))))


def prediction_row(classes: list[str], probs: np.ndarray, low_confidence: float) -> dict[str, Any]:
    """Stage, confidence, low-confidence flag and one column per class for one image."""
    k = int(np.argmax(probs))
    row: dict[str, Any] = {
        "stage": classes[k],
        "confidence": float(probs[k]),
        "low_confidence": bool(probs[k] < low_confidence),
        "error": "",
    }
    row.update({c: float(v) for c, v in zip(classes, probs, strict=True)})
    return row


def unique_png(out_dir: Path, stem: str, taken: set[str]) -> Path:
    """``<stem>.gradcam.png``, or ``<stem>.gradcam-2.png``... if that name is already used.

    Used means on disk *or* earlier in this batch (``a/x.jpg`` and ``b/x.jpg``), so an
    existing overlay or another input's overlay is never overwritten.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"
    n = 1
    while True:
        name = f"{safe}.gradcam.png" if n == 1 else f"{safe}.gradcam-{n}.png"
        if name not in taken and not (out_dir / name).exists():
            taken.add(name)
            return out_dir / name
        n += 1


def predict_files(
    model: LoadedModel,
    files: list[Path],
    low_confidence: float,
    gradcam_dir: Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> pd.DataFrame:
    """One row per file; unreadable files get an error row, the others still get results.

    With ``gradcam_dir``, each readable file also gets an overlay PNG there (column
    ``gradcam``), named after its stem.
    """
    good: list[Path] = []
    arrays: list[np.ndarray] = []
    originals: list[np.ndarray] = []
    rows: list[dict[str, Any]] = []
    for f in files:
        try:
            gray = decode_image(Path(f), max_pixels)
        except ImageReadError as exc:
            rows.append(
                {
                    "file": str(f),
                    "stage": "",
                    "confidence": np.nan,
                    "low_confidence": False,
                    "error": str(exc),
                }
            )
            continue
        arrays.append(to_model_array(gray, model.size))
        originals.append(gray)
        good.append(f)
    if arrays:
        batch = np.stack(arrays)
        probs = model.predict(batch)
        overlays: list[Path | None] = [None] * len(good)
        if gradcam_dir is not None:
            from PIL import Image

            gradcam_dir.mkdir(parents=True, exist_ok=True)
            taken: set[str] = set()
            pictures = model.gradcam_overlays(batch, [display_image(g) for g in originals])
            for i, (f, rgb) in enumerate(zip(good, pictures, strict=True)):
                target = unique_png(gradcam_dir, Path(f).stem, taken)
                Image.fromarray(rgb).save(target, format="PNG")
                overlays[i] = target
        for f, p, ov in zip(good, probs, overlays, strict=True):
            row = {"file": str(f), **prediction_row(model.classes, p, low_confidence)}
            if gradcam_dir is not None:
                row["gradcam"] = str(ov)
            rows.append(row)
    df = pd.DataFrame(rows)
    df["low_confidence"] = df["low_confidence"].astype(bool)
    if gradcam_dir is not None:
        df["gradcam"] = df["gradcam"].fillna("") if "gradcam" in df else ""
    order = {str(f): i for i, f in enumerate(files)}
    return df.sort_values("file", key=lambda s: s.map(order)).reset_index(drop=True)


def summarize(df: pd.DataFrame, classes: list[str], low_confidence: float) -> dict[str, Any]:
    """Batch statistics: stage distribution, mean confidence, which images are unsure.

    The mean probability per class is reported too: unlike the count of argmax stages,
    it does not hide a batch that is split 51/49 between two neighbouring stages.
    """
    ok = df[df["error"].fillna("") == ""] if len(df) else df
    n_ok = len(ok)
    counts = {c: int((ok["stage"] == c).sum()) if n_ok else 0 for c in classes}
    low = ok[ok["low_confidence"].astype(bool)] if n_ok else ok
    file_col = "file" if "file" in df else "filename"
    return {
        "n_images": len(df),
        "n_predicted": n_ok,
        "n_errors": len(df) - n_ok,
        "stage_counts": counts,
        "stage_fractions": {c: (counts[c] / n_ok if n_ok else 0.0) for c in classes},
        "mean_probabilities": {
            c: (float(ok[c].mean()) if n_ok and c in ok else 0.0) for c in classes
        },
        "mean_confidence": float(ok["confidence"].mean()) if n_ok else None,
        "min_confidence": float(ok["confidence"].min()) if n_ok else None,
        "low_confidence_threshold": low_confidence,
        "n_low_confidence": len(low),
        "low_confidence_files": [str(x) for x in low[file_col]] if len(low) else [],
    }
