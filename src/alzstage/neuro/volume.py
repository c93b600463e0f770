"""Reading NIfTI volumes: bytes in, one canonical (RAS) 3D float array out, or a clear error.

Files and uploads take the same path, and it is built so that memory is decided by the
header, not by what a file claims once it is unpacked (issue 16: a 249 KB ``.nii.gz``
of a 640^3 volume took a server from 1.8 to 8.4 GB):

1. the first bytes are inflated and the header parsed; its dimensions and data type are
   checked (one 3D scalar volume, at most ``max_voxels`` voxels, at most ``max_bytes``)
   *before* any voxel is inflated;
2. exactly the bytes the header promises are inflated (a truncated or damaged gzip
   fails here, naming the file), and viewed as the voxel array without a copy;
3. the voxels become one float32 array (scaled as the header says), the bytes are
   dropped, and the volume is turned to the closest canonical orientation (RAS+: axes
   point Right, Anterior, Superior), so later steps never care how the scanner stored it;
4. a volume finer than 1 mm is resampled to 1 mm at once (:data:`WORKING_VOXEL_MM`):
   slices are cut at 1 mm and registration runs at 2 mm, so finer voxels would only
   multiply the memory and time of every later step.

Peak memory is then about ``voxels x (bytes per voxel + 4)`` plus the 1 mm copy.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alzstage.errors import UnsupportedVolume, VolumeError, VolumeTooLarge

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Fewer voxels than this along an axis is a slice or a localiser, not a brain volume.
MIN_SIDE_VOXELS = 8
DEFAULT_MAX_BYTES = 1 << 30
# 2^25 = 33.5 M voxels (256 x 256 x 512): twice a 1 mm 256^3 head. Real T1 scans fit with
# room to spare (ADNI MPRAGE 256 x 256 x 170 = 11 M, HCP 0.7 mm 260 x 311 x 260 = 21 M);
# the 640^3 of issue 16 (262 M) does not. Float32 of the largest admitted volume: 134 MB.
DEFAULT_MAX_VOXELS = 2**25
# Volumes with finer voxels are resampled to this (mm) right after loading.
WORKING_VOXEL_MM = 1.0
_RESAMPLE_BELOW_MM = 0.95  # a 0.96 mm scan is "1 mm": resampling it would only blur it
_GZIP_MAGIC = b"\x1f\x8b"
_HEADER_SIZES = {348: "nifti1", 540: "nifti2"}
_CONVERT_HINT = "convert the DICOM series to one 3D NIfTI (e.g. `dcm2niix -z y <dicom folder>`)"
_RESAMPLE_HINT = "resample it to 1 mm first (e.g. `mri_convert -vs 1 1 1 in.nii.gz out.nii.gz`)"


def is_volume_path(path: Path | str) -> bool:
    """True for ``.nii`` and ``.nii.gz`` (any case): the files treated as volumes."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


@dataclass(frozen=True)
class Volume:
    """One 3D scan in canonical RAS orientation.

    ``data`` keeps non-finite voxels as they were read: whether they are an error is a
    quality rule, decided by the caller (``validate.nifti`` / predict), not by the reader.
    A volume resampled to 1 mm had them counted first (``nonfinite``) and set to 0, so
    that interpolation could not spread them.
    """

    data: np.ndarray  # float32 (x, y, z), axes pointing R, A, S
    affine: np.ndarray  # voxel index -> RAS mm, 4x4
    name: str  # the file (or upload) name, for messages
    shape_on_disk: tuple[int, ...]
    zooms_on_disk: tuple[float, float, float] | None = None  # None: not resampled
    nonfinite: int | None = None  # counted before resampling; None: count ``data``

    @property
    def zooms(self) -> tuple[float, float, float]:
        """Voxel size in mm along each axis (of ``data``, after any resampling)."""
        return tuple(float(z) for z in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def voxel_mm_on_disk(self) -> tuple[float, float, float]:
        """Voxel size in mm as the file stored it: what the voxel-size rule judges."""
        return self.zooms_on_disk or self.zooms

    @property
    def n_nonfinite(self) -> int:
        if self.nonfinite is not None:
            return self.nonfinite
        return int(self.data.size - np.count_nonzero(np.isfinite(self.data)))


# --------------------------------------------------------------------------- bytes


def _inflate(raw: bytes, name: str, limit: int) -> bytearray:
    """The first ``limit`` bytes of a (possibly multi-member) gzip stream, and no more.

    Stopping at ``limit`` is what makes a gzip bomb harmless: nothing past what the
    header needs is ever inflated. Fewer bytes than ``limit`` only when the stream ends.
    """
    out = bytearray()
    rest = raw
    try:
        while rest and len(out) < limit:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out += d.decompress(rest, limit - len(out))
            if len(out) >= limit:
                break
            if not d.eof:
                raise VolumeError(
                    f"{name}: the gzip stream ends early (truncated file); copy or download it "
                    "again (`gzip -t` checks a .gz file)",
                    check="unreadable",
                )
            rest = d.unused_data.lstrip(b"\x00")
            if rest and not rest.startswith(_GZIP_MAGIC):
                break  # trailing garbage after the last member, as gzip itself tolerates
    except zlib.error as exc:
        raise VolumeError(
            f"{name}: the gzip data is damaged ({exc}); copy or download the file again, or "
            "re-export it (`gzip -t` checks a .gz file)",
            check="unreadable",
        ) from None
    return out


def _header_kind(data: bytes, name: str) -> str:
    if len(data) >= 4:
        for order in ("<", ">"):
            size = struct.unpack(f"{order}i", bytes(data[:4]))[0]
            if size in _HEADER_SIZES:
                return _HEADER_SIZES[size]
    raise UnsupportedVolume(
        f"{name}: not a NIfTI-1 or NIfTI-2 file (no NIfTI header); give a .nii or .nii.gz "
        f"volume, or {_CONVERT_HINT}"
    )


def _parse_header(head: bytes | bytearray, name: str) -> Any:
    """The nibabel header of the first bytes of a NIfTI file (no voxel is touched)."""
    import nibabel as nib

    kind = _header_kind(head, name)
    klass = nib.Nifti1Header if kind == "nifti1" else nib.Nifti2Header
    size = 348 if kind == "nifti1" else 540
    if len(head) < size:
        raise VolumeError(
            f"{name}: the file ends inside the NIfTI header ({len(head)} bytes); copy the "
            "file again",
            check="unreadable",
        )
    try:
        header = klass(bytes(head[:size]), check=True)
        magic = bytes(header["magic"]).rstrip(b"\x00")
        header.get_data_shape()
    except Exception as exc:  # nibabel raises several types for a damaged header
        raise VolumeError(
            f"{name}: the NIfTI header cannot be read ({type(exc).__name__}: {exc}); "
            f"re-export the volume, or {_CONVERT_HINT}",
            check="unreadable",
        ) from None
    if magic not in (b"n+1", b"n+2"):
        raise UnsupportedVolume(
            f"{name}: a NIfTI header/image pair (magic {magic!r}), whose voxels live in a "
            "separate .img file; convert it to a single .nii.gz (e.g. `fslchfiletype "
            "NIFTI_GZ in.hdr`)"
        )
    return header


def check_header(
    header: Any, name: str, max_bytes: int, max_voxels: int
) -> tuple[tuple[int, int, int], np.dtype, int]:
    """(3D shape, dtype, bytes needed up to the last voxel) of an acceptable header.

    Every refusal here happens before a voxel is inflated or read.
    """
    shape = tuple(int(s) for s in header.get_data_shape())
    if len(shape) > 3 and any(s != 1 for s in shape[3:]):
        n = int(np.prod(shape[3:]))
        raise VolumeError(
            f"{name}: a {len(shape)}D series of {n} volumes (shape {shape}); give one 3D "
            "volume, e.g. the first with `fslroi in.nii.gz out.nii.gz 0 1` or "
            "`nibabel.load(f).slicer[..., 0]`",
            check="not_3d",
        )
    shape = shape[:3]
    if len(shape) < 3 or min(shape) < MIN_SIDE_VOXELS:
        raise VolumeError(
            f"{name}: shape {shape} is a 2D image or a few slices, not a 3D brain volume "
            f"(each axis needs at least {MIN_SIDE_VOXELS} voxels); {_CONVERT_HINT}, or send "
            "single slices as JPEG/PNG instead",
            check="not_3d",
        )
    dtype = np.dtype(header.get_data_dtype())
    if dtype.kind not in "uif" or dtype.itemsize > 8:
        raise UnsupportedVolume(
            f"{name}: voxel data type {dtype} is not a scalar intensity (e.g. RGB or "
            "complex); give a T1-weighted volume of integer or float voxels"
        )
    voxels = int(np.prod(shape, dtype=np.int64))
    if voxels > max_voxels:
        raise VolumeTooLarge(
            f"{name}: the header declares {'x'.join(map(str, shape))} = {voxels:,} voxels, "
            f"over the limit of {max_voxels:,} (a whole head at 1 mm is ~16.8 M); "
            f"{_RESAMPLE_HINT}, or do not trust the file"
        )
    needed = int(header.get_data_offset()) + voxels * dtype.itemsize
    if needed > max_bytes:
        raise VolumeTooLarge(
            f"{name}: decompresses to {needed:,} bytes, over the limit of {max_bytes:,}; if "
            "the volume is genuine, raise neuro.preprocess.max_volume_mb (or the server's "
            "--max-volume-mb), otherwise do not trust the file"
        )
    return (shape[0], shape[1], shape[2]), dtype, needed


def _voxels(
    source: Path | bytes, name: str, max_bytes: int, max_voxels: int
) -> tuple[np.ndarray, np.ndarray]:
    """(float32 voxels in file order, affine): header first, then exactly its bytes."""
    if isinstance(source, Path):
        size = source.stat().st_size
        if size > max_bytes:
            raise VolumeTooLarge(
                f"{name}: {size:,} bytes is over the limit of {max_bytes:,}; raise "
                "neuro.preprocess.max_volume_mb if the volume is genuine"
            )
        raw = source.read_bytes()
    else:
        raw = source
    gz = raw[:2] == _GZIP_MAGIC
    header = _parse_header(_inflate(raw, name, 540) if gz else raw[:540], name)
    shape, dtype, needed = check_header(header, name, max_bytes, max_voxels)
    data = _inflate(raw, name, needed) if gz else raw
    del raw
    if needed > len(data):
        raise VolumeError(
            f"{name}: the voxel data is truncated: the header promises shape {shape} "
            f"({needed:,} bytes) but the file holds {len(data):,}; copy the file again",
            check="unreadable",
        )
    offset = int(header.get_data_offset())
    count = int(np.prod(shape))
    stored = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape, order="F")
    voxels = stored.astype(np.float32)  # the one copy; keeps Fortran order like nibabel
    del stored, data
    slope, inter = header.get_slope_inter()
    if slope is not None and slope != 1:
        voxels *= np.float32(slope)
    if inter is not None and inter != 0:
        voxels += np.float32(inter)
    return voxels, np.asarray(header.get_best_affine(), dtype=np.float64)


def read_nifti(source: Path | bytes, name: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES):
    """The header of a NIfTI file or its bytes, checked (for callers that want metadata)."""
    name = name or (str(source) if isinstance(source, Path) else "upload")
    raw = source.read_bytes() if isinstance(source, Path) else source
    head = _inflate(raw, name, 540) if raw[:2] == _GZIP_MAGIC else raw[:540]
    return _parse_header(head, name)


def resample_to(
    data: np.ndarray, affine: np.ndarray, voxel_mm: float = WORKING_VOXEL_MM
) -> tuple[np.ndarray, np.ndarray]:
    """Axes finer than ``voxel_mm`` resampled to it (linear, anti-aliased); others kept.

    The first voxel's centre stays where it is, so the new affine is the old one times a
    diagonal scale: no resampling error in the geometry, only in the intensities.
    """
    from scipy import ndimage

    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    step = np.where(zooms < voxel_mm * _RESAMPLE_BELOW_MM, voxel_mm / zooms, 1.0)
    if np.all(step == 1.0):
        return data, affine
    shape = tuple(int(np.floor((n - 1) / s)) + 1 for n, s in zip(data.shape, step, strict=True))
    # Blur by about half the step first (as skimage's anti_aliasing), in place.
    sigma = np.maximum(0.0, (step - 1.0) / 2.0)
    ndimage.gaussian_filter(data, sigma=sigma, output=data, mode="nearest")
    out = ndimage.affine_transform(
        data, np.diag(step), output_shape=shape, order=1, mode="nearest", output=np.float32
    )
    return np.asfortranarray(out), affine @ np.diag([*step, 1.0])


def load_volume(
    source: Path | bytes,
    name: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> Volume:
    """Load one 3D NIfTI volume (path or bytes) in canonical RAS orientation, at most 1 mm.

    Raises a :class:`~alzstage.errors.VolumeError` (its ``check`` says which) whose message names
    the file and says how to fix it; size refusals come from the header alone.
    """
    import nibabel as nib

    name = name or (str(source) if isinstance(source, Path) else "upload")
    data, affine = _voxels(source, name, max_bytes, max_voxels)
    shape_on_disk = tuple(int(s) for s in data.shape)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.all(np.isfinite(affine)) or np.any(zooms <= 1e-6):
        raise VolumeError(
            f"{name}: the header's voxel-to-world matrix is invalid (voxel sizes "
            f"{np.round(zooms, 4).tolist()} mm); fix pixdim/sform/qform in the header, or "
            f"{_CONVERT_HINT}",
            check="voxel_size",
        )
    ornt = nib.orientations.io_orientation(affine)
    data = nib.orientations.apply_orientation(data, ornt)  # flips and transposes: views
    affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape_on_disk)
    zooms_on_disk = None
    nonfinite = None
    if np.any(zooms < WORKING_VOXEL_MM * _RESAMPLE_BELOW_MM):
        zooms_on_disk = tuple(float(z) for z in np.linalg.norm(affine[:3, :3], axis=0))
        finite = np.isfinite(data)
        nonfinite = int(data.size - np.count_nonzero(finite))
        if nonfinite:
            data[~finite] = 0.0
        del finite
        data, affine = resample_to(data, affine)
    return Volume(
        data=data,
        affine=np.asarray(affine, dtype=np.float64),
        name=name,
        shape_on_disk=shape_on_disk,
        zooms_on_disk=zooms_on_disk,  # type: ignore[arg-type]
        nonfinite=nonfinite,
    )
