"""``data.source: multi``: several sources in one pipeline, each in its own folder of data/raw.

Users combine public sets, and those sets are often repackagings of the same brains at
other sizes and under other names. This module only gathers them: each entry of
``data.sources`` is collected by its own source into ``data/raw/<id>/`` (so manifest
paths start with the entry's id, and two sets may hold files of the same name), given
subject ids are prefixed with the id (two sets may both call a brain ``sub-01``), and the
entries' skip lists are merged into the one ``data/raw/skipped.csv`` validate reads.
Finding the brains the sets share is the split's job (:mod:`alzstage.data.duplicates`,
which also reads each row's source back from its path), because that needs the decoded
pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from alzstage.config import DataParams, Params, Paths
from alzstage.data.manifest import RawRecord
from alzstage.data.sources.layout import SKIPPED_FILE, Skipped, read_skipped, write_skipped

Collect = Callable[[Params, Paths, Path], list[RawRecord]]


class _EntryParams:
    """``params`` with ``data`` replaced by one entry's; every other read goes to ``params``.

    Not ``params.model_copy``: the stage hands its function a scoped view of the params
    (:class:`alzstage.stages.ScopedParams`) whose reads are checked against what the
    stage declares, and that check must keep seeing the sources' reads.
    """

    def __init__(self, params: Params, data: DataParams) -> None:
        self._params = params
        self.data = data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._params, name)


def collect_sources(
    params: Params, paths: Paths, staging: Path, collectors: Mapping[str, Collect]
) -> list[RawRecord]:
    """Collect every ``data.sources`` entry into ``staging/<id>/`` with its own source.

    ``collectors`` maps each source kind onto its collect function (the download stage's
    registry, passed in so that this module does not import the stage).
    """
    records: list[RawRecord] = []
    skipped: list[Skipped] = []
    for sid, data in params.data.entries():
        folder = staging / sid
        folder.mkdir(parents=True, exist_ok=False)
        found = collectors[data.source](_EntryParams(params, data), paths, folder)  # type: ignore[arg-type]
        records += [replace(r, subject=f"{sid}:{r.subject}" if r.subject else "") for r in found]
        skipped += [replace(s, path=f"{sid}/{s.path}") for s in read_skipped(folder / SKIPPED_FILE)]
        (folder / SKIPPED_FILE).unlink(missing_ok=True)
    write_skipped(skipped, staging / SKIPPED_FILE)
    return records
