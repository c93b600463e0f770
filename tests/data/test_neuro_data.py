"""The ``nifti`` data source: download preprocesses volumes, validate judges their QC.

A tiny CN / MCI / LMCI / AD cohort of 4 mm MNI152 copies (moved and intensity-modulated)
plus one volume of each failure kind, generated in tmp_path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from neuro_volumes import corrupt_gzip, moved_affine, save_nifti, synthetic_volume

from alzstage.artifacts import read_manifest, read_raw_manifest, read_volumes
from alzstage.config import Params, Paths
from alzstage.data.download import run_download
from alzstage.data.validate import run_validate
from alzstage.errors import AlzstageError

CLASSES = ["CN", "MCI", "LMCI", "AD"]
SIZE = (64, 56)
N_SLICES = 4
BAD = {"cut.nii.gz", "bold.nii.gz", "missing.nii.gz", "noise.nii.gz"}


def make_params(folder: Path, **validate: object) -> Params:
    return Params.model_validate(
        {
            "base": {
                "image_size": list(SIZE),
                "classes": CLASSES,
                "class_aliases": {"Alzheimer": "AD"},
            },
            "data": {
                "source": "nifti",
                "path": str(folder),
                "demo": {"subjects_per_class": [1, 1, 1, 1]},
            },
            "validate": {"nifti": {"voxel_size_mm": [0.5, 4.5]}, **validate},
            "neuro": {"preprocess": {"registration_resolution": 3, "n_slices": N_SLICES}},
        }
    )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two good volumes per class (one subject scanned twice) and four bad volumes."""
    folder = tmp_path_factory.mktemp("cohort")
    rows = []
    for ci, label in enumerate(CLASSES):
        for n in range(2):
            seed = 10 * ci + n
            rng = np.random.default_rng(seed)
            truth = moved_affine(tuple(rng.normal(0, 4, 3)), tuple(rng.normal(0, 4, 3)))
            data, affine = synthetic_volume(truth, gain=600 + 100 * n, atrophy=0.15 * ci)
            name = f"scans/{label}_{n}.nii.gz"
            save_nifti(folder / name, data, affine, flip_x=bool(n))
            written = "Alzheimer" if label == "AD" and n == 1 else label  # alias
            rows.append((f"sub-{label}-{n}", name, written))
    rows.append(("sub-CN-0", "scans/CN_0_visit2.nii.gz", "CN"))  # same subject, 2nd visit
    save_nifti(folder / "scans/CN_0_visit2.nii.gz", *synthetic_volume(gain=650.0))
    data, affine = synthetic_volume()
    corrupt_gzip(folder / "cut.nii.gz", folder / "scans/CN_0.nii.gz")
    save_nifti(folder / "bold.nii.gz", np.stack([data, data], axis=-1), affine)
    noise = np.random.default_rng(0).gamma(2.0, 100.0, (48, 56, 48))
    save_nifti(folder / "noise.nii.gz", noise, np.diag([4, 4, 4, 1.0]))
    for i, name in enumerate(sorted(BAD)):
        rows.append((f"sub-bad-{i}", name, "MCI"))
    pd.DataFrame(rows, columns=["subject", "file", "label"]).to_csv(
        folder / "subjects.csv", index=False
    )
    return folder


@pytest.fixture(scope="module")
def downloaded(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Params]:
    root = tmp_path_factory.mktemp("project")
    params = make_params(cohort)
    run_download(params, Paths(root))
    return root, params


def test_download_writes_slices_with_true_subject_ids(downloaded: tuple[Path, Params]) -> None:
    root, _ = downloaded
    paths = Paths(root)
    manifest = read_raw_manifest(paths.raw_manifest)
    volumes = read_volumes(paths.raw_volumes)
    good = volumes[volumes["status"] == "ok"]
    # 9 brain volumes + the noise volume (preprocessed, judged later) -> slices.
    assert len(good) == 10 and len(manifest) == 10 * N_SLICES
    assert set(manifest["label"]) == set(CLASSES)
    assert set(manifest["subject"]) == {*good["subject"]}
    assert (manifest["width"] == SIZE[1]).all() and (manifest["height"] == SIZE[0]).all()
    assert (manifest["mode"] == "L").all() and (manifest["format"] == "PNG").all()
    # Two volumes of one subject keep distinct slice files, one subject id.
    cn0 = manifest[manifest["subject"] == "sub-CN-0"]
    assert len(cn0) == 2 * N_SLICES and cn0["path"].is_unique
    assert (manifest.loc[manifest["subject"] == "sub-AD-1", "label"] == "AD").all()  # alias
    by_file = volumes.set_index("file")
    assert by_file.loc["cut.nii.gz", "status"] == "unreadable"
    assert by_file.loc["bold.nii.gz", "status"] == "not_3d"
    assert by_file.loc["missing.nii.gz", "status"] == "missing_file"
    assert "subjects_csv" in by_file.loc["missing.nii.gz", "error"]
    assert by_file.loc["noise.nii.gz", "registration_score"] < 0.5
    brains = good[good["file"] != "noise.nii.gz"]
    assert (brains["registration_score"] > 0.8).all() and (brains["brain_ml"] > 1000).all()
    assert (brains["gm_fraction"] > 0.2).all() and (brains["wm_fraction"] > 0.2).all()


def test_validate_quarantines_failing_subjects_and_lists_them(
    downloaded: tuple[Path, Params], cohort: Path
) -> None:
    root, _ = downloaded
    params = make_params(cohort, on_failure="quarantine")
    paths = Paths(root)
    result = run_validate(params, paths)
    report = json.loads(paths.validation_report.read_text())
    assert report["volumes"]["n_volumes"] == 13
    assert report["volumes"]["n_quarantined"] == 4 and report["volumes"]["n_valid"] == 9
    assert report["volumes"]["checks"] == {"registration": 1, "volume_error": 3}
    qv = pd.read_csv(paths.quarantine_volumes, keep_default_na=False)
    assert set(qv["file"]) == BAD
    assert "fslroi" in qv.set_index("file").loc["bold.nii.gz", "details"]
    assert "registration_score" in qv.set_index("file").loc["noise.nii.gz", "details"]
    qc = pd.read_csv(paths.volume_qc, keep_default_na=False)
    assert qc["passed"].sum() == 9 and len(qc) == 13
    # The noise volume's slices are quarantined with it; the clean manifest keeps the rest.
    q = pd.read_csv(paths.quarantine, keep_default_na=False)
    assert len(q) == N_SLICES and (q["reasons"] == "registration").all()
    clean = read_manifest(paths.validated_manifest)
    assert len(clean) == 9 * N_SLICES and not clean["subject"].str.startswith("sub-bad").any()
    assert result.metrics["volumes.n_quarantined"] == 4


def test_validate_fail_names_every_bad_volume(
    downloaded: tuple[Path, Params], cohort: Path
) -> None:
    root, _ = downloaded
    with pytest.raises(AlzstageError) as info:
        run_validate(make_params(cohort, on_failure="fail"), Paths(root))
    msg = str(info.value)
    assert "4 volume(s) failed" in msg
    for name in BAD:
        assert name in msg, name
    assert "validate.on_failure: quarantine" in msg


def test_thresholds_are_validate_params_not_a_new_download(
    downloaded: tuple[Path, Params], cohort: Path
) -> None:
    """Tightening validate.nifti re-judges the stored measurements: no preprocessing."""
    root, _ = downloaded
    params = make_params(cohort, on_failure="quarantine")
    strict = params.model_copy(
        update={
            "validate_": params.validate_.model_copy(
                update={"nifti": params.validate_.nifti.model_copy(update={"min_brain_ml": 1e6})}
            )
        }
    )
    with pytest.raises(AlzstageError, match=r"min_per_class|classes"):
        run_validate(strict, Paths(root))  # every volume fails: no class keeps an image
    report = json.loads(Paths(root).validation_report.read_text())
    assert report["volumes"]["checks"]["empty_brain_mask"] == 10


@pytest.mark.parametrize(
    ("csv", "words"),
    [
        ("subject,file\ns1,a.nii.gz\n", ["missing column", "label"]),
        ("subject,file,label\ns1,a.nii.gz,Dementia\n", ["line 2", "'Dementia'", "class_aliases"]),
        ("subject,file,label\ns1,a.nii.gz,CN\ns2,a.nii.gz,AD\n", ["more than once", "a.nii.gz"]),
    ],
)
def test_bad_subjects_csv_stops_download_naming_the_row(
    tmp_path: Path, csv: str, words: list[str]
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "subjects.csv").write_text(csv)
    with pytest.raises(AlzstageError) as info:
        run_download(make_params(folder), Paths(tmp_path / "p"))
    msg = str(info.value)
    assert "subjects.csv" in msg and all(w in msg for w in words), msg
    assert not (tmp_path / "p" / "data" / "raw").exists()  # nothing half-written


def test_no_usable_volume_is_a_download_error(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "x.nii.gz").write_bytes(b"\x1f\x8bnot really gzip")
    (folder / "subjects.csv").write_text("subject,file,label\ns1,x.nii.gz,CN\n")
    with pytest.raises(AlzstageError, match=r"no volume could be preprocessed.*x\.nii\.gz"):
        run_download(make_params(folder), Paths(tmp_path / "p"))
