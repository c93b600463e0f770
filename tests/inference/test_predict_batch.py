"""``alzstage predict --output``: batch prediction on the compute engine, streamed in order.

Against the session's demo champion (tests/conftest.py), on a local cluster of two
worker processes, compared with the in-process ``alzstage predict`` on the same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from neuro_volumes import moved_affine, save_nifti, synthetic_volume
from PIL import Image
from typer.testing import CliRunner

from alzstage.cli import app
from alzstage.config import Paths as ProjectPaths
from alzstage.config import load_params
from alzstage.inference import batch as predict_batch
from alzstage.inference.batch import chunked, output_columns, run_batch_predict
from alzstage.inference.prediction import CHECK_COLUMNS, VOLUME_COLUMNS, records
from alzstage.serve.demo import DemoChampion

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo: DemoChampion) -> Path:
    """The repo's params.yaml with two local workers, the registry at the demo store."""
    root = tmp_path / "project"
    root.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["compute"]["workers"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("ALZSTAGE_ROOT", str(root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", demo.tracking_uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", demo.tracking_uri)
    return root


@pytest.fixture
def inputs(tmp_path: Path, mri_slices: list[np.ndarray]) -> Path:
    """23 slices (real-like, noise, one damaged file) and a 3 mm volume, in one folder."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    for i in range(18):
        Image.fromarray(mri_slices[i % len(mri_slices)]).save(folder / f"a{i:02d}.png")
    rng = np.random.default_rng(0)
    for i in range(3):  # out of distribution for the model's input check
        Image.fromarray(rng.integers(0, 256, (60, 50), dtype=np.uint8)).save(folder / f"n{i}.png")
    (folder / "b-broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    data, affine = synthetic_volume(moved_affine((2, -3, 1), (1, 2, -2)), resolution=3.0)
    save_nifti(folder / "m-scan.nii.gz", data, affine)
    Image.fromarray(mri_slices[0]).save(folder / "z-last.png")
    return folder


def reference(inputs: Path) -> pd.DataFrame:
    """What the interactive ``alzstage predict --format csv`` gives, in this process."""
    from alzstage.inference.command import run_predict

    run = run_predict([str(inputs)], None, load_params(), ProjectPaths(), announce=lambda _: None)
    return pd.DataFrame(records(run.predictions, run.classes))


def assert_same_rows(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Same columns, files in the same order, same values; probabilities to 1e-5 (TensorFlow
    rounds a little differently with the batch size: here chunks of 5, there one batch)."""
    assert list(got.columns) == list(want.columns)
    assert got["file"].tolist() == want["file"].tolist()
    for column in want.columns:
        a, b = got[column], want[column]
        if pd.api.types.is_numeric_dtype(b) and not pd.api.types.is_bool_dtype(b):
            np.testing.assert_allclose(a.astype(float), b.astype(float), atol=1e-5, err_msg=column)
        else:
            text = [str(v) if not pd.isna(v) and v != "" else "" for v in a]
            assert text == [str(v) if not pd.isna(v) and v != "" else "" for v in b], column


@pytest.mark.integration
def test_batch_predict_writes_csv_and_parquet_in_input_order_equal_to_predict(
    project: Path, inputs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given: 24 inputs, in chunks of 5 images (the volume alone), and the in-process answer
    monkeypatch.setattr(predict_batch, "CHUNK_IMAGES", 5)
    want = reference(inputs)
    assert want["error"].str.contains("b-broken.png").sum() == 1
    assert (want["out_of_distribution"] == True).sum() == 3  # noqa: E712
    # when: the CLI writes the CSV on two worker processes
    csv = project / "out" / "results.csv"
    result = CliRunner().invoke(app, ["predict", str(inputs), "--output", str(csv)])
    # then: one row per input, in order, the same numbers; exit 1 for the broken file
    assert result.exit_code == 1, result.output
    assert "24 inputs ->" in result.stdout and "1 errors" in result.stdout
    assert_same_rows(pd.read_csv(csv, keep_default_na=False, na_values=[""]), want)
    assert not list(csv.parent.glob(".*.tmp"))
    # when / then: Parquet, through the API, gives the same table with fixed types
    parquet = project / "out" / "results.parquet"
    summary = run_batch_predict(
        [str(inputs)], None, load_params(), ProjectPaths(), parquet, announce=lambda _: None
    )
    table = pd.read_parquet(parquet)
    assert_same_rows(table, want)
    assert summary.n_inputs == 24 and summary.n_errors == 1 and summary.n_out_of_distribution == 3
    assert table["low_confidence"].dtype == bool


def test_chunks_keep_order_and_put_each_volume_alone() -> None:
    files = [Path(f) for f in ["a.png", "b.png", "c.nii.gz", "d.png", "e.png", "f.png", "g.png"]]
    assert list(chunked(files, 3)) == [
        ["a.png", "b.png"],
        ["c.nii.gz"],
        ["d.png", "e.png", "f.png"],
        ["g.png"],
    ]


def test_output_columns_are_the_records_columns_of_the_whole_batch() -> None:
    assert output_columns(["A", "B"], True, False) == [
        "file", "stage", "confidence", "low_confidence", "error", "A", "B", *CHECK_COLUMNS
    ]  # fmt: skip
    assert output_columns(["A"], False, True)[-len(VOLUME_COLUMNS) - 1 :] == [
        "kind",
        *VOLUME_COLUMNS,
    ]


def test_a_chunk_with_only_null_flags_keeps_the_parquet_types(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    columns = output_columns(["A"], True, True)
    frames = [
        pd.DataFrame({"file": ["x.png"], "stage": [""], "error": ["x.png: unreadable"]}),
        pd.DataFrame(
            {
                "file": ["y.png"],
                "stage": ["A"],
                "confidence": [0.9],
                "low_confidence": [False],
                "error": [""],
                "A": [0.9],
                "out_of_distribution": [False],
                "kind": ["image"],
            }
        ),
    ]
    target = tmp_path / "r.parquet"
    with predict_batch.result_writer(target, columns) as write:
        for frame in frames:
            write(frame)
    table = pq.read_table(target)
    assert table.num_rows == 2 and table.schema.field("low_confidence").type == "bool"
    assert table.column("kind").to_pylist() == ["image", "image"]


def test_an_unknown_output_suffix_is_refused_before_any_work(project: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["predict", str(tmp_path), "--output", "r.xlsx"])
    assert result.exit_code == 2
    assert "--output r.xlsx: write a .csv or a .parquet file" in result.output


def test_gradcam_does_not_combine_with_batch_mode(project: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["predict", str(tmp_path), "--output", "r.csv", "--gradcam", str(tmp_path / "g")]
    )
    assert result.exit_code == 2 and "--gradcam does not combine with --output" in result.output
