"""``alzstage predict``: input expansion, safe decoding, batch summary, Grad-CAM files, CLI.

The model is a real registered champion (the project's network at 32x32, random
weights, logged through the production pyfunc) built once per test session by
:func:`alzstage.serve.demo.ensure_demo_champion`, so the CLI is exercised against the
same contract as after ``dvc repro``, in seconds instead of minutes.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import png_bytes
from PIL import Image
from typer.testing import CliRunner

from alzstage import tracking
from alzstage.cli import app
from alzstage.errors import ImageReadError, UnsupportedImage
from alzstage.inference.gradcam import unique_png
from alzstage.inference.predict import (
    decode_image,
    expand_inputs,
    resolve_model_uri,
)
from alzstage.inference.prediction import (
    ImagePrediction,
    SlicePrediction,
    VolumePrediction,
    records,
    scored,
    summarize,
    volume_details,
)
from alzstage.model.conformal import describe_set
from alzstage.serve.demo import DemoChampion

REPO = Path(__file__).resolve().parents[2]


def write_png(path: Path, seed: int, size: tuple[int, int] = (52, 44)) -> Path:
    """A grayscale noise PNG (lossless): decodable, but out of distribution for the model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def write_slice(path: Path, gray: np.ndarray) -> Path:
    """A real-like slice (from the ``mri_slices`` fixture) as a PNG: gets a stage."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gray).save(path, format="PNG")
    return path


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo: DemoChampion) -> Path:
    """A project root with the repo's params.yaml, its registry pointed at the demo store."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    monkeypatch.setenv("ALZSTAGE_ROOT", str(root))
    # Both set through monkeypatch: MLflow writes them into os.environ when configured,
    # and only a monkeypatched variable is removed again after the test.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", demo.tracking_uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", demo.tracking_uri)
    return root


def _pyfunc_probs(demo: DemoChampion, files: list[Path]) -> np.ndarray:
    """Reference numbers: the registered pyfunc itself, on the pixels the CLI feeds it."""
    from alzstage.data.images import load_gray
    from alzstage.serve.demo import scoped_tracking_uri
    from alzstage.tracking import load_pyfunc

    with scoped_tracking_uri(demo.tracking_uri):
        model, _ = load_pyfunc(demo.uri)  # mlflow.pyfunc.load_model, as MLflow serves it
    arrays = np.stack([load_gray(f, demo.input_size) for f in files])
    return model.predict(arrays)[demo.classes].to_numpy(dtype=np.float64)


# --------------------------------------------------------------------------- inputs


def test_expand_inputs_folders_globs_and_explicit_files(tmp_path: Path) -> None:
    a = write_png(tmp_path / "scans" / "a.png", 0)
    b = write_png(tmp_path / "scans" / "deep" / "b.PNG", 1)
    (tmp_path / "scans" / "notes.txt").write_text("not an image")
    c = write_png(tmp_path / "other" / "c.png", 2)
    odd = tmp_path / "odd.dat"
    odd.write_bytes(b"x")

    assert expand_inputs([str(tmp_path / "scans")]) == sorted([a.resolve(), b.resolve()])
    assert expand_inputs([str(tmp_path / "*" / "*.png")]) == sorted([a.resolve(), c.resolve()])
    # Named explicitly: kept, so that predict reports it instead of skipping it silently.
    assert expand_inputs([str(odd)]) == [odd.resolve()]
    # Overlapping inputs are de-duplicated.
    assert expand_inputs([str(a), str(tmp_path / "scans")]) == sorted([a.resolve(), b.resolve()])
    with pytest.raises(FileNotFoundError, match="nope"):
        expand_inputs([str(tmp_path / "nope*.png")])


def test_decode_image_classifies_failures(tmp_path: Path) -> None:
    gray = decode_image(png_bytes(0, (30, 20)))
    assert gray.shape == (30, 20) and gray.dtype == np.uint8

    with pytest.raises(UnsupportedImage, match="not a JPEG or PNG") as exc:
        decode_image(b"%PDF-1.4 definitely not an image", name="report.pdf")
    assert exc.value.status == 415 and "report.pdf" in str(exc.value)

    gif = io.BytesIO()
    Image.new("L", (8, 8)).save(gif, format="GIF")
    with pytest.raises(UnsupportedImage):  # a real image, but not a format we decode
        decode_image(gif.getvalue())

    with pytest.raises(ImageReadError, match="damaged or truncated") as exc:
        decode_image(png_bytes(1, (64, 64))[:200])
    assert exc.value.status == 422


def test_decompression_bomb_is_refused_before_decoding() -> None:
    big = io.BytesIO()
    Image.new("L", (3000, 3000)).save(big, format="PNG")  # ~9 MP, a few KB compressed
    assert len(big.getvalue()) < 100_000
    with pytest.raises(ImageReadError, match="decompression-bomb guard") as exc:
        decode_image(big.getvalue(), max_pixels=1_000_000)
    assert exc.value.status == 422
    assert decode_image(big.getvalue(), max_pixels=10_000_000).shape == (3000, 3000)


# --------------------------------------------------------------------------- helpers


def test_model_references() -> None:
    assert resolve_model_uri(None, "alzstage") == "models:/alzstage@champion"
    assert resolve_model_uri("3", "alzstage") == "models:/alzstage/3"
    assert resolve_model_uri("@challenger", "alzstage") == "models:/alzstage@challenger"
    assert resolve_model_uri("challenger", "alzstage") == "models:/alzstage@challenger"
    assert tracking.parse_model_uri("models:/alzstage@champion") == ("alzstage", None, "champion")
    assert tracking.parse_model_uri("models:/alzstage/7") == ("alzstage", "7", None)
    assert tracking.parse_model_uri("runs:/abc/model") is None


def test_unique_png_never_clobbers(tmp_path: Path) -> None:
    (tmp_path / "x.gradcam.png").write_bytes(b"existing")
    taken: set[str] = set()
    first = unique_png(tmp_path, "x", taken)
    second = unique_png(tmp_path, "x", taken)  # same stem from another folder, same batch
    assert first.name == "x.gradcam-2.png" and second.name == "x.gradcam-3.png"
    assert (tmp_path / "x.gradcam.png").read_bytes() == b"existing"
    assert unique_png(tmp_path, "../../etc/passwd", taken).parent == tmp_path
    assert unique_png(tmp_path, "scan 01 (copy)", taken).name == "scan_01_copy.gradcam.png"


def _image(name: str, probs: list[float] | None = None, error: str = "") -> ImagePrediction:
    """A typed image result as predict_decoded makes it (threshold 0.5)."""
    if error:
        return ImagePrediction(index=0, filename=name, status=422, error=error)
    return ImagePrediction(
        index=0, filename=name, status=200, **scored(["A", "B", "C"], np.array(probs), 0.5)
    )


def test_summarize_counts_only_readable_images() -> None:
    classes = ["A", "B", "C"]
    results = [
        _image("1", [0.9, 0.05, 0.05]),
        _image("2", [0.4, 0.35, 0.25]),
        _image("3", [0.1, 0.2, 0.7]),
        _image("bad", error="unreadable"),
    ]
    s = summarize(results, classes, 0.5)
    assert s.n_images == 4 and s.n_predicted == 3 and s.n_errors == 1
    assert s.stage_counts == {"A": 2, "B": 0, "C": 1}
    assert s.stage_fractions["A"] == pytest.approx(2 / 3)
    assert s.mean_confidence == pytest.approx((0.9 + 0.4 + 0.7) / 3)
    assert s.mean_probabilities["B"] == pytest.approx((0.05 + 0.35 + 0.2) / 3)
    assert s.n_low_confidence == 1 and s.low_confidence_files == ["2"]
    empty = summarize(results[3:], classes, 0.5)
    assert empty.n_predicted == 0 and empty.mean_confidence is None


def test_records_have_the_same_columns_whichever_inputs_failed() -> None:
    # given an unreadable image first, an out-of-distribution one, a good one and volumes
    classes = ["A", "B", "C"]
    ood = ImagePrediction(
        index=1,
        filename="noise.png",
        status=200,
        out_of_distribution=True,
        ood_reason="not like the training MRI slices",
        seen_in_training=False,
        training_correlation=0.1,
    )
    good = _image("good.png", [0.2, 0.7, 0.1]).model_copy(
        update={"out_of_distribution": False, "seen_in_training": False, "gradcam": "g.png"}
    )
    volume = VolumePrediction(
        index=3,
        filename="sub-01.nii.gz",
        status=200,
        **scored(classes, np.array([0.6, 0.3, 0.1]), 0.5),
        aggregate="mean_log",
        n_slices=2,
        registration_score=0.9,
        slices=[
            SlicePrediction(
                index=i,
                z_mm=float(i),
                informative=True,
                gradcam=f"sub-01.s00{i}.png",
                **{
                    k: v
                    for k, v in scored(classes, np.array(p), 0.5).items()
                    if k != "low_confidence"
                },
            )
            for i, p in enumerate([[0.5, 0.4, 0.1], [0.8, 0.1, 0.1]])
        ],
    )
    broken_volume = VolumePrediction(index=4, filename="cut.nii.gz", status=422, error="cut")
    predictions = [_image("bad.png", error="unreadable"), ood, good, volume, broken_volume]
    # when they are rendered as the CLI's JSON/CSV rows
    rows = records(predictions, classes, gradcam=True)
    # then every row has the same columns, in one order that failures do not change
    columns = ["file", "stage", "confidence", "low_confidence", "error", *classes]
    columns += ["out_of_distribution", "ood_reason", "seen_in_training", "training_correlation"]
    columns += ["kind", "n_slices", "aggregate", "registration_score", "n_slices_used"]
    columns += ["brain_model", "pooled_stage", "set_text", "gradcam"]
    assert all(list(r) == columns for r in rows)
    assert [r["kind"] for r in rows] == ["image", "image", "image", "volume", "volume"]
    assert rows[0]["out_of_distribution"] is None and rows[0]["low_confidence"] is False
    assert rows[1]["stage"] == "" and rows[1]["A"] is None and rows[1]["gradcam"] == ""
    assert rows[2]["B"] == 0.7 and rows[2]["ood_reason"] == "" and rows[2]["gradcam"] == "g.png"
    # a volume's overlays, most informative first; a failed volume has none (not null)
    assert volume.informative_slices == [1, 0]
    assert rows[3]["gradcam"] == "sub-01.s001.png;sub-01.s000.png" and rows[4]["gradcam"] == ""
    assert volume_details([volume], gradcam=True)[0]["gradcam"] == [
        "sub-01.s001.png",
        "sub-01.s000.png",
    ]


def test_predict_without_any_such_input_is_a_usage_error(project: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "nope*.png")])
    assert result.exit_code == 2 and "no such file, folder or glob match" in result.output


# --------------------------------------------------------------------------- CLI


def test_predict_json_matches_pyfunc_and_summarises(
    project: Path, demo: DemoChampion, tmp_path: Path, mri_slices: list[np.ndarray]
) -> None:
    files = [write_slice(tmp_path / "in" / f"s{i}.png", mri_slices[i]) for i in range(3)]
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "in"), "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["model"] == "models:/alzstage-demo@champion"  # the configured demo data's
    assert doc["model_version"] == demo.version and doc["model_name"] == "alzstage-demo"
    assert doc["dataset"] == "demo" and doc["synthetic_demo"] is True
    assert "data.source: demo" in doc["model_choice"] and "SYNTHETIC" in doc["provenance"]
    preds = doc["predictions"]
    assert [Path(p["file"]).name for p in preds] == ["s0.png", "s1.png", "s2.png"]
    got = np.array([[p[c] for c in demo.classes] for p in preds])
    np.testing.assert_allclose(got, _pyfunc_probs(demo, files), atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)
    for p in preds:
        assert p["stage"] == max(demo.classes, key=lambda c: p[c])
        assert p["low_confidence"] == (p["confidence"] < 0.5)
        assert p["out_of_distribution"] is False and p["seen_in_training"] is False
    s = doc["summary"]
    assert s["n_images"] == 3 and sum(s["stage_counts"].values()) == 3
    assert s["low_confidence_threshold"] == 0.5


def test_predict_table_csv_and_bad_file_in_batch(
    project: Path, tmp_path: Path, mri_slices: list[np.ndarray]
) -> None:
    write_slice(tmp_path / "in" / "good.png", mri_slices[0])
    write_png(tmp_path / "in" / "noise.png", 0, (208, 176))
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    table = CliRunner().invoke(app, ["predict", str(tmp_path / "in")], env={"COLUMNS": "200"})
    assert table.exit_code == 1  # a file failed: say so in the exit code...
    assert "good.png" in table.stdout and "batch summary" in table.stdout  # ...but still answer
    assert "broken.png" in table.stdout
    # the noise is answered without a stage, and the reason is printed in full below
    assert "out of distribution" in table.stdout
    assert "noise.png: out of distribution, no stage: not like the training" in table.stdout

    csv = CliRunner().invoke(app, ["predict", str(tmp_path / "in" / "good.png"), "-f", "csv"])
    assert csv.exit_code == 0, csv.output
    df = pd.read_csv(io.StringIO(csv.stdout))
    assert list(df["file"].map(lambda f: Path(f).name)) == ["good.png"]
    assert {"stage", "confidence", "low_confidence", "NonDemented"} <= set(df.columns)


def test_predict_by_version_number(project: Path, demo: DemoChampion, tmp_path: Path) -> None:
    img = write_png(tmp_path / "one.png", 5)
    result = CliRunner().invoke(app, ["predict", str(img), "--model", demo.version, "-f", "json"])
    assert result.exit_code == 0, result.output
    # a bare version is one of the configured dataset's (demo) registered model
    assert json.loads(result.stdout)["model"] == f"models:/alzstage-demo/{demo.version}"


def test_gradcam_overlays_named_by_stem_without_clobbering(
    project: Path, tmp_path: Path, mri_slices: list[np.ndarray]
) -> None:
    a = write_slice(tmp_path / "one" / "scan.png", mri_slices[0])
    b = write_slice(tmp_path / "two" / "scan.png", mri_slices[1])  # same stem, other folder
    out = tmp_path / "cams"
    args = ["predict", str(a), str(b), "--gradcam", str(out), "-f", "json"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    written = sorted(p.name for p in out.iterdir())
    assert written == ["scan.gradcam-2.png", "scan.gradcam.png"]
    doc = json.loads(first.stdout)
    assert {Path(p["gradcam"]).name for p in doc["predictions"]} == set(written)
    with Image.open(out / "scan.gradcam.png") as im:
        assert im.mode == "RGB" and im.size == (176, 208)  # the original's own size
    before = (out / "scan.gradcam.png").read_bytes()
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0, second.output
    assert len(list(out.iterdir())) == 4 and (out / "scan.gradcam.png").read_bytes() == before


def test_gradcam_target_must_be_a_folder(project: Path, tmp_path: Path) -> None:
    img = write_png(tmp_path / "one.png", 0)
    blocker = tmp_path / "afile"
    blocker.write_text("")
    result = CliRunner().invoke(app, ["predict", str(img), "--gradcam", str(blocker)])
    assert result.exit_code == 2 and "not a folder" in result.output


def test_predicting_a_training_slice_says_it_was_seen_in_training(
    project: Path, demo: DemoChampion
) -> None:
    from alzstage.serve.demo import demo_training_files

    train_file = demo_training_files(demo.root / "training-slices")[3]
    result = CliRunner().invoke(app, ["predict", str(train_file), "-f", "json"])
    assert result.exit_code == 0, result.output
    (p,) = json.loads(result.stdout)["predictions"]
    assert p["seen_in_training"] is True and p["training_correlation"] >= 0.999
    assert p["stage"] in demo.classes
    table = CliRunner().invoke(app, ["predict", str(train_file)], env={"COLUMNS": "200"})
    assert "(seen in training)" in table.stdout


# --------------------------------------------------------------------------- one brain


def _brain_folder(root: Path, slices: list[np.ndarray]) -> Path:
    """One brain's slices as PNGs, plus a noise image and a damaged file among them."""
    for i, gray in enumerate(slices):
        write_slice(root / f"slice_{i:02d}.png", gray)
    write_png(root / "slice_98_noise.png", 0, (208, 176))
    (root / "slice_99_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return root


def test_a_folder_of_one_brains_slices_gives_one_brain_answer(
    project: Path, demo: DemoChampion, tmp_path: Path, mri_slices: list[np.ndarray]
) -> None:
    # given a folder of one brain's four slices, a noise image and a damaged file
    folder = _brain_folder(tmp_path / "sub-01", mri_slices[:4])
    # when it is predicted as one brain, as JSON
    result = CliRunner().invoke(app, ["predict", "--brain", str(folder), "-f", "json"])
    # then one brain-level answer: the brain model's stage, its set and the pooled stage
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    (row,) = doc["predictions"]
    (brain,) = doc["brains"]
    assert "volumes" not in doc
    assert row["kind"] == "brain" and row["file"] == str(folder)
    assert row["n_slices"] == 6 and row["n_slices_used"] == 4
    assert row["brain_model"] == "logistic" and row["stage"] == brain["stage"]
    assert brain["stage"] in brain["prediction_set"] and brain["set_confidence"] == 0.9
    assert row["set_text"] == brain["set_text"] == describe_set(brain["prediction_set"], 0.9)
    assert row["pooled_stage"] in demo.classes
    # ... with the per-slice table: the noise and the damaged file are left out, and why
    by_name = {s["filename"]: s for s in brain["slices"]}
    assert [Path(n).name for n in by_name] == [f"slice_{i:02d}.png" for i in range(4)] + [
        "slice_98_noise.png",
        "slice_99_broken.png",
    ]
    noise, broken = (
        by_name[str(folder / "slice_98_noise.png")],
        by_name[str(folder / "slice_99_broken.png")],
    )
    assert noise["out_of_distribution"] is True and noise["stage"] is None
    assert noise["left_out"].startswith("out of distribution: ")
    assert "damaged or truncated" in broken["left_out"] and broken["probabilities"] is None
    used = [s for s in brain["slices"] if not s["left_out"]]
    assert len(used) == 4 and all(s["stage"] in demo.classes for s in used)
    # the terminal table says the same in words
    table = CliRunner().invoke(app, ["predict", "--brain", str(folder)], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    text = " ".join(table.stdout.split())
    assert f"sub-01: brain stage {brain['stage']}; set {brain['set_text']}" in text
    assert "slices of sub-01" in text and "left out: out of distribution" in text
    assert "sub-01: left out slice_98_noise.png: out of distribution: not like" in text


def test_the_pyfunc_brain_mode_gives_one_row_like_predict_brain(
    project: Path, demo: DemoChampion, tmp_path: Path, mri_slices: list[np.ndarray]
) -> None:
    from alzstage.serve.demo import scoped_tracking_uri
    from alzstage.tracking import load_pyfunc

    # given one brain's four full-size slices, as a folder and as one array
    folder = tmp_path / "sub-02"
    for i, gray in enumerate(mri_slices[4:8]):
        write_slice(folder / f"s{i}.png", gray)
    with scoped_tracking_uri(demo.tracking_uri):
        model, _ = load_pyfunc(demo.uri)  # mlflow.pyfunc.load_model, as MLflow serves it
    # when the pyfunc is asked for a brain, and for slices
    frame = model.predict(np.stack(mri_slices[4:8]), params={"brain": True})
    per_slice = model.predict(np.stack(mri_slices[4:8]))
    # then ONE row for the brain, with its set; without the parameter, one per slice
    assert len(frame) == 1 and len(per_slice) == 4
    row = frame.iloc[0]
    assert row["n_slices"] == row["n_slices_used"] == 4 and row["left_out"] == 0
    assert row["brain_model"] == "logistic" and row["stage"] in row["prediction_set"]
    assert row["set_text"] == describe_set(list(row["prediction_set"]), 0.9)
    # ... the same answer as `alzstage predict --brain` on the same pixels
    cli = CliRunner().invoke(app, ["predict", "--brain", str(folder), "-f", "json"])
    assert cli.exit_code == 0, cli.output
    (brain,) = json.loads(cli.stdout)["brains"]
    got = np.array([row[c] for c in demo.classes], dtype=np.float64)
    np.testing.assert_allclose(got, [brain["probabilities"][c] for c in demo.classes], atol=1e-6)
    assert row["stage"] == brain["stage"] and list(row["prediction_set"]) == brain["prediction_set"]


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("empty", "the folder is empty"),
        ("nested", "no JPEG/PNG slices directly in this folder (its sub-folders hold 1)"),
        ("text", "the folder holds no JPEG/PNG slices"),
        ("file", "not a folder"),
        ("missing", "no such folder"),
    ],
)
def test_a_brain_folder_without_slices_is_one_line_naming_the_folder(
    project: Path, tmp_path: Path, layout: str, expected: str
) -> None:
    # given a folder (or not) that holds no slice of its own
    folder = tmp_path / "sub-03"
    if layout == "file":
        folder = write_png(tmp_path / "one.png", 0)
    elif layout != "missing":
        folder.mkdir()
    if layout == "nested":
        write_png(folder / "deeper" / "a.png", 0)
    if layout == "text":
        (folder / "notes.txt").write_text("no slices here")
    # when it is predicted as one brain
    result = CliRunner().invoke(app, ["predict", "--brain", str(folder)])
    # then a usage error, one line naming the folder and the fix, before any model loads
    assert result.exit_code == 2
    (line,) = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert str(folder) in line and expected in line, line


def test_a_model_without_a_brain_model_answers_a_brain_by_pooling_and_says_so() -> None:
    from alzstage.inference.brain import NO_BRAIN_MODEL, brain_answer, brain_model_from_meta

    # given the meta of a model logged before brain models existed, and one brain's slices
    classes = ["A", "B", "C"]
    meta = {"classes": classes, "input_size": [32, 32], "temperature": 1.0}
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.5, 0.4, 0.1]])
    grays = [np.full((20, 16), 100, np.uint8)] * 3
    # when the brain is answered with what the meta holds
    answer = brain_answer(brain_model_from_meta(meta), classes, probs, grays)
    # then the fixed pooling rule's stage, no set, and the answer names the fallback
    pooled = np.exp(np.log(probs).mean(axis=0))
    np.testing.assert_allclose(answer.probabilities, pooled / pooled.sum())
    assert answer.stage == answer.pooled_stage == "A"
    assert answer.members is None and answer.set_text is None
    assert answer.fields(0.5)["brain_model"] == NO_BRAIN_MODEL
