"""One volume in, Kaggle-like slices and a QC record out: the whole NIfTI preprocessing.

    load (RAS) -> foreground -> clip -> register to MNI152 -> brain mask -> tissue classes
    -> normalise -> axial slices in MNI space -> 8-bit, background black

The same function serves the ``nifti`` data source (``rules=None``: measure everything,
judge nothing, so the validate stage can decide with its own thresholds) and prediction
(``rules`` given: stop at the first broken rule with an error naming the file).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alzstage.config import NeuroPreprocessParams
from alzstage.errors import VolumeError
from alzstage.neuro.qc import VolumeRule, check_measurements
from alzstage.neuro.volume import Volume, load_volume

STEPS = ("load", "normalise", "register", "mask", "slice")

# The neuro.preprocess values of the speed-against-fidelity knobs before they were tuned
# (about 3x slower per 1 mm volume on one core). ``benchmarks/bench_neuro.py --compare`` and
# tests/neuro/test_neuro.py hold the defaults against them: docs/neuro.md#speed-and-fidelity.
REFERENCE_PARAMS: dict[str, Any] = {
    "registration_shrink_factors": (4, 2, 1),
    "registration_sampling": 0.25,
    "registration_min_step": 0.001,
    "registration_gradient_filter": True,
    "foreground_stride": 1,
    "tissue_kmeans": "sample",
}


@dataclass
class Preprocessed:
    """What preprocessing made of one volume."""

    slices: np.ndarray  # uint8 (n, height, width), training image format
    z_mm: np.ndarray  # MNI z of each slice
    qc: dict[str, Any]  # the measurements of data/raw/volumes.csv (QC_COLUMNS)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step (STEPS)
    transform: np.ndarray | None = None  # 4x4 registration, MNI mm -> subject mm


@contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[step] = timings.get(step, 0.0) + time.perf_counter() - start


def preprocess_volume(
    source: Path | bytes | Volume,
    params: NeuroPreprocessParams,
    image_size: tuple[int, int],
    name: str | None = None,
    rules: list[VolumeRule] | None = None,
) -> Preprocessed:
    """Turn one NIfTI volume into ``params.n_slices`` uint8 axial slices of ``image_size``.

    Raises a :class:`~alzstage.errors.VolumeError` when no slices can be made
    (unreadable, not 3D, nothing in the image, registration crashed) and, with
    ``rules``, when a measurement breaks one of them.
    """
    from alzstage.neuro.intensity import clip_percentiles, normalise_intensity, to_uint8
    from alzstage.neuro.mask import otsu_foreground
    from alzstage.neuro.register import RegistrationSettings, register_to_mni
    from alzstage.neuro.slices import sample_slices, slice_positions

    # 1. Load (canonical RAS, at most 1 mm) and measure what the header and voxels show.
    timings: dict[str, float] = {}
    data, affine, zooms, name, qc = _load(source, params, name, rules, timings)

    # 2. Foreground and intensity clipping: a blank image stops here.
    with _timed(timings, "normalise"):
        foreground = otsu_foreground(data, affine, params.foreground_stride)
        if not foreground.any():
            raise VolumeError(
                f"{name}: no foreground found (the image is blank or constant); check that "
                "it is a T1-weighted brain scan and that the export kept the voxel values",
                check="empty_brain_mask",
            )
        clipped = clip_percentiles(data, foreground, params.clip_percentiles)

    # 3. Affine registration to MNI152.
    with _timed(timings, "register"):
        reg = register_to_mni(
            clipped,
            affine,
            name,
            params.registration_resolution,
            RegistrationSettings.from_params(params),
        )
    qc["registration_score"] = round(reg.score, 4)

    # 4. The brain mask and tissue classes, measured and (with rules) judged.
    with _timed(timings, "mask"):
        mask = _brain(clipped, affine, reg, foreground, params, zooms, qc)
    if rules is not None:
        check_measurements(qc, rules, name, {"registration_score", "brain_ml"})

    # 5. Intensity normalisation inside the mask. Volume-sized arrays are dropped as soon
    # as no later step needs them (issue 16: memory must stay bounded per request).
    del clipped, foreground
    with _timed(timings, "normalise"):
        normalised = normalise_intensity(data, mask, params.normalise, params.clip_percentiles)
    del data

    # 6. Axial slices in MNI space, 8-bit, background black.
    with _timed(timings, "slice"):
        z_mm = slice_positions(params.z_range_mm, params.n_slices)
        values = sample_slices(normalised, affine, reg.matrix, image_size, z_mm)
        inside = sample_slices(mask.astype(np.uint8), affine, reg.matrix, image_size, z_mm, True)
        slices = np.where(inside > 0, to_uint8(values, params.normalise), 0).astype(np.uint8)
    qc["n_slices"] = len(slices)
    qc["seconds"] = round(sum(timings.values()), 3)
    return Preprocessed(slices=slices, z_mm=z_mm, qc=qc, timings=timings, transform=reg.matrix)


def _load(
    source: Path | bytes | Volume,
    params: NeuroPreprocessParams,
    name: str | None,
    rules: list[VolumeRule] | None,
    timings: dict[str, float],
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...], str, dict[str, Any]]:
    """The voxels (finite), affine, voxel size, name and header QC of one volume.

    With ``rules``, a header or voxel measurement that breaks one stops here, before the
    costly steps.
    """
    with _timed(timings, "load"):
        if isinstance(source, Volume):
            volume = source
        else:
            max_bytes = int(params.max_volume_mb * 2**20)
            volume = load_volume(source, name=name, max_bytes=max_bytes)
    on_disk = volume.voxel_mm_on_disk
    qc: dict[str, Any] = {
        "shape": "x".join(str(s) for s in volume.shape_on_disk),
        "voxel_min_mm": round(min(on_disk), 4),
        "voxel_max_mm": round(max(on_disk), 4),
        "n_nonfinite": volume.n_nonfinite,
    }
    if rules is not None:
        check_measurements(qc, rules, volume.name, {"voxel_min_mm", "voxel_max_mm", "n_nonfinite"})
    # Non-finite voxels are reported above; here they only must not poison the maths.
    # In place when this function loaded the volume (no one else holds it): one array
    # of the volume's size less at the peak.
    data = np.nan_to_num(
        volume.data, copy=isinstance(source, Volume), nan=0.0, posinf=0.0, neginf=0.0
    )
    # zooms: after any resampling to 1 mm, what the arrays are on.
    return data, volume.affine, volume.zooms, volume.name, qc


def _brain(
    clipped: np.ndarray,
    affine: np.ndarray,
    reg: Any,
    foreground: np.ndarray,
    params: NeuroPreprocessParams,
    zooms: tuple[float, ...],
    qc: dict[str, Any],
) -> np.ndarray:
    """The brain mask, its volume (``brain_ml``) and tissue fractions added to ``qc``."""
    from alzstage.neuro.mask import brain_mask, segment_tissue, tissue_fractions

    mask = brain_mask(
        clipped, affine, reg, params.brain_mask, params.registration_resolution, foreground
    )
    qc["brain_ml"] = round(float(mask.sum()) * float(np.prod(zooms)) / 1000.0, 2)
    if params.tissue_segmentation:
        labels = segment_tissue(clipped, mask, method=params.tissue_kmeans)
        fractions = tissue_fractions(labels)
        del labels
        qc.update({f"{k}_fraction": round(v, 4) for k, v in fractions.items()})
    return mask
