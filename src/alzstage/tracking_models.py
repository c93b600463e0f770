"""The models half of the MLflow boundary: the pyfunc class, logging, loading, stand-alone stores.

Why apart from :mod:`alzstage.tracking`: it is a third of the MLflow code and needs
nothing of it (it imports no ``tracking`` name), so :mod:`alzstage.tracking` stays under
500 lines and re-exports every public name here: callers keep using
``tracking.log_pyfunc_model`` and friends. The class keeps its
importable name ``alzstage.tracking.AlzstageModel`` (``__module__`` below), the one that
models logged before this split pickled by reference, so they still load.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alzstage.errors import AlzstageError, InputError

#: Where the class says it lives: pickles of logged models name it, so it must not move.
PUBLIC_MODULE = "alzstage.tracking"


def _pyfunc_class() -> type:
    """The MLflow ``PythonModel`` adapter: MLflow's calls in, a model bundle's methods out.

    What it serves is injected (``load_bundle``: artifact paths -> an object with
    ``predict_frame``), so this module imports no model code; cloudpickle stores that
    loader by reference (:meth:`alzstage.inference.pyfunc.ClassifierBundle.from_artifacts`).
    Subclassing needs MLflow imported, which this module otherwise defers (a fast CLI),
    so the class is made on first use and reached as ``tracking.AlzstageModel`` through
    that module's ``__getattr__``; its ``__module__``/``__qualname__`` make that its
    importable name, so pickles refer to it rather than copying its code.
    """
    global _PYFUNC_CLASS
    if _PYFUNC_CLASS is not None:
        return _PYFUNC_CLASS
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    class AlzstageModel(mlflow.pyfunc.PythonModel):
        """pyfunc over the alzstage artifacts (``model.keras``, ``meta.json``, thumbnails)."""

        load_bundle: Any = None  # class default: set per instance, or by a legacy subclass

        def __init__(self, load_bundle: Any = None) -> None:
            if load_bundle is not None:
                self.load_bundle = load_bundle

        def load_context(self, context: Any) -> None:
            artifacts = dict(context.artifacts)
            self.bundle = self.load_bundle(artifacts)
            if hasattr(self.bundle, "model_version") and "meta" in artifacts:
                self.bundle.model_version = model_identity(Path(artifacts["meta"]).parents[1])

        # No type hints here: MLflow would try to derive (and enforce) a schema from them.
        def predict(self, context, model_input, params=None):
            """Stage, probabilities and the input check's fields per (H, W) slice; with
            ``params={"brain": True}``, one row for the input as one brain's slices."""
            try:
                return self.bundle.predict_frame(model_input, params)
            except InputError as exc:  # a malformed slice: the client's 400, not a 500
                raise ClientInputError(str(exc)) from None

    class ClientInputError(MlflowException):
        """A client's malformed input (400) whose message stays short: MLflow's scoring
        server prepends the whole input array to a predict error's ``message`` (megabytes
        for one slice); this message keeps the first value it is given, cut to
        :data:`MAX_ERROR_CHARS`."""

        def __init__(self, message: str) -> None:
            super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

        @property
        def message(self) -> str:
            return self.__dict__.get("_short", "")

        @message.setter
        def message(self, value: str) -> None:
            if "_short" not in self.__dict__:
                text = str(value)
                cut = len(text) > MAX_ERROR_CHARS
                self.__dict__["_short"] = text[: MAX_ERROR_CHARS - 3] + "..." if cut else text

    AlzstageModel.__module__ = PUBLIC_MODULE
    AlzstageModel.__qualname__ = "AlzstageModel"
    _PYFUNC_CLASS = AlzstageModel
    return AlzstageModel


# The md5 of models/model.keras a train run wrote, and the pyfunc it logged: how evaluate
# and promote find that run from models/train_run.json, which holds no MLflow id (an id
# differs on every run, and the file is a DVC output that must hash alike twice).
TAG_MODEL_MD5 = "alzstage.model_md5"
TAG_MODEL_URI = "alzstage.model_uri"


@dataclass(frozen=True)
class TrainedModel:
    """The train run that wrote a model file, and the pyfunc it logged."""

    run_id: str
    model_uri: str


def trained_model(model_md5: str, store: str) -> TrainedModel:
    """The newest finished train run (experiment ``alzstage``) tagged with ``model_md5``.

    One line naming ``store`` when there is none: the store does not hold the run that
    trained this model file (another store, or one made anew).
    """
    import mlflow
    from mlflow import MlflowClient

    exp = mlflow.get_experiment_by_name("alzstage")
    found = (
        MlflowClient().search_runs(
            [exp.experiment_id],
            f"tags.`alzstage.stage` = 'train' and tags.`{TAG_MODEL_MD5}` = '{model_md5}' "
            "and attributes.status = 'FINISHED'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if exp is not None
        else []
    )
    if not found or TAG_MODEL_URI not in found[0].data.tags:
        raise AlzstageError(
            f"{store}: no finished train run wrote the models/model.keras of md5 {model_md5}; "
            "re-run `alzstage train` (or `dvc repro train`) with this tracking store"
        )
    return TrainedModel(found[0].info.run_id, found[0].data.tags[TAG_MODEL_URI])


_PYFUNC_CLASS: type | None = None
#: The longest error message the pyfunc's 400 answers carry.
MAX_ERROR_CHARS = 500


def model_identity(model_dir: Path) -> str:
    """What the pyfunc at ``model_dir`` is: ``"<name> v<version>"`` of the registry
    version(s) made from it when the tracking server named by ``MLFLOW_TRACKING_URI``
    says so (as under ``mlflow models serve -m models:/...``), else ``"model <id>"``
    from its ``MLmodel`` file; "" when neither is known. Never raises: an answer
    without a version is better than a model that does not load."""
    import yaml

    try:
        info = yaml.safe_load((Path(model_dir) / "MLmodel").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ""
    model_id, run_id = info.get("model_id"), info.get("run_id")
    if os.environ.get("MLFLOW_TRACKING_URI") and run_id:
        try:
            from mlflow import MlflowClient

            found = MlflowClient().search_model_versions(f"run_id = '{run_id}'")
            versions = sorted(f"{v.name} v{v.version}" for v in found)
            if versions:
                return ", ".join(versions)
        except Exception:  # a registry that cannot answer: fall back
            pass
    return f"model {model_id}" if model_id else (f"run {run_id}" if run_id else "")


def log_pyfunc_model(
    artifacts: dict[str, Path],
    load_bundle: Any,
    output_columns: dict[str, str],
    example: Any,
    pip_requirements: list[str],
    params: tuple[tuple[str, str, Any], ...] = (),
    input_dtype: str | None = "uint8",
) -> str:
    """Log the alzstage pyfunc into the active run; returns its model URI.

    ``input_dtype`` None logs no input schema, so MLflow neither casts the pixels sent
    (JSON floats to uint8: 0.4 became 0) nor answers a mismatch by echoing the input;
    the model reads and checks the values itself.

    ``load_bundle(artifact paths)`` builds what serves predictions when MLflow loads the
    model. The input signature is a uint8 tensor of shape (-1, -1, -1): any number of
    slices of any one H x W per request (the model resizes), so a client sends slices at
    their exported size (Kaggle 208 x 176) as ``{"inputs": [[[...]]]}``. ``params``
    ``(name, type, default)`` become the signature's inference parameters, which MLflow
    passes to ``predict`` only when declared (``{"inputs": ..., "params": {"brain": true}}``).
    """
    import mlflow.pyfunc
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(input_dtype), (-1, -1, -1))]) if input_dtype else None,
        outputs=Schema([ColSpec(kind, name) for name, kind in output_columns.items()]),
        params=ParamSchema([ParamSpec(name, kind, default) for name, kind, default in params])
        if params
        else None,
    )
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=_pyfunc_class()(load_bundle),
        artifacts={k: str(v) for k, v in artifacts.items()},
        signature=signature,
        input_example=example,
        pip_requirements=pip_requirements,
    )
    return info.model_uri


@dataclass
class ResolvedModel:
    """A ``models:/`` reference pinned to a version, and where that version's files are."""

    name: str
    version: str
    alias: str | None
    tags: dict[str, str]
    location: str


def resolve_registered(
    name: str,
    version: str | None,
    alias: str | None,
    tracking_uri: str | None,
    registry_uri: str | None,
) -> ResolvedModel:
    """Pin an alias to the version it names *now*; :class:`ModelNotFound` if there is none.

    The store is named explicitly, so a read-only caller (predict, serve) need not
    repoint MLflow's process-wide URIs.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from alzstage.errors import ModelNotFound

    store = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)
    try:
        mv = (
            store.get_model_version_by_alias(name, alias)
            if alias
            else store.get_model_version(name, str(version))
        )
        location = store.get_model_version_download_uri(name, mv.version)
    except MlflowException as exc:
        raise ModelNotFound(exc.message.splitlines()[0]) from None
    return ResolvedModel(name, str(mv.version), alias, dict(mv.tags), location)


def load_pyfunc(location: str) -> Any:
    """The pyfunc at ``location`` and the alzstage object inside it: ``(pyfunc, python_model)``.

    :class:`ModelNotFound` (first line of MLflow's reason) when it cannot be loaded.
    """
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    from alzstage.errors import ModelNotFound

    try:
        loaded = mlflow.pyfunc.load_model(location)
    except (MlflowException, OSError) as exc:
        raise ModelNotFound(getattr(exc, "message", str(exc)).splitlines()[0]) from None
    return loaded, loaded.unwrap_python_model()


# ------------------------------------------------------------------ demo and test stores
@contextlib.contextmanager
def scoped_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking and registry URIs at ``uri``, then put them back.

    ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` into the environment;
    left behind, it would silently redirect every later caller (and test) in the process.
    MLflow has no public way to read back "unset", hence its private module variables.
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


def register_standalone(
    store_uri: str,
    artifact_root: Path,
    experiment: str,
    log_model: Any,
    registered: str,
    tags: dict[str, str],
    alias: str,
) -> str:
    """In a store of its own: one run that calls ``log_model()`` (returning a model URI),
    the model registered as ``registered`` with ``tags`` and ``alias``; returns the version.

    For the demo champion, which must be a real registry entry without a pipeline run.
    """
    import mlflow

    with scoped_tracking_uri(store_uri):
        store = mlflow.MlflowClient(tracking_uri=store_uri, registry_uri=store_uri)
        exp_id = store.create_experiment(experiment, artifact_location=artifact_root.as_uri())
        with mlflow.start_run(experiment_id=exp_id, run_name=f"{experiment}-train"):
            model_uri = log_model()
        mv = mlflow.register_model(model_uri, registered, tags=tags)
        store.set_registered_model_alias(registered, alias, mv.version)
    return str(mv.version)
