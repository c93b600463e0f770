"""Every MLflow call the pipeline makes: store location, stage runs, registry, model addresses.

Keeping them here means the stage modules never import MLflow (fast CLI start, testable
logic), and there is one place that decides how runs are tagged and how a model address
(``models:/<name>@<alias>``, ``models:/<name>/<version>``) is spelled and read back:
:func:`alias_uri`, :func:`version_uri`, :func:`champion_uri`, :func:`model_ref_uri` and
:func:`parse_model_uri`. Nothing else writes ``models:/``.

The boundary is this module and three helpers below it that callers never import (this
one re-exports what they offer): :mod:`alzstage.tracking_store` (the sqlite file: refuse
a damaged one, back it up before a schema migration), :mod:`alzstage.tracking_models`
(the pyfunc class, logging, loading) and :mod:`alzstage.tracking_tags` (what a run is
tagged with; no MLflow).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alzstage.config import Params, tracking_home
from alzstage.errors import AlzstageError, InputError
from alzstage.tracking_models import _pyfunc_class
from alzstage.tracking_models import load_pyfunc as load_pyfunc
from alzstage.tracking_models import log_pyfunc_model as log_pyfunc_model
from alzstage.tracking_models import register_standalone as register_standalone
from alzstage.tracking_models import resolve_registered as resolve_registered
from alzstage.tracking_models import scoped_tracking_uri as scoped_tracking_uri
from alzstage.tracking_store import check_sqlite_store, upgrade_with_backup
from alzstage.tracking_store import registry_lock as registry_lock
from alzstage.tracking_tags import (
    dvc_dep_hashes,
    flatten,
    git_commit,
    pipeline_id,
    process_id,
    tf_task,
)
from alzstage.tracking_tags import process_gone as process_gone

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

from alzstage.tracking_models import TAG_MODEL_MD5 as TAG_MODEL_MD5
from alzstage.tracking_models import TAG_MODEL_URI as TAG_MODEL_URI
from alzstage.tracking_models import TrainedModel as TrainedModel
from alzstage.tracking_models import trained_model as trained_model

EXPERIMENT = "alzstage"
TAG_STAGE = "alzstage.stage"
TAG_PIPELINE = "alzstage.pipeline_id"
TAG_PROCESS = "alzstage.process"  # host:pid:start time, to find runs a SIGKILL abandoned
TAG_GIT = "mlflow.source.git.commit"
TAG_ROOT = "alzstage.root"  # the checkout the stage ran in
TAG_FAILURE = "alzstage.failure"  # why a run ended early: killed, terminated
ALIAS_CHAMPION = "champion"
ALIAS_CHALLENGER = "challenger"
EXP_TAGS = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.exp_baseline_rev"}


# ------------------------------------------------------------------ store location


# URIs this process set itself. ``mlflow.set_tracking_uri`` exports the URI as
# MLFLOW_TRACKING_URI (for subprocesses), so the variable alone cannot tell a user's
# server from our own earlier choice.
_OWN_URIS: set[str] = set()


def _user_tracking_uri(root: Path | None = None) -> str | None:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if not env or env in _OWN_URIS:
        return None
    # The project's own store, named in the variable (a test, a subprocess): still ours.
    return None if root is not None and env == f"sqlite:///{store_file(root)}" else env


def is_server_store(root: Path | None = None) -> bool:
    """True when the user pointed MLFLOW_TRACKING_URI elsewhere (no project ``mlflow.db``)."""
    return _user_tracking_uri(root) is not None


def store_file(root: Path) -> Path:
    """The project's own sqlite store, ``mlflow.db`` (used unless MLFLOW_TRACKING_URI is set)."""
    return tracking_home(root) / "mlflow.db"


def tracking_uri(root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when the user set it (a server), else the repo's sqlite store.

    Every reader and writer gets the sqlite URI here, after the file is checked and, if an
    older MLflow wrote it, backed up and upgraded (:mod:`alzstage.tracking_store`): none
    can open a damaged store (MLflow would "repair" an empty one with fresh tables) or
    let MLflow migrate one with no copy kept.
    """
    user = _user_tracking_uri(root)
    if user:
        return user
    db = store_file(root)
    check_sqlite_store(db)
    upgrade_with_backup(db)
    return f"sqlite:///{db}"


def artifact_root(root: Path) -> str | None:
    """Absolute ``mlruns/`` beside the sqlite store; a server decides its own."""
    if _user_tracking_uri(root):
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
    if not _user_tracking_uri(root):
        _OWN_URIS.add(uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        mlflow.create_experiment(EXPERIMENT, artifact_location=artifact_root(root))
    mlflow.set_experiment(EXPERIMENT)
    return uri


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


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Params,
    root: Path,
    sections: list[str],
    before_start: Callable[[], None] | None = None,
) -> Iterator[StageRun]:
    """Open one MLflow run for a stage, tagged so runs of one pipeline can be found together.

    Runs are never left RUNNING: SIGTERM ends this one as FAILED, and the runs of any
    stage that a SIGKILL left RUNNING are marked FAILED here (:func:`fail_abandoned_runs`).
    ``before_start`` (the stage's preflight) runs after that and before the run opens, so
    a stage refused for its inputs leaves no run behind.
    """
    configure(root)
    import mlflow

    fail_abandoned_runs()
    if before_start is not None:
        before_start()
    tags = {
        TAG_STAGE: stage,
        TAG_PIPELINE: pipeline_id(),
        TAG_PROCESS: process_id(),
        TAG_GIT: git_commit(root),
        TAG_ROOT: str(root),
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


def _runs(filter_string: str, max_results: int = 1000, newest_first: bool = False) -> list[Any]:
    """Runs of the alzstage experiment matching ``filter_string`` (none before it exists)."""
    import mlflow

    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    order = ["attributes.start_time DESC"] if newest_first else None
    return client().search_runs(
        [exp.experiment_id], filter_string, max_results=max_results, order_by=order
    )


def fail_abandoned_runs() -> list[str]:
    """Mark FAILED every stage's RUNNING runs whose process is gone; return their ids.

    A SIGKILL (the OOM killer, ``kill -9``, a lost container) ends a stage without its
    ``finally``, so MLflow would show it RUNNING forever. Any stage start sweeps them all
    (an ``evaluate`` after a killed ``train`` too), not only its own stage's. Runs from
    before the process tag existed, and runs of other hosts, are left as they are.
    """
    failed = []
    for r in _runs(f"tags.`{TAG_STAGE}` != '' and attributes.status = 'RUNNING'"):
        ident = r.data.tags.get(TAG_PROCESS)
        if ident and process_gone(ident):
            client().set_tag(r.info.run_id, TAG_FAILURE, f"process {ident} ended (killed)")
            client().set_terminated(r.info.run_id, status="FAILED")
            failed.append(r.info.run_id)
    return failed


@dataclass(frozen=True)
class LastRun:
    """The newest run of one stage in one checkout: whether its outputs can be trusted."""

    stage: str
    run_id: str
    status: str  # RUNNING (its process lives: sweeps fail the others), FINISHED, FAILED
    failure: str | None  # why it ended early (killed, terminated), from TAG_FAILURE
    process: str


def last_run(stage: str, root: Path) -> LastRun | None:
    """The newest run of ``stage`` logged from the checkout at ``root``, or None (also
    for a path with a quote, which MLflow's filter language cannot hold)."""
    if "'" in str(root):
        return None
    found = _runs(
        f"tags.`{TAG_STAGE}` = '{stage}' and tags.`{TAG_ROOT}` = '{root}'",
        max_results=1,
        newest_first=True,
    )
    if not found:
        return None
    r = found[0]
    tags = r.data.tags
    return LastRun(
        stage, r.info.run_id, r.info.status, tags.get(TAG_FAILURE), tags.get(TAG_PROCESS, "")
    )


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
        import mlflow

        run = mlflow.active_run()
        if run is not None:  # said on the run, so a later stage knows its outputs are partial
            client().set_tag(run.info.run_id, TAG_FAILURE, f"process {process_id()} terminated")
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ------------------------------------------------------------------ model addresses

# Every ``models:/`` string alzstage writes or reads is spelled by the functions below.
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def alias_uri(name: str, alias: str) -> str:
    """``models:/<name>@<alias>``: whatever version the alias names when it is loaded."""
    return f"models:/{name}@{alias}"


def version_uri(name: str, version: int | str) -> str:
    """``models:/<name>/<version>``: one fixed version."""
    return f"models:/{name}/{version}"


# One registered model per dataset, ``<promote.model_name>-<dataset>``, rather than one
# name with per-dataset aliases: MLflow scopes aliases and version numbers to a registered
# model, so champion/challenger keep their plain names, ``models:/alzstage-demo@champion``
# is a URI every MLflow tool loads, the UI lists each dataset's history on its own, and
# promote can only ever compare a challenger with a champion of the same data.
def registered_name(model_name: str, dataset: str) -> str:
    return f"{model_name}-{dataset}"


def champion_uri(model_name: str, dataset: str) -> str:
    return alias_uri(registered_name(model_name, dataset), ALIAS_CHAMPION)


def model_ref_uri(ref: str | None, name: str) -> str:
    """The address of ``name`` that ``--model`` means: nothing (the champion), a version
    number, ``@alias`` or a bare alias."""
    if not ref:
        return alias_uri(name, ALIAS_CHAMPION)
    if ref.isdigit():
        return version_uri(name, ref)
    return alias_uri(name, ref.removeprefix("@"))


def is_model_uri(ref: str) -> bool:
    """A URI MLflow loads by itself (``models:/``, ``runs:/``, any ``scheme://``)."""
    return "://" in ref or ref.startswith(("models:/", "runs:/"))


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None] | None:
    """``(name, version, alias)`` of ``models:/name@alias`` / ``models:/name/3``, else None."""
    m = _MODEL_URI.match(uri)
    if not m:
        return None
    return m["name"], m["version"], m["alias"]


# ------------------------------------------------------------------ registry


def client() -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient()


def dataset_champions(
    model_name: str, tracking_uri: str | None = None, registry_uri: str | None = None
) -> list[str]:
    """The datasets of ``model_name`` that have a champion, sorted.

    For messages that name the alternatives when the configured dataset has none; the
    store is named explicitly so a read-only caller need not repoint MLflow.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    prefix = registered_name(model_name, "")
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


def register_once(model_uri: str, name: str, tags: dict[str, str], key: str) -> tuple[Any, bool]:
    """``(version, registered now)``: the version of ``name`` whose tag ``key`` equals
    ``tags[key]``, registered only when there is none.

    Why: promote re-run for the same training run (by hand, or a retried ``dvc repro``)
    must not add a second version of one model. The found version's tags are brought up to
    date (a re-evaluation may change its metrics). Call it inside :func:`registry_lock`,
    which makes the look-up and the registration one step for this machine's processes.
    """
    same = [
        v
        for v in client().search_model_versions(f"name = '{name}'")
        if v.tags.get(key) == tags[key]
    ]
    if not same:
        return register(model_uri, name, tags), True
    mv = min(same, key=lambda v: int(v.version))
    for k, v in tags.items():
        if mv.tags.get(k) != v:
            client().set_model_version_tag(name, mv.version, k, v)
    return client().get_model_version(name, mv.version), False


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


def __getattr__(name: str) -> Any:
    # The pyfunc class is made on first use (it subclasses an MLflow class); models logged
    # by every alzstage version name it ``alzstage.tracking.AlzstageModel``.
    if name == "AlzstageModel":
        return _pyfunc_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
