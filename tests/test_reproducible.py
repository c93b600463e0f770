"""The same bytes twice: a fresh copy of the project reproduces the data stages' outputs.

A DVC user expects ``dvc repro`` of a fresh clone to rewrite nothing that is committed in
``dvc.lock``. Two copies in two directories (different absolute paths), the second with
one BLAS/OpenMP thread and another hash seed, run the data stages; every output must be
byte-identical. A timestamp, an absolute path, a set's or dict's order, a float printed
from a thread-dependent sum would each show up here as a differing file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_pipeline_integration import copy_tiny_project

from alzstage.files import md5_file

BIN = Path(sys.executable).parent
DATA_STAGES = ("download", "validate", "decode", "split", "augment")
pytestmark = pytest.mark.integration


def _repro(project: Path, extra_env: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ALZSTAGE_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra_env)
    proc = subprocess.run(
        ["dvc", "repro", *DATA_STAGES],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def _lock_outs(project: Path) -> dict[str, str]:
    """``dvc.lock``'s md5 of every data-stage output, by path."""
    stages = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for s in DATA_STAGES for o in stages[s]["outs"]}


def _file_hashes(project: Path, outs: list[str]) -> dict[str, str]:
    """md5 of every file inside the outputs ``outs`` (paths relative to ``project``)."""
    hashes = {}
    for out in outs:
        root = project / out
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        hashes.update({p.relative_to(project).as_posix(): md5_file(p) for p in files})
    return hashes


def test_data_stages_write_the_same_bytes_in_two_directories(tmp_path: Path) -> None:
    # given: two fresh copies of the project (tiny demo) at different absolute paths
    first = copy_tiny_project(tmp_path / "a" / "alzstage")
    second = copy_tiny_project(tmp_path / "somewhere" / "else" / "alzstage-copy")

    # when: the data stages run in each, the second with one thread and another hash seed
    _repro(first, {})
    _repro(second, {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONHASHSEED": "7"})

    # then: every file of every output is byte-identical, and dvc.lock agrees
    outs = sorted(_lock_outs(first))
    a, b = _file_hashes(first, outs), _file_hashes(second, outs)
    differing = sorted(f for f in a.keys() | b.keys() if a.get(f) != b.get(f))
    assert differing == [], f"files that differ between the two copies: {differing}"
    assert _lock_outs(first) == _lock_outs(second)
    # and: the outputs the test compared are the data stages' (nothing was skipped)
    assert {"data/raw", "reports/validation", "reports/split.json"} <= set(outs)
    assert len(a) > 20
