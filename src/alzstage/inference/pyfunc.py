"""The model the registry serves: raw grayscale slices in, checked probabilities out.

Wrapping the Keras file with its ``meta.json`` fixes the contract in one place (input
size, class order, calibration temperature, the input check fitted at train time), so
``alzstage predict``, ``alzstage serve`` and ``mlflow models serve`` return the same
numbers and the same ``out_of_distribution`` verdict for the same pixels.

Slices come at any H x W (the Kaggle export is 208 x 176, the network takes its
``input_size``) and are resized here, exactly as ``alzstage predict`` does, after the
input check has judged them at their own size. The MLflow ``PythonModel`` adapter itself
lives in :mod:`alzstage.tracking` (the one module that imports MLflow);
:class:`ClassifierBundle` is everything it does.

**Arrays in** (the rule, :func:`alzstage.data.images.pixels_8bit`): uint8 pixels are
0-255; other numbers are read as the ``pixel_range`` parameter declares ("0-255" or
"0-1"), by default detected: floats all within 0..1 with a fraction are 0-1, anything
else 0-255. Values outside the range read are refused with a short 400 naming what
was found, never cast (MLflow's uint8 input schema used to turn 0-1 floats into a black
slice without a word); 16-bit slices are sent as PNG files to ``alzstage predict`` or
the REST API, which decode them by their bit depth. Models logged since carry no
input schema for MLflow to enforce, so these rules are the model's own.

**Answers out**: the stage, its ``confidence`` (calibrated probability of that stage,
as ``alzstage predict`` reports it), each class's probability, the input check's
fields and ``model_version`` (the registry version(s) the model was registered as,
else its MLflow model id).

With ``params={"brain": True}`` (a parameter of the logged signature, default false)
the whole input is one brain's slices and the answer is ONE row: the brain model's stage
and probabilities, its conformal set, and how many slices it rests on
(:data:`BRAIN_COLUMNS`, :mod:`alzstage.inference.brain`), as ``alzstage predict
--brain`` gives it. A model logged before the parameter existed ignores it (MLflow
warns) and answers per slice.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from alzstage.data.images import ImageReadError, to_model_array
from alzstage.inference.brain import brain_answer, brain_model_from_meta
from alzstage.inference.ood import THUMBNAILS_FILE, InputCheck, InputGuard, save_thumbnails_file
from alzstage.model.brain import BrainModel
from alzstage.model.calibration import apply_temperature

# Columns after the per-class probabilities, in every per-slice pyfunc answer.
CHECK_COLUMNS = ("out_of_distribution", "ood_reason", "seen_in_training", "training_correlation")
# Columns after the per-class probabilities of the one-row brain answer (params brain).
BRAIN_COLUMNS = (
    "prediction_set",
    "set_confidence",
    "set_text",
    "brain_model",
    "pooled_stage",
    "n_slices",
    "n_slices_used",
    "left_out",
)
#: The pyfunc's inference parameters (name, MLflow type, default), in its signature.
PARAMS = (("brain", "boolean", False), ("pixel_range", "string", "auto"))


def probabilities(
    model: Any,
    images: np.ndarray,
    size: tuple[int, int],
    temperature: float = 1.0,
    batch_size: int = 64,
) -> np.ndarray:
    """Softmax probabilities for uint8 (N, H, W) images, resized to ``size`` if needed."""
    arr = np.asarray(images)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.shape[1:3] != tuple(size):
        arr = np.stack([to_model_array(a, size) for a in arr])
    x = arr[..., None].astype("float32")
    probs = np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float64)
    return apply_temperature(probs, temperature)


def as_images(model_input: Any) -> list[np.ndarray]:
    """The slices in a pyfunc input: a (N, H, W[, C]) array, a list of slices (sizes may
    differ) or a DataFrame of such arrays, each as a 2D/3D array.

    A bare 2D array is refused (ImageReadError): it is one slice or a batch of 1-pixel
    rows, and the logged contract has always been a batch, as MLflow's input schema
    enforced before the model read its input itself.
    """
    if isinstance(model_input, pd.DataFrame):
        model_input = [np.asarray(v) for v in model_input.iloc[:, 0]]
    if isinstance(model_input, list | tuple):
        return [np.asarray(a) for a in model_input]
    arr = np.asarray(model_input)
    if arr.ndim < 3:
        raise ImageReadError(
            f"input has shape {arr.shape}; send a batch of slices, shape (N, H, W): "
            '{"inputs": [slice, ...]}, each slice H rows of W pixel values'
        )
    return list(arr)


@dataclass
class ClassifierBundle:
    """A Keras network with its contract: classes, input size, temperature, input check."""

    model: Any
    classes: list[str]
    size: tuple[int, int]
    temperature: float = 1.0
    guard: InputGuard | None = None
    brain: BrainModel | None = None  # None: logged before brain models (fixed pooling)
    model_version: str = ""  # set when MLflow loads it (tracking.model_identity)

    @classmethod
    def from_artifacts(cls, artifacts: dict[str, str]) -> ClassifierBundle:
        """From the pyfunc's artifact paths, as MLflow hands them to ``load_context``."""
        thumbs = artifacts.get("training_thumbnails")
        keras_file, meta_file = Path(artifacts["keras_model"]), Path(artifacts["meta"])
        return cls.load(keras_file, meta_file, Path(thumbs) if thumbs else None)

    @classmethod
    def load(cls, keras_file: Path, meta_file: Path, thumbnails: Path | None) -> ClassifierBundle:
        """From the pyfunc's artifacts (``thumbnails`` absent in models older than the check)."""
        import keras

        import alzstage.model.network  # noqa: F401 - registers the custom preprocessing layer

        meta = json.loads(Path(meta_file).read_text())
        return cls(
            model=keras.models.load_model(keras_file, compile=False),
            classes=list(meta["classes"]),
            size=(int(meta["input_size"][0]), int(meta["input_size"][1])),
            temperature=float(meta.get("temperature", 1.0)),
            guard=InputGuard.from_meta(meta, thumbnails),
            brain=brain_model_from_meta(meta),
        )

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N, n_classes); no input check (callers check first)."""
        return probabilities(self.model, images, self.size, self.temperature)

    def check(
        self, grays: list[np.ndarray], sizes: list[tuple[int, int]] | None = None
    ) -> list[InputCheck] | None:
        """The input check's verdicts, or None for a model stored without one."""
        return None if self.guard is None else self.guard.check(grays, sizes)

    def predict_frame(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """The pyfunc answer: per slice (stage, one column per class, then
        :data:`CHECK_COLUMNS`) or, with ``params={"brain": True}``, one row for the
        whole input as one brain's slices (:meth:`brain_frame`).

        An out-of-distribution slice gets no stage and no probabilities (nulls), only
        the reason; the others are resized to the network's input and predicted.
        """
        pixel_range = str((params or {}).get("pixel_range") or "auto")
        grays = [_gray(a, pixel_range) for a in as_images(model_input)]
        checks = self.check(grays)
        usable = [i for i, c in enumerate(checks or [None] * len(grays)) if not _flagged(c)]
        probs = (
            self.probabilities(np.stack([to_model_array(grays[i], self.size) for i in usable]))
            if usable
            else np.zeros((0, len(self.classes)))
        )
        if (params or {}).get("brain"):
            return self.brain_frame(grays, usable, probs)
        rows: list[dict[str, Any]] = []
        by_index = dict(zip(usable, probs, strict=True))
        for i in range(len(grays)):
            p = by_index.get(i)
            row: dict[str, Any] = {
                "stage": None if p is None else self.classes[int(np.argmax(p))],
                "confidence": None if p is None else float(np.max(p)),
                **{c: (None if p is None else float(p[k])) for k, c in enumerate(self.classes)},
            }
            if checks is None:
                row.update(dict.fromkeys(CHECK_COLUMNS))
            else:
                row.update(checks[i].as_dict())
            row["model_version"] = self.model_version or None
            rows.append(row)
        columns = ["stage", "confidence", *self.classes, *CHECK_COLUMNS, "model_version"]
        # object columns keep None as null in MLflow's JSON (a float column would send NaN)
        return pd.DataFrame(rows, columns=columns, dtype=object)

    def brain_frame(
        self, grays: list[np.ndarray], usable: list[int], probs: np.ndarray
    ) -> pd.DataFrame:
        """One row for one brain: stage, probabilities, :data:`BRAIN_COLUMNS`.

        The atrophy measurements are taken on the arrays as given (send full-size
        slices, as exported: the brain model was fitted on full-size measurements).
        Out-of-distribution slices are left out (``left_out`` counts them); when none is
        left the row has no stage, only ``n_slices_used`` 0.
        """
        row: dict[str, Any] = dict.fromkeys(["stage", *self.classes, *BRAIN_COLUMNS])
        row.update(
            n_slices=len(grays), n_slices_used=len(usable), left_out=len(grays) - len(usable)
        )
        if usable:
            answer = brain_answer(self.brain, self.classes, probs, [grays[i] for i in usable])
            fields = answer.fields(0.0)
            row.update(
                stage=answer.stage,
                **fields["probabilities"],
                **{k: fields[k] for k in BRAIN_COLUMNS if k in fields},
            )
        row["model_version"] = self.model_version or None
        columns = ["stage", *self.classes, *BRAIN_COLUMNS, "model_version"]
        return pd.DataFrame([row], columns=columns, dtype=object)


def _flagged(check: InputCheck | None) -> bool:
    return check is not None and check.out_of_distribution


def _gray(a: np.ndarray, pixel_range: str = "auto") -> np.ndarray:
    """A 2D or (H, W, C) pixel array as uint8 (H, W) at its own size, its values read by
    the array rule (:func:`~alzstage.data.images.pixels_8bit`); else ImageReadError."""
    arr = np.asarray(a)
    own = (arr.shape[0], arr.shape[1]) if arr.ndim >= 2 else (1, 1)
    return to_model_array(arr, own, pixel_range)


def example_input(meta: dict[str, Any]) -> np.ndarray:
    """A blank slice at the most common training size (else the network's input size)."""
    sizes = (meta.get("input_check") or {}).get("sizes") or {}
    if sizes:
        h, w = (int(v) for v in Counter(sizes).most_common(1)[0][0].split("x"))
    else:
        h, w = meta["input_size"]
    return np.zeros((1, h, w), dtype=np.uint8)


def log_pyfunc(
    model_file: Path,
    meta: dict,
    example: np.ndarray | None = None,
    training_thumbnails: np.ndarray | None = None,
) -> str:
    """Log the model into the active MLflow run; returns its URI.

    ``meta`` (classes, input_size, temperature, backbone and, from the train command,
    ``input_check``) becomes ``meta.json``; ``training_thumbnails`` (uint8 (N, 32, 32))
    the leak guard's file. ``example`` is kept for callers of the old signature: the
    logged example is a blank slice of the training size (:func:`example_input`), as a
    client sends it.
    """
    import tempfile

    from alzstage import tracking

    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {"keras_model": Path(model_file)}
        meta_file = Path(tmp) / "meta.json"
        meta_file.write_text(json.dumps(meta, indent=2))
        artifacts["meta"] = meta_file
        if training_thumbnails is not None:
            thumbs = Path(tmp) / THUMBNAILS_FILE
            save_thumbnails_file(thumbs, training_thumbnails)
            artifacts["training_thumbnails"] = thumbs
        return tracking.log_pyfunc_model(
            artifacts,
            ClassifierBundle.from_artifacts,
            output_columns(meta["classes"]),
            example_input(meta),
            _requirements(),
            params=PARAMS,
            input_dtype=None,  # the model reads the pixels itself (module docstring)
        )


def output_columns(classes: list[str]) -> dict[str, str]:
    """Column name -> MLflow type of the (per-slice) answer, for the logged signature.

    The brain answer (``params={"brain": True}``) has :data:`BRAIN_COLUMNS` instead of
    the input check's; MLflow does not enforce an output schema, and a signature has
    only one, so the per-slice answer (the default) is the one described.
    """
    return {
        "stage": "string",
        "confidence": "double",
        **dict.fromkeys(classes, "double"),
        "out_of_distribution": "boolean",
        "ood_reason": "string",
        "seen_in_training": "boolean",
        "training_correlation": "double",
        "model_version": "string",
    }


def _requirements() -> list[str]:
    from importlib.metadata import version

    # scipy (atrophy measurements), crepes and scikit-learn (conformal sets): the brain answer
    pkgs = ["mlflow", "keras", "numpy", "pandas", "pillow", "pydantic"]
    pkgs += ["scipy", "crepes", "scikit-learn"]
    reqs = [f"{p}=={version(p)}" for p in pkgs]
    try:
        reqs.append(f"tensorflow-cpu=={version('tensorflow-cpu')}")
    except Exception:
        reqs.append(f"tensorflow=={version('tensorflow')}")
    return reqs


_LEGACY_CLASS: type | None = None


def __getattr__(name: str) -> Any:
    """``AlzstageModel``: the class of models registered before the adapter moved to
    :mod:`alzstage.tracking`. Their pickles name ``alzstage.inference.pyfunc.AlzstageModel``
    and carry no loader, so this subclass supplies :meth:`ClassifierBundle.from_artifacts`;
    made on first use, so importing this module does not import MLflow."""
    global _LEGACY_CLASS
    if name != "AlzstageModel":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _LEGACY_CLASS is None:
        from alzstage import tracking

        _LEGACY_CLASS = type(
            "AlzstageModel",
            (tracking.AlzstageModel,),
            {"load_bundle": staticmethod(ClassifierBundle.from_artifacts), "__module__": __name__},
        )
    return _LEGACY_CLASS
