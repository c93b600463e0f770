"""Projects, CLI runs and logged models for the tracking-store, promote and preflight tests.

Everything real: a project folder with the repository's own dvc.yaml files, the CLI in a
fresh process, a pyfunc logged into the project's sqlite MLflow store.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def make_project(root: Path) -> Path:
    """``root`` as a project: default params.yaml and the repository's dvc.yaml files."""
    from alzstage.config import Params

    root.mkdir(parents=True, exist_ok=True)
    raw = Params().model_dump(by_alias=True, mode="json")
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "cv").mkdir(exist_ok=True)
    shutil.copy(REPO / "cv" / "dvc.yaml", root / "cv" / "dvc.yaml")
    return root.resolve()


def cli_env(root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_URI")}
    env.pop("MLFLOW_REGISTRY_URI", None)
    return {**env, "ALZSTAGE_ROOT": str(root), **extra}


def start_cli(root: Path, *args: str, **popen: object) -> subprocess.Popen:
    """``alzstage <args>`` started in a fresh process at ``root`` (not waited for)."""
    return subprocess.Popen(
        [sys.executable, "-m", "alzstage.cli", *args],
        cwd=root,
        env=popen.pop("env", None) or cli_env(root),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def run_cli(root: Path, *args: str, **popen: object) -> subprocess.CompletedProcess:
    """``alzstage <args>`` in a fresh process, as a person runs it, waited for."""
    proc = start_cli(root, *args, **popen)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a failed command; no traceback anywhere."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@contextmanager
def project_store(root: Path) -> Iterator[None]:
    """MLflow in this process pointed at ``root``'s store, then put back as it was."""
    from mlflow.tracking import fluent

    from alzstage import tracking

    saved_env = {
        k: os.environ.pop(k, None) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")
    }
    saved_experiment = fluent._active_experiment_id
    try:
        with tracking.scoped_tracking_uri(tracking.tracking_uri(root)):
            # as in a stage process: no URI of the user's, so configure treats it as ours
            os.environ.pop("MLFLOW_TRACKING_URI", None)
            tracking.configure(root)
            yield
    finally:
        fluent._active_experiment_id = saved_experiment
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def log_train_run(root: Path, score: float = 0.5, fingerprint: str = "split-1") -> str:
    """A ``train`` run with a tiny logged pyfunc, its train_run.json and an evaluation
    (metrics.json) scoring ``score``: what promote reads. Returns the train run's id."""
    import mlflow

    from alzstage import tracking
    from alzstage.artifacts import MetricsReport, TrainRun
    from alzstage.config import Params, Paths

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    paths = Paths(root)
    with project_store(root), tracking.stage_run("train", Params(), root, ["train"]) as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=[])
        model_md5 = uuid.uuid4().hex  # stands for the md5 of the model file it wrote
        run.set_tags({tracking.TAG_MODEL_MD5: model_md5, tracking.TAG_MODEL_URI: info.model_uri})
    TrainRun(
        model_md5=model_md5,
        temperature=1.0,
        input_size=(32, 32),
        recipe="scratch",
        backbone="tiny",
        weights="none",
    ).write(paths.train_run)
    MetricsReport(
        balanced_accuracy=score,
        macro_f1=score,
        accuracy=score,
        split_fingerprint=fingerprint,
        split_strategy="subject",
        split_leaky=False,
        dataset="demo",
        data_source="demo",
    ).write(paths.metrics)
    return run.run_id


def versions(root: Path, name: str = "alzstage-demo") -> list[tuple[int, str]]:
    """``(version, train_run_id tag)`` of every registered version of ``name``, sorted."""
    from mlflow import MlflowClient

    from alzstage import tracking

    uri = tracking.tracking_uri(root)
    found = MlflowClient(uri, uri).search_model_versions(f"name = '{name}'")
    return sorted((int(v.version), v.tags.get("train_run_id", "")) for v in found)


def aliases(root: Path, name: str = "alzstage-demo") -> dict[str, int]:
    from mlflow import MlflowClient

    from alzstage import tracking

    uri = tracking.tracking_uri(root)
    model = MlflowClient(uri, uri).get_registered_model(name)
    return {alias: int(v) for alias, v in (model.aliases or {}).items()}
