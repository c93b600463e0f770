"""MNI geometry shared by the demo slices and the slices cut from real volumes.

One definition of where an axial slice sits in MNI space, so that a preprocessed NIfTI
volume (:mod:`alzstage.neuro.slices`) is drawn exactly like the demo data
(:mod:`alzstage.data.demo`), and hence like the Kaggle/OASIS slices the demo imitates.
"""

from __future__ import annotations

# Kaggle/OASIS slices are 208 (anterior-posterior) x 176 (left-right) pixels at ~1 mm; other
# image sizes keep this field of view so the brain stays centred and whole.
REFERENCE_SIZE_MM = (208.0, 176.0)
# Centre of the brain in MNI space (x, y), mm: the template's brain is not centred in y.
BRAIN_CENTRE_MM = (0.0, -17.0)
# Axial band the slices are drawn from (MNI z, mm): from the hippocampi / temporal horns up
# through the bodies of the lateral ventricles, where the Kaggle slices concentrate and
# where the demo's atrophy effects are visible (neuro.preprocess.z_range_mm defaults to it).
BAND_Z_MM = (-18.0, 40.0)


def pixel_mm(image_size: tuple[int, int]) -> float:
    """Side of a (square) pixel in mm, sized so the reference field of view fits the image."""
    height, width = int(image_size[0]), int(image_size[1])
    return max(REFERENCE_SIZE_MM[0] / height, REFERENCE_SIZE_MM[1] / width)
