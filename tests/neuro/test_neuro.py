"""alzstage.neuro: loading, registration, brain mask, slices, and every kind of bad volume.

All volumes are made here from the real MNI152 T1 that nilearn ships, moved by known
transforms and resampled to coarse 3-4 mm grids so registration takes a second or two.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from neuro_volumes import (
    corrupt_gzip,
    header_bomb,
    moved_affine,
    save_nifti,
    synthetic_volume,
)

from alzstage.config import ConfigError, NeuroPreprocessParams, NiftiQCParams, Params, parse_params
from alzstage.errors import ImageReadError, UnsupportedVolume, VolumeError, VolumeTooLarge
from alzstage.neuro.preprocess import preprocess_volume
from alzstage.neuro.qc import volume_rules
from alzstage.neuro.volume import is_volume_path, load_volume

FAST = NeuroPreprocessParams(registration_resolution=3, n_slices=8)
SIZE = (208, 176)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def template_scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MNI152 T1 itself at 4 mm, stored flipped (LAS) to exercise reorientation."""
    data, affine = synthetic_volume(resolution=4.0)
    return save_nifti(tmp_path_factory.mktemp("vol") / "mni.nii.gz", data, affine, flip_x=True)


# --------------------------------------------------------------------------- loading


def test_load_reorients_to_ras_and_keeps_values(template_scan: Path) -> None:
    vol = load_volume(template_scan)
    stored = nib.load(template_scan)
    assert nib.aff2axcodes(stored.affine) == ("L", "A", "S")
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    np.testing.assert_allclose(vol.zooms, (4.0, 4.0, 4.0))
    # Same voxel in world space before and after reorientation.
    ijk = np.array([10, 20, 15])
    world = vol.affine @ np.r_[ijk, 1.0]
    src = np.rint(np.linalg.solve(stored.affine, world)[:3]).astype(int)
    assert vol.data[tuple(ijk)] == pytest.approx(float(stored.get_fdata()[tuple(src)]))
    assert load_volume(template_scan.read_bytes(), name="up.nii.gz").data.shape == vol.data.shape


def test_plain_nii_and_4d_with_one_volume_load(tmp_path: Path) -> None:
    data, affine = synthetic_volume(resolution=4.0)
    plain = save_nifti(tmp_path / "a.nii", data[..., None], affine)
    assert load_volume(plain).data.ndim == 3
    assert is_volume_path("X.NII.GZ") and is_volume_path("x.nii") and not is_volume_path("x.png")


# --------------------------------------------------------------------------- registration


@pytest.mark.parametrize(
    ("degrees", "shift", "scale", "voxel_mm"),
    [
        ((8.0, -6.0, 10.0), (7.0, -9.0, 5.0), 1.06, 3.0),
        ((-5.0, 4.0, -12.0), (-10.0, 6.0, -4.0), 0.95, 3.0),
        # Finer than the 3 mm registration grid: block-averaged before registering.
        ((3.0, 7.0, -4.0), (-4.0, -8.0, 9.0), 1.02, 1.5),
    ],
)
def test_registration_recovers_a_known_transform(
    tmp_path: Path, degrees: tuple, shift: tuple, scale: float, voxel_mm: float
) -> None:
    from alzstage.neuro.register import register_to_mni

    truth = moved_affine(degrees, shift, scale)  # subject point -> template point
    data, affine = synthetic_volume(truth, resolution=voxel_mm, gain=700.0, bias=0.15)
    vol = load_volume(save_nifti(tmp_path / "s.nii.gz", data, affine))
    reg = register_to_mni(vol.data, vol.affine, "s", resolution=3)
    residual = truth @ reg.matrix  # template -> subject -> template: identity if recovered
    u, singular, vt = np.linalg.svd(residual[:3, :3])
    angle = np.degrees(np.arccos(np.clip((np.trace(u @ vt) - 1) / 2, -1, 1)))
    assert angle < 2.0
    assert np.all(np.abs(singular - 1.0) < 0.03)
    for point in ([0, -17, 5], [40, 20, 30], [-40, -60, -10]):  # centre and far cortex
        p = np.r_[point, 1.0]
        assert np.linalg.norm((residual @ p - p)[:3]) < 2.5
    assert reg.score > 0.8


def test_registration_score_exposes_a_misaligned_volume() -> None:
    from alzstage.neuro.register import mni152, registration_score

    tpl = mni152(3)
    assert registration_score(tpl.t1, tpl) == pytest.approx(1.0)
    shifted = np.roll(tpl.t1, 12, axis=1)  # 36 mm: anatomy in the wrong place
    upside_down = tpl.t1[:, :, ::-1]
    assert registration_score(shifted, tpl) < 0.5
    assert registration_score(upside_down, tpl) < 0.5


# --------------------------------------------------------------------------- mask, tissue


def test_brain_mask_covers_the_template_brain() -> None:
    """On the template itself (3 mm grid) every mask mode matches nilearn's brain mask."""
    from alzstage.neuro.mask import brain_mask, segment_tissue
    from alzstage.neuro.register import mni152, register_to_mni

    tpl = mni152(3)
    reg = register_to_mni(tpl.t1 * 1000.0, tpl.affine, "mni", resolution=3)
    for mode, threshold in (("both", 0.9), ("template", 0.9), ("otsu", 0.85)):
        mask = brain_mask(tpl.t1, tpl.affine, reg, mode, resolution=3)
        assert dice(mask, tpl.mask) > threshold, mode
    # Tissue classes: white matter agrees with nilearn's WM template.
    from nilearn.datasets import load_mni152_wm_template

    wm_template = load_mni152_wm_template(resolution=3).get_fdata() > 0.5
    labels = segment_tissue(tpl.t1, tpl.mask)
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    assert dice(labels == 3, wm_template) > 0.7


def test_mask_of_a_moved_scan_maps_back_onto_the_template_brain(tmp_path: Path) -> None:
    from alzstage.neuro.mask import brain_mask
    from alzstage.neuro.register import mni152, register_to_mni, resample

    truth = moved_affine((6.0, 0.0, -8.0), (5.0, 4.0, -3.0), 1.04)
    data, affine = synthetic_volume(truth, resolution=3.0)
    reg = register_to_mni(data, affine, "s", resolution=3)
    mask = brain_mask(data, affine, reg, "both", resolution=3)
    tpl = mni152(3)
    back = resample(mask.astype(np.uint8), affine, tpl.t1.shape, tpl.affine, reg.matrix, True)
    assert dice(back, tpl.mask) > 0.85


# --------------------------------------------------------------------------- slices


def test_slices_are_in_the_training_format_and_orientation(template_scan: Path) -> None:
    out = preprocess_volume(template_scan, FAST, SIZE)
    assert out.slices.shape == (8, *SIZE) and out.slices.dtype == np.uint8
    np.testing.assert_allclose(out.z_mm, np.linspace(-18, 40, 8))
    s = out.slices[4]
    assert s[0, :].max() == 0 and s[:, 0].max() == 0  # black background, brain inside
    rows = np.flatnonzero(s.max(axis=1))
    assert rows[0] > 10 and rows[-1] < SIZE[0] - 10
    # Orientation: the slice must match the template drawn straight onto the demo's grid
    # (anterior at the top) far better than its own upside-down copy does.
    from alzstage.neuro.register import mni152
    from alzstage.neuro.slices import sample_slices

    tpl = mni152(1)
    ref = sample_slices(tpl.t1, tpl.affine, np.eye(4), SIZE, out.z_mm)
    inside = s > 0
    corr = np.corrcoef(s[inside].astype(float), ref[4][inside])[0, 1]
    flipped = np.corrcoef(s[::-1][inside].astype(float), ref[4][inside])[0, 1]
    assert corr > 0.85 and corr > flipped + 0.3
    assert out.qc["registration_score"] > 0.8 and out.qc["brain_ml"] > 1000
    assert set(out.timings) == {"load", "normalise", "register", "mask", "slice"}


def test_slice_grid_follows_the_demo_orientation() -> None:
    """Image top = anterior (+y), image left = patient's right (+x), as demo.render_subject."""
    from alzstage.neuro.slices import slice_grid
    from alzstage.neuro.space import BRAIN_CENTRE_MM

    shape, affine = slice_grid(SIZE, np.array([0.0, 2.0]))
    assert shape == (176, 208, 2)
    top_left = affine @ np.array([0, 0, 0, 1.0])
    bottom_right = affine @ np.array([175, 207, 1, 1.0])
    assert top_left[0] > BRAIN_CENTRE_MM[0] > bottom_right[0]  # right ... left
    assert top_left[1] > BRAIN_CENTRE_MM[1] > bottom_right[1]  # anterior ... posterior
    assert (top_left[2], bottom_right[2]) == (0.0, 2.0)


def test_uint8_mapping_matches_the_demo_slices() -> None:
    """The constants in alzstage.neuro.intensity are the demo's brain-pixel statistics."""
    from alzstage.data import demo
    from alzstage.neuro.intensity import DEMO_BRAIN_MEAN, DEMO_BRAIN_RANGE, DEMO_BRAIN_SD

    values = []
    for ci, severity in enumerate((0.0, 0.33, 0.67, 1.0)):
        rng = np.random.default_rng(np.random.SeedSequence([42, ci, 0]))
        s = demo.render_subject(demo._draw_subject(rng, severity, 30), rng, 30, SIZE)
        values.append(s[s > 0])
    v = np.concatenate(values).astype(float)
    assert abs(v.mean() - DEMO_BRAIN_MEAN) < 8 and abs(v.std() - DEMO_BRAIN_SD) < 8
    lo, hi = np.percentile(v, [0.5, 99.5])
    # Per-subject gain (0.86-0.92) moves the top percentile by about +-8 grey levels.
    assert abs(lo - DEMO_BRAIN_RANGE[0]) < 15 and abs(hi - DEMO_BRAIN_RANGE[1]) < 15


def test_normalisation_methods() -> None:
    from alzstage.neuro.intensity import normalise_intensity, to_uint8

    rng = np.random.default_rng(0)
    data = rng.normal(500, 100, (20, 20, 20)).astype(np.float32)
    data[0, 0, 0] = 1e6  # a hot voxel must not set the scale
    mask = np.ones(data.shape, bool)
    z = normalise_intensity(data, mask, "zscore", (1, 99))
    assert abs(z[mask].mean()) < 1e-3 and abs(z[mask].std() - 1) < 1e-3
    m = normalise_intensity(data, mask, "minmax", (1, 99))
    assert m.min() == 0.0 and m.max() == 1.0
    assert np.percentile(m, 50) == pytest.approx(0.5, abs=0.05)
    assert to_uint8(np.array([0.0]), "zscore")[0] == 128
    assert tuple(to_uint8(np.array([0.0, 1.0]), "minmax")) == (1, 248)


# --------------------------------------------------------------------------- speed vs fidelity


def test_fast_defaults_agree_with_the_reference_settings(tmp_path: Path) -> None:
    """The tuned speed knobs give the slices, score and QC verdict of the old settings.

    docs/neuro.md#speed-and-fidelity: per-slice NCC >= 0.98, |score change| <= 0.01, the
    same verdict on every validate.nifti rule (benchmarks/bench_neuro.py --compare is
    the 1 mm version of this, with timings).
    """
    from alzstage.neuro.preprocess import REFERENCE_PARAMS
    from alzstage.neuro.qc import rule_failure
    from alzstage.neuro.slices import slice_ncc

    # given a 2 mm head, moved, with a bias field and noise, and 3 NaN voxels (QC fails)
    truth = moved_affine((6.0, -4.0, 9.0), (-6.0, 5.0, 4.0), 1.04)
    data, affine = synthetic_volume(truth, resolution=2.0, bias=0.2, noise=0.03)
    data[2, 3, 4:7] = np.nan
    f = save_nifti(tmp_path / "s.nii.gz", data, affine, dtype=np.float32)
    fast = NeuroPreprocessParams(registration_resolution=3, n_slices=8)
    reference = fast.model_copy(update=REFERENCE_PARAMS)
    assert fast.registration_gradient_filter != reference.registration_gradient_filter
    # when both preprocess it
    new, old = preprocess_volume(f, fast, SIZE), preprocess_volume(f, reference, SIZE)
    # then the slices, the score and every rule's verdict agree
    assert slice_ncc(new.slices, old.slices).min() >= 0.98
    assert abs(new.qc["registration_score"] - old.qc["registration_score"]) <= 0.01
    rules = volume_rules(NiftiQCParams())
    verdicts = [
        [rule_failure(r, out.qc.get(r.column)) is None for r in rules] for out in (new, old)
    ]
    assert verdicts[0] == verdicts[1] == [True, True, False, True, True]  # only the NaNs fail
    assert new.qc["brain_ml"] == pytest.approx(old.qc["brain_ml"], rel=0.01)
    for tissue in ("csf", "gm", "wm"):
        assert new.qc[f"{tissue}_fraction"] == pytest.approx(old.qc[f"{tissue}_fraction"], abs=0.02)


def test_registration_settings_come_from_the_params_and_repeat_exactly() -> None:
    from alzstage.neuro.register import RegistrationSettings, mni152, register_to_mni

    assert RegistrationSettings.from_params(NeuroPreprocessParams()) == RegistrationSettings()
    # A fixed sampling seed: the same volume gets the same transform every time (seed 0
    # would be SimpleITK's wall clock, and the transform moved between runs).
    tpl = mni152(3)
    moved = np.roll(tpl.t1, (2, -1, 1), axis=(0, 1, 2)) * 800.0
    first = register_to_mni(moved, tpl.affine, "a", 3)
    again = register_to_mni(moved, tpl.affine, "a", 3)
    np.testing.assert_allclose(first.matrix, again.matrix, atol=1e-6)


def test_foreground_majority_vote_is_the_median_filter_exactly() -> None:
    """foreground_stride > 1 skips the median image: median > t <=> >= 14 of 27 above t."""
    import SimpleITK as sitk

    from alzstage.neuro.mask import _majority, _strided_median, otsu_foreground

    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 100.0, (23, 19, 17)).astype(np.float32)
    median = sitk.GetArrayFromImage(sitk.Median(sitk.GetImageFromArray(x), [1, 1, 1]))
    np.testing.assert_array_equal(_strided_median(x, 1, chunk=5), median)  # edges as ITK
    np.testing.assert_array_equal(_strided_median(x, 2), median[::2, ::2, ::2])
    for t in (150.0, 200.0, 260.0):
        np.testing.assert_array_equal(_majority(x > np.float32(t)), median > np.float32(t))
    # On a head, the threshold from every 2nd voxel per axis gives the same foreground.
    data, affine = synthetic_volume(moved_affine((5.0, 0.0, -5.0)), resolution=2.0, noise=0.05)
    every = otsu_foreground(data, affine, stride=1)
    assert dice(otsu_foreground(data, affine, stride=2), every) > 0.999


def test_tissue_kmeans_on_the_histogram_is_kmeans_on_the_voxels() -> None:
    from sklearn.cluster import KMeans

    from alzstage.neuro.mask import TISSUE_BINS, segment_tissue, tissue_fractions

    # given three tissue-like intensity classes (CSF < GM < WM on T1)
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [rng.normal(300, 60, 20_000), rng.normal(600, 50, 45_000), rng.normal(800, 40, 35_000)]
    ).astype(np.float32)
    data = values.reshape(100, 100, 10)
    mask = np.ones(data.shape, bool)
    # when it is segmented from the histogram, and by k-means on every voxel
    labels = segment_tissue(data, mask)
    km = KMeans(n_clusters=3, n_init=10, random_state=0).fit(values.reshape(-1, 1))
    order = np.argsort(km.cluster_centers_[:, 0])
    rank = np.empty(3, int)
    rank[order] = [1, 2, 3]
    exact = rank[km.labels_].reshape(data.shape)
    # then they agree to within a bin width
    bin_width = float(np.ptp(values)) / TISSUE_BINS
    for k in (1, 2, 3):
        centre = float(values[labels.reshape(-1) == k].mean())
        assert centre == pytest.approx(
            float(np.sort(km.cluster_centers_[:, 0])[k - 1]), abs=2 * bin_width
        )
    assert np.mean(labels != exact) < 0.002
    fractions = tissue_fractions(labels)
    assert fractions["gm"] > fractions["wm"] > fractions["csf"]
    # the old random-sample fit is still there
    sample = tissue_fractions(segment_tissue(data, mask, method="sample"))
    assert all(abs(sample[k] - fractions[k]) < 0.01 for k in fractions)


# --------------------------------------------------------------------------- bad input


def _expect(exc: type[ImageReadError], fn, *words: str, check: str | None = None) -> ImageReadError:
    with pytest.raises(exc) as info:
        fn()
    assert check is None or info.value.check == check, (check, info.value.check)
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)
    return info.value


def test_4d_series_is_refused_with_how_to_pick_one(tmp_path: Path) -> None:
    data, affine = synthetic_volume(resolution=4.0)
    f = save_nifti(tmp_path / "bold.nii.gz", np.stack([data, data, data], axis=-1), affine)
    err = _expect(
        VolumeError, lambda: load_volume(f), str(f), "3 volumes", "fslroi", check="not_3d"
    )
    assert err.status == 422 and err.check == "not_3d"


def test_2d_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "slice.nii"
    nib.save(nib.Nifti1Image(np.ones((64, 64), np.int16), np.eye(4)), f)
    _expect(VolumeError, lambda: load_volume(f), str(f), "2D", "dcm2niix", check="not_3d")
    thin = tmp_path / "one_slice.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((64, 64, 1), np.int16), np.eye(4)), thin)
    _expect(VolumeError, lambda: load_volume(thin), str(thin), "3D", check="not_3d")


def test_corrupt_gzip_and_non_nifti_are_named(tmp_path: Path, template_scan: Path) -> None:
    bad = corrupt_gzip(tmp_path / "cut.nii.gz", template_scan)
    _expect(
        VolumeError, lambda: load_volume(bad), str(bad), "truncated", "gzip -t", check="unreadable"
    )
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"\x1f\x8b" + b"\x00" * 200)
    _expect(VolumeError, lambda: load_volume(garbage), str(garbage), "gzip", check="unreadable")
    notnifti = tmp_path / "photo.nii"
    notnifti.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 400)
    err = _expect(UnsupportedVolume, lambda: load_volume(notnifti), "not a NIfTI")
    assert err.status == 415
    # Header promises more voxels than the file holds.
    whole = gzip.decompress(template_scan.read_bytes())
    short = tmp_path / "short.nii"
    short.write_bytes(whole[: len(whole) - 5000])
    _expect(VolumeError, lambda: load_volume(short), str(short), "truncated", check="unreadable")


def test_gzip_bomb_is_refused_from_its_header_before_inflating(tmp_path: Path) -> None:
    # given issue 16's volume: a valid header declaring 640^3 uint8, 262 MB of zeros inside
    bomb = header_bomb(tmp_path / "bomb.nii.gz", (640, 640, 640))
    assert bomb.stat().st_size < 1 << 20
    # when it is loaded, with a byte limit it would pass (1 GiB)
    inflated: list[int] = []
    real = zlib.decompressobj

    def counting(*args: object) -> object:
        d = real(*args)

        class Counted:
            eof = property(lambda self: d.eof)
            unused_data = property(lambda self: d.unused_data)

            def decompress(self, data: bytes, max_length: int = 0) -> bytes:
                out = d.decompress(data, max_length)
                inflated.append(len(out))
                return out

        return Counted()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(zlib, "decompressobj", counting)
        err = _expect(VolumeTooLarge, lambda: load_volume(bomb), "640x640x640", "resample")
    # then the voxel count is refused from the header: nothing past it was inflated
    assert err.status == 413 and sum(inflated) <= 540


def test_declared_bytes_over_the_limit_and_headerless_gzip_are_refused(tmp_path: Path) -> None:
    f = header_bomb(tmp_path / "f64.nii.gz", (128, 128, 128), np.float64)  # 16.8 MB
    err = _expect(VolumeTooLarge, lambda: load_volume(f, max_bytes=1 << 20), "max_volume_mb")
    assert err.status == 413
    zeros = tmp_path / "zeros.nii.gz"
    zeros.write_bytes(gzip.compress(b"\x00" * (8 << 20)))
    _expect(UnsupportedVolume, lambda: load_volume(zeros), "not a NIfTI")


def test_rgb_voxels_are_refused_from_the_header(tmp_path: Path) -> None:
    rgb = np.zeros((16, 16, 16), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    f = tmp_path / "rgb.nii.gz"
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), f)
    _expect(UnsupportedVolume, lambda: load_volume(f), "data type", "T1")


def test_scaled_integer_voxels_read_as_nibabel_reads_them(tmp_path: Path) -> None:
    data, affine = synthetic_volume(resolution=4.0)
    img = nib.Nifti1Image(np.rint(data).astype(np.int16), affine)
    img.header.set_slope_inter(0.5, 10.0)
    f = tmp_path / "scaled.nii"
    nib.save(img, f)
    vol = load_volume(f)
    np.testing.assert_allclose(vol.data, nib.load(f).get_fdata(), rtol=1e-6, atol=1e-3)


def test_finer_than_1mm_is_resampled_at_load_and_qc_keeps_the_stored_size(
    tmp_path: Path,
) -> None:
    # given a 0.5 mm volume: a coarse head with each voxel repeated 4x per axis
    data, _ = synthetic_volume(resolution=4.0)
    fine = np.repeat(np.repeat(np.repeat(data, 4, 0), 4, 1), 4, 2)
    affine = np.diag([0.5, 0.5, 0.5, 1.0])
    f = save_nifti(tmp_path / "fine.nii.gz", fine, affine)
    # when it is loaded
    vol = load_volume(f)
    # then it is held at 1 mm (half the voxels per axis) with exact geometry, and the
    # stored voxel size is kept for the voxel-size rule
    np.testing.assert_allclose(vol.zooms, (1.0, 1.0, 1.0))
    assert vol.voxel_mm_on_disk == pytest.approx((0.5, 0.5, 0.5))
    assert vol.data.shape == tuple((n - 1) // 2 + 1 for n in fine.shape)
    np.testing.assert_allclose(vol.affine, np.diag([1.0, 1.0, 1.0, 1.0]))
    assert vol.data.mean() == pytest.approx(fine.astype(np.float32).mean(), rel=0.02)
    block = (40, 48, 40)  # the middle of a 4-voxel block: its value survives the blur
    assert vol.data[block] == pytest.approx(float(fine[80 + 1, 96 + 1, 80 + 1]), rel=0.05)


def test_nan_voxels_and_voxel_size_break_the_rules(tmp_path: Path) -> None:
    data, affine = synthetic_volume(resolution=4.0)
    data[10:12, 10:12, 10:12] = np.nan
    f = save_nifti(tmp_path / "nan.nii.gz", data, affine, dtype=np.float32)
    rules = volume_rules(NiftiQCParams(voxel_size_mm=(0.5, 5.0)))
    _expect(
        VolumeError,
        lambda: preprocess_volume(f, FAST, SIZE, rules=rules),
        "NaN",
        "nan",
        check="nonfinite",
    )
    # Without rules (the data source) it is measured, not refused.
    assert preprocess_volume(f, FAST, SIZE).qc["n_nonfinite"] == 8
    thick = save_nifti(tmp_path / "thick.nii.gz", *synthetic_volume(resolution=4.0))
    strict = volume_rules(NiftiQCParams(voxel_size_mm=(0.5, 3.0)))
    _expect(
        VolumeError,
        lambda: preprocess_volume(thick, FAST, SIZE, rules=strict),
        "thick.nii.gz",
        "voxel_max_mm = 4 > 3",
        "validate.nifti.voxel_size_mm",
        check="voxel_size",
    )


def test_blank_volume_has_no_brain(tmp_path: Path) -> None:
    f = save_nifti(tmp_path / "blank.nii.gz", np.zeros((40, 40, 40)), np.diag([4, 4, 4, 1.0]))
    _expect(
        VolumeError,
        lambda: preprocess_volume(f, FAST, SIZE),
        "blank.nii.gz",
        "T1",
        check="empty_brain_mask",
    )


def test_failed_registration_is_an_error_naming_the_file(tmp_path: Path) -> None:
    """Noise is not a brain: the registration score falls below the threshold."""
    rng = np.random.default_rng(0)
    noise = rng.gamma(2.0, 100.0, (48, 56, 48)).astype(np.float32)
    f = save_nifti(tmp_path / "noise.nii.gz", noise, np.diag([4, 4, 4, 1.0]))
    rules = volume_rules(NiftiQCParams(voxel_size_mm=(0.5, 5.0), min_brain_ml=0))
    err = _expect(
        VolumeError,
        lambda: preprocess_volume(f, FAST, SIZE, rules=rules),
        "noise.nii.gz",
        "registration_score",
        "min_registration_score",
        check="registration",
    )
    assert err.check == "registration"


def test_registration_crash_is_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    import SimpleITK as sitk

    from alzstage.neuro import register

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Exception thrown in ITK: All samples map outside moving image")

    monkeypatch.setattr(sitk.ImageRegistrationMethod, "Execute", boom)
    tpl = register.mni152(3)
    _expect(
        VolumeError,
        lambda: register.register_to_mni(tpl.t1, tpl.affine, "x.nii.gz", 3),
        "x.nii.gz",
        "All samples map outside",
        "orientation",
        check="registration",
    )


# --------------------------------------------------------------------------- params, pooling


def test_neuro_params_are_checked_with_the_key_named() -> None:
    base = {s: {} for s in ("base", "data", "validate", "split", "augment", "model", "train")}
    base |= {"evaluate": {}, "promote": {}, "neuro": {}}
    ok = parse_params({**base, "neuro": {"aggregate": "vote"}})
    assert ok.neuro.aggregate == "vote" and ok.neuro.preprocess.n_slices == 32
    for bad, key in (
        ({"neuro": {"aggregate": "max"}}, "neuro.aggregate"),
        ({"neuro": {"preprocess": {"normalise": "robust"}}}, "neuro.preprocess.normalise"),
        ({"neuro": {"preprocess": {"z_range_mm": [40, -18]}}}, "neuro.preprocess.z_range_mm"),
        (
            {"neuro": {"preprocess": {"registration_shrink_factors": [1, 2]}}},
            "neuro.preprocess.registration_shrink_factors",
        ),
        ({"validate": {"nifti": {"min_registration_score": 2}}}, "validate.nifti"),
        ({"data": {"source": "nifti"}}, "data.path"),
    ):
        with pytest.raises(ConfigError) as info:
            parse_params({**base, **bad})
        msg = str(info.value)
        assert key in msg and "\n" not in msg, msg
    with pytest.raises(ConfigError, match="neuro"):
        parse_params({k: v for k, v in base.items() if k != "neuro"})  # sections are required


def test_pool_slices_rules() -> None:
    from alzstage.model.metrics import aggregate_by_subject, pool_slices

    probs = np.array([[0.6, 0.4], [0.6, 0.4], [0.01, 0.99]])
    mean_log = pool_slices(probs, "mean_log")
    ref = aggregate_by_subject(probs, np.zeros(3, int), np.array(["s"] * 3)).probs[0]
    np.testing.assert_allclose(mean_log, ref)  # same rule as the evaluate stage's
    assert mean_log.argmax() == 1  # one slice that confidently rules class 0 out
    np.testing.assert_allclose(pool_slices(probs, "mean"), [0.403333, 0.596667], atol=1e-5)
    vote = pool_slices(probs, "vote")
    assert vote.argmax() == 0 and vote.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown rule"):
        pool_slices(probs, "max")


def test_repository_params_use_the_documented_neuro_defaults() -> None:
    """params.yaml spells out every neuro / validate.nifti default (docs/neuro.md)."""
    from alzstage.config import load_params

    repo = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
    assert repo.neuro == Params().neuro
    assert repo.validate_.nifti == Params().validate_.nifti
    assert repo.neuro.preprocess.z_range_mm == (-18.0, 40.0)  # the demo's band
