"""``data.source: demo``: the offline synthetic cohort of :mod:`alzstage.data.demo`."""

from __future__ import annotations

from pathlib import Path

from alzstage.config import Params, Paths
from alzstage.data.demo import generate_demo
from alzstage.data.manifest import RawRecord


def collect_demo(params: Params, paths: Paths, staging: Path) -> list[RawRecord]:
    """Generate the demo slices straight into ``staging``, so the records point there."""
    data, base = params.data, params.base
    return generate_demo(
        staging / "images",
        classes=base.classes,
        subjects_per_class=data.demo.subjects_per_class,
        slices_per_subject=data.demo.slices_per_subject,
        image_size=base.image_size,
        seed=base.seed,
    )
