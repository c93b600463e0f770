"""A tiny registered champion in seconds, for tests, the benchmark and a first look at the page.

Why: the serving code needs a real ``models:/alzstage-demo@champion`` (pyfunc, signature,
registry tags, alias) to be exercised honestly, but running the pipeline takes minutes.
This builds the project's own network at 32x32 with random weights, logs it through the
same :func:`alzstage.model.pyfunc.log_pyfunc` the ``train`` stage uses, and registers it
with the same tags ``promote`` writes, into a store of its own. Its predictions mean
nothing; its contract is exactly the production one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from alzstage.tracking import registered_name

DEMO_CLASSES = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]
DEMO_TAGS = {
    "balanced_accuracy": "0.625",
    "macro_f1": "0.6",
    "accuracy": "0.7",
    "split_strategy": "subject",
    "split_leaky": "False",
    "split_fingerprint": "demo",
    # The demo dataset's champion (one per dataset), labelled synthetic wherever shown.
    "dataset": "demo",
    "data_source": "demo",
    "recipe": "untrained",
    "backbone": "resnet50",
    "weights": "none",
}


@dataclass(frozen=True)
class DemoChampion:
    """Where the demo model lives and what it is."""

    root: Path
    tracking_uri: str
    model_name: str  # the registered name: ``<promote.model_name>-demo``
    version: str
    classes: list[str]
    input_size: tuple[int, int]
    temperature: float

    @property
    def uri(self) -> str:
        return f"models:/{self.model_name}@champion"


@contextlib.contextmanager
def scoped_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking and registry URIs at ``uri``, then put them back.

    ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` into the environment;
    left behind, it would silently redirect every later caller (and test) in the process.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env_keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {k: os.environ.get(k) for k in env_keys}
    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ensure_demo_champion(
    root: Path,
    model_name: str = "alzstage",
    input_size: tuple[int, int] = (32, 32),
    temperature: float = 1.5,
    seed: int = 0,
) -> DemoChampion:
    """Build (once; reused when ``root`` already holds one) a registered demo champion.

    The default ResNet50 backbone, because with random weights it is the one whose
    outputs still vary with the input (MobileNetV2's and EfficientNet's activations
    vanish to a uniform 0.25), so probability comparisons in tests mean something.
    """
    root = Path(root).resolve()
    marker = root / "demo_champion.json"
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    if marker.exists():
        info = json.loads(marker.read_text())
        return DemoChampion(
            root=root,
            tracking_uri=tracking_uri,
            model_name=info["model_name"],
            version=info["version"],
            classes=info["classes"],
            input_size=tuple(info["input_size"]),
            temperature=info["temperature"],
        )
    root.mkdir(parents=True, exist_ok=True)
    import keras
    import mlflow
    import numpy as np

    from alzstage.config import ModelParams
    from alzstage.model.build import build_network
    from alzstage.model.pyfunc import log_pyfunc

    keras.utils.set_random_seed(seed)  # the backbone's initialisers draw from the global seed
    params = ModelParams(backbone="resnet50", weights="none", input_size=input_size, dense_units=8)
    net = build_network(params, n_classes=len(DEMO_CLASSES), seed=seed)
    model_file = root / "model.keras"
    net.model.save(model_file)
    meta = {
        "classes": DEMO_CLASSES,
        "input_size": list(input_size),
        "temperature": temperature,
        "backbone": params.backbone,
    }
    example = np.zeros((1, *input_size), dtype=np.uint8)
    with scoped_tracking_uri(tracking_uri):
        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        exp_id = client.create_experiment(
            "alzstage-demo", artifact_location=(root / "mlruns").as_uri()
        )
        with mlflow.start_run(experiment_id=exp_id, run_name="demo-train"):
            model_uri = log_pyfunc(model_file, meta, example)
        registered = registered_name(model_name, DEMO_TAGS["dataset"])
        mv = mlflow.register_model(model_uri, registered, tags=DEMO_TAGS)
        client.set_registered_model_alias(registered, "champion", mv.version)
    info = {
        "model_name": registered,
        "version": str(mv.version),
        "classes": DEMO_CLASSES,
        "input_size": list(input_size),
        "temperature": temperature,
    }
    marker.write_text(json.dumps(info, indent=2))
    return ensure_demo_champion(root, model_name, input_size, temperature, seed)
