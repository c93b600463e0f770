"""Neuroimaging input: NIfTI volumes to the 2D model's slices (issue #7, docs/neuro.md).

Modules, in the order a volume meets them: ``volume`` (read, RAS), ``intensity``
(clip, normalise, 8-bit), ``register`` (SimpleITK affine to MNI152), ``mask`` (brain,
tissue), ``slices`` (axial MNI slices on the grid of ``space``, the MNI geometry the demo
shares), ``preprocess`` (all of it), ``qc`` (rules shared by validate and predict). The
``nifti`` data source that runs them is :mod:`alzstage.data.sources.nifti`: neuro imports
nothing from data, model or serve.
Nothing heavy is imported here: nibabel, SimpleITK and scikit-learn load on first use.
"""
