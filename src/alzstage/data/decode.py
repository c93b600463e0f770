"""The ``decode`` stage's run function: every validated image decoded once, for every later stage.

What is decoded, stored and why is :mod:`alzstage.data.pixels` (and the store itself
:class:`alzstage.artifacts.PixelStore`). The run function lives apart so that the stages
reading the store import its readers, never the decode stage's own module.
"""

from __future__ import annotations

import time

from alzstage.artifacts import read_manifest
from alzstage.config import Params, Paths
from alzstage.data.pixels import write_pixels
from alzstage.result import StageResult


def run_decode(params: Params, paths: Paths) -> StageResult:
    """Validated manifest + ``data/raw`` -> ``data/processed/pixels/``."""
    rel_paths = read_manifest(paths.validated_manifest)["path"].tolist()
    t0 = time.perf_counter()
    store = write_pixels(paths.raw, rel_paths, params, paths.pixels)
    seconds = time.perf_counter() - t0
    megabytes = sum(f.stat().st_size for f in paths.pixels.iterdir()) / 1e6
    h, w = store.meta.input_size
    return StageResult(
        metrics={
            "n_images": float(len(rel_paths)),
            "seconds_decode": round(seconds, 3),
            "megabytes": round(megabytes, 3),
        },
        artifacts=[paths.pixels / "meta.json"],
        summary=(
            f"decoded {len(rel_paths)} images once in {seconds:.1f}s: {h}x{w} network inputs, "
            f"thumbnails at {', '.join(map(str, store.meta.thumb_sizes))} px ({megabytes:.1f} MB)"
        ),
    )
