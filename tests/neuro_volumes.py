"""Synthetic NIfTI volumes for the neuro tests: the real MNI152 T1 shipped by nilearn,
moved by a known affine, resampled to a coarse grid and intensity-modulated.

Coarse grids (3-4 mm) keep registration at a second or two on a shared 2-core machine.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def rotation(degrees: tuple[float, float, float]) -> np.ndarray:
    """Rotation matrix for x, y, z Euler angles in degrees (extrinsic, x first)."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz", degrees, degrees=True).as_matrix()


def moved_affine(
    degrees: tuple[float, float, float] = (0.0, 0.0, 0.0),
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    scale: float = 1.0,
    centre: tuple[float, float, float] = (0.0, -17.0, 5.0),
) -> np.ndarray:
    """4x4 map from a subject point to the template point it shows (about ``centre``)."""
    lin = rotation(degrees) * scale
    c = np.asarray(centre, dtype=float)
    a = np.eye(4)
    a[:3, :3] = lin
    a[:3, 3] = c + np.asarray(shift_mm, dtype=float) - lin @ c
    return a


def synthetic_volume(
    subject_to_template: np.ndarray | None = None,
    resolution: float = 4.0,
    gain: float = 900.0,
    bias: float = 0.0,
    atrophy: float = 0.0,
    seed: int = 0,
    noise: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(data, RAS affine) of the MNI152 T1 seen through ``subject_to_template``.

    ``bias`` adds a linear intensity gradient along x (coil inhomogeneity); ``atrophy``
    darkens the tissue nearest the template's CSF, a crude stand-in for disease.
    """
    import SimpleITK as sitk

    from alzstage.neuro.register import affine_transform, from_sitk, mni152, to_sitk

    tpl = mni152(1)
    t1 = tpl.t1.copy()
    if atrophy > 0:
        t1 = np.where((t1 > 0.05) & (t1 < 0.45 + 0.2 * atrophy), t1 * (1 - atrophy), t1)
    matrix = np.eye(4) if subject_to_template is None else subject_to_template
    margin = 16.0
    extent = np.array(t1.shape) * 1.0 + 2 * margin
    shape = tuple(int(np.ceil(e / resolution)) for e in extent)
    affine = np.diag([resolution, resolution, resolution, 1.0])
    affine[:3, 3] = tpl.affine[:3, 3] - margin
    ref = to_sitk(np.zeros(shape, np.uint8), affine)
    moved = sitk.Resample(
        to_sitk(t1, tpl.affine),
        ref,
        affine_transform(matrix),
        sitk.sitkLinear,
        0.0,
        sitk.sitkFloat32,
    )
    data = from_sitk(moved).astype(np.float64)
    x = np.linspace(-1.0, 1.0, shape[0])[:, None, None]
    data = data * gain * (1.0 + bias * x)
    if noise:
        rng = np.random.default_rng(seed)
        data = data + rng.normal(0, noise * gain, data.shape) * (data > 0)
    return data.astype(np.float32), affine


def save_nifti(
    path: Path, data: np.ndarray, affine: np.ndarray, flip_x: bool = False, dtype=np.int16
) -> Path:
    """Write a NIfTI; ``flip_x`` stores it in LAS order, so loading must reorient it."""
    import nibabel as nib

    if flip_x:
        data = data[::-1]
        affine = affine.copy()
        affine[0, 3] = affine[0, 3] + (data.shape[0] - 1) * affine[0, 0]
        affine[0, 0] = -affine[0, 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data).astype(dtype), affine), path)
    return path


def corrupt_gzip(path: Path, source: Path) -> Path:
    """A .nii.gz whose compressed stream is cut in the middle."""
    blob = source.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    return path


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data)


def header_bomb(path: Path, shape: tuple[int, ...], dtype=np.uint8) -> Path:
    """A .nii.gz with a valid header declaring ``shape`` and that many zero voxels.

    Tiny on disk (zeros compress ~1000:1), huge once inflated: issue 16's 640^3 volume
    was 249 KB. Written in chunks, so making it never holds the voxels in memory.
    """
    import zlib

    import nibabel as nib

    header = nib.Nifti1Image(np.zeros((1, 1, 1), dtype), np.eye(4)).header
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_data_offset(352)
    n_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(16 << 20)
    with open(path, "wb") as f:
        f.write(z.compress(header.binaryblock + b"\x00" * 4))
        left = n_bytes
        while left > 0:
            f.write(z.compress(chunk[: min(left, len(chunk))]))
            left -= len(chunk)
        f.write(z.flush())
    return path
