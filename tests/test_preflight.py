"""Stages fail early and clean: unwritable outputs and incomplete inputs are refused in one
line before the work starts, naming the path and the stage to run (or wait for).

Real processes throughout: the CLI as a person runs it, a ``train`` killed with SIGKILL or
still running in another process, a read-only folder seen by an unprivileged user.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from store_helpers import (
    cli_env,
    log_train_run,
    make_project,
    one_line_error,
    project_store,
    run_cli,
)

from alzstage import preflight, tracking
from alzstage.errors import AlzstageError
from alzstage.stages import BY_NAME

EVALUATE_READS = BY_NAME["evaluate"].reads


def _touch_all(root: Path, reads: tuple[str, ...]) -> None:
    """Stand-ins for every input (the check looks at presence and producers only)."""
    for read in reads:
        path = root / read
        path.parent.mkdir(parents=True, exist_ok=True)
        if Path(read).suffix:
            path.write_text("{}")
        else:
            path.mkdir(exist_ok=True)


def _runs_of(root: Path, stage: str) -> list:
    from mlflow import MlflowClient

    store = MlflowClient(tracking.tracking_uri(root))
    exp = store.get_experiment_by_name(tracking.EXPERIMENT)
    if exp is None:
        return []
    return store.search_runs([exp.experiment_id], f"tags.`{tracking.TAG_STAGE}` = '{stage}'")


# A train stage that logs its run, says its id, then is killed or waits to be.
_TRAIN = """
import os, signal, sys, time
from pathlib import Path
from alzstage import tracking
from alzstage.config import Params
with tracking.stage_run("train", Params(), Path(sys.argv[1]), ["train"]) as run:
    print(run.run_id, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(600)
"""


def _train(root: Path, how: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _TRAIN, str(root), how],
        env=cli_env(root),
        stdout=subprocess.PIPE,
        text=True,
    )


def test_evaluate_without_trained_model_names_train_and_starts_no_run(tmp_path):
    # given a project where train never ran
    root = make_project(tmp_path / "p")
    # when evaluate runs
    line = one_line_error(run_cli(root, "evaluate"))
    # then one line names the missing model and the stage that writes it; nothing was logged
    assert line.startswith("error: evaluate: models/model.keras, ")
    assert "they are written by validate, decode, split, train: run `alzstage validate` " in line
    assert _runs_of(root, "evaluate") == []
    # and with the earlier stages' outputs in place, train is the one to run
    _touch_all(root, ("reports/split.json", "reports/validation.json"))
    _touch_all(root, ("data/processed/split.csv", "data/processed/pixels"))
    line = one_line_error(run_cli(root, "evaluate"))
    assert (
        "models/brain_model.json: not found; run `alzstage train` (or `dvc repro train`) first"
        in line
    )


def test_evaluate_after_a_killed_train_names_train_and_fails_its_run(tmp_path):
    # given a train killed with SIGKILL (its run left RUNNING), and inputs on disk
    root = make_project(tmp_path / "p")
    _touch_all(root, EVALUATE_READS)
    proc = _train(root, "kill")
    killed = proc.stdout.readline().strip()
    assert proc.wait(timeout=300) == -9
    # when evaluate starts
    line = one_line_error(run_cli(root, "evaluate"))
    # then it refuses, names train to re-run, and the killed run is FAILED
    assert "models/model.keras, models/train_run.json, models/brain_model.json: written by " in line
    assert f"whose last run did not finish (run {killed}: process " in line
    assert "re-run `alzstage train` (or `dvc repro train`), then evaluate" in line
    assert _runs_of(root, "train")[0].info.status == "FAILED"
    assert _runs_of(root, "evaluate") == []


def test_evaluate_while_train_still_runs_says_to_wait(tmp_path):
    # given a train running now in another process, and older inputs on disk
    root = make_project(tmp_path / "p")
    _touch_all(root, EVALUATE_READS)
    proc = _train(root, "wait")
    try:
        running = proc.stdout.readline().strip()
        # when evaluate starts
        line = one_line_error(run_cli(root, "evaluate"))
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    # then it says train is running (which run, which process) and to wait for it
    assert f"written by train, which is running now (run {running}, process " in line
    assert "wait for it to finish, then run evaluate again" in line


def test_inputs_of_a_finished_producer_pass_and_of_a_terminated_one_do_not(tmp_path):
    # given inputs on disk, written by a train run that finished
    root = make_project(tmp_path / "p")
    _touch_all(root, EVALUATE_READS)
    log_train_run(root)
    # when the inputs are checked; then nothing is refused
    with project_store(root):
        preflight.check_inputs(BY_NAME["evaluate"], root, tracking.last_run)
    # given a later train that was stopped with SIGTERM (its run ends FAILED, terminated)
    proc = _train(root, "wait")
    proc.stdout.readline()
    proc.terminate()
    assert proc.wait(timeout=120) == 143
    # then evaluate's inputs are refused
    with project_store(root), pytest.raises(AlzstageError, match="terminated"):
        preflight.check_inputs(BY_NAME["evaluate"], root, tracking.last_run)


def test_the_outputs_of_a_stage_come_from_the_stage_registry() -> None:
    assert preflight.stage_outputs("train") == [
        "models/model.keras",
        "models/train_run.json",
        "models/brain_model.json",
        "reports/train.json",
        "reports/plots/train_history.csv",
    ]
    assert preflight.stage_outputs("cv_fold", fold=2) == ["reports/cv/folds/fold_2"]
    assert preflight.producer("reports/cv/folds", preflight.declared_outputs()) == "cv_fold"
    assert preflight.producer("data/processed/pixels", preflight.declared_outputs()) == ("decode")


# --------------------------------------------------------------------------- read-only outputs


def _without_root_powers() -> list[str]:
    """A command prefix that makes permission bits bind: as root, drop the capabilities
    that write through them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    import shutil

    if os.getuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be made")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


@pytest.fixture
def train_project(tmp_path) -> Path:
    """A project with train's inputs in place and a models/ folder."""
    root = make_project(tmp_path / "p")
    _touch_all(root, BY_NAME["train"].reads)
    (root / "models").mkdir()
    return root


def test_a_read_only_models_folder_is_refused_before_training(train_project):
    root = train_project
    # given models/ that this process cannot write
    (root / "models").chmod(0o555)
    # when train runs
    proc = subprocess.run(
        [*_without_root_powers(), sys.executable, "-m", "alzstage.cli", "train"],
        cwd=root,
        env=cli_env(root),
        capture_output=True,
        text=True,
        timeout=600,
    )
    (root / "models").chmod(0o755)
    # then one line names the folder and the outputs, before anything ran or was logged
    line = one_line_error(proc)
    assert "error: train: cannot write models/ (for models/model.keras, " in line
    assert "models/train_run.json, models/brain_model.json)" in line
    assert "chmod u+w" in line and "Nothing was run" in line
    assert not (root / "mlflow.db").exists()


def test_writable_outputs_pass_the_check(train_project):
    root = train_project
    # given models/ and everything else writable: the same check, as the same user, passes
    code = (
        "import sys; from pathlib import Path; from alzstage import preflight, tracking;"
        "root = Path(sys.argv[1]);"
        "preflight.check_writable('train', root, preflight.stage_outputs('train'),"
        " tracking.store_file(root))"
    )
    proc = subprocess.run(
        [*_without_root_powers(), sys.executable, "-c", code, str(root)],
        env=cli_env(root),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
