"""Checks a stage passes before its expensive work starts: outputs writable, inputs complete.

Why: a read-only ``models/`` was found only after a full training run (a
``PermissionError`` traceback at the first write), and ``evaluate`` after a killed or
still-running ``train`` died in Keras with a ``ValueError``. Both are knowable in
milliseconds at the start, so each stage is checked first, and refused in one line that
names the path and the stage to run (or wait for).

What a stage writes and who writes what it reads come from the stage registry's outs,
metrics and plots, which ``tests/test_stages.py`` holds ``dvc.yaml`` and ``cv/dvc.yaml``
to: the files DVC itself holds a stage to.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from alzstage.errors import AlzstageError

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.stages import Stage
    from alzstage.tracking import LastRun


def declared_outputs() -> dict[str, list[str]]:
    """Every stage: name -> its outs, metrics and plots, from the stage registry
    (:data:`alzstage.stages.STAGES`, which ``tests/test_stages.py`` holds ``dvc.yaml`` and
    ``cv/dvc.yaml`` to). A ``foreach`` stage's paths keep ``${item}``."""
    from alzstage.stages import STAGES

    return {s.name: [*s.outs, *s.metrics, *s.plots] for s in STAGES}


def stage_outputs(stage: str, fold: int | None = None) -> list[str]:
    """What ``stage`` writes (for ``cv_fold``, ``fold``'s folder), as repository paths."""
    paths = declared_outputs().get(stage, [])
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
    outputs = declared_outputs()
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
