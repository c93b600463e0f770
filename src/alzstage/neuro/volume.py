"""Reading NIfTI volumes: bytes in, one canonical (RAS) 3D float array out, or a clear error.

Files and uploads take the same path: the bytes are read (and gunzipped) here with a size
cap, then parsed by nibabel. Doing the decompression ourselves, instead of letting
nibabel stream a ``.nii.gz``, is what lets a truncated or damaged gzip fail *here* with a
message naming the file, rather than half-way through reading voxels, and lets a small
upload that would inflate to gigabytes be refused before it is inflated.

Every volume is reoriented to the closest canonical orientation (RAS+: voxel axes point
Right, Anterior, Superior), so later steps never have to care how the scanner stored it.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alzstage.neuro.errors import (
    CorruptVolume,
    NotAVolume,
    UnsupportedVolume,
    VolumeTooLarge,
    VoxelSizeError,
)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Fewer voxels than this along an axis is a slice or a localiser, not a brain volume.
MIN_SIDE_VOXELS = 8
DEFAULT_MAX_BYTES = 1 << 30
_GZIP_MAGIC = b"\x1f\x8b"
_HEADER_SIZES = {348: "nifti1", 540: "nifti2"}
_CONVERT_HINT = "convert the DICOM series to one 3D NIfTI (e.g. `dcm2niix -z y <dicom folder>`)"


def is_volume_path(path: Path | str) -> bool:
    """True for ``.nii`` and ``.nii.gz`` (any case): the files treated as volumes."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


@dataclass(frozen=True)
class Volume:
    """One 3D scan in canonical RAS orientation.

    ``data`` keeps non-finite voxels as they were read: whether they are an error is a
    quality rule, decided by the caller (``validate.nifti`` / predict), not by the reader.
    """

    data: np.ndarray  # float32 (x, y, z), axes pointing R, A, S
    affine: np.ndarray  # voxel index -> RAS mm, 4x4
    name: str  # the file (or upload) name, for messages
    shape_on_disk: tuple[int, ...]

    @property
    def zooms(self) -> tuple[float, float, float]:
        """Voxel size in mm along each axis."""
        return tuple(float(z) for z in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def n_nonfinite(self) -> int:
        return int(self.data.size - np.count_nonzero(np.isfinite(self.data)))


def _gunzip(raw: bytes, name: str, max_bytes: int) -> bytes:
    """Decompress a (possibly multi-member) gzip stream, refusing more than ``max_bytes``."""
    out = bytearray()
    rest = raw
    try:
        while rest:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out += d.decompress(rest, max_bytes + 1 - len(out))
            if len(out) > max_bytes:
                raise VolumeTooLarge(
                    f"{name}: decompresses to more than {max_bytes:,} bytes; if the volume is "
                    "genuine, raise neuro.preprocess.max_volume_mb (or the server's "
                    "--max-volume-mb), otherwise do not trust the file"
                )
            if not d.eof:
                raise CorruptVolume(
                    f"{name}: the gzip stream ends early (truncated file); copy or download it "
                    "again (`gzip -t` checks a .gz file)"
                )
            rest = d.unused_data.lstrip(b"\x00")
            if rest and not rest.startswith(_GZIP_MAGIC):
                break  # trailing garbage after the last member, as gzip itself tolerates
    except zlib.error as exc:
        raise CorruptVolume(
            f"{name}: the gzip data is damaged ({exc}); copy or download the file again, or "
            "re-export it (`gzip -t` checks a .gz file)"
        ) from None
    return bytes(out)


def _header_kind(data: bytes, name: str) -> str:
    if len(data) >= 4:
        for order in ("<", ">"):
            size = struct.unpack(f"{order}i", data[:4])[0]
            if size in _HEADER_SIZES:
                return _HEADER_SIZES[size]
    raise UnsupportedVolume(
        f"{name}: not a NIfTI-1 or NIfTI-2 file (no NIfTI header); give a .nii or .nii.gz "
        f"volume, or {_CONVERT_HINT}"
    )


def read_nifti(source: Path | bytes, name: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES):
    """Parse a NIfTI file or its bytes into a nibabel image, header and data size checked.

    Returns a ``nibabel`` image whose voxel data is known to be complete in memory.
    """
    import nibabel as nib

    name = name or (str(source) if isinstance(source, Path) else "upload")
    if isinstance(source, Path):
        size = source.stat().st_size
        if size > max_bytes:
            raise VolumeTooLarge(
                f"{name}: {size:,} bytes is over the limit of {max_bytes:,}; raise "
                "neuro.preprocess.max_volume_mb if the volume is genuine"
            )
        raw = source.read_bytes()
    else:
        raw = bytes(source)
    data = _gunzip(raw, name, max_bytes) if raw[:2] == _GZIP_MAGIC else raw
    kind = _header_kind(data, name)
    klass = nib.Nifti1Image if kind == "nifti1" else nib.Nifti2Image
    try:
        img = klass.from_bytes(data)
        header = img.header
        shape = tuple(int(s) for s in header.get_data_shape())
        needed = int(header.get_data_offset()) + int(np.prod(shape, dtype=np.int64)) * int(
            header.get_data_dtype().itemsize
        )
    except Exception as exc:  # nibabel raises several types for a damaged header
        raise CorruptVolume(
            f"{name}: the NIfTI header cannot be read ({type(exc).__name__}: {exc}); "
            f"re-export the volume, or {_CONVERT_HINT}"
        ) from None
    if needed > len(data):
        raise CorruptVolume(
            f"{name}: the voxel data is truncated: the header promises shape {shape} "
            f"({needed:,} bytes) but the file holds {len(data):,}; copy the file again"
        )
    return img


def _as_3d(img, name: str):
    """Drop trailing singleton axes; refuse anything that is not one 3D volume."""
    import nibabel as nib

    shape = tuple(int(s) for s in img.shape)
    if len(shape) > 3 and all(s == 1 for s in shape[3:]):
        img = nib.funcs.squeeze_image(img)
        shape = tuple(int(s) for s in img.shape)
    if len(shape) > 3:
        n = int(np.prod(shape[3:]))
        raise NotAVolume(
            f"{name}: a {len(shape)}D series of {n} volumes (shape {shape}); give one 3D "
            "volume, e.g. the first with `fslroi in.nii.gz out.nii.gz 0 1` or "
            "`nibabel.load(f).slicer[..., 0]`"
        )
    if len(shape) < 3 or min(shape) < MIN_SIDE_VOXELS:
        raise NotAVolume(
            f"{name}: shape {shape} is a 2D image or a few slices, not a 3D brain volume "
            f"(each axis needs at least {MIN_SIDE_VOXELS} voxels); {_CONVERT_HINT}, or send "
            "single slices as JPEG/PNG instead"
        )
    return img


def load_volume(
    source: Path | bytes, name: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> Volume:
    """Load one 3D NIfTI volume (path or bytes) in canonical RAS orientation.

    Raises a :class:`~alzstage.neuro.errors.VolumeError` subclass whose message names
    the file and says how to fix it.
    """
    import nibabel as nib

    name = name or (str(source) if isinstance(source, Path) else "upload")
    img = _as_3d(read_nifti(source, name, max_bytes), name)
    shape_on_disk = tuple(int(s) for s in img.shape)
    affine = np.asarray(img.affine, dtype=np.float64)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.all(np.isfinite(affine)) or np.any(zooms <= 1e-6):
        raise VoxelSizeError(
            f"{name}: the header's voxel-to-world matrix is invalid (voxel sizes "
            f"{np.round(zooms, 4).tolist()} mm); fix pixdim/sform/qform in the header, or "
            f"{_CONVERT_HINT}"
        )
    try:
        img = nib.as_closest_canonical(img)
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:  # damaged voxel data surfaces here
        raise CorruptVolume(
            f"{name}: the voxel data cannot be read ({type(exc).__name__}: {exc}); copy the "
            "file again or re-export it"
        ) from None
    return Volume(
        data=data,
        affine=np.asarray(img.affine, dtype=np.float64),
        name=name,
        shape_on_disk=shape_on_disk,
    )
