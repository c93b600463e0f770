"""The MLflow pyfunc that the registry serves: raw grayscale arrays in, probabilities out.

Wrapping the Keras file in a pyfunc fixes the contract in one place (input size,
class order, calibration temperature), so ``alzstage predict``, ``mlflow models serve``
and the REST API all return the same numbers for the same pixels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from alzstage.model.calibration import apply_temperature
from alzstage.model.inputs import to_model_array


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


class AlzstageModel(mlflow.pyfunc.PythonModel):
    """pyfunc over ``model.keras`` + ``meta.json`` (classes, input size, temperature)."""

    def load_context(self, context: Any) -> None:
        import keras

        import alzstage.model.build  # noqa: F401 - registers the custom preprocessing layer

        self.model = keras.models.load_model(context.artifacts["keras_model"], compile=False)
        meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self.classes: list[str] = meta["classes"]
        self.size = tuple(meta["input_size"])
        self.temperature = float(meta.get("temperature", 1.0))

    # No type hints here: MLflow would try to derive (and enforce) a schema from them.
    def predict(self, context, model_input, params=None):
        """Probabilities per class plus the argmax stage for (N, H, W) grayscale arrays."""
        arr = np.asarray(model_input)
        probs = probabilities(self.model, arr, self.size, self.temperature)
        out = pd.DataFrame(probs, columns=self.classes)
        out.insert(0, "stage", [self.classes[i] for i in probs.argmax(axis=1)])
        return out


def log_pyfunc(model_file: Path, meta: dict, example: np.ndarray) -> str:
    """Log the pyfunc into the active run, with signature and input example; returns its URI."""
    import tempfile

    from mlflow.models import infer_signature

    with tempfile.TemporaryDirectory() as tmp:
        meta_file = Path(tmp) / "meta.json"
        meta_file.write_text(json.dumps(meta, indent=2))
        wrapper = AlzstageModel()
        classes = meta["classes"]
        out_example = pd.DataFrame(
            np.full((len(example), len(classes)), 1.0 / len(classes)), columns=classes
        )
        out_example.insert(0, "stage", classes[0])
        signature = infer_signature(example, out_example)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=wrapper,
            artifacts={"keras_model": str(model_file), "meta": str(meta_file)},
            signature=signature,
            input_example=example,
            pip_requirements=_requirements(),
        )
    return info.model_uri


def _requirements() -> list[str]:
    from importlib.metadata import version

    pkgs = ["mlflow", "keras", "numpy", "pandas", "pillow"]
    reqs = [f"{p}=={version(p)}" for p in pkgs]
    try:
        reqs.append(f"tensorflow-cpu=={version('tensorflow-cpu')}")
    except Exception:
        reqs.append(f"tensorflow=={version('tensorflow')}")
    return reqs
