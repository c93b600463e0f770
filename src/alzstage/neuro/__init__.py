"""Neuroimaging input: NIfTI volumes to the 2D model's slices (issue #7, docs/neuro.md).

Modules, in the order a volume meets them: ``volume`` (read, RAS), ``intensity``
(clip, normalise, 8-bit), ``register`` (SimpleITK affine to MNI152), ``mask`` (brain,
tissue), ``slices`` (axial MNI slices, demo conventions), ``preprocess`` (all of it),
``qc`` (rules shared by validate and predict), ``dataset`` (the ``nifti`` data source).
Nothing heavy is imported here: nibabel, SimpleITK and scikit-learn load on first use.
"""
