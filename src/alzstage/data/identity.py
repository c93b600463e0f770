"""Which dataset a model was trained on: one short, stable name per dataset.

The name keys the registry (one champion per dataset, see ``tracking.registered_name``),
so a model trained on the synthetic ``demo`` images can never stay champion over, or be
served in place of, a model trained on real scans.

- ``data.name`` in params.yaml wins when set.
- ``data.source: demo`` is always ``demo``: the generator is deterministic, offline and
  the same on every machine.
- Otherwise ``<source>-<8 hex>``: the source kind plus a fingerprint of the validated
  manifest's image hashes. The fingerprint, not ``data.path``, carries the identity: the
  same zip reached through another path or URL is the same dataset, and a re-download
  that changed one image is not.

The ``split`` stage computes it once from ``data/interim/manifest.csv`` and records it in
``reports/split.json``; ``evaluate`` copies it into ``reports/metrics.json``, which
``promote`` reads. Nothing downstream re-hashes images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alzstage.errors import AlzstageError

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.config import Params, Paths

DEMO = "demo"
# 8 hex digits = 32 bits: a collision between two of one team's datasets has odds of
# about n^2 / 2^33, under one in a million for a hundred datasets.
FINGERPRINT_CHARS = 8


def image_fingerprint(image_sha256: Iterable[str]) -> str:
    """sha256 over the sorted, distinct image hashes: independent of row order and paths."""
    distinct = sorted({h.strip().lower() for h in image_sha256 if h and h.strip()})
    return hashlib.sha256("\n".join(distinct).encode()).hexdigest()


def dataset_name(source: str, image_sha256: Iterable[str], name: str | None = None) -> str:
    """The dataset's name: ``name`` if given, ``demo`` for the demo source, else derived."""
    if name:
        return name
    if source == DEMO:
        return DEMO
    return f"{source}-{image_fingerprint(image_sha256)[:FINGERPRINT_CHARS]}"


@dataclass(frozen=True)
class ConfiguredDataset:
    """The dataset params.yaml points at, and how that was worked out (shown to the user)."""

    name: str
    source: str
    why: str

    @property
    def synthetic(self) -> bool:
        return self.source == DEMO


def configured_dataset(params: Params, paths: Paths) -> ConfiguredDataset:
    """The dataset of the configured params, without downloading or hashing anything.

    A derived name needs the validated manifest's hashes, so it is read from the split
    report, and only when that report was made from the configured ``data.source``.
    """
    d = params.data
    if d.name:
        return ConfiguredDataset(d.name, d.source, "data.name in params.yaml")
    if d.source == DEMO:
        return ConfiguredDataset(DEMO, DEMO, "data.source: demo in params.yaml")
    report = paths.split_report
    how = "run the pipeline on it (`dvc repro`), set data.name in params.yaml, or pass --model"
    if not report.exists():
        raise AlzstageError(
            f"data.source is {d.source!r} with no data.name, and {report} does not exist, so "
            f"the dataset (and its champion) is unknown; {how}"
        )
    from alzstage.files import read_json

    recorded = read_json(report)
    if recorded.get("data_source") != d.source or not recorded.get("dataset"):
        raise AlzstageError(
            f"{report} was made from data.source {recorded.get('data_source', '?')!r}, but "
            f"params.yaml says {d.source!r}; the dataset (and its champion) is unknown; {how}"
        )
    return ConfiguredDataset(
        recorded["dataset"],
        d.source,
        f"derived from the validated manifest of data.source: {d.source}, as recorded "
        f"in {report.relative_to(paths.root) if report.is_relative_to(paths.root) else report}",
    )
