"""End to end on NIfTI volumes: ``dvc repro`` with ``data.source: nifti`` on a tiny cohort.

Twelve 4 mm MNI152 copies (moved, intensity-modulated, with a crude severity-driven
darkening) labelled CN / MCI / LMCI / AD, plus one corrupt file, run through every stage
with real DVC and MLflow; then ``alzstage predict`` on a volume with the new champion.
Small on purpose (4 slices per volume, 64x64 images, 1 epoch): this checks the plumbing,
not the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from neuro_volumes import corrupt_gzip, moved_affine, save_nifti, synthetic_volume
from test_pipeline_integration import _run, copy_tiny_project

pytestmark = pytest.mark.integration

CLASSES = ["CN", "MCI", "LMCI", "AD"]
PER_CLASS = 3


def _cohort(folder: Path) -> Path:
    rows = []
    for ci, label in enumerate(CLASSES):
        for n in range(PER_CLASS):
            rng = np.random.default_rng(100 * ci + n)
            truth = moved_affine(
                tuple(rng.normal(0, 4, 3)), tuple(rng.normal(0, 4, 3)), rng.normal(1, 0.03)
            )
            data, affine = synthetic_volume(
                truth, gain=rng.uniform(500, 900), bias=rng.uniform(0, 0.2), atrophy=0.2 * ci
            )
            name = f"{label.lower()}_{n}.nii.gz"
            save_nifti(folder / name, data, affine, flip_x=bool(n % 2))
            rows.append((f"{label}-{n:02d}", name, label))
    corrupt_gzip(folder / "broken.nii.gz", folder / "cn_0.nii.gz")
    rows.append(("MCI-99", "broken.nii.gz", "MCI"))
    pd.DataFrame(rows, columns=["subject", "file", "label"]).to_csv(
        folder / "subjects.csv", index=False
    )
    return folder


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    volumes = _cohort(tmp_path_factory.mktemp("volumes"))
    overrides = {
        "base": {"classes": CLASSES},
        "data": {
            "source": "nifti",
            "path": str(volumes),
            "demo": {"subjects_per_class": [1, 1, 1, 1]},
        },
        "validate": {"on_failure": "quarantine", "nifti": {"voxel_size_mm": [0.5, 4.5]}},
        "neuro": {"preprocess": {"registration_resolution": 4, "n_slices": 4}},
    }
    dest = copy_tiny_project(tmp_path_factory.mktemp("repo") / "alzstage", overrides)
    _run(["dvc", "repro"], dest)
    return dest


def test_pipeline_runs_on_volumes_with_given_subject_ids(project: Path) -> None:
    volumes = pd.read_csv(project / "data/raw/volumes.csv", keep_default_na=False)
    assert len(volumes) == 13 and (volumes["status"] == "ok").sum() == 12
    validation = json.loads((project / "reports/validation.json").read_text())
    assert validation["volumes"]["n_quarantined"] == 1
    quarantined = pd.read_csv(project / "reports/validation/quarantine_volumes.csv")
    assert list(quarantined["file"]) == ["broken.nii.gz"]
    split = json.loads((project / "reports/split.json").read_text())
    assert split["subject_ids"] == "given"
    assert split["groups"]["rows_by_subject_source"] == {"given": 12 * 4, "pseudo": 0, "none": 0}
    rows = pd.read_csv(project / "data/processed/split.csv", keep_default_na=False)
    assert rows.groupby("subject")["split"].nunique().max() == 1  # subject-disjoint
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["n_test"] > 0 and metrics["split_strategy"] == "subject"
    assert "subject_level" in metrics


def test_predict_on_a_volume_with_the_pipeline_champion(project: Path) -> None:
    folder = Path(yaml.safe_load((project / "params.yaml").read_text())["data"]["path"])
    out = _run(["alzstage", "predict", str(folder / "ad_0.nii.gz"), "--format", "json"], project)
    doc = json.loads(out.stdout[out.stdout.index("{") :])
    row = doc["predictions"][0]
    assert row["kind"] == "volume" and row["stage"] in CLASSES and row["n_slices"] == 4
    assert abs(sum(row[c] for c in CLASSES) - 1.0) < 1e-6
    assert len(doc["volumes"][0]["slices"]) == 4
