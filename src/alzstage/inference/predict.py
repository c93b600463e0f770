"""Prediction for ``alzstage predict`` and ``alzstage serve``: pixels in, stage + probabilities out.

By default the model is the ``champion`` of the dataset params.yaml configures (one per
dataset, see :func:`choose_model`); ``--model`` takes a version number or an alias of
that dataset's model, a ``models:/`` or ``runs:/`` URI, or a local path (an MLflow model
directory or a ``.keras`` file), so the same command works on a laptop and against a team
server.

The CLI and the REST API share everything here (decoding, the model wrapper, the input
check, prediction and Grad-CAM in :func:`predict_decoded`), and both get the typed
results of :mod:`alzstage.inference.prediction`, so a file gets the same numbers whichever
way it is sent; the probabilities come from the registered pyfunc, so they also match
``mlflow models serve``.

Here: which model (``--model`` and the champion), input expansion (and the ``--brain``
folders) and the shared image path (``predict_decoded``) for the CLI and the API.
Loading a model is :mod:`alzstage.inference.loading`, the result type
``prediction.py``, volumes ``volume.py``, brains ``brain.py``, rendering ``command.py``.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alzstage import tracking
from alzstage.data.identity import ConfiguredDataset, configured_dataset
from alzstage.data.images import (  # decoding lives with the other input code; re-exported
    DEFAULT_MAX_PIXELS,
    DISPLAY_MAX_SIDE,
    IMAGE_FORMATS,  # noqa: F401
    DecodedImage,
    decode_image,  # noqa: F401
    decode_slice,
    display_image,
    to_model_array,
)
from alzstage.errors import ImageReadError, InputError, ModelNotFound  # re-exported
from alzstage.inference.gradcam import overlay_writer
from alzstage.inference.prediction import ImagePrediction, Prediction, failed, scored

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.config import Params, Paths
    from alzstage.inference.loading import LoadedModel
    from alzstage.inference.prediction import VolumePrediction


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


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


def brain_files(folder: Path) -> list[Path]:
    """The JPEG/PNG slices directly in ``folder``, sorted: one brain for ``--brain``.

    Only the folder's own files: a folder of brains (one sub-folder each) would
    otherwise become one brain. Raises :class:`~alzstage.errors.InputError`, one line
    naming the folder and the fix, when there is nothing to predict.
    """
    from alzstage.neuro.volume import is_volume_path

    folder = Path(folder)
    how = "--brain takes a folder holding one brain's slices (.jpg, .jpeg, .png)"
    if not folder.exists():
        raise InputError(f"{folder}: no such folder; {how}")
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; {how} (predict single files without --brain)")
    entries = sorted(folder.iterdir())
    files = [q for q in entries if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES]
    if files:
        return files
    if any(q.is_file() and is_volume_path(q) for q in entries):
        raise InputError(
            f"{folder}: holds NIfTI volumes, not slice images; a volume is one brain by "
            "itself: predict it without --brain"
        )
    nested = [q for q in folder.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES]
    if nested:
        raise InputError(
            f"{folder}: no JPEG/PNG slices directly in this folder (its sub-folders hold "
            f"{len(nested)}); give each brain's own folder to --brain"
        )
    state = "is empty" if not entries else "holds no JPEG/PNG slices"
    raise InputError(f"{folder}: the folder {state}; {how}")


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
    if not ref or ref.isdigit() or ref.startswith("@"):
        return tracking.model_ref_uri(ref, model_name)
    if tracking.is_model_uri(ref):
        return ref
    if Path(ref).exists():
        return str(Path(ref).resolve())
    if ref.endswith(".keras") or any(c in ref for c in "/\\") or ref.startswith((".", "~")):
        # An alias cannot hold these, so the person meant a file that is not there.
        raise ModelNotFound(
            f"--model {ref}: no such file; give the path of an existing .keras file or MLflow "
            "model folder, a version number or an alias (e.g. champion)"
        )
    return tracking.model_ref_uri(ref, model_name)


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
    model. Raises :class:`~alzstage.errors.AlzstageError` when that dataset cannot be
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
            "(or data.name) in params.yaml, or pass --model "
            f"{tracking.champion_uri(model_name, '<dataset>')}"
        )
    return hint


def store_uris(root: Path) -> tuple[str, str]:
    """``(tracking_uri, registry_uri)`` to read models from, named explicitly.

    Read-only use: unlike ``tracking.configure()`` this creates no experiment and does
    not repoint MLflow for the whole process. ``MLFLOW_REGISTRY_URI`` wins for the
    registry, as MLflow itself would do.
    """
    store = tracking.tracking_uri(root)
    return store, os.environ.get("MLFLOW_REGISTRY_URI") or store


# --------------------------------------------------------------------------- batch


def predict_decoded(
    model: LoadedModel,
    decoded: Sequence[tuple[int, str, DecodedImage]],
    low_confidence: float,
    overlay_to: Callable[[ImagePrediction, np.ndarray], str] | None = None,
    lock: AbstractContextManager[Any] | None = None,
) -> list[ImagePrediction]:
    """Check, predict and explain decoded images ``(index, name, image)``; the CLI and
    the API both run this, so an image gets the same result from either.

    Each image is judged by the model's input check first: one that is out of
    distribution gets ``out_of_distribution`` and its reason instead of a stage; the
    others are predicted in one batch. With ``overlay_to``, each predicted image also
    gets a Grad-CAM overlay, stored where ``overlay_to`` says (a file, a data URL).
    ``lock`` is held around the model calls only (the server shares one model).
    """
    checks = model.check([d.gray for *_, d in decoded], [(d.height, d.width) for *_, d in decoded])
    results: dict[int, ImagePrediction] = {}
    good = []
    for (index, name, image), check in zip(decoded, checks, strict=True):
        judged = ImagePrediction(
            index=index,
            filename=name,
            status=200,
            width=image.width,
            height=image.height,
            **({} if check is None else check.as_dict()),
        )
        if judged.out_of_distribution_flag:
            results[index] = judged
        else:
            good.append((judged, image))
    if good:
        batch = np.stack([to_model_array(image.gray, model.size) for _, image in good])
        with lock or nullcontext():
            probs = model.predict(batch)
            pictures: list[np.ndarray | None] = (
                model.gradcam_overlays(batch, [display_image(image.gray) for _, image in good])
                if overlay_to is not None
                else [None] * len(good)
            )
        for (judged, _), p, rgb in zip(good, probs, pictures, strict=True):
            gradcam = None if rgb is None or overlay_to is None else overlay_to(judged, rgb)
            update = {**scored(model.classes, p, low_confidence), "gradcam": gradcam}
            results[judged.index] = judged.model_copy(update=update)
    return [results[i] for i in sorted(results)]


def predict_files(
    model: LoadedModel,
    files: list[Path],
    low_confidence: float,
    gradcam_dir: Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[ImagePrediction]:
    """One result per image file, in order; unreadable files get an error, the others
    still get results. With ``gradcam_dir``, each predicted file also gets an overlay
    PNG there (``gradcam``), named after its stem."""
    results: dict[int, ImagePrediction] = {}
    decoded = []
    for i, f in enumerate(files):
        try:
            decoded.append(
                (i, str(f), decode_slice(Path(f), max_pixels, max_side=DISPLAY_MAX_SIDE))
            )
        except ImageReadError as exc:
            results[i] = failed(i, str(f), exc, ImagePrediction)
    write = None if gradcam_dir is None else overlay_writer(gradcam_dir)
    overlay_to = None if write is None else (lambda p, rgb: write(Path(p.filename).stem, rgb))
    for p in predict_decoded(model, decoded, low_confidence, overlay_to):
        results[p.index] = p
    return [results[i] for i in sorted(results)]


def predict_brain_folders(
    model: LoadedModel,
    brains: Sequence[tuple[Path, list[Path]]],
    params: Params,
    gradcam_dir: Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[VolumePrediction]:
    """One brain-level result per ``(folder, its files)`` (:func:`brain_files`), each
    with the per-slice table; files that cannot be read are listed, not fatal.

    With ``gradcam_dir``, each informative slice's overlay of the brain's stage is
    written there as ``<file stem>.gradcam.png`` (never overwriting).
    """
    from alzstage.inference.volume import predict_brain_slices

    write = None if gradcam_dir is None else overlay_writer(gradcam_dir)
    results = []
    for index, (folder, files) in enumerate(brains):
        decoded, unreadable = [], []
        for i, f in enumerate(files):
            try:
                decoded.append((i, str(f), decode_slice(f, max_pixels, max_side=DISPLAY_MAX_SIDE)))
            except ImageReadError as exc:
                unreadable.append((i, str(f), str(exc)))
        overlay_to = (
            None if write is None else (lambda i, rgb, fs=files: write(Path(fs[i]).stem, rgb))
        )
        results.append(
            predict_brain_slices(
                model,
                decoded,
                unreadable,
                str(folder),
                params.neuro,
                params.evaluate.low_confidence,
                index=index,
                overlay_to=overlay_to,
            )
        )
    return results


def predict_paths(
    model: LoadedModel, files: list[Path], params: Params, gradcam_dir: Path | None = None
) -> list[Prediction]:
    """Images and NIfTI volumes together: one result each, in the order of ``files``."""
    from alzstage.inference.volume import predict_volume_files
    from alzstage.neuro.volume import is_volume_path

    threshold = params.evaluate.low_confidence
    is_volume = [is_volume_path(f) for f in files]
    images = [f for f, v in zip(files, is_volume, strict=True) if not v]
    volumes = [f for f, v in zip(files, is_volume, strict=True) if v]
    image_results = iter(predict_files(model, images, threshold, gradcam_dir) if images else [])
    volume_results = iter(
        predict_volume_files(model, volumes, params, threshold, gradcam_dir) if volumes else []
    )
    return [
        next(volume_results if v else image_results).model_copy(update={"index": i})
        for i, v in enumerate(is_volume)
    ]
