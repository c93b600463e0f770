"""Affine registration to the MNI152 template with SimpleITK, and a quality score.

Why affine to MNI152: the 2D model was trained on axial slices of atlas-registered
brains (the Kaggle/OASIS slices; the demo renders them from MNI152), so a volume must be
brought into the same space before "the slice at z = 12 mm" means the same anatomy.
The template is the one nilearn ships in its wheel, so nothing is downloaded.

Coordinates: SimpleITK images are built here from the nibabel RAS affine directly, so
every physical point in this package is in RAS millimetres (ITK's LPS convention never
enters). :class:`Registration.matrix` maps a template point to the subject point that
lands on it, which is what resampling the subject into template space needs.

The optimisation is ITK's (Mattes mutual information, regular-step gradient descent,
multi-resolution pyramid): similarity first (rotation, translation, one scale), then a
full affine started from it. The score is the correlation of the registered volume with
the template inside the template's brain mask, clipped to 0..1: above ~0.8 for a brain
that lines up, near 0 for one that is upside down or shifted by centimetres.

Speed against fidelity is set by :class:`RegistrationSettings` (``neuro.preprocess.
registration_*``). The defaults were chosen on 1 mm volumes with a known true transform
(``benchmarks/bench_neuro.py --compare``, docs/neuro.md): they register about 4x faster
than the settings used before, and land closer to the true transform, not further.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from alzstage.errors import VolumeError

# Pyramid levels are shrink factors relative to the template grid, coarse to fine; each
# level smooths with a Gaussian of (shrink factor x this) mm, so 4, 2, 1 -> 4, 2, 1 mm.
SMOOTHING_MM_PER_SHRINK = 1.0
# The affine stage refines the similarity result on the half and the full template grid.
AFFINE_SHRINK_FACTORS = (2, 1)
# Metric sampling on the coarser levels: they hold few voxels (a 4x-shrunk 2 mm template
# has ~4,000 in the dilated brain mask), so fewer samples there made the coarse
# similarity stage unstable: with 10 % on every level, 1 seed in 8 ended 0.8-1.1 mm off.
COARSE_SAMPLING = 0.25
# Never reached with the step settings below (levels stop after 10-50 iterations on
# "step too small"); a bound on a volume that does not converge.
ITERATIONS = 100
# Fixed seed for the random metric sampling, so a volume always gets the same transform.
# 0 would be sitk.sitkWallClock: a new sample set on every run, which is what this
# module did before; the same 1 mm volume then moved by up to 0.06 mm between runs.
SEED = 1


@dataclass(frozen=True)
class RegistrationSettings:
    """Speed-against-fidelity knobs of :func:`register_to_mni` (``neuro.preprocess``).

    The defaults are ``NeuroPreprocessParams``'s; the settings used before they were
    tuned for speed are in :data:`alzstage.neuro.preprocess.REFERENCE_PARAMS`.
    """

    # Similarity stage pyramid (template-grid shrink factors, coarse to fine). The
    # affine stage then runs on AFFINE_SHRINK_FACTORS, so a last similarity level at 1
    # only repeated, at the price of a full-grid level, what the affine stage refines.
    shrink_factors: tuple[int, ...] = (4, 2)
    # Fraction of the dilated template mask the metric samples on the full template grid
    # (coarser levels: COARSE_SAMPLING). The full-grid levels cost time in proportion.
    sampling: float = 0.10
    # Smallest optimiser step (about mm of voxel shift) before a level stops: 0.01 mm is
    # far below the ~0.3 mm an affine registration on a 2 mm grid is accurate to.
    min_step: float = 0.01
    # True: ITK's default, a Gaussian-derivative gradient image of both images at every
    # level (most of the time on a 1 mm scan); False: central differences at the sampled
    # points only. False also landed closer to the true transform on the test volumes.
    gradient_filter: bool = False

    @classmethod
    def from_params(cls, params: Any) -> RegistrationSettings:
        """The settings of a ``NeuroPreprocessParams``."""
        return cls(
            shrink_factors=tuple(params.registration_shrink_factors),
            sampling=float(params.registration_sampling),
            min_step=float(params.registration_min_step),
            gradient_filter=bool(params.registration_gradient_filter),
        )


@dataclass(frozen=True)
class Template:
    """The MNI152 T1 template and its brain mask on one grid (RAS mm)."""

    t1: np.ndarray  # float32 (x, y, z), max 1
    mask: np.ndarray  # bool (x, y, z)
    affine: np.ndarray  # 4x4 voxel -> MNI mm
    resolution: int


@functools.lru_cache(maxsize=4)
def mni152(resolution: int = 2) -> Template:
    """nilearn's MNI152 template and brain mask at ``resolution`` mm (cached per process).

    Both come from the files in the nilearn wheel (``load_mni152_template`` /
    ``load_mni152_brain_mask``); nothing touches the network.
    """
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    t1 = load_mni152_template(resolution=resolution)
    mask = load_mni152_brain_mask(resolution=resolution)
    data = np.asarray(t1.get_fdata(dtype=np.float32))
    return Template(
        t1=data,
        mask=np.asarray(mask.get_fdata()) > 0.5,
        affine=np.asarray(t1.affine, dtype=np.float64),
        resolution=int(resolution),
    )


def to_sitk(data: np.ndarray, affine: np.ndarray) -> Any:
    """A SimpleITK image of a (x, y, z) array whose physical space is RAS mm.

    Shear in the affine (rare, from some converters) is dropped: ITK directions must be
    orthonormal, and the nearest rotation keeps the geometry within a fraction of a voxel.
    """
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data).transpose(2, 1, 0)))
    spacing, origin, direction = _geometry(affine)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def _geometry(affine: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    """ITK (spacing, origin, direction) of a RAS affine, shear dropped (see :func:`to_sitk`)."""
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    u, _, vt = np.linalg.svd(affine[:3, :3] / zooms)
    return (
        [float(z) for z in zooms],
        [float(o) for o in affine[:3, 3]],
        [float(d) for d in (u @ vt).ravel()],
    )


def from_sitk(img: Any) -> np.ndarray:
    """The (x, y, z) array of a SimpleITK image (inverse of :func:`to_sitk`'s transpose)."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(img).transpose(2, 1, 0)


def affine_transform(matrix: np.ndarray) -> Any:
    """A SimpleITK AffineTransform for a 4x4 point-mapping matrix."""
    import SimpleITK as sitk

    t = sitk.AffineTransform(3)
    t.SetMatrix([float(v) for v in matrix[:3, :3].ravel()])
    t.SetTranslation([float(v) for v in matrix[:3, 3]])
    return t


def _matrix_of(transform: Any) -> np.ndarray:
    """4x4 matrix of a SimpleITK matrix-offset transform (centre folded into the offset)."""
    m = np.eye(4)
    a = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c = np.asarray(transform.GetCenter(), dtype=np.float64)
    t = np.asarray(transform.GetTranslation(), dtype=np.float64)
    m[:3, :3] = a
    m[:3, 3] = t + c - a @ c
    return m


@dataclass(frozen=True)
class Registration:
    """Result of registering one volume to MNI152."""

    matrix: np.ndarray  # 4x4: MNI mm -> subject mm
    score: float  # 0..1, correlation with the template inside its brain mask
    metric: float  # final Mattes mutual information (lower is better), for the record
    seconds: float

    def subject_to_template(self) -> np.ndarray:
        return np.linalg.inv(self.matrix)


def _method(fixed_mask: Any, levels: tuple[int, ...], settings: RegistrationSettings) -> Any:
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentagePerLevel(
        [settings.sampling if level == 1 else COARSE_SAMPLING for level in levels], SEED
    )
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0,
        minStep=settings.min_step,
        numberOfIterations=ITERATIONS,
        relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-6,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(levels))
    reg.SetSmoothingSigmasPerLevel([level * SMOOTHING_MM_PER_SHRINK for level in levels])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    if not settings.gradient_filter:
        reg.SetMetricUseMovingImageGradientFilter(False)
        reg.SetMetricUseFixedImageGradientFilter(False)
    return reg


def _coarsen(image: Any, mm: float) -> Any:
    """Block-average a finer-than-``mm`` image down to about ``mm`` voxels.

    The optimiser never looks at detail finer than the template grid, but ITK smooths
    and shrinks the moving image at every pyramid level: on a 1 mm scan that was most of
    the registration time. Block averaging (``BinShrink``) is its own anti-aliasing.
    """
    import SimpleITK as sitk

    factors = [max(1, int(mm / s + 1e-6)) for s in image.GetSpacing()]
    return image if factors == [1, 1, 1] else sitk.BinShrink(image, factors)


@functools.lru_cache(maxsize=4)
def _sampling_mask(resolution: int) -> np.ndarray:
    """Where the metric samples (uint8, template grid): the brain mask dilated by 2 voxels.

    Only in and just around the brain: the subject's skull, neck and field of view differ
    from the skull-stripped template and must not drive the alignment. Cached: it is
    the same for every volume (and the dilation cost ~0.05 s each time).
    """
    import SimpleITK as sitk

    template = mni152(resolution)
    grown = sitk.BinaryDilate(to_sitk(template.mask.astype(np.uint8), template.affine), [2] * 3)
    mask = from_sitk(grown)
    mask.flags.writeable = False
    return mask


def registration_score(moved: np.ndarray, template: Template) -> float:
    """Correlation of a volume resampled into template space with the template, in its mask.

    Pearson correlation is blind to the intensity scale (any normalisation gives the same
    score) but not to misplaced anatomy, which is what a quality gate needs.
    """
    a = np.asarray(moved, dtype=np.float64)[template.mask]
    b = template.t1.astype(np.float64)[template.mask]
    if a.size < 2 or a.std() < 1e-9:
        return 0.0
    return float(max(0.0, np.corrcoef(a, b)[0, 1]))


def register_to_mni(
    data: np.ndarray,
    affine: np.ndarray,
    name: str,
    resolution: int = 2,
    settings: RegistrationSettings | None = None,
) -> Registration:
    """Affine-register a volume (RAS array + affine) to MNI152 at ``resolution`` mm.

    ``data`` should already be clipped of outliers (a few hot voxels distort the mutual
    information histogram). Raises :class:`VolumeError` when ITK gives up.
    """
    import SimpleITK as sitk

    start = time.perf_counter()
    settings = settings or RegistrationSettings()
    template = mni152(resolution)
    fixed = to_sitk(template.t1, template.affine)
    fixed_mask = to_sitk(_sampling_mask(resolution), template.affine)
    moving = _coarsen(to_sitk(np.asarray(data, dtype=np.float32), affine), resolution)
    try:
        initial = sitk.CenteredTransformInitializer(
            fixed,
            moving,
            sitk.Similarity3DTransform(),
            sitk.CenteredTransformInitializerFilter.MOMENTS,
        )
        coarse = _method(fixed_mask, settings.shrink_factors, settings)
        coarse.SetInitialTransform(initial, inPlace=False)
        similarity = coarse.Execute(fixed, moving)
        full = sitk.AffineTransform(3)
        sim = sitk.Similarity3DTransform(similarity.GetNthTransform(0))
        full.SetMatrix(sim.GetMatrix())
        full.SetTranslation(sim.GetTranslation())
        full.SetCenter(sim.GetCenter())
        fine = _method(fixed_mask, AFFINE_SHRINK_FACTORS, settings)
        fine.SetInitialTransform(full, inPlace=False)
        final = fine.Execute(fixed, moving)
        metric = float(fine.GetMetricValue())
        matrix = _matrix_of(sitk.AffineTransform(final.GetNthTransform(0)))
    except RuntimeError as exc:  # ITK reports every failure as a RuntimeError
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise VolumeError(
            f"{name}: affine registration to MNI152 failed ({first}); check that the file is "
            "a whole-brain T1-weighted volume with a correct orientation and voxel size in its "
            "header",
            check="registration",
        ) from None
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix[:3, :3])) < 1e-3:
        raise VolumeError(
            f"{name}: registration to MNI152 produced a degenerate transform; check that the "
            "file is a whole-brain T1-weighted volume with a correct header",
            check="registration",
        )
    moved = resample(data, affine, template.t1.shape, template.affine, matrix)
    score = registration_score(moved, template)
    return Registration(
        matrix=matrix, score=score, metric=metric, seconds=time.perf_counter() - start
    )


def resample(
    data: np.ndarray,
    affine: np.ndarray,
    out_shape: tuple[int, ...],
    out_affine: np.ndarray,
    matrix: np.ndarray,
    nearest: bool = False,
) -> np.ndarray:
    """Sample ``data`` at the points of an output grid mapped through ``matrix``.

    ``matrix`` maps output-grid physical points (RAS mm) to ``data``'s physical points;
    outside the input everything is 0. One interpolation from the original voxels.
    """
    import SimpleITK as sitk

    image = to_sitk(np.asarray(data, dtype=np.uint8 if nearest else np.float32), affine)
    # The output grid as numbers, not as a reference image: a zero volume of the output's
    # size (13 M voxels for a 1 mm subject grid) was allocated, copied and thrown away.
    spacing, origin, direction = _geometry(out_affine)
    out = sitk.Resample(
        image,
        [int(n) for n in out_shape],
        affine_transform(matrix),
        sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear,
        origin,
        spacing,
        direction,
        0.0,
        image.GetPixelID(),
    )
    return from_sitk(out)
