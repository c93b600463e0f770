"""Checks a stage passes before its expensive work starts: outputs writable, inputs complete.

Why: a read-only ``models/`` was found only after a full training run (a
``PermissionError`` traceback at the first write), and ``evaluate`` after a killed or
still-running ``train`` died in Keras with a ``ValueError``. Both are knowable in
milliseconds at the start, so each stage is checked first, and refused in one line that
names the path and the stage to run (or wait for).

What a stage writes and who writes what it reads come from the ``outs`` (and ``metrics``,
``plots``) of ``dvc.yaml`` and ``cv/dvc.yaml`` at run time: the files DVC itself holds a
stage to. A project without them (a test's bare folder) gets no output check.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alzstage.errors import AlzstageError

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.stages import Stage
    from alzstage.tracking import LastRun

DVC_FILES = ("dvc.yaml", "cv/dvc.yaml")
_OUT_KINDS = ("outs", "metrics", "plots")


def _entries(spec: dict[str, Any]) -> list[str]:
    """The paths of a stage's outs, metrics and plots (plain, or ``{path: options}``)."""
    found = []
    for kind in _OUT_KINDS:
        for item in spec.get(kind) or []:
            found.extend(item if isinstance(item, dict) else [item])
    return [str(p) for p in found]


def declared_outputs(root: Path) -> dict[str, list[str]]:
    """Every stage of both dvc files: name -> its outputs as repository paths.

    A ``foreach`` stage's paths keep ``${item}`` (:func:`stage_outputs` fills it in).
    """
    import yaml

    out: dict[str, list[str]] = {}
    for rel in DVC_FILES:
        path = root / rel
        if not path.is_file():
            continue
        stages = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
        for name, spec in stages.items():
            spec = spec.get("do", spec) if isinstance(spec, dict) else {}
            wdir = (path.parent / spec.get("wdir", ".")).resolve()
            out[name] = [
                os.path.relpath(os.path.normpath(wdir / p), root.resolve()) for p in _entries(spec)
            ]
    return out


def stage_outputs(stage: str, root: Path, fold: int | None = None) -> list[str]:
    """What ``stage`` writes (for ``cv_fold``, ``fold``'s folder), as repository paths."""
    paths = declared_outputs(root).get(stage, [])
    return [p.replace("${item}", str(fold)) for p in paths if fold is not None or "${" not in p]


# --------------------------------------------------------------------------- outputs


def _unwritable(path: Path) -> Path | None:
    """The folder that stops ``path`` from being (re)written atomically, or None.

    Outputs are written to a temporary sibling and renamed (:mod:`alzstage.files`), so
    what must be writable is the nearest existing folder above ``path``, and ``path``
    itself when it is a folder a stage writes into.
    """
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        return path
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return parent  # a file where a folder must be
    return None if os.access(parent, os.W_OK | os.X_OK) else parent


def check_writable(stage: str, root: Path, outputs: Iterable[str], store: Path | None) -> None:
    """Refuse (:class:`AlzstageError`, one line) when an output or the store cannot be
    written; ``store`` is the project's ``mlflow.db`` (None: a tracking server)."""
    targets = [root / p for p in outputs]
    if store is not None:
        targets += [store, store.parent / "mlruns"]
    blocked: dict[Path, list[Path]] = {}
    for target in targets:
        folder = _unwritable(target)
        if folder is not None:
            blocked.setdefault(folder, []).append(target)
    if store is not None and store.is_file() and not os.access(store, os.R_OK | os.W_OK):
        blocked.setdefault(store, []).append(store)
    if not blocked:
        return
    where = "; ".join(
        f"{_show(folder, root)} (for {', '.join(_show(t, root) for t in outs)})"
        for folder, outs in blocked.items()
    )
    raise AlzstageError(
        f"cannot write {where}: not writable by this user (uid {os.getuid()}) or on a "
        f"read-only disk; make it writable (chmod u+w, or chown) and run {stage} again. "
        "Nothing was run"
    )


def _show(path: Path, root: Path) -> str:
    try:
        rel = path.relative_to(root)
    except ValueError:
        return str(path)
    return f"{rel}/" if path.is_dir() else str(rel)


# --------------------------------------------------------------------------- inputs


def producer(path: str, outputs: dict[str, list[str]]) -> str | None:
    """The stage whose declared output is ``path``, inside it, or under it."""
    for stage, outs in outputs.items():
        for out in outs:
            out = out.split("${", 1)[0].rstrip("/_") if "${" in out else out
            if path == out or path.startswith(out + "/") or out.startswith(path + "/"):
                return stage
    return None


def _command(name: str) -> str:
    from alzstage.stages import BY_NAME

    return f"alzstage {BY_NAME[name].command}" if name in BY_NAME else "dvc repro"


def _unfinished(name: str, reads: list[str], stage: str, run: LastRun | None) -> str | None:
    """Why ``name``'s outputs cannot be read now (one line), or None when they can."""
    if run is None:
        return None
    what = f"{', '.join(reads)}: written by {name}"
    if run.status == "RUNNING":
        return (
            f"{what}, which is running now (run {run.run_id}, process {run.process}): wait "
            f"for it to finish, then run {stage} again"
        )
    if run.failure:
        return (
            f"{what}, whose last run did not finish (run {run.run_id}: {run.failure}), so they "
            f"may be partial: re-run `{_command(name)}` (or `dvc repro {name}`), then {stage}"
        )
    return None


def check_inputs(stage: Stage, root: Path, last_run: Callable[[str, Path], LastRun | None]) -> None:
    """Refuse (:class:`AlzstageError`, one line naming the stage to re-run) when an
    input is missing, or when the stage that writes it is running now or was killed or
    terminated in its last run.

    ``last_run(stage, root)`` is :func:`alzstage.tracking.last_run`, called after
    :func:`~alzstage.tracking.fail_abandoned_runs`, so RUNNING there means alive.
    """
    outputs = declared_outputs(root)
    producers: dict[str, list[str]] = {}
    for read in stage.reads:
        name = producer(read, outputs)
        if name is not None and name != stage.name:
            producers.setdefault(name, []).append(read)
    for name, reads in producers.items():
        why = _unfinished(name, reads, stage.name, last_run(name, root))
        if why is not None:
            raise AlzstageError(why)
    missing = [r for r in stage.reads if not (root / r).exists()]
    if missing:
        raise AlzstageError(f"{', '.join(missing)}: not found; {_rerun(missing, outputs)}")


def _rerun(missing: list[str], outputs: dict[str, list[str]]) -> str:
    """Which stage to run for ``missing``: the one earliest in the pipeline comes first."""
    from alzstage.stages import STAGES

    order = {s.name: i for i, s in enumerate(STAGES)}
    names = sorted(
        {n for n in (producer(m, outputs) for m in missing) if n}, key=lambda n: order.get(n, 99)
    )
    if not names:
        return "run the stages before it first (`dvc repro`)"
    first = f"run `{_command(names[0])}` (or `dvc repro {names[0]}`) first"
    if len(names) == 1:
        return first
    return f"they are written by {', '.join(names)}: {first}, then the others"
