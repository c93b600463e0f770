"""Every benchmark records the params it ran with and says when they are not the defaults.

``dvc exp run -S`` leaves its values in the workspace's params.yaml; a figure measured
afterwards must not pass for one of the committed defaults. Real git repos, no mocks.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _machine import machine_info, params_info, params_text

PARAMS = {"base": {"seed": 42, "classes": ["a", "b"]}, "train": {"batch_size": 64, "lr": 0.001}}


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def _committed_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "project"
    repo.mkdir()
    (repo / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    _git(repo, "init", "-q")
    _git(repo, "add", "params.yaml")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "params")
    return repo


def test_params_as_committed_are_recorded_with_no_difference(tmp_path: Path) -> None:
    # given: a checkout whose params.yaml is the committed one
    repo = _committed_repo(tmp_path)

    # when: a benchmark records its machine and params
    info = params_info(repo)

    # then: the values are recorded, nothing differs, and the report line says so
    assert info["values"] == PARAMS
    assert info["differs_from_committed"] == {}
    assert params_text(info).startswith("params: params.yaml as committed at ")


def test_params_left_by_an_experiment_are_named_key_by_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # given: params.yaml as `dvc exp run -S train.batch_size=32 -S base.seed=1` leaves it
    repo = _committed_repo(tmp_path)
    changed = {**PARAMS, "base": {**PARAMS["base"], "seed": 1}}
    changed["train"] = {**PARAMS["train"], "batch_size": 32}
    (repo / "params.yaml").write_text(yaml.safe_dump(changed))

    # when: a benchmark records its machine (and so its params)
    machine = machine_info(repo)

    # then: the JSON names each changed key with both values, and stderr shouts it
    diff = machine["params"]["differs_from_committed"]
    assert diff == {
        "base.seed": {"committed": 42, "now": 1},
        "train.batch_size": {"committed": 64, "now": 32},
    }
    assert machine["commit"].endswith("+dirty")
    line = params_text(machine["params"])
    assert "NOT THE COMMITTED DEFAULTS" in line and "train.batch_size 64 -> 32" in line
    err = capsys.readouterr().err
    assert "NOT THE COMMITTED DEFAULTS" in err and "git checkout -- params.yaml" in err


def test_params_outside_git_are_recorded_without_a_comparison(tmp_path: Path) -> None:
    # given: a params.yaml that no git repository holds
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))

    # when
    info = params_info(tmp_path)

    # then: recorded, and the report says there was nothing to compare with
    assert info["values"] == PARAMS and info["committed"] is None
    assert "no committed copy" in params_text(info)


def test_a_report_from_before_params_were_recorded_says_so() -> None:
    assert params_text(None).startswith("params: not recorded")
