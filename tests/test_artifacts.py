"""Stage artefacts are typed: what one stage writes, the next reads back, or is told why not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from alzstage.artifacts import (
    MANIFEST_CSV,
    SPLIT_CSV,
    SPLITS,
    VOLUMES_CSV,
    AugmentedSet,
    FoldsReport,
    MetricsReport,
    SplitReport,
    TrainReport,
    TrainRun,
    ValidationReport,
    fit_slices_csv,
    fold_predictions_csv,
    fold_test_column,
    read_folds,
    read_manifest,
    read_split,
    read_volumes,
    role_column,
    write_folds,
    write_split,
)
from alzstage.errors import AlzstageError
from alzstage.files import json_text


def train_run() -> TrainRun:
    return TrainRun(
        model_md5="0123456789abcdef0123456789abcdef",
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
    # given a train_run.json without the md5 of its model file
    path = tmp_path / "train_run.json"
    doc = train_run().model_dump(mode="json")
    del doc["model_md5"]
    path.write_text(json.dumps(doc))

    # when it is read
    with pytest.raises(AlzstageError) as caught:
        TrainRun.read(path)

    # then one line says where, what and how to fix it
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message and "'model_md5' is missing" in message
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


def train_summary() -> dict:
    """What the train stage writes of a scratch run: no history and no timings (a demo run's)."""
    return {
        "strategy": "_DefaultDistributionStrategy",
        "replicas": 1,
        "recipe": "scratch",
        "backbone": "resnet_compact",
        "parameters": 325716,
        "scratch_epochs": 30,
        "scratch_best_val_balanced_accuracy": 0.7552083333333334,
        "temperature": 1.4286932934589867,
        "val_ece_before": 0.07693065609782936,
        "val_ece_after": 0.09108572178783893,
        "class_weight": {"MildDemented": 1.0833333333333333, "NonDemented": 0.7647058823529411},
        "n_train_samples": 416,
        "n_val": 96,
    }


def test_the_train_report_keeps_the_bytes_it_had_as_a_plain_dict(tmp_path: Path) -> None:
    # given the summary the train stage used to write with write_json
    summary = train_summary()
    path = tmp_path / "reports" / "train.json"

    # when it is checked against its contract, written, and read back
    TrainReport.check(summary, path).write(path)
    back = TrainReport.read(path)

    # then the file is byte for byte what write_json wrote (no null for an unset key),
    # and the reader gets typed fields and the phase figures
    assert path.read_text() == json_text(summary)
    assert back.temperature == summary["temperature"] and back.recipe == "scratch"
    assert back.cut_cache_mb is None
    assert back.model_extra == {k: v for k, v in summary.items() if k.startswith("scratch_")}


def test_the_transfer_recipe_s_train_report_round_trips(tmp_path: Path) -> None:
    # given a transfer run: two phases, the activation cache, stopped at its target
    summary = {k: v for k, v in train_summary().items() if not k.startswith("scratch_")}
    summary |= {"recipe": "transfer", "cut_cache_mb": 12.5, "stopped_at_target_epoch": 4}
    summary["activation_cache"] = [{"name": "train", "key": "ab12", "status": "hit"}]
    for phase in ("head", "fine_tune"):
        summary |= {f"{phase}_epochs": 2, f"{phase}_best_val_loss": 0.61}
    path = tmp_path / "train.json"

    # when it is written and read back
    TrainReport.check(summary, path).write(path)

    # then nothing is lost or added
    assert json.loads(path.read_text()) == summary
    assert TrainReport.read(path).activation_cache == summary["activation_cache"]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"tempreature": 1.2}, "key 'tempreature': String should match pattern"),
        ({"scratch_epochs": "30"}, "key 'scratch_epochs.int': Input should be a valid integer"),
        ({"temperature": None}, "key 'temperature': Input should be a valid number"),
        ({"train_seconds": 62.6}, "key 'train_seconds': String should match pattern"),
    ],
)
def test_a_train_report_names_the_key_it_refuses(tmp_path: Path, change: dict, named: str) -> None:
    # given a train.json with a misspelt key, a phase figure as text, or no temperature
    path = tmp_path / "train.json"
    path.write_text(json.dumps(train_summary() | change))

    # when it is read
    with pytest.raises(AlzstageError) as caught:
        TrainReport.read(path)

    # then one line names the file, the key and the stage to run again
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    assert named in message and "alzstage train" in message


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


# --------------------------------------------------------------------------- step two


def test_a_csv_file_left_empty_is_refused_in_one_line(tmp_path: Path) -> None:
    # given a split.csv a killed writer left at 0 bytes
    path = tmp_path / "split.csv"
    path.write_text("")
    # when it is read, then one line names it and the stage (no pandas traceback)
    with pytest.raises(
        AlzstageError, match=r"split\.csv: empty \(no header\); run `alzstage split`"
    ):
        read_split(path)


def test_evaluate_reads_the_validation_counts_and_names_validate_when_one_is_missing(
    tmp_path: Path,
) -> None:
    # given a validation.json with its counts and detail, and one that lost n_valid
    path = tmp_path / "validation.json"
    path.write_text(json.dumps({"n_images": 10, "n_valid": 9, "checks": {"size": 1}}))
    # when evaluate reads them, then the counts are typed and the detail passes through
    report = ValidationReport.read(path)
    assert (report.n_valid, report.n_images) == (9, 10)
    assert report.model_dump(mode="json")["checks"] == {"size": 1}
    path.write_text(json.dumps({"n_images": 10}))
    expected = r"validation\.json: key 'n_valid' is missing; run `alzstage validate`"
    with pytest.raises(AlzstageError, match=expected):
        ValidationReport.read(path)


def augmented(n: int = 3, views: int = 1) -> AugmentedSet:
    rng = np.random.default_rng(0)
    m = n * (1 + views)
    return AugmentedSet(
        images=rng.integers(0, 256, (m, 4, 5), dtype=np.uint8),
        labels=np.arange(m, dtype=np.int64) % 2,
        source=np.concatenate([np.arange(n), np.arange(n)]),
        paths=np.array([f"images/{i}.jpg" for i in range(n)]),
        subjects=np.array(["007"] * n),
    )


def test_the_augmented_set_round_trips_through_train_npz(tmp_path: Path) -> None:
    # given the augment stage's arrays, written through the contract
    path = augmented().write(tmp_path / "augmented")
    # when train reads them back
    back = AugmentedSet.read(tmp_path / "augmented")
    # then every array is as written, in train.npz
    assert path == tmp_path / "augmented" / "train.npz"
    for name in ("images", "labels", "source", "paths", "subjects"):
        np.testing.assert_array_equal(getattr(back, name), getattr(augmented(), name))
    assert back.subjects.tolist() == ["007"] * 3


def test_a_train_npz_without_labels_names_the_array_and_augment(tmp_path: Path) -> None:
    # given a train.npz from a writer that forgot the labels
    folder = tmp_path / "augmented"
    folder.mkdir()
    full = augmented()
    np.savez(folder / "train.npz", images=full.images, source=full.source, paths=full.paths)
    # when train reads it, then one line names the file, the array and the stage
    with pytest.raises(AlzstageError) as caught:
        AugmentedSet.read(folder)
    assert str(caught.value) == (
        f"{folder / 'train.npz'}: no array 'labels'; "
        "run `alzstage augment` (or `dvc repro augment`) again"
    )
    # and a file that is no .npz at all is named too
    (folder / "train.npz").write_bytes(b"not a zip")
    with pytest.raises(AlzstageError, match=r"train\.npz: not a readable \.npz"):
        AugmentedSet.read(folder)


def test_inconsistent_augmented_arrays_are_neither_written_nor_read(tmp_path: Path) -> None:
    # given views whose source points past the originals
    bad = augmented()
    bad = AugmentedSet(bad.images, bad.labels, bad.source + 2, bad.paths, bad.subjects)
    # when augment writes them, then nothing is written
    with pytest.raises(AlzstageError, match=r"train\.npz: not written, labels or source"):
        bad.write(tmp_path / "augmented")
    assert not (tmp_path / "augmented").exists()
    # and a file that holds them anyway is refused at the read
    (tmp_path / "augmented").mkdir()
    np.savez(tmp_path / "augmented" / "train.npz", **vars(bad))
    with pytest.raises(AlzstageError, match="out of range; run `alzstage augment`"):
        AugmentedSet.read(tmp_path / "augmented")
    with pytest.raises(AlzstageError, match="not found; run `alzstage augment`"):
        AugmentedSet.read(tmp_path / "elsewhere")


def folds_frame(repeats: int = 1) -> pd.DataFrame:
    """Four subjects over two folds: fold 0 tests s0 and s1, fold 1 tests s2 and s3."""
    rows = []
    for s in range(4):
        test = s // 2
        row = {"path": f"images/{s}.jpg", "label": "AD", "subject": f"s{s}"}
        for r in range(repeats):
            row[fold_test_column(r)] = test
            for i in range(2):
                row[role_column(i, r)] = "test" if i == test else ("val" if s == 3 else "train")
        rows.append(row)
    return pd.DataFrame(rows)


def test_folds_csv_round_trips_with_every_repeat(tmp_path: Path) -> None:
    # given cv_split's folds, two repeats
    path = write_folds(folds_frame(repeats=2), tmp_path / "folds.csv")
    # when cv_fold or cv_report reads them
    back = read_folds(path)
    # then the test folds are whole numbers and the roles text, in the columns written
    assert list(back.columns) == list(folds_frame(repeats=2).columns)
    assert back["r1_test_fold"].dtype == "int64"
    pd.testing.assert_frame_equal(back, folds_frame(repeats=2))


def test_a_folds_row_whose_role_disagrees_with_its_test_fold_is_refused(tmp_path: Path) -> None:
    # given a folds.csv where subject s0 is tested by fold 0 but trains in it
    frame = folds_frame()
    frame.loc[0, "fold_0"] = "train"
    path = tmp_path / "folds.csv"
    frame.to_csv(path, index=False)
    # when cv_fold reads it, then the row, both columns and cv_split are named
    expected = (
        f"{path}: row 1: test_fold is 0 but fold_0 is 'train'; "
        "run `alzstage cv-split` (or `dvc repro cv/dvc.yaml`) again"
    )
    with pytest.raises(AlzstageError) as caught:
        read_folds(path)
    assert str(caught.value) == expected
    # and cv_split's writer refuses the same table
    with pytest.raises(AlzstageError, match="not written, row 1"):
        write_folds(frame, tmp_path / "new.csv")
    assert not (tmp_path / "new.csv").exists()


def test_a_folds_file_missing_a_later_repeats_role_column_is_refused(tmp_path: Path) -> None:
    # given repeat 1's test column without its role columns
    path = tmp_path / "folds.csv"
    folds_frame(repeats=2).drop(columns=["r1_fold_1"]).to_csv(path, index=False)
    with pytest.raises(AlzstageError, match=r"no column r1_fold_1; run `alzstage cv-split`"):
        read_folds(path)
    with pytest.raises(AlzstageError, match=r"not found; run `alzstage cv-split`"):
        read_folds(tmp_path / "nothing.csv")


def folds_report() -> dict:
    return {
        "k": 2,
        "repeats": 1,
        "n_subjects": 4,
        "n_images": 4,
        "subjects_tested_once": 4,
        "subjects_never_tested": [],
        "subjects_per_fold_role_class": {"0": {"test": {"AD": 2}}},
        "tiny_classes": {
            "AD": {
                "n_subjects": 4,
                "n_images": 4,
                "min_subjects_per_class": 5,
                "policy": "shared",
                "decision": "shared: ...",
            }
        },
    }


def test_folds_json_round_trips_and_a_bad_count_names_the_key(tmp_path: Path) -> None:
    # given cv_split's summary written through its contract
    path = FoldsReport.check(folds_report(), tmp_path / "folds.json").write(tmp_path / "f.json")
    # when cv_report reads it, then it is the summary written
    assert FoldsReport.read(path).model_dump(mode="json") == folds_report()
    # and a count that is not a whole number is named with the stage to re-run
    path.write_text(json.dumps(folds_report() | {"n_subjects": "four"}))
    with pytest.raises(AlzstageError, match=r"key 'n_subjects'.*run `alzstage cv-split`"):
        FoldsReport.read(path)


CV_CLASSES = ["AD", "CN"]


def fold_rows() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    p = rng.dirichlet([1, 1], size=4)
    frame = pd.DataFrame(
        {
            "path": [f"images/{i}.jpg" for i in range(4)],
            "label": ["AD", "CN", "AD", "CN"],
            "subject": ["007", "008", "009", "010"],
            "fold": 1,
            "repeat": 0,
            "predicted": [CV_CLASSES[i] for i in p.argmax(axis=1)],
            "p_AD": np.round(p[:, 0], 6),
            "p_CN": np.round(p[:, 1], 6),
            "morph_csf": rng.random(4) / 3,
        }
    )
    for name in ("majority", "nearest", "pixel"):
        frame[f"baseline_{name}"] = "AD"
    return frame


def test_a_folds_predictions_come_back_bit_for_bit_with_ids_as_text(tmp_path: Path) -> None:
    # given a fold's predictions written by cv_fold through the contract
    contract = fold_predictions_csv(CV_CLASSES, ["morph_csf"])
    path = contract.write(fold_rows(), tmp_path / "predictions.csv")
    # when cv_report reads them
    back = contract.read(path)
    # then the numbers are those pandas reads from the file, the ids text ('007')
    pd.testing.assert_frame_equal(back, pd.read_csv(path, dtype={"path": str, "subject": str}))
    assert back["subject"].tolist() == ["007", "008", "009", "010"]
    np.testing.assert_allclose(back["p_AD"], fold_rows()["p_AD"], rtol=0, atol=1e-12)


def test_a_folds_predictions_without_a_class_column_name_the_column_and_cv_fold(
    tmp_path: Path,
) -> None:
    # given predictions from a run with other classes (no p_CN column)
    path = tmp_path / "predictions.csv"
    fold_rows().drop(columns=["p_CN"]).to_csv(path, index=False)
    # when cv_report reads them, then the column and the stage are named
    expected = r"no column p_CN; run `alzstage cv-fold --fold <i>` \(or `dvc repro cv/dvc.yaml`\)"
    with pytest.raises(AlzstageError, match=expected):
        fold_predictions_csv(CV_CLASSES, ["morph_csf"]).read(path)
    # and fit_slices.csv needs each slice's role on top
    fold_rows().to_csv(path, index=False)
    with pytest.raises(AlzstageError, match="no column role"):
        fit_slices_csv(CV_CLASSES, ["morph_csf"]).read(path)


def test_skipped_csv_names_what_download_writes_and_a_lost_column_names_download(
    tmp_path: Path,
) -> None:
    from alzstage.artifacts import SKIPPED_CSV
    from alzstage.data.sources.layout import SKIPPED_COLUMNS, Skipped, read_skipped, write_skipped

    # given download's skipped.csv with one file in it
    assert SKIPPED_CSV.names == SKIPPED_COLUMNS
    path = tmp_path / "skipped.csv"
    kept = Skipped("train/AD/0.bmp", "AD", "unsupported_format", "BMP image, 3 MB")
    write_skipped([kept], path)
    # when validate reads it, then the row comes back as written
    assert read_skipped(path) == [kept]
    # and a file that lost its reason column is refused in one line naming download
    pd.read_csv(path).drop(columns=["reason"]).to_csv(path, index=False)
    expected = r"skipped\.csv: no column reason; run `alzstage download`"
    with pytest.raises(AlzstageError, match=expected):
        read_skipped(path)
