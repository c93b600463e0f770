"""Errors for NIfTI inputs, each naming the file and saying how to fix it.

They extend :class:`alzstage.errors.ImageReadError`, so everything that already
handles an unreadable slice (``alzstage predict`` error rows, the REST API's per-file
``status``) handles an unusable volume the same way. This module imports nothing heavy:
the CLI and the API catch these without loading nibabel or SimpleITK.
"""

from __future__ import annotations

from alzstage.errors import ImageReadError


class VolumeError(ImageReadError):
    """A NIfTI volume that cannot be turned into slices (HTTP 422).

    ``check`` is the short reason code used in the QC table and the quarantine lists.
    """

    status = 422
    check = "volume_error"


class MissingVolume(VolumeError):
    """A volume listed in the subjects CSV is not on disk."""

    check = "missing_file"


class UnsupportedVolume(VolumeError):
    """Not a NIfTI-1/NIfTI-2 file at all (HTTP 415)."""

    status = 415
    check = "unreadable"


class CorruptVolume(VolumeError):
    """A NIfTI file whose gzip stream, header or voxel data is damaged."""

    check = "unreadable"


class VolumeTooLarge(VolumeError):
    """Decompresses to more than the configured limit (a gzip bomb, or a 4D series)."""

    status = 413
    check = "too_large"


class NotAVolume(VolumeError):
    """Not a single 3D volume: a 2D image, a single slice, or a 4D series of several."""

    check = "not_3d"


class NonFiniteVolume(VolumeError):
    """Voxels that are NaN or infinite (a broken conversion or a division by zero)."""

    check = "nonfinite"


class VoxelSizeError(VolumeError):
    """Voxels outside the accepted size range (thick clinical slices, broken header)."""

    check = "voxel_size"


class EmptyBrainMask(VolumeError):
    """Nothing that looks like a brain was found (blank image, wrong contrast)."""

    check = "empty_brain_mask"


class RegistrationFailed(VolumeError):
    """Affine registration to MNI152 did not converge or matched the template poorly."""

    check = "registration"
