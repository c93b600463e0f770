"""What a stage run is tagged with: its pipeline, its process, its commit, its inputs.

Why apart from :mod:`alzstage.tracking`: none of it needs MLflow (these are facts about
this process and checkout), and :mod:`alzstage.tracking` re-exports every name, so callers
keep using ``tracking.pipeline_id`` and friends.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any


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
