"""The MNI152 anatomy the demo draws its subjects from, prepared once per process.

Split from :mod:`alzstage.data.demo` (issue #22): this half loads nilearn's bundled
templates and turns them into tissue and distance maps over the slice band; the demo
module draws subjects and renders slices from them. Pure arrays, no files written.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from alzstage.neuro.space import BAND_Z_MM

# Margin around the band so per-subject deformations never sample outside the cached block.
_Z_MARGIN_MM = 8.0
# Centres of the left and right hippocampus in MNI space (x, y, z), mm.
HIPPOCAMPI_MM = ((-25.0, -20.0, -15.0), (25.0, -20.0, -15.0))
# Caps on the atrophy radii (mm): beyond them a ventricle or hippocampus would swallow
# its surroundings, and the distance maps only need to reach this far.
MAX_RADIUS_MM = {"vent": 18.0, "sulc": 3.5, "hippo": 16.0}
_FAR_MM = 1.0e4  # "no such structure nearby" in a distance map


# --------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class _Anatomy:
    """Template tissue maps and distance maps over the slice band, at 1 mm.

    Distance maps are computed once here so that atrophy per subject is just a threshold
    on them (a continuous radius in mm) instead of repeated 3-D morphology.
    """

    gm: np.ndarray  # grey-matter fraction, (x, y, z) float32
    wm: np.ndarray  # white-matter fraction
    csf: np.ndarray  # CSF fraction inside the brain mask
    d_vent: np.ndarray  # mm to the nearest lateral-ventricle voxel
    d_ext: np.ndarray  # mm to the nearest outer (sulcal / extra-cerebral) CSF voxel
    d_csf: np.ndarray  # mm to the nearest CSF voxel of any kind
    hippo: np.ndarray  # 0..1 weight, peaks on the hippocampi
    origin_mm: tuple[float, float, float]  # MNI coordinate of voxel (0, 0, 0)


# The 1 mm MNI152 (ICBM 2009a) T1, grey- and white-matter templates bundled in the nilearn
# wheel, as nilearn.datasets.load_mni152_*_template(resolution=1) reads them.
_TEMPLATE_FILES = (
    "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
)


def _load_templates() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """T1, GM and WM templates (each rescaled to max 1, float32) and their affine.

    Reads nilearn's bundled files with nibabel, exactly as ``load_mni152_template`` and
    friends do at ``resolution=1`` (their native grid: nothing to resample). Importing
    ``nilearn.datasets`` costs seconds (it pulls in scikit-learn, pandas, requests) and
    dominated small demo runs, so the public loaders are only the fallback for a nilearn
    release that moves the files. Neither path touches the network.
    """
    import importlib.util

    import nibabel as nib

    spec = importlib.util.find_spec("nilearn")  # locates the package without importing it
    roots = list(spec.submodule_search_locations or []) if spec else []
    files = [Path(roots[0], "datasets", "data", name) for name in _TEMPLATE_FILES] if roots else []
    if files and all(f.is_file() for f in files):
        imgs = [nib.load(f) for f in files]
    else:
        from nilearn.datasets import (
            load_mni152_gm_template,
            load_mni152_template,
            load_mni152_wm_template,
        )

        imgs = [
            f(resolution=1)
            for f in (load_mni152_template, load_mni152_gm_template, load_mni152_wm_template)
        ]
    arrays = []
    for img in imgs:
        data = np.asarray(img.dataobj, dtype=np.float32)
        arrays.append(data / max(float(data.max()), 1e-6))
    return arrays[0], arrays[1], arrays[2], np.asarray(imgs[0].affine)


def _distance_to(
    feature: np.ndarray, near: np.ndarray | None = None, reach: float = math.inf
) -> np.ndarray:
    """Distance (mm, float32) from each voxel to the nearest ``feature`` voxel.

    With ``near``, only distances below ``reach`` inside the bounding box of ``near`` are
    guaranteed; the transform then runs on that box grown by ``reach`` and everything
    else reads as far away. The Euclidean transforms dominated the one-off set-up cost,
    and each effect only ever looks a bounded distance from its own region.
    """
    if near is None or not near.any():
        crop: tuple[slice, ...] = tuple(slice(0, n) for n in feature.shape)
    else:
        grow = math.ceil(min(reach, max(feature.shape)))
        crop = ()
        for axis, n in enumerate(feature.shape):
            hit = np.flatnonzero(near.any(axis=tuple(a for a in range(near.ndim) if a != axis)))
            crop += (slice(max(int(hit[0]) - grow, 0), min(int(hit[-1]) + grow + 1, n)),)
    out = np.full(feature.shape, _FAR_MM, dtype=np.float32)
    sub = feature[crop]
    if sub.any():
        out[crop] = ndimage.distance_transform_edt(~sub)
    return out


def _lateral_ventricles(
    is_csf: np.ndarray, mask: np.ndarray, X: np.ndarray, Y: np.ndarray, Z: np.ndarray
) -> np.ndarray:
    """The lateral ventricles of the template block, as a boolean map."""
    # Lateral ventricles: the large CSF space deep in the brain, near the midline. Depth
    # (distance from the brain surface) excludes sulci; the box excludes the sylvian
    # fissures; the largest connected piece is the ventricular system.
    box = (np.abs(X) < 30.0) & (Y > -50.0) & (Y < 35.0) & (Z > -8.0) & (Z < 35.0)
    depth = _distance_to(mask <= 0.5, near=box, reach=13.0)
    candidate = (
        is_csf
        & box
        & (depth > 12.0)
        # The quadrigeminal cistern sits behind the third ventricle on the midline; it
        # is not ventricle and would balloon into a round blob.
        & ~((np.abs(X) < 8.0) & (Y < -28.0))
    )
    labels, n = ndimage.label(candidate)
    if n == 0:
        raise RuntimeError("could not locate the lateral ventricles in the MNI152 template")
    sizes = ndimage.sum(candidate, labels, index=np.arange(1, n + 1))
    keep = np.flatnonzero(sizes >= 0.1 * sizes.max()) + 1  # both ventricles if split
    vent = np.isin(labels, keep)
    return vent


@functools.lru_cache(maxsize=1)
def _anatomy() -> _Anatomy:
    """Load the MNI152 templates bundled with nilearn (offline) and prepare the band.

    Cached per process: loading and the distance transforms take ~1-2 s, every subject
    after that reuses them.
    """
    t1, gm, wm, affine = _load_templates()
    if not np.allclose(affine[:3, :3], np.eye(3)):  # 1 mm, RAS, axis-aligned
        raise RuntimeError(f"unexpected MNI152 template affine {affine.tolist()}")

    # Crop to the band (plus margin) and to the brain's bounding box: everything per
    # subject scales with this block, so it should hold nothing that is never sampled.
    origin = affine[:3, 3]
    z0 = math.floor(BAND_Z_MM[0] - _Z_MARGIN_MM - origin[2])
    z1 = math.ceil(BAND_Z_MM[1] + _Z_MARGIN_MM - origin[2]) + 1
    inside = t1 > 0.02
    xy = np.argwhere(inside.any(axis=2))
    (x0, y0), (x1, y1) = xy.min(0) - 4, xy.max(0) + 5
    x0, y0 = max(int(x0), 0), max(int(y0), 0)
    sl = np.s_[x0:x1, y0:y1, z0:z1]
    t1, gm, wm, inside = t1[sl], gm[sl], wm[sl], inside[sl]
    origin_mm = (float(origin[0] + x0), float(origin[1] + y0), float(origin[2] + z0))

    # The template is skull-stripped: its non-zero voxels are the brain. A light blur of
    # the mask gives a partial-volume edge instead of a jagged staircase.
    mask = ndimage.gaussian_filter(ndimage.binary_fill_holes(inside).astype(np.float32), 0.6)
    tissue = np.clip(gm + wm, 0.0, 1.0)
    gm = gm * mask
    wm = wm * mask
    csf = np.clip(mask - tissue, 0.0, 1.0)

    # Coordinates of the block in MNI mm, for the anatomical regions below.
    xs = origin_mm[0] + np.arange(gm.shape[0], dtype=np.float32)
    ys = origin_mm[1] + np.arange(gm.shape[1], dtype=np.float32)
    zs = origin_mm[2] + np.arange(gm.shape[2], dtype=np.float32)
    X, Y, Z = np.meshgrid(xs, ys, zs, indexing="ij")

    is_csf = csf > 0.5
    vent = _lateral_ventricles(is_csf, mask, X, Y, Z)

    # Outer CSF: sulci, fissures and everything outside the brain. Cortical atrophy eats
    # grey matter from this side, which both thins the cortex and widens the sulci.
    outer = ((csf > 0.35) & ~ndimage.binary_dilation(vent, iterations=2)) | (mask < 0.5)

    hippo = np.zeros_like(gm)
    for hx, hy, hz in HIPPOCAMPI_MM:
        # Elongated along y like the hippocampus itself (head to tail).
        r2 = ((X - hx) / 7.0) ** 2 + ((Y - hy) / 14.0) ** 2 + ((Z - hz) / 8.0) ** 2
        hippo = np.maximum(hippo, np.exp(-0.5 * r2))

    f32 = np.float32
    return _Anatomy(
        gm=gm.astype(f32),
        wm=wm.astype(f32),
        csf=csf.astype(f32),
        d_vent=_distance_to(vent, near=vent, reach=MAX_RADIUS_MM["vent"] + 2.0),
        d_ext=_distance_to(outer),
        d_csf=_distance_to(
            is_csf | (mask < 0.5), near=hippo > 0.01, reach=MAX_RADIUS_MM["hippo"] + 2.0
        ),
        hippo=hippo.astype(f32),
        origin_mm=origin_mm,
    )
