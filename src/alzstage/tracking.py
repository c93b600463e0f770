"""Every MLflow call the pipeline makes: store location, stage runs, registry and aliases.

Keeping them here means the stage modules never import MLflow (fast CLI start, testable
logic) and there is one place that decides how runs are tagged and how ``models:/``
URIs are built.

Why one module of about 650 lines: it is the whole MLflow boundary by design (issue 17:
nothing else imports mlflow), so runs, tags, registry, aliases, model URIs and pyfunc
loading all sit here; cutting it would put MLflow imports in two places again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alzstage.config import Params, tracking_home
from alzstage.errors import AlzstageError, InputError

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

EXPERIMENT = "alzstage"
TAG_STAGE = "alzstage.stage"
TAG_PIPELINE = "alzstage.pipeline_id"
TAG_PROCESS = "alzstage.process"  # host:pid:start time, to find runs a SIGKILL abandoned
TAG_GIT = "mlflow.source.git.commit"
ALIAS_CHAMPION = "champion"
ALIAS_CHALLENGER = "challenger"
EXP_TAGS = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.exp_baseline_rev"}


# ------------------------------------------------------------------ store location


# URIs this process set itself. ``mlflow.set_tracking_uri`` exports the URI as
# MLFLOW_TRACKING_URI (for subprocesses), so the variable alone cannot tell a user's
# server from our own earlier choice.
_OWN_URIS: set[str] = set()


def _user_tracking_uri() -> str | None:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    return env if env and env not in _OWN_URIS else None


def tracking_uri(root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when the user set it (a server), else the repo's sqlite store."""
    return _user_tracking_uri() or f"sqlite:///{tracking_home(root) / 'mlflow.db'}"


def artifact_root(root: Path) -> str | None:
    """Absolute ``mlruns/`` beside the sqlite store; a server decides its own."""
    if _user_tracking_uri():
        return None
    return (tracking_home(root) / "mlruns").as_uri()


def configure(root: Path) -> str:
    """Point MLflow at the project's store and make sure the experiment exists.

    The registry follows the tracking URI unless MLFLOW_REGISTRY_URI is set, which MLflow
    reads by itself.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    import mlflow

    uri = tracking_uri(root)
    if not _user_tracking_uri():
        _OWN_URIS.add(uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        mlflow.create_experiment(EXPERIMENT, artifact_location=artifact_root(root))
    mlflow.set_experiment(EXPERIMENT)
    return uri


# ------------------------------------------------------------------ run tags


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pipeline_id() -> str:
    """One id shared by every stage that a single ``dvc repro`` (or ``dvc exp run``) runs.

    Stages are separate processes, so the id comes from the enclosing DVC process: its pid
    and start time identify one invocation. ``ALZSTAGE_PIPELINE_ID`` overrides it, and a
    stage run by hand gets a fresh id.
    """
    env = os.environ.get("ALZSTAGE_PIPELINE_ID")
    if env:
        return env
    try:
        import psutil

        proc = psutil.Process().parent()
        while proc is not None:
            args = proc.cmdline()
            if any(Path(a).name == "dvc" for a in args[:3]) or args[1:3] == ["-m", "dvc"]:
                seed = f"{proc.pid}-{proc.create_time()}"
                return "dvc-" + hashlib.sha1(seed.encode()).hexdigest()[:12]
            proc = proc.parent()
    except Exception:
        pass
    return "adhoc-" + uuid.uuid4().hex[:12]


def dvc_dep_hashes(root: Path, stage: str) -> dict[str, str]:
    """Content hashes of the stage's DVC dependencies, as listed in dvc.yaml.

    DVC writes dvc.lock only after a stage succeeds, so the run hashes its inputs itself.
    """
    import yaml

    from alzstage.files import md5_tree

    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.exists():
        return {}
    spec = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}).get(stage, {})
    out = {}
    for dep in spec.get("deps", []):
        p = root / dep
        if p.exists():
            out[f"dvc.dep.{dep}"] = md5_tree(p)
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ------------------------------------------------------------------ stage runs


@dataclass
class StageRun:
    """The active run of one stage, handed to stage code that must log as it goes."""

    run_id: str
    stage: str

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import mlflow

        clean = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        if clean:
            mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path or path.name)
        elif path.exists():
            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        import mlflow

        mlflow.set_tags(tags)


def _is_number(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def tf_task() -> str | None:
    """``worker:1`` for this process's ``TF_CONFIG`` task, or None outside a cluster.

    Every worker of a multi-worker run logs its own MLflow run; this tag tells them apart
    (worker 0, the chief, is the one whose outputs count).
    """
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        task = json.loads(raw).get("task", {})
    except (ValueError, AttributeError):
        return None
    return f"{task.get('type', 'worker')}:{task.get('index', 0)}"


@contextlib.contextmanager
def stage_run(stage: str, params: Params, root: Path, sections: list[str]) -> Iterator[StageRun]:
    """Open one MLflow run for a stage, tagged so runs of one pipeline can be found together.

    Runs are never left RUNNING: SIGTERM ends this one as FAILED, and a run of the same
    stage that a SIGKILL left RUNNING is marked FAILED here (:func:`fail_abandoned_runs`).
    """
    configure(root)
    import mlflow

    fail_abandoned_runs(stage)
    tags = {
        TAG_STAGE: stage,
        TAG_PIPELINE: pipeline_id(),
        TAG_PROCESS: process_id(),
        TAG_GIT: git_commit(root),
        "alzstage.root": str(root),
        **dvc_dep_hashes(root, stage),
    }
    # `dvc exp run` (queued or not) hands each stage DVC_EXP_NAME and DVC_EXP_BASELINE_REV
    # (dvc/repo/experiments/queue/base.py): the same names `dvc exp show` prints, so an
    # experiment row there and its runs in MLflow can be matched by tag.
    task = tf_task()
    if task is not None:
        tags["alzstage.tf_task"] = task
    for env_key, tag in EXP_TAGS.items():
        if os.environ.get(env_key):
            tags[tag] = os.environ[env_key]
    # Sections as dvc.yaml lists them: ``train`` or one key of it, ``model.input_size``.
    logged = {
        k: v
        for k, v in flatten(params.model_dump(by_alias=True, mode="json")).items()
        if any(k == s or k.startswith(f"{s}.") for s in sections)
    }
    with mlflow.start_run(run_name=stage, tags=tags) as run, _sigterm_unwinds():
        # MLflow caps param values at 6000 chars; ours are short scalars and lists.
        mlflow.log_params({k: str(v)[:500] for k, v in logged.items()})
        yield StageRun(run_id=run.info.run_id, stage=stage)


# ------------------------------------------------------------------ kill hygiene


def process_id() -> str:
    """``host:pid:start time`` of this process: enough to tell later whether it still runs."""
    import socket

    import psutil

    return f"{socket.gethostname()}:{os.getpid()}:{psutil.Process().create_time():.2f}"


def process_gone(ident: str) -> bool:
    """True when the process named by :func:`process_id` has ended (this host only).

    A process on another host, or a tag that cannot be parsed, counts as alive: a run
    is never failed on a guess. A reused pid is told apart by its start time.
    """
    import socket

    import psutil

    try:
        host, pid, started = ident.rsplit(":", 2)
        if host != socket.gethostname():
            return False
        return abs(psutil.Process(int(pid)).create_time() - float(started)) > 0.05
    except psutil.NoSuchProcess:
        return True
    except (ValueError, psutil.Error):
        return False


def fail_abandoned_runs(stage: str) -> list[str]:
    """Mark FAILED the RUNNING runs of ``stage`` whose process is gone; return their ids.

    A SIGKILL (the OOM killer, ``kill -9``, a lost container) ends a stage without its
    ``finally``, so MLflow would show it RUNNING forever. Runs from before the process
    tag existed are left as they are.
    """
    import mlflow

    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    runs = client().search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{TAG_STAGE}` = '{stage}' and attributes.status = 'RUNNING'",
    )
    failed = []
    for r in runs:
        ident = r.data.tags.get(TAG_PROCESS)
        if ident and process_gone(ident):
            client().set_tag(r.info.run_id, "alzstage.failure", f"process {ident} ended (killed)")
            client().set_terminated(r.info.run_id, status="FAILED")
            failed.append(r.info.run_id)
    return failed


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into SystemExit(143) so the run's ``with`` ends it as FAILED.

    Only in the main thread (where Python runs signal handlers) and only when nobody
    else handles SIGTERM; the previous handler is restored afterwards.
    """
    import signal
    import threading

    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ------------------------------------------------------------------ registry


def client() -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient()


def alias_uri(name: str, alias: str) -> str:
    return f"models:/{name}@{alias}"


# One registered model per dataset, ``<promote.model_name>-<dataset>``, rather than one
# name with per-dataset aliases: MLflow scopes aliases and version numbers to a registered
# model, so champion/challenger keep their plain names, ``models:/alzstage-demo@champion``
# is a URI every MLflow tool loads, the UI lists each dataset's history on its own, and
# promote can only ever compare a challenger with a champion of the same data.
def registered_name(model_name: str, dataset: str) -> str:
    return f"{model_name}-{dataset}"


def champion_uri(model_name: str, dataset: str) -> str:
    return alias_uri(registered_name(model_name, dataset), ALIAS_CHAMPION)


def dataset_champions(
    model_name: str, tracking_uri: str | None = None, registry_uri: str | None = None
) -> list[str]:
    """The datasets of ``model_name`` that have a champion, sorted.

    For messages that name the alternatives when the configured dataset has none; the
    store is named explicitly so a read-only caller need not repoint MLflow.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    prefix = f"{model_name}-"
    store = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)
    try:
        models = store.search_registered_models(filter_string=f"name LIKE '{prefix}%'")
    except MlflowException:
        return []
    return sorted(
        m.name[len(prefix) :]
        for m in models
        if m.name.startswith(prefix) and ALIAS_CHAMPION in (m.aliases or {})
    )


def version_uri(name: str, version: int | str) -> str:
    return f"models:/{name}/{version}"


def get_alias_version(name: str, alias: str) -> Any | None:
    """The model version behind an alias, or None when the model or alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def register(model_uri: str, name: str, tags: dict[str, str]) -> Any:
    import mlflow

    mv = mlflow.register_model(model_uri, name, tags=tags)
    return mv


def set_alias(name: str, alias: str, version: int | str) -> None:
    """Point ``alias`` at a version; a bad alias or a missing version is a one-line error."""
    from mlflow.exceptions import MlflowException

    try:
        client().set_registered_model_alias(name, alias, str(version))
    except MlflowException as exc:
        why = exc.message.splitlines()[0] if exc.message else str(exc.error_code)
        if exc.error_code == "INVALID_PARAMETER_VALUE":
            raise InputError(
                f"--alias {alias!r}: {why} Use letters, digits, '_' or '-' (e.g. champion); "
                "'latest' and v<number> are reserved"
            ) from None
        versions = _registered_versions(name)
        if not versions:
            raise AlzstageError(
                f"no model {name!r} is registered yet, so there is no version {version}; "
                "run `dvc repro` first (its promote stage registers each trained model)"
            ) from None
        if int(version) not in versions:
            raise AlzstageError(
                f"{name} has no version {version}; registered versions are "
                f"{', '.join(map(str, versions))}: pass one of those to --version"
            ) from None
        raise AlzstageError(f"{name} v{version}: cannot set alias @{alias}: {why}") from None


def _registered_versions(name: str) -> list[int]:
    from mlflow.exceptions import MlflowException

    try:
        return sorted(int(v.version) for v in client().search_model_versions(f"name = '{name}'"))
    except MlflowException:
        return []


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
    alias: str = ALIAS_CHAMPION,
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


# ------------------------------------------------------------------ pyfunc


def _pyfunc_class() -> type:
    """The MLflow ``PythonModel`` adapter: MLflow's calls in, a model bundle's methods out.

    What it serves is injected (``load_bundle``: artifact paths -> an object with
    ``predict_frame``), so this module imports no model code; cloudpickle stores that
    loader by reference (:meth:`alzstage.inference.pyfunc.ClassifierBundle.from_artifacts`).
    Subclassing needs MLflow imported, which this module otherwise defers (a fast CLI),
    so the class is made on first use and reached as ``tracking.AlzstageModel`` through
    the module ``__getattr__`` below; its ``__module__``/``__qualname__`` make that its
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

    AlzstageModel.__module__ = __name__
    AlzstageModel.__qualname__ = "AlzstageModel"
    _PYFUNC_CLASS = AlzstageModel
    return AlzstageModel


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


def __getattr__(name: str) -> Any:
    if name == "AlzstageModel":
        return _pyfunc_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
