"""What a benchmark figure depends on: CPU model and flags, cores, load, versions, threads.

Absolute times do not carry from one machine to another (issue 15: the same 2-core size
with AVX-512 and with AVX2 only differ by 7x on one epoch), so every harness that prints
a figure also records this, in its table and its JSON.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

# The vector and matrix extensions that decide float32 / bfloat16 convolution speed.
CPU_FLAGS = (
    "fma",
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
THREAD_ENV = (
    "OMP_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
    "TF_NUM_INTEROP_THREADS",
    "TF_ENABLE_ONEDNN_OPTS",
    "KMP_AFFINITY",
    "KMP_BLOCKTIME",
)


def cpu_description(cpuinfo: str | None = None) -> dict:
    """Model name and which of ``CPU_FLAGS`` the first core reports, from /proc/cpuinfo."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {
        "model": fields.get("model name") or platform.processor() or "unknown",
        "flags": {f: f in flags for f in CPU_FLAGS},
    }


def flags_text(cpu: dict) -> str:
    """``AVX2 AVX-512 (bf16) no AMX``: the part of the flags a reader compares first."""
    f = cpu["flags"]
    avx512 = "AVX-512" + (" (bf16)" if f.get("avx512_bf16") else "") if f.get("avx512f") else ""
    parts = ["AVX2" if f.get("avx2") else "no AVX2", avx512 or "no AVX-512"]
    parts.append("AMX" if f.get("amx_tile") else "no AMX")
    return ", ".join(parts)


def git_commit(repo: Path) -> str:
    """HEAD of ``repo``, with ``+dirty`` when tracked files differ from it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "diff", "--quiet", "HEAD", "--"], capture_output=True
        ).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"batch_size": 64}}`` -> ``{"train.batch_size": 64}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def params_info(repo: Path) -> dict:
    """params.yaml as this run reads it, and every key that differs from the committed one.

    ``dvc exp run -S`` writes its values into the workspace's params.yaml and leaves them
    there, and a ``+dirty`` commit does not say which file is dirty: a figure measured
    after an experiment silently ran with that experiment's settings. Recording the
    difference (``differs_from_committed``, empty when the file is as committed) keeps
    such a figure from passing for the defaults.
    """
    import yaml

    path = Path(repo) / "params.yaml"
    text = path.read_text() if path.exists() else ""
    committed_text = subprocess.run(
        ["git", "-C", str(repo), "show", "HEAD:params.yaml"], capture_output=True, text=True
    )
    info: dict[str, Any] = {
        "file": str(path),
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "values": yaml.safe_load(text) or {},
        "committed": None,
        "differs_from_committed": {},
    }
    if committed_text.returncode != 0:
        return info  # not a git checkout, or params.yaml is not committed: nothing to compare
    info["committed"] = git_commit(repo).removesuffix("+dirty")
    now, then = _flatten(info["values"]), _flatten(yaml.safe_load(committed_text.stdout) or {})
    info["differs_from_committed"] = {
        key: {"committed": then.get(key), "now": now.get(key)}
        for key in sorted(now.keys() | then.keys())
        if now.get(key) != then.get(key)
    }
    return info


def params_text(info: dict | None) -> str:
    """One line for a report: the params are the committed ones, or which keys are not."""
    if info is None:
        return "params: not recorded (a report from before params were recorded)"
    if info["committed"] is None:
        return f"params: {info['file']} (no committed copy to compare with)"
    diff = info["differs_from_committed"]
    if not diff:
        return f"params: params.yaml as committed at {info['committed']}"
    shown = ", ".join(f"{k} {d['committed']!r} -> {d['now']!r}" for k, d in diff.items())
    return (
        f"params: NOT THE COMMITTED DEFAULTS: params.yaml differs from {info['committed']} "
        f"in {len(diff)} key(s): {shown}"
    )


def warn_if_params_differ(info: dict) -> None:
    """Say on stderr, loudly, that a figure was not measured with the committed params."""
    if info["differs_from_committed"]:
        bar = "!" * 88
        print(
            f"{bar}\n{params_text(info)}\nThese figures are not for the committed "
            "defaults. Reset with `git checkout -- params.yaml`, or run experiments with "
            f"`dvc exp run --temp` so they leave params.yaml alone.\n{bar}",
            file=sys.stderr,
        )


def machine_info(repo: Path) -> dict:
    """Everything outside the code that a time or a GFLOP/s figure depends on.

    Includes the params it ran with (:func:`params_info`), and warns on stderr when they
    are not the committed ones.
    """
    params = params_info(repo)
    warn_if_params_differ(params)
    return {
        "cpu": cpu_description(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        "thread_env": {k: os.environ.get(k) for k in THREAD_ENV},
        "commit": git_commit(repo),
        "params": params,
    }


def framework_info() -> dict:
    """TensorFlow / Keras versions and the thread pools TensorFlow runs with (0 = its choice).

    Call after any thread setting is applied; importing TensorFlow is the caller's cost.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on for x86 builds)"),
    }


def set_threads(intra: int | None, inter: int | None) -> None:
    """TensorFlow's thread pools; must run before TensorFlow executes its first op."""
    if not intra and not inter:
        return
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(intra or 0)
    tf.config.threading.set_inter_op_parallelism_threads(inter or 0)
