"""Loading the model ``predict`` and ``serve`` use: a registry pyfunc or a bare ``.keras``.

Why its own module: what a model *is* once loaded (:class:`LoadedModel`, with the
registry facts of :class:`ModelInfo`) is independent of how the CLI and the API feed it
images (:mod:`alzstage.inference.predict`). Which reference ``--model`` means, and the
spelling of model addresses, stay in ``predict``, which imports nothing from here at
run time (the two would otherwise import each other).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alzstage import tracking
from alzstage.data.identity import DEMO
from alzstage.errors import AlzstageError, ModelNotFound
from alzstage.inference.prediction import ModelRef

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.inference.ood import InputCheck
    from alzstage.model.brain import BrainModel

# Registry tags (written by ``promote``) that describe how good the model is.
METRIC_TAGS = ("balanced_accuracy", "macro_f1", "accuracy")


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
    def ref(self) -> ModelRef:
        """These facts as every prediction response carries them."""
        return ModelRef(
            uri=self.uri,
            name=self.name,
            version=self.version,
            alias=self.alias,
            dataset=self.dataset,
            recipe=self.recipe,
            synthetic_demo=self.synthetic_demo,
            provenance=self.provenance,
        )

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
    parsed = tracking.parse_model_uri(uri)
    assert parsed is not None
    name, version, alias = parsed
    try:
        found = tracking.resolve_registered(name, version, alias, tracking_uri, registry_uri)
    except ModelNotFound as exc:
        raise _no_model(uri, str(exc)) from None
    info = ModelInfo(uri=uri, name=name, version=found.version, alias=alias, tags=found.tags)
    return info, found.location


def _load_keras_file(path: Path) -> Any:
    """A ``.keras`` file, or an :class:`AlzstageError` that tells a missing file from a bad one."""
    import zipfile

    if not path.is_file():
        raise ModelNotFound(
            f"--model {path}: no such file; give the path of an existing .keras file "
            "(`alzstage train` writes models/model.keras)"
        )
    if not zipfile.is_zipfile(path):  # Keras says "File not found" for these
        raise AlzstageError(
            f"--model {path}: not a Keras model file (a .keras file is a zip archive); it is "
            "damaged or something else renamed: re-export it with model.save() or re-run "
            "`alzstage train`"
        )
    import keras

    import alzstage.model.network  # noqa: F401

    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a damaged archive
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AlzstageError(
            f"--model {path}: cannot load this Keras model ({first}); it is damaged or was "
            "saved by an incompatible Keras: re-export it or re-run `alzstage train`"
        ) from None


class LoadedModel:
    """Either a pyfunc from MLflow or a bare ``.keras`` file, behind one ``predict``.

    ``tracking_uri`` / ``registry_uri`` (default: MLflow's current ones) name the store
    explicitly, so neither the CLI nor the API server has to change MLflow's process-wide
    settings (which MLflow also copies into ``os.environ``) just to read a model.

    A registry model carries its input check and training thumbnails (``check``); a bare
    ``.keras`` file has neither, and its results say ``out_of_distribution: null``.
    """

    def __init__(
        self,
        uri: str,
        classes: list[str],
        input_size: tuple[int, int],
        tracking_uri: str | None = None,
        registry_uri: str | None = None,
    ) -> None:
        from alzstage.inference.pyfunc import ClassifierBundle

        self.uri = uri
        self.info = ModelInfo(uri=uri)
        if uri.endswith(".keras"):
            keras_model = _load_keras_file(Path(uri))
            self.bundle = ClassifierBundle(keras_model, list(classes), tuple(input_size))
            return
        location = uri
        if tracking.parse_model_uri(uri):
            self.info, location = _resolve_registry(uri, tracking_uri, registry_uri)
        try:
            _, inner = tracking.load_pyfunc(location)
        except ModelNotFound as exc:
            raise _no_model(uri, str(exc)) from None
        # Models logged before the bundle existed unpickle into the same class and
        # rebuild it in load_context, so every registry model has one.
        self.bundle = inner.bundle

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    @property
    def size(self) -> tuple[int, int]:
        return self.bundle.size

    @property
    def temperature(self) -> float:
        return self.bundle.temperature

    @property
    def has_input_check(self) -> bool:
        return self.bundle.guard is not None

    @property
    def brain_model(self) -> BrainModel | None:
        """The brain-level model stored with the network (``meta["brain_model"]``); None
        for a model logged before it existed, or a bare ``.keras`` file: the brain's stage
        then comes from the fixed pooling rule, with no set."""
        return self.bundle.brain

    @property
    def keras_model(self) -> Any:
        """The Keras network itself (for Grad-CAM, which needs gradients, not a pyfunc)."""
        return self.bundle.model

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N, n_classes) for uint8 (N, H, W) images.

        The pyfunc's own numbers (same function, same temperature), without its input
        check: callers run :meth:`check` first, on the images at their native size.
        """
        return self.bundle.probabilities(np.asarray(images, dtype=np.uint8))

    def check(
        self, grays: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[InputCheck | None]:
        """The stored input check's verdict per image (``None`` each without a check)."""
        found = self.bundle.check(list(grays), None if sizes is None else list(sizes))
        return [None] * len(grays) if found is None else list(found)

    def gradcam_overlays(
        self, model_arrays: np.ndarray, display: Sequence[np.ndarray]
    ) -> list[np.ndarray]:
        """RGB Grad-CAM overlays of the predicted class, drawn on each ``display`` image.

        The map is computed at the network's input size (what the model saw) and
        stretched over the display image, which can be the full-resolution original.
        """
        from alzstage.inference.gradcam import gradcam, overlay

        if len(model_arrays) == 0:
            return []
        maps = gradcam(self.keras_model, np.asarray(model_arrays, dtype=np.uint8))
        return [overlay(img, m) for img, m in zip(display, maps, strict=True)]
