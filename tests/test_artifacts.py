"""Stage artefacts are typed: what one stage writes, the next reads back, or is told why not."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from alzstage.artifacts import (
    MANIFEST_CSV,
    SPLIT_CSV,
    SPLITS,
    VOLUMES_CSV,
    MetricsReport,
    SplitReport,
    TrainRun,
    read_manifest,
    read_split,
    read_volumes,
    write_split,
)
from alzstage.errors import AlzstageError


def train_run() -> TrainRun:
    return TrainRun(
        run_id="r1",
        model_uri="models:/m/1",
        runs_uri="runs:/r1/model",
        temperature=1.3,
        input_size=(176, 208),
        recipe="transfer",
        backbone="efficientnetb0",
        weights="imagenet",
    )


def test_train_run_round_trips_through_its_file(tmp_path: Path) -> None:
    # given a train run written by the train stage's type
    path = train_run().write(tmp_path / "models" / "train_run.json")

    # when evaluate or promote reads it back
    back = TrainRun.read(path)

    # then it is the same value, and the file is plain JSON a person can read
    assert back == train_run()
    assert json.loads(path.read_text())["input_size"] == [176, 208]


def test_a_missing_key_names_the_file_the_key_and_the_stage_to_rerun(tmp_path: Path) -> None:
    # given a train_run.json without its model URI
    path = tmp_path / "train_run.json"
    doc = train_run().model_dump(mode="json")
    del doc["model_uri"]
    path.write_text(json.dumps(doc))

    # when it is read
    with pytest.raises(AlzstageError) as caught:
        TrainRun.read(path)

    # then one line says where, what and how to fix it
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message and "'model_uri' is missing" in message
    assert "alzstage train" in message
    assert isinstance(caught.value, AlzstageError)


def test_a_wrongly_typed_value_is_refused_not_coerced(tmp_path: Path) -> None:
    # given a metrics.json whose leak flag is the string "False" (truthy if coerced by hand)
    path = tmp_path / "metrics.json"
    doc = {
        "balanced_accuracy": 0.5,
        "macro_f1": 0.5,
        "accuracy": 0.5,
        "split_fingerprint": "f" * 64,
        "split_strategy": "subject",
        "split_leaky": "False",
        "dataset": "demo",
        "data_source": "demo",
    }
    path.write_text(json.dumps(doc))

    # when promote reads it, then the key is named
    with pytest.raises(AlzstageError, match=r"metrics\.json: key 'split_leaky'.*alzstage evaluate"):
        MetricsReport.read(path)


def test_a_missing_file_says_which_stage_writes_it(tmp_path: Path) -> None:
    with pytest.raises(AlzstageError, match=r"split\.json: not found; run `alzstage split`"):
        SplitReport.read(tmp_path / "split.json")


def test_reports_keep_the_keys_no_reader_declares(tmp_path: Path) -> None:
    # given a split.json with the detail the model card and the headline use
    path = tmp_path / "split.json"
    doc = {
        "strategy": "subject",
        "leaky": False,
        "fingerprint": "f" * 64,
        "warning": "",
        "subject_ids": "given",
        "dataset": "demo",
        "data_source": "demo",
        "counts": {"test": {"total": 3}},
    }
    path.write_text(json.dumps(doc))

    # when it is read, then the declared fields are typed and the rest passes through
    split = SplitReport.read(path)
    assert split.leaky is False
    assert split.model_dump(mode="json") == doc


def test_a_writer_is_stopped_before_it_writes_a_report_a_reader_would_refuse(
    tmp_path: Path,
) -> None:
    # given an evaluate report that lost its dataset name
    report = {"balanced_accuracy": 0.5, "macro_f1": 0.5, "accuracy": 0.5, "split_leaky": False}
    report |= {"split_fingerprint": "f", "split_strategy": "subject", "data_source": "demo"}

    # when evaluate checks it against the contract, then nothing is written
    expected = r"metrics\.json: not written, key 'dataset' is missing$"
    with pytest.raises(AlzstageError, match=expected):
        MetricsReport.check(report, tmp_path / "metrics.json")
    assert not (tmp_path / "metrics.json").exists()


def test_promote_refuses_metrics_without_a_split_fingerprint(tmp_path: Path) -> None:
    # given a metrics.json from before the split fingerprint was recorded
    from alzstage.config import Params, Paths
    from alzstage.promote import run_promote

    paths = Paths(tmp_path)
    train_run().write(paths.train_run)
    paths.reports.mkdir(parents=True, exist_ok=True)
    paths.metrics.write_text(
        json.dumps(
            {
                "balanced_accuracy": 0.5,
                "macro_f1": 0.5,
                "accuracy": 0.5,
                "split_strategy": "subject",
                "split_leaky": False,
                "dataset": "demo",
                "data_source": "demo",
            }
        )
    )

    # when promote runs, then it stops before registering anything (no empty-string tag)
    with pytest.raises(AlzstageError, match="'split_fingerprint' is missing"):
        run_promote(Params(), paths)


# --------------------------------------------------------------------------- CSV files


def split_rows() -> list[dict[str, str]]:
    return [
        {
            "path": f"images/AD/{i}.jpg",
            "label": "AD",
            "subject": "007",
            "subject_source": "given",
            "source_split": "",
            "split": split,
        }
        for i, split in enumerate(SPLITS)
    ]


def test_split_csv_round_trips_with_ids_kept_as_text(tmp_path: Path) -> None:
    # given split rows built from the contract and written by the split stage's writer
    path = write_split(SPLIT_CSV.frame(split_rows()), tmp_path / "split.csv")

    # when a later stage reads it back
    back = read_split(path)

    # then every value is the text written (subject '007' is not the number 7)
    assert list(back.columns) == [c for c in SPLIT_CSV.names if c != "sha256"]
    assert back.to_dict("records") == split_rows()


def test_a_split_csv_without_a_column_names_the_file_the_column_and_the_stage(
    tmp_path: Path,
) -> None:
    # given a split.csv that lost its subject column
    path = tmp_path / "split.csv"
    SPLIT_CSV.frame(split_rows()).drop(columns=["subject"]).to_csv(path, index=False)

    # when augment, train or evaluate reads it
    with pytest.raises(AlzstageError) as caught:
        read_split(path)

    # then one line says where, what and how to fix it
    message = str(caught.value)
    assert "\n" not in message
    assert message == (
        f"{path}: no column subject; run `alzstage split` (or `dvc repro split`) again"
    )


def test_a_split_name_outside_train_val_test_is_refused(tmp_path: Path) -> None:
    rows = split_rows()
    rows[1]["split"] = "holdout"
    path = tmp_path / "split.csv"
    pd.DataFrame(rows).to_csv(path, index=False)

    with pytest.raises(AlzstageError, match=r"column split is 'holdout' in row 2, must be one of"):
        read_split(path)


def test_a_writer_is_stopped_before_it_writes_a_csv_a_reader_would_refuse(
    tmp_path: Path,
) -> None:
    # given a split.csv from an earlier run, and new rows with an unknown subject source
    path = write_split(SPLIT_CSV.frame(split_rows()), tmp_path / "split.csv")
    before = path.read_text()
    rows = pd.DataFrame(split_rows()).assign(subject_source="guessed")

    # when the split stage writes them, then nothing is written
    with pytest.raises(AlzstageError, match=r"split\.csv: not written, column subject_source"):
        write_split(rows, path)
    assert path.read_text() == before


def test_manifest_sizes_are_whole_numbers_and_ids_stay_text(tmp_path: Path) -> None:
    row = {c: "" for c in MANIFEST_CSV.names} | {"path": "a.jpg", "subject": "007"}
    path = tmp_path / "manifest.csv"
    pd.DataFrame([row | {"width": "32", "height": "40"}]).to_csv(path, index=False)
    back = read_manifest(path)
    assert back["width"].tolist() == [32] and back["width"].dtype == "int64"
    assert back["subject"].tolist() == ["007"]

    pd.DataFrame([row | {"width": "wide", "height": "40"}]).to_csv(path, index=False)
    expected = r"column width is 'wide' in row 1, must be a whole number; run `alzstage validate`"
    with pytest.raises(AlzstageError, match=expected):
        read_manifest(path)


def test_volume_measurements_are_numbers_and_empty_when_not_measured(tmp_path: Path) -> None:
    # given a volume that was measured and one that stopped before it was
    text = {c.name: "" for c in VOLUMES_CSV.columns if c.dtype is str}
    ok = text | {"file": "a.nii.gz", "status": "ok", "n_slices": "32", "brain_ml": "1200.5"}
    stopped = text | {"file": "b.nii.gz", "status": "voxel_size", "error": "too coarse"}
    path = tmp_path / "volumes.csv"
    pd.DataFrame([ok, stopped], columns=VOLUMES_CSV.names).to_csv(path, index=False)

    # when validate reads the table
    back = read_volumes(path)

    # then measurements are numbers, NaN where missing, and text stays text
    assert back["brain_ml"].iloc[0] == 1200.5 and pd.isna(back["brain_ml"].iloc[1])
    assert back["status"].tolist() == ["ok", "voxel_size"] and back["error"].iloc[0] == ""


def test_volumes_contract_names_the_columns_the_nifti_source_writes() -> None:
    from alzstage.neuro.qc import QC_COLUMNS

    assert VOLUMES_CSV.names == QC_COLUMNS
