"""Tracking store location, run tagging, and registry calls against a real MLflow server."""

from __future__ import annotations

import pytest
from conftest import mlflow_server

from alzstage import tracking
from alzstage.config import Params, tracking_home


def test_tracking_home_escapes_dvc_experiment_copies(tmp_path):
    repo = tmp_path / "repo"
    assert tracking_home(repo) == repo.resolve()
    exp_copy = repo / ".dvc" / "tmp" / "exps" / "tmpabc123"
    assert tracking_home(exp_copy) == repo.resolve()


def test_tracking_uri_is_absolute_sqlite_unless_overridden(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.tracking_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking.artifact_root(tmp_path) == (tmp_path.resolve() / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5000"
    assert tracking.artifact_root(tmp_path) is None


def test_pipeline_id_env_override(monkeypatch):
    monkeypatch.setenv("ALZSTAGE_PIPELINE_ID", "fixed-id")
    assert tracking.pipeline_id() == "fixed-id"
    monkeypatch.delenv("ALZSTAGE_PIPELINE_ID")
    assert tracking.pipeline_id().startswith("adhoc-")


@pytest.fixture
def mlflow_server_url(tmp_path):
    """A real ``mlflow server`` process on 127.0.0.1 with a sqlite store."""
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path) as url:
        yield url


@pytest.mark.integration
def test_stage_run_and_registry_over_http(mlflow_server_url, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server_url)
    monkeypatch.setenv("ALZSTAGE_PIPELINE_ID", "server-test")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    params = Params()

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    with tracking.stage_run("train", params, tmp_path, ["train"]) as run:
        run.log_metrics({"val_balanced_accuracy": 0.5}, step=1)
        info = mlflow.pyfunc.log_model(name="model", python_model=Echo())
    assert mlflow.get_tracking_uri() == mlflow_server_url
    v1 = tracking.register(info.model_uri, "alzstage-test", {"balanced_accuracy": "0.5"})
    tracking.set_alias("alzstage-test", tracking.ALIAS_CHAMPION, v1.version)
    v2 = tracking.register(info.model_uri, "alzstage-test", {"balanced_accuracy": "0.6"})
    tracking.set_alias("alzstage-test", tracking.ALIAS_CHALLENGER, v2.version)

    champ = tracking.get_alias_version("alzstage-test", "champion")
    chall = tracking.get_alias_version("alzstage-test", "challenger")
    assert (champ.version, chall.version) == ("1", "2")
    assert tracking.get_alias_version("alzstage-test", "missing") is None
    got = mlflow.get_run(run.run_id)
    assert got.data.tags["alzstage.pipeline_id"] == "server-test"
    assert got.data.tags["alzstage.stage"] == "train"
    assert got.data.params["train.epochs"] == str(params.train.epochs)
    loaded = mlflow.pyfunc.load_model(tracking.alias_uri("alzstage-test", "champion"))
    assert loaded is not None


# --------------------------------------------------------------------------- kill hygiene

_STAGE_THEN_SIGNAL = """
import os, signal, sys
from pathlib import Path
from alzstage import tracking
from alzstage.config import Params
root, stage = Path(sys.argv[1]), sys.argv[3]
with tracking.stage_run(stage, Params(), root, [stage]) as run:
    print(run.run_id, flush=True)
    os.kill(os.getpid(), getattr(signal, sys.argv[2]))
    signal.pause()  # SIGKILL never returns here; SIGTERM unwinds the with-block
"""


def _stage_killed_by(signal_name: str, root, stage: str = "validate") -> tuple[str, int]:
    """Run one stage in a child process that sends itself ``signal_name``; (run id, exit)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [sys.executable, "-c", _STAGE_THEN_SIGNAL, str(root), signal_name, stage],
        capture_output=True,
        text=True,
        env={**env, "ALZSTAGE_PIPELINE_ID": "killed"},
        timeout=300,
    )
    return proc.stdout.split()[0], proc.returncode


def _status(root, run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient(tracking.tracking_uri(root)).get_run(run_id).info.status


def test_run_killed_by_sigkill_is_marked_failed_when_the_stage_starts_again(tmp_path, monkeypatch):
    # given a validate run whose process was SIGKILLed, so MLflow still says RUNNING
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    killed, code = _stage_killed_by("SIGKILL", tmp_path)
    assert code == -9 and _status(tmp_path, killed) == "RUNNING"
    # when validate starts again
    with tracking.stage_run("validate", Params(), tmp_path, ["validate"]) as run:
        pass
    # then the abandoned run is FAILED, with the reason; the new run finished normally
    assert _status(tmp_path, killed) == "FAILED"
    assert _status(tmp_path, run.run_id) == "FINISHED"
    from mlflow import MlflowClient

    tags = MlflowClient(tracking.tracking_uri(tmp_path)).get_run(killed).data.tags
    assert "ended (killed)" in tags["alzstage.failure"]


def test_any_stage_start_fails_the_abandoned_runs_of_every_stage(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    # given a train run whose process was SIGKILLed (still RUNNING in MLflow)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    killed, code = _stage_killed_by("SIGKILL", tmp_path, stage="train")
    assert code == -9 and _status(tmp_path, killed) == "RUNNING"
    # when another stage (evaluate) starts
    with tracking.stage_run("evaluate", Params(), tmp_path, ["evaluate"]):
        pass
    # then the train run is FAILED, said why, and is what last_run reports for train
    assert _status(tmp_path, killed) == "FAILED"
    tags = MlflowClient(tracking.tracking_uri(tmp_path)).get_run(killed).data.tags
    assert "ended (killed)" in tags["alzstage.failure"]
    last = tracking.last_run("train", tmp_path)
    assert (last.run_id, last.status) == (killed, "FAILED") and "killed" in last.failure


def test_a_run_whose_process_still_lives_is_not_failed():
    assert tracking.process_gone(tracking.process_id()) is False
    assert tracking.process_gone("another-host:1:0.00") is False  # cannot check: leave it
    assert tracking.process_gone("garbage") is False


def test_sigterm_marks_the_own_run_failed(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    run_id, code = _stage_killed_by("SIGTERM", tmp_path)
    assert code == 143
    assert _status(tmp_path, run_id) == "FAILED"
    tags = MlflowClient(tracking.tracking_uri(tmp_path)).get_run(run_id).data.tags
    assert "terminated" in tags["alzstage.failure"]  # a later stage knows it ended early


# --------------------------------------------------------------------------- aliases


def test_alias_on_a_missing_version_names_the_versions_that_exist(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from alzstage.errors import AlzstageError, InputError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.configure(tmp_path)
    with pytest.raises(AlzstageError, match=r"no model 'm' is registered yet.*no version 999"):
        tracking.set_alias("m", "champion", 999)
    store = MlflowClient()
    store.create_registered_model("m")
    store.create_model_version("m", source=(tmp_path / "model").as_uri())
    with pytest.raises(AlzstageError, match=r"^m has no version 999; registered versions are 1: "):
        tracking.set_alias("m", "champion", 999)
    with pytest.raises(InputError, match=r"^--alias '': .*cannot be empty.*e\.g\. champion"):
        tracking.set_alias("m", "", 1)
    tracking.set_alias("m", "champion", 1)
    assert str(store.get_model_version_by_alias("m", "champion").version) == "1"


# --------------------------------------------------------------------------- model addresses


def test_model_addresses_are_spelled_and_read_back_by_tracking():
    name = tracking.registered_name("alzstage", "demo")
    assert tracking.champion_uri("alzstage", "demo") == "models:/alzstage-demo@champion"
    assert tracking.model_ref_uri(None, name) == "models:/alzstage-demo@champion"
    assert tracking.model_ref_uri("3", name) == tracking.version_uri(name, 3)
    assert tracking.model_ref_uri("@challenger", name) == "models:/alzstage-demo@challenger"
    assert tracking.model_ref_uri("challenger", name) == "models:/alzstage-demo@challenger"
    assert tracking.parse_model_uri(tracking.version_uri(name, 7)) == (name, "7", None)
    assert tracking.parse_model_uri(tracking.alias_uri(name, "x")) == (name, None, "x")
    assert tracking.parse_model_uri("runs:/abc/model") is None
    assert tracking.is_model_uri("runs:/abc/model") and not tracking.is_model_uri("champion")


def _spelled_addresses(path) -> list[str]:
    """String literals (f-strings with ``{}`` for their holes) in ``path`` that spell a
    ``models:/`` address; docstrings and help text that only mention the scheme do not."""
    import ast
    import re

    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) in docstrings:
                continue
            text = node.value
        else:
            continue
        if re.search(r"models:/[^\s]", text):
            found.append(f"{path.name}:{node.lineno}: {text!r}")
    return found


def test_only_tracking_spells_a_model_address():
    from alzstage.stages import SRC

    # given every module of the package; then only tracking.py writes models:/ addresses
    spelled = {p.name for p in SRC.rglob("*.py") if _spelled_addresses(p)}
    assert spelled == {"tracking.py"}, [a for p in SRC.rglob("*.py") for a in _spelled_addresses(p)]
