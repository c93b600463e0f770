"""Brain extraction and tissue classes, from well-kept library code.

Two independent estimates of "where is the brain", combined by ``neuro.preprocess.brain_mask``:

* ``otsu``: the foreground of the volume itself, in the spirit of dipy's ``median_otsu``
  (median filter, Otsu threshold, largest connected piece, holes filled), with SimpleITK's
  filters. It follows the individual brain, but on a scan with skull it keeps the skull.
* ``template``: nilearn's MNI152 brain mask mapped into the subject through the affine
  registration. It never keeps skull, but an affine map cannot follow every gyrus.
* ``both`` (default): the template mask grown by a few millimetres, intersected with the
  Otsu foreground, so each removes the other's typical error.

Tissue classes (CSF, grey matter, white matter) come from a 3-class k-means (scikit-learn)
on the intensities inside the mask: on T1 the classes are ordered CSF < GM < WM. They are
recorded as fractions in the QC table, a cheap sanity check (a "brain" that is 90% one
class is not a T1 brain) and a coarse atrophy signal.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from alzstage.neuro.register import Registration, mni152, resample, to_sitk

MaskMode = Literal["template", "otsu", "both"]
# How far the template mask is grown before intersecting it with the Otsu foreground:
# about the residual error of an affine registration at the cortex.
TEMPLATE_MARGIN_MM = 4.0
TISSUE_LABELS = {1: "csf", 2: "gm", 3: "wm"}
_MAX_KMEANS_VOXELS = 200_000


def otsu_foreground(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Boolean foreground of a volume: median filter, Otsu, largest component, holes filled."""
    import SimpleITK as sitk

    img = to_sitk(np.asarray(data, dtype=np.float32), affine)
    smooth = sitk.Median(img, [1, 1, 1])
    fg = sitk.OtsuThreshold(smooth, 0, 1, 128)  # below the threshold -> 0, above -> 1
    components = sitk.RelabelComponent(sitk.ConnectedComponent(fg), sortByObjectSize=True)
    largest = sitk.BinaryThreshold(components, 1, 1, 1, 0)
    filled = sitk.BinaryFillhole(largest)
    return sitk.GetArrayFromImage(filled).transpose(2, 1, 0).astype(bool)


def template_mask_in_subject(
    data_shape: tuple[int, ...], affine: np.ndarray, registration: Registration, resolution: int
) -> np.ndarray:
    """nilearn's MNI152 brain mask mapped onto the subject's voxel grid."""
    template = mni152(resolution)
    mapped = resample(
        template.mask.astype(np.uint8),
        template.affine,
        data_shape,
        affine,
        registration.subject_to_template(),
        nearest=True,
    )
    return mapped.astype(bool)


def _grow(mask: np.ndarray, affine: np.ndarray, mm: float) -> np.ndarray:
    import SimpleITK as sitk

    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    radius = [max(1, round(mm / z)) for z in zooms]
    grown = sitk.BinaryDilate(to_sitk(mask.astype(np.uint8), affine), radius)
    return sitk.GetArrayFromImage(grown).transpose(2, 1, 0).astype(bool)


def brain_mask(
    data: np.ndarray,
    affine: np.ndarray,
    registration: Registration,
    mode: MaskMode = "both",
    resolution: int = 2,
    foreground: np.ndarray | None = None,
) -> np.ndarray:
    """The subject's brain mask on its own voxel grid (see the module docstring for modes)."""
    if mode == "otsu":
        return otsu_foreground(data, affine) if foreground is None else foreground
    template = template_mask_in_subject(data.shape, affine, registration, resolution)
    if mode == "template":
        return template
    fg = otsu_foreground(data, affine) if foreground is None else foreground
    return _grow(template, affine, TEMPLATE_MARGIN_MM) & fg


def segment_tissue(data: np.ndarray, mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """Labels (int8): 0 outside ``mask``, 1 CSF, 2 grey matter, 3 white matter (T1 order).

    k-means is fitted on at most 200,000 voxels drawn from the mask (the class centres
    are stable long before that) and then assigns every voxel in the mask.
    """
    from sklearn.cluster import KMeans

    labels = np.zeros(np.shape(data), dtype=np.int8)
    values = np.asarray(data, dtype=np.float32)[mask].reshape(-1, 1)
    if len(values) < 3 or float(values.std()) < 1e-9:
        return labels
    rng = np.random.default_rng(seed)
    sample = values[rng.choice(len(values), min(len(values), _MAX_KMEANS_VOXELS), replace=False)]
    km = KMeans(n_clusters=3, n_init=3, random_state=seed).fit(sample)
    order = np.argsort(km.cluster_centers_[:, 0])  # darkest cluster first: CSF, GM, WM
    rank = np.empty(3, dtype=np.int8)
    rank[order] = np.arange(1, 4, dtype=np.int8)
    labels[mask] = rank[km.predict(values)]
    return labels


def tissue_fractions(labels: np.ndarray) -> dict[str, float]:
    """Share of each tissue class among the labelled voxels, e.g. ``{"gm": 0.45, ...}``."""
    total = int(np.count_nonzero(labels))
    return {
        name: (float(np.count_nonzero(labels == k)) / total if total else 0.0)
        for k, name in TISSUE_LABELS.items()
    }
