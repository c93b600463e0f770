"""Predicting on NIfTI volumes end to end: ``alzstage predict``, the REST API, the page.

The model is the session's registered demo champion (tests/conftest.py ``demo``); the
volumes are the MNI152 T1 from nilearn at 4 mm, so each one preprocesses in a second or
two. Preprocessing is configured small (8 slices, registration on the 3 mm template).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import uvicorn_in_thread
from neuro_volumes import corrupt_gzip, moved_affine, save_nifti, synthetic_volume
from typer.testing import CliRunner

from alzstage.cli import app
from alzstage.config import NeuroParams, NeuroPreprocessParams, NiftiQCParams
from alzstage.model.conformal import describe_set
from alzstage.model.metrics import pool_slices
from alzstage.serve.demo import DemoChampion

REPO = Path(__file__).resolve().parents[2]
N_SLICES = 8
NEURO = {"preprocess": {"registration_resolution": 3, "n_slices": N_SLICES}, "gradcam_slices": 2}
NIFTI_QC = {"voxel_size_mm": [0.5, 4.5]}


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good moved scan, a second good scan, and one of each kind of bad volume."""
    root = tmp_path_factory.mktemp("scans")
    good = save_nifti(
        root / "sub-01.nii.gz", *synthetic_volume(moved_affine((5, 0, -6), (4, -3, 2), 1.03))
    )
    other = save_nifti(root / "sub-02.nii", *synthetic_volume(gain=500.0, bias=0.2))
    data, affine = synthetic_volume()
    series = save_nifti(root / "bold.nii.gz", np.stack([data, data], axis=-1), affine)
    cut = corrupt_gzip(root / "cut.nii.gz", good)
    nan = data.copy()
    nan[5:8, 5:8, 5:8] = np.nan
    nan_scan = save_nifti(root / "nan.nii.gz", nan, affine, dtype=np.float32)
    return {"good": good, "other": other, "series": series, "cut": cut, "nan": nan_scan}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo: DemoChampion) -> Path:
    """A project root whose params preprocess small, with the registry at the demo store."""
    root = tmp_path / "project"
    root.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["neuro"] = {**params["neuro"], **NEURO}
    params["neuro"]["preprocess"] = {**params["neuro"]["preprocess"], **NEURO["preprocess"]}
    params["validate"]["nifti"] = {**params["validate"]["nifti"], **NIFTI_QC}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setenv("ALZSTAGE_ROOT", str(root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", demo.tracking_uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", demo.tracking_uri)
    return root


# --------------------------------------------------------------------------- CLI


def test_cli_predicts_one_subject_stage_from_a_volume(
    project: Path, scans: dict[str, Path], demo: DemoChampion, tmp_path: Path
) -> None:
    # given a volume and the demo champion, which stores a calibrated brain model
    out_dir = tmp_path / "cams"
    # when it is predicted with Grad-CAM, as JSON
    result = CliRunner().invoke(
        app, ["predict", str(scans["good"]), "-f", "json", "--gradcam", str(out_dir)]
    )
    # then one brain-level row: the brain model's stage with its conformal set
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    (row,) = doc["predictions"]
    (vol,) = doc["volumes"]
    assert row["kind"] == "volume" and row["n_slices"] == N_SLICES
    assert row["aggregate"] == "mean_log" and row["registration_score"] > 0.8
    assert len(vol["slices"]) == N_SLICES
    assert row["brain_model"] == vol["brain_model"] == "logistic"
    assert row["stage"] == vol["stage"] == max(demo.classes, key=lambda c: row[c])
    assert vol["set_confidence"] == 0.9 and vol["stage"] in vol["prediction_set"]
    assert row["set_text"] == vol["set_text"] == describe_set(vol["prediction_set"], 0.9)
    assert vol["n_slices_used"] == N_SLICES and 0 < vol["csf_fraction"] < 1
    # ... and the fixed pooling rule's stage beside it, as the reference
    slice_probs = np.array([[s["probabilities"][c] for c in demo.classes] for s in vol["slices"]])
    pooled = pool_slices(slice_probs, "mean_log")
    np.testing.assert_allclose(
        [vol["pooled_probabilities"][c] for c in demo.classes], pooled, atol=1e-9
    )
    assert row["pooled_stage"] == vol["pooled_stage"] == demo.classes[int(pooled.argmax())]
    # Grad-CAM on the 2 slices that most support the brain's stage, as PNG files.
    k = demo.classes.index(row["stage"])
    best = sorted(range(N_SLICES), key=lambda i: -slice_probs[i, k])[:2]
    assert vol["informative_slices"] == best
    written = sorted(p.name for p in out_dir.iterdir())
    assert written == sorted(f"sub-01.s{i:03d}.gradcam.png" for i in best)
    assert vol["qc"]["brain_ml"] > 1000 and vol["qc"]["voxel_max_mm"] == 4.0


def test_a_volume_predicted_by_a_model_without_a_brain_model_falls_back_to_pooling(
    project: Path, scans: dict[str, Path], demo: DemoChampion
) -> None:
    # given the demo network as a bare .keras file: no meta, so no brain model
    keras_file = demo.root / "model.keras"
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"]["input_size"] = list(demo.input_size)  # a file says nothing of its size
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # when a volume is predicted with it
    result = CliRunner().invoke(
        app, ["predict", str(scans["good"]), "--model", str(keras_file), "-f", "json"]
    )
    # then the fixed pooling rule gives the stage, there is no set, and the answer says so
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    (row,) = doc["predictions"]
    (vol,) = doc["volumes"]
    assert row["brain_model"] == "pool (no brain model stored)"
    assert vol["prediction_set"] is None and vol["set_text"] is None
    assert row["stage"] == row["pooled_stage"]
    np.testing.assert_allclose(
        [row[c] for c in demo.classes], [vol["pooled_probabilities"][c] for c in demo.classes]
    )
    table = CliRunner().invoke(
        app, ["predict", str(scans["good"]), "--model", str(keras_file)], env={"COLUMNS": "200"}
    )
    assert "brain model: none stored with this model; fixed pooling rule" in table.stdout


def test_cli_batch_lists_every_bad_volume_and_continues(
    project: Path, scans: dict[str, Path], demo: DemoChampion, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for key in ("good", "other", "series", "cut", "nan"):
        shutil.copy(scans[key], folder / scans[key].name)
    result = CliRunner().invoke(app, ["predict", str(folder), "-f", "json"])
    assert result.exit_code == 1  # some inputs failed
    doc = json.loads(result.stdout)
    by_name = {Path(r["file"]).name: r for r in doc["predictions"]}
    assert set(by_name) == {
        "sub-01.nii.gz",
        "sub-02.nii",
        "bold.nii.gz",
        "cut.nii.gz",
        "nan.nii.gz",
    }
    for ok in ("sub-01.nii.gz", "sub-02.nii"):
        assert by_name[ok]["error"] == "" and by_name[ok]["stage"] in demo.classes
    for bad, words in (
        ("bold.nii.gz", ("2 volumes", "fslroi")),
        ("cut.nii.gz", ("truncated", "gzip -t")),
        ("nan.nii.gz", ("NaN", "n_nonfinite")),
    ):
        err = by_name[bad]["error"]
        assert bad in err and all(w in err for w in words), err
    assert doc["summary"]["n_errors"] == 3 and doc["summary"]["n_predicted"] == 2
    # The table names every failure in full below the results.
    table = CliRunner().invoke(app, ["predict", str(folder)])
    assert table.exit_code == 1
    text = " ".join(table.output.split())
    for bad in ("bold.nii.gz", "cut.nii.gz", "nan.nii.gz"):
        assert bad in text
    assert "most informative slices" in text


def test_cli_aggregate_rule_comes_from_params(
    project: Path, scans: dict[str, Path], demo: DemoChampion
) -> None:
    # given params whose reference pooling rule is the slices' vote
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["neuro"]["aggregate"] = "vote"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # when a volume is predicted
    result = CliRunner().invoke(app, ["predict", str(scans["other"]), "-f", "json"])
    # then the pooled reference is the vote; the brain model's stage is unchanged by it
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    row, vol = doc["predictions"][0], doc["volumes"][0]
    assert row["aggregate"] == "vote" and row["brain_model"] == "logistic"
    votes = np.bincount(
        [demo.classes.index(s["stage"]) for s in vol["slices"]], minlength=len(demo.classes)
    )
    assert votes[demo.classes.index(row["pooled_stage"])] == votes.max()  # the most voted
    shares = np.array([vol["pooled_probabilities"][c] for c in demo.classes])
    np.testing.assert_allclose(shares, votes / votes.sum(), atol=1e-5)  # vote shares


# --------------------------------------------------------------------------- REST


def _settings(demo: DemoChampion, **overrides: object):
    from alzstage.serve.app import ServeSettings

    return ServeSettings(
        model_uri=demo.uri,
        tracking_uri=demo.tracking_uri,
        neuro=NeuroParams(
            preprocess=NeuroPreprocessParams(**NEURO["preprocess"]),
            gradcam_slices=NEURO["gradcam_slices"],
        ),
        nifti_qc=NiftiQCParams(**NIFTI_QC),
        **overrides,
    )


def test_rest_volume_endpoint_answers_good_and_bad_volumes(
    demo: DemoChampion, scans: dict[str, Path]
) -> None:
    from fastapi.testclient import TestClient

    from alzstage.serve.app import create_app

    files = [
        ("files", ("sub-01.nii.gz", scans["good"].read_bytes(), "application/gzip")),
        ("files", ("bold.nii.gz", scans["series"].read_bytes(), "application/gzip")),
        ("files", ("cut.nii.gz", scans["cut"].read_bytes(), "application/gzip")),
        ("files", ("notes.nii", b"just text, not a volume" * 30, "application/octet-stream")),
    ]
    with TestClient(create_app(_settings(demo))) as client:
        res = client.post("/predict/volume?gradcam=true", files=files)
        assert res.status_code == 200, res.text
        body = res.json()
        good, series, cut, notes = body["predictions"]
        assert good["status"] == 200 and good["stage"] in demo.classes
        assert good["n_slices"] == N_SLICES and len(good["slices"]) == N_SLICES
        assert good["registration_score"] > 0.8 and good["aggregate"] == "mean_log"
        # the brain-level stage comes with its conformal set and the pooled reference
        assert good["kind"] == "volume" and good["brain_model"] == "logistic"
        assert good["stage"] in good["prediction_set"] and good["set_confidence"] == 0.9
        assert good["set_text"] == describe_set(good["prediction_set"], 0.9)
        assert good["pooled_stage"] in demo.classes
        assert all(s["image"].startswith("data:image/png;base64,") for s in good["slices"])
        with_cam = [s["index"] for s in good["slices"] if s["gradcam"]]
        assert with_cam == sorted(s["index"] for s in good["slices"] if s["informative"])
        assert len(with_cam) == NEURO["gradcam_slices"]
        assert (series["status"], cut["status"], notes["status"]) == (422, 422, 415)
        assert "bold.nii.gz" in series["error"] and "fslroi" in series["error"]
        assert "cut.nii.gz" in cut["error"] and "gzip" in cut["error"]
        assert "not a NIfTI" in notes["error"]
        assert body["summary"]["n_errors"] == 3

        # Nothing usable: the request fails with the per-file reasons.
        only_bad = client.post("/predict/volume", files=files[3:])
        assert only_bad.status_code == 415 and "not a NIfTI" in only_bad.json()["detail"]


def test_rest_volume_size_limit(demo: DemoChampion, scans: dict[str, Path]) -> None:
    from fastapi.testclient import TestClient

    from alzstage.serve.app import create_app

    blob = scans["good"].read_bytes()
    with TestClient(create_app(_settings(demo, max_volume_bytes=len(blob) - 1))) as client:
        res = client.post("/predict/volume", files=[("files", ("big.nii.gz", blob))])
        assert res.status_code == 413 and "--max-volume-mb" in res.json()["detail"]


# --------------------------------------------------------------------------- page


@pytest.fixture
def server(demo: DemoChampion) -> Iterator[str]:
    from alzstage.serve.app import create_app

    with uvicorn_in_thread(create_app(_settings(demo))) as url:
        yield url


def test_page_shows_a_slice_strip_with_overlays(
    server: str, scans: dict[str, Path], tmp_path: Path
) -> None:
    from test_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS

    if not CHROMIUM.exists():
        pytest.skip("needs Debian chromium at /usr/bin/chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(server + "/")
            page.set_input_files("#files", [str(scans["good"]), str(scans["series"])])
            page.click("#submit")
            expect = sync_api.expect
            cards = page.get_by_test_id("volume-result")
            expect(cards).to_have_count(2, timeout=120_000)
            strip = cards.first.get_by_test_id("slice-strip")
            expect(strip.locator("img")).to_have_count(N_SLICES)
            cams = strip.get_by_test_id("slice-gradcam")
            expect(cams).to_have_count(NEURO["gradcam_slices"])
            assert cams.first.evaluate("img => img.complete && img.naturalWidth > 0")
            assert cards.first.get_by_test_id("stage").inner_text()
            # the brain's set next to its stage, and the demo model said to be synthetic
            expect(cards.first.get_by_test_id("set-text")).to_contain_text("(90%)")
            expect(cards.first.get_by_test_id("card-synthetic-demo")).to_be_visible()
            expect(cards.nth(1).get_by_test_id("error")).to_contain_text("fslroi")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "volume_page.png"), full_page=True)
        finally:
            browser.close()


def test_page_shows_one_brain_from_its_slices_with_the_set(
    server: str, tmp_path: Path, mri_slices: list[np.ndarray]
) -> None:
    from PIL import Image
    from test_browser import CHROMIUM, CHROMIUM_ARGS

    if not CHROMIUM.exists():
        pytest.skip("needs Debian chromium at /usr/bin/chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    # given one brain's four slices as files
    files = []
    for i, gray in enumerate(mri_slices[:4]):
        files.append(tmp_path / f"s{i}.png")
        Image.fromarray(gray).save(files[-1])
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(server + "/")
            # when they are sent as one brain
            page.set_input_files("#files", [str(f) for f in files])
            page.check("#one-brain")
            page.click("#submit")
            # then one brain card: the stage, the set in words, the slice strip
            expect = sync_api.expect
            card = page.get_by_test_id("volume-result")
            expect(card).to_have_count(1, timeout=120_000)
            expect(card.get_by_test_id("set-text")).to_contain_text("(90%)")
            expect(card.get_by_test_id("brain-model")).to_contain_text("4 of 4 slice files")
            expect(card.get_by_test_id("slice-strip").locator("img")).to_have_count(4)
            assert card.get_by_test_id("stage").inner_text()
        finally:
            browser.close()
