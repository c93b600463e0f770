"""A deterministic, offline, MRI-like stand-in for the Kaggle Alzheimer's 4-class dataset.

Why this exists: the pipeline must run end to end (CI, a laptop without a Kaggle account,
a reviewer reproducing a result) without downloading anything. Random noise images would
let every stage run, but they would hide the problems the project is about: a model that
cannot learn anything tells nothing, and a dataset without subjects cannot show why a
subject-disjoint split matters. So this module builds slices that behave like the real
data where it counts:

* Anatomy comes from the MNI152 templates that ship inside the nilearn wheel (no network):
  tissue probability maps are turned into a T1-like image (CSF dark, grey matter mid,
  white matter bright), skull-stripped, on a black background, 208 x 176 at 1 mm.
* Disease severity (the class index) drives the anatomy that radiologists look at:
  enlarged lateral ventricles, widened sulci / thinner cortex, shrunken hippocampi. Each
  effect varies between subjects, so neighbouring classes overlap as in real cohorts.
* Each subject gets its own head size, pose, smooth anatomical deformation, contrast,
  bias field and noise, and contributes a run of *adjacent* axial slices. Neighbouring
  slices are near-duplicates, so a slice-level random split leaks subject identity and
  scores much higher than a subject-disjoint one - the same trap the real dataset sets.

How hard is it? With the defaults (80 subjects, 26/22/18/14 per class, 8 adjacent slices
each, seed 42), a logistic regression on 32x32 thumbnails scores ~0.59 balanced accuracy
per slice and ~0.58 per brain under subject-disjoint 5-fold GroupKFold (chance: 0.25), but
~0.93 on a random slice-level split. Adjacent slices correlate ~0.96 (lowest ~0.90), the
middle slices of two subjects ~0.77. The default ``dvc repro`` (16 test brains) pools each
brain's slices to a brain-level balanced accuracy of 0.60 (95% CI 0.45-0.75) at seed 42,
0.58 (0.37-0.80) at seed 1 and 0.82 (0.60-1.00) at seed 2: above the majority baseline
(0.25), far from perfect, and most errors fall between neighbouring classes (MildDemented
read as ModerateDemented above all). On a leaky slice-level split (``split.strategy:
stratified``, seed 42) copying the label of the nearest training slice scores 0.87 and the
pixel baseline 0.86, against 0.64 and 0.59 on the subject split; the augmented network
itself gains little from the leak (0.69 against 0.63 per slice), as on the real archive.
The previous default, 40 subjects of 16 slices, left 8 test brains and scored 0.17 (CI
0.00-0.25) per brain at seed 42, which read as "does not learn". The effect sizes
(``ATROPHY_MM``, ``SEVERITY_SPREAD``, ``HEALTHY_MM``) are unchanged: more brains of fewer
slices each, the same 640 images, made the difference.

The array logic (``demo_anatomy._anatomy``, ``_draw_subject``, ``render_subject``) is pure
and separate from ``generate_demo``, which only writes JPEGs. Every random draw is seeded
from ``seed`` and the subject's (class, number), so the same arguments give byte-identical
files, and adding subjects to one class does not change the subjects already generated.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from alzstage.data.demo_anatomy import _Z_MARGIN_MM, MAX_RADIUS_MM, _anatomy
from alzstage.data.manifest import RawRecord
from alzstage.neuro.space import BAND_Z_MM, BRAIN_CENTRE_MM, pixel_mm

# The slice grid (field of view, brain centre, axial band) is MNI geometry, in
# alzstage.neuro.space: slices cut from real volumes use the same one.
# Distance between adjacent slices. 2 mm keeps neighbours near-duplicates (r ~0.92-0.99)
# without being identical, like consecutive slices of a 1 mm MRI after resampling.
SLICE_STEP_MM = 2.0
# A subject's run of slices is centred here (MNI z, mm: the ventricle bodies) and shifted
# per subject by up to +-Z_JITTER_MM, then clamped to the band.
RUN_CENTRE_Z_MM = 12.0
Z_JITTER_MM = 6.0
# Atrophy at full severity (mm of tissue turned into CSF) for ventricles, cortex and
# hippocampi, and the per-subject spread of disease load in severity units (class gap
# is 1/(n_classes-1)). Tuned so that a linear model on 32x32 thumbnails beats chance
# clearly on a subject-disjoint split but is far from perfect (numbers in the docstring).
ATROPHY_MM = {"vent": 9.0, "sulc": 3.0, "hippo": 8.0}
SEVERITY_SPREAD = 0.12
# Healthy ageing (mean, SD in mm) before any disease: ventricles and sulci differ a lot
# between cognitively normal people, which is what makes neighbouring classes overlap.
HEALTHY_MM = {"vent": (1.0, 1.0), "sulc": (0.4, 0.4), "hippo": (0.5, 0.5)}


def max_slices_per_subject() -> int:
    """How many adjacent slices fit in the band; more would leave the ventricle region."""
    return math.floor((BAND_Z_MM[1] - BAND_Z_MM[0]) / SLICE_STEP_MM) + 1


# --------------------------------------------------------------------------- subjects


@dataclass(frozen=True)
class SubjectParams:
    """Everything random about one subject, drawn up front so rendering is pure."""

    severity: float  # 0 healthy .. 1 most severe (from the class)
    r_vent: float  # mm of ventricular enlargement
    r_sulc: float  # mm of cortical grey matter lost at the outer CSF boundary
    r_hippo: float  # mm of medial-temporal tissue lost around the hippocampi
    scale: tuple[float, float]  # head size (x, y)
    rotation_deg: float  # in-plane head rotation
    shift_mm: tuple[float, float]  # in-plane head position
    z_start_mm: float  # MNI z of the first slice
    gm_level: float  # T1 intensity of grey matter, white matter = 1
    csf_level: float  # T1 intensity of CSF
    gamma: float  # scanner / windowing non-linearity
    gain: float  # overall brightness of white matter in the 8-bit output
    noise: float  # per-pixel noise SD relative to white matter
    bias_sd: float  # strength of the smooth multiplicative bias field
    warp_mm: float  # SD of the smooth anatomical deformation


def _draw_subject(rng: np.random.Generator, severity: float, n_slices: int) -> SubjectParams:
    """Draw a subject: severity-driven atrophy plus nuisance variation.

    Atrophy = a healthy-ageing baseline that varies a lot between people + a severity
    term with its own per-subject spread, so neighbouring classes overlap (a
    ``VeryMildDemented`` brain can look healthier than a ``NonDemented`` one).
    """
    # Each subject's disease progresses at its own pace in each region.
    load = max(0.0, severity + rng.normal(0.0, SEVERITY_SPREAD))
    radius = {}
    for region in ("vent", "sulc", "hippo"):
        mean, sd = HEALTHY_MM[region]
        weight = float(np.clip(rng.normal(1.0, 0.3), 0.3, 1.6))  # regional emphasis
        radius[region] = max(0.0, rng.normal(mean, sd)) + ATROPHY_MM[region] * load * weight
    r_vent, r_sulc, r_hippo = radius["vent"], radius["sulc"], radius["hippo"]

    span = (n_slices - 1) * SLICE_STEP_MM
    # Runs are centred on the ventricles with a per-subject jitter, as real slice
    # selections are (roughly the same atlas levels for everyone, never exactly), and
    # kept inside the band.
    lo, hi = BAND_Z_MM[0], BAND_Z_MM[1] - span
    centred = min(max(RUN_CENTRE_Z_MM - span / 2.0, lo), hi)
    z_start = float(np.clip(centred + rng.uniform(-Z_JITTER_MM, Z_JITTER_MM), lo, hi))
    # Nuisance variation is modest on purpose: the Kaggle slices come from OASIS images
    # that were already gain-field corrected and affinely registered to an atlas, so
    # what is left between subjects is mostly residual pose and individual anatomy.
    size = rng.normal(1.0, 0.02)
    return SubjectParams(
        severity=severity,
        r_vent=float(min(r_vent, MAX_RADIUS_MM["vent"])),
        r_sulc=float(min(r_sulc, MAX_RADIUS_MM["sulc"])),  # the cortex is ~3-4 mm thick
        r_hippo=float(min(r_hippo, MAX_RADIUS_MM["hippo"])),
        scale=(float(size * rng.normal(1.0, 0.015)), float(size * rng.normal(1.0, 0.015))),
        rotation_deg=float(rng.normal(0.0, 2.0)),
        shift_mm=(float(rng.normal(0.0, 1.5)), float(rng.normal(0.0, 1.5))),
        z_start_mm=float(z_start),
        gm_level=float(rng.normal(0.62, 0.02)),
        csf_level=float(rng.normal(0.16, 0.02)),
        gamma=float(rng.normal(1.0, 0.03)),
        gain=float(rng.uniform(0.86, 0.92)),
        noise=float(rng.uniform(0.015, 0.035)),
        bias_sd=float(rng.uniform(0.02, 0.05)),
        warp_mm=float(rng.uniform(1.0, 2.0)),
    )


def _smooth_fields(
    rng: np.random.Generator, count: int, shape: tuple[int, int, int], z_span_mm: float
) -> np.ndarray:
    """``count`` smooth random fields (unit SD-ish) on the output grid.

    Drawn on a coarse grid (~30 mm spacing) and interpolated with cubic splines, so they
    model slowly varying things: individual anatomy, coil bias. The coarse grid spans the
    field of view, so the same subject gets the same fields at any image size. Spline
    interpolation is separable and linear, so it is applied as three small matrices
    (one per axis) instead of ``ndimage.zoom`` on the full grid, which dominated the run
    time.
    """
    nz = max(2, math.ceil(z_span_mm / 30.0) + 1)
    coarse = rng.normal(0.0, 1.0, size=(count, nz, 6, 6))
    mz, my, mx = (_spline_matrix(c, s) for c, s in zip(coarse.shape[1:], shape, strict=True))
    fields = np.einsum("za,yb,xc,kabc->kzyx", mz, my, mx, coarse, optimize=True)
    return fields.astype(np.float32)


@functools.lru_cache(maxsize=32)
def _spline_matrix(n_in: int, n_out: int) -> np.ndarray:
    """The (n_out, n_in) matrix of 1-D cubic-spline upsampling, pixel centres aligned."""
    pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    eye = np.eye(n_in)
    cols = [ndimage.map_coordinates(eye[:, j], [pos], order=3, mode="nearest") for j in range(n_in)]
    m = np.stack(cols, axis=1)
    m.flags.writeable = False  # cached and shared: nobody may modify it
    return m


def render_subject(
    params: SubjectParams,
    rng: np.random.Generator,
    n_slices: int,
    image_size: tuple[int, int],
) -> np.ndarray:
    """Render one subject's adjacent axial slices as uint8 images, shape (n, H, W).

    Pure: only ``params`` and ``rng`` decide the result.
    """
    a = _anatomy()
    height, width = image_size

    # Atrophy, in the subject's z-range only. Each effect turns tissue within r mm of a
    # CSF space into CSF, with a soft (sub-voxel) edge so severity changes are continuous.
    z_first = params.z_start_mm - _Z_MARGIN_MM - a.origin_mm[2]
    z_last = params.z_start_mm + (n_slices - 1) * SLICE_STEP_MM + _Z_MARGIN_MM - a.origin_mm[2]
    k0, k1 = max(int(z_first), 0), min(math.ceil(z_last) + 1, a.gm.shape[2])
    zs = np.s_[:, :, k0:k1]

    def soft(radius: float | np.ndarray, dist: np.ndarray) -> np.ndarray:
        # Ring k (dist k mm) converts once radius passes k-1, with a linear ramp so a
        # 2.3 mm radius differs from 2.0 mm. Residual tissue inside the CSF space itself
        # (dist 0: partial volume, septum) fades out over the first millimetre too;
        # otherwise the old ventricle outline would stay as a ghost inside the new one.
        return np.clip(radius - dist + 1.0, 0.0, 1.0) * np.minimum(radius, 1.0)

    conv = np.maximum(soft(params.r_vent, a.d_vent[zs]), soft(params.r_sulc, a.d_ext[zs]))
    # Hippocampal loss is local: the radius fades out away from the hippocampi.
    conv = np.maximum(conv, soft(params.r_hippo * a.hippo[zs], a.d_csf[zs]))
    gm, wm, csf = a.gm[zs], a.wm[zs], a.csf[zs]
    lost = conv * (gm + wm)
    keep = 1.0 - conv
    image = (
        params.csf_level * (csf + lost) + params.gm_level * gm * keep + 1.0 * wm * keep
    ).astype(np.float32)

    # Output grid -> MNI mm. Pixels are square, sized so the Kaggle field of view fits.
    mm_per_px = pixel_mm((height, width))
    u = (np.arange(width, dtype=np.float32) - (width - 1) / 2.0) * mm_per_px  # image right
    v = (np.arange(height, dtype=np.float32) - (height - 1) / 2.0) * mm_per_px  # image down
    V, U = np.meshgrid(v, u, indexing="ij")
    # Inverse of the subject's pose: un-shift, un-rotate, un-scale.
    U = U - params.shift_mm[0]
    V = V - params.shift_mm[1]
    th = math.radians(params.rotation_deg)
    c, s = math.cos(th), math.sin(th)
    U, V = (c * U + s * V) / params.scale[0], (-s * U + c * V) / params.scale[1]
    # Radiological axial view: anterior at the top, the patient's right on image left.
    x_mm = BRAIN_CENTRE_MM[0] - U
    y_mm = BRAIN_CENTRE_MM[1] - V
    z_mm = params.z_start_mm + SLICE_STEP_MM * np.arange(n_slices, dtype=np.float32)

    grid = (n_slices, height, width)
    span = (n_slices - 1) * SLICE_STEP_MM + 1.0
    dx, dy, dz, bias = _smooth_fields(rng, 4, grid, span)
    coords = np.stack(
        [
            np.broadcast_to(x_mm, grid) + params.warp_mm * dx - a.origin_mm[0],
            np.broadcast_to(y_mm, grid) + params.warp_mm * dy - a.origin_mm[1],
            z_mm[:, None, None] + 0.5 * params.warp_mm * dz - a.origin_mm[2] - k0,
        ]
    )
    img = ndimage.map_coordinates(image, coords, order=1, mode="constant", cval=0.0)
    # Inside the head every voxel is at least CSF-bright, so thresholding the image at
    # half the CSF level recovers the brain mask without a second interpolation.
    msk = img > 0.5 * params.csf_level

    # Scanner effects: smooth bias field, Rician-like noise inside the head only (the
    # skull-stripped background of the real data is black), contrast and brightness.
    img = img * np.exp(params.bias_sd * bias)
    n1 = rng.normal(0.0, params.noise, size=grid).astype(np.float32)
    n2 = rng.normal(0.0, params.noise, size=grid).astype(np.float32)
    img = np.where(msk, np.sqrt((img + n1) ** 2 + n2**2), img)
    img = np.clip(img, 0.0, None) ** params.gamma
    out = np.clip(np.rint(img * params.gain * 255.0), 0, 255)
    return out.astype(np.uint8)


# --------------------------------------------------------------------------- files


def _validate(
    classes: list[str],
    subjects_per_class: list[int],
    slices_per_subject: int,
    image_size: tuple[int, int],
) -> None:
    if len(classes) < 2:
        raise ValueError(f"classes: need at least 2 classes ordered by severity, got {classes}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes: names must be unique, got {classes}")
    if len(subjects_per_class) != len(classes):
        raise ValueError(
            f"subjects_per_class: needs one count per class ({len(classes)} for {classes}), "
            f"got {len(subjects_per_class)}: {subjects_per_class}"
        )
    bad = [n for n in subjects_per_class if int(n) != n or n < 1]
    if bad:
        raise ValueError(
            f"subjects_per_class: every count must be a positive integer, got {subjects_per_class}"
        )
    limit = max_slices_per_subject()
    if int(slices_per_subject) != slices_per_subject or not 1 <= slices_per_subject <= limit:
        raise ValueError(
            f"slices_per_subject: must be between 1 and {limit} (the adjacent "
            f"{SLICE_STEP_MM:g} mm axial slices in the ventricle band), got {slices_per_subject}; "
            "use more subjects instead of more slices per subject"
        )
    if len(image_size) != 2 or any(int(s) != s or s < 16 for s in image_size):
        raise ValueError(
            f"image_size: must be (height, width) with both >= 16 pixels, got {image_size}"
        )


def generate_demo(
    out_dir: Path,
    *,
    classes: list[str],
    subjects_per_class: list[int],
    slices_per_subject: int,
    image_size: tuple[int, int],
    seed: int,
) -> list[RawRecord]:
    """Write the synthetic dataset as ``out_dir/<class>/<subject>_s<slice>.jpg``.

    ``classes`` are ordered by severity (first healthy, last most severe); the layout
    and file type (8-bit grayscale JPEG) match the Kaggle archive, so every later stage
    treats both the same. Returns one record per file, sorted by path, with the subject
    id filled in so the split can keep subjects apart.
    """
    from PIL import Image

    _validate(classes, subjects_per_class, slices_per_subject, image_size)
    size = (int(image_size[0]), int(image_size[1]))
    out_dir = Path(out_dir).resolve()
    records: list[RawRecord] = []
    for ci, label in enumerate(classes):
        severity = ci / (len(classes) - 1)
        class_dir = out_dir / label
        class_dir.mkdir(parents=True, exist_ok=True)
        for n in range(int(subjects_per_class[ci])):
            subject = f"demo-{ci}-{n:03d}"
            # One stream per subject, keyed by (seed, class, number): reproducible and
            # independent of how many subjects the other classes have.
            rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2**64, ci, n]))
            params = _draw_subject(rng, severity, slices_per_subject)
            slices = render_subject(params, rng, slices_per_subject, size)
            for k, pixels in enumerate(slices):
                path = class_dir / f"{subject}_s{k:03d}.jpg"
                # A 2-D uint8 array becomes an 8-bit grayscale ("L") image, like Kaggle's.
                Image.fromarray(pixels).save(path, format="JPEG", quality=90)
                records.append(RawRecord(path=path, label=label, subject=subject))
    return sorted(records, key=lambda r: str(r.path))
