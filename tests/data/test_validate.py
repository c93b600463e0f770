"""Tests for the validate stage: every kind of bad file is caught and named, and nothing vanishes.

All fixtures are generated here with Pillow/numpy in tmp_path; no real dataset files.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile, PngImagePlugin

from alzstage.artifacts import read_manifest, read_raw_manifest, write_raw_manifest
from alzstage.config import Params, Paths
from alzstage.data.manifest import MANIFEST_COLUMNS, RawRecord, build_manifest
from alzstage.data.validate import run_validate
from alzstage.data.validation.checks import IMAGE_CHECKS, check_images
from alzstage.data.validation.decision import QUARANTINE_COLUMNS, decide
from alzstage.data.validation.gx import run_manifest_suite
from alzstage.data.validation.rules import expectation_specs, suite_frames
from alzstage.errors import AlzstageError

CLASSES = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]
H, W = 40, 32  # small images keep the tests fast; base.image_size is (height, width)


def make_params(**validate: object) -> Params:
    return Params.model_validate({"base": {"image_size": [H, W]}, "validate": validate})


def _pixels(seed: int, size: tuple[int, int] = (W, H)) -> np.ndarray:
    """A unique, high-contrast greyscale image (numpy shape is height x width)."""
    return np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)


def _jpeg_bytes(arr: np.ndarray, mode: str = "L") -> bytes:
    im = Image.fromarray(arr)
    if mode != "L":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_file(raw: Path, rel: str, kind: str, seed: int, source: Path | None = None) -> Path:
    """Write one fixture file of the given kind at raw/rel."""
    path = raw / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "good":
        path.write_bytes(_jpeg_bytes(_pixels(seed)))
    elif kind == "zero_byte":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a picture\n")
    elif kind == "truncated":
        data = _jpeg_bytes(_pixels(seed))
        path.write_bytes(data[: len(data) // 2])
    elif kind == "rgb":
        path.write_bytes(_jpeg_bytes(_pixels(seed), mode="RGB"))
    elif kind == "wrong_size":
        path.write_bytes(_jpeg_bytes(_pixels(seed, size=(W + 8, H))))
    elif kind == "blank":
        path.write_bytes(_jpeg_bytes(np.full((H, W), 7, dtype=np.uint8)))
    elif kind == "copy":
        assert source is not None
        path.write_bytes(source.read_bytes())
    elif kind == "png":
        # Same pixels for the same seed, different bytes per file: a text chunk differs.
        info = PngImagePlugin.PngInfo()
        info.add_text("name", rel)
        Image.fromarray(_pixels(seed)).save(path, format="PNG", pnginfo=info)
    else:
        raise ValueError(kind)
    return path


def make_dataset(
    root: Path, per_class: int = 3, extra: list[tuple[str, str, str, int]] = ()
) -> tuple[Paths, pd.DataFrame]:
    """Good images for every class plus ``extra`` (rel, label, kind, seed); writes the manifest.

    A ``copy`` kind copies the file of the same seed written earlier by ``good``.
    """
    paths = Paths(root)
    raw = paths.raw
    records: list[RawRecord] = []
    by_seed: dict[int, Path] = {}
    seed = 1000
    for label in CLASSES:
        for i in range(per_class):
            p = write_file(raw, f"images/{label}/{label}_{i:02d}.jpg", "good", seed)
            by_seed[seed] = p
            records.append(RawRecord(path=p, label=label))
            seed += 1
    for rel, label, kind, s in extra:
        p = write_file(raw, rel, kind, s, source=by_seed.get(s))
        by_seed.setdefault(s, p)
        records.append(RawRecord(path=p, label=label))
    manifest = build_manifest(records, raw)
    paths.raw_manifest.parent.mkdir(parents=True, exist_ok=True)
    write_raw_manifest(manifest, paths.raw_manifest)
    return paths, read_raw_manifest(paths.raw_manifest)


def validate_frame(paths: Paths, params: Params):
    manifest = read_raw_manifest(paths.raw_manifest)
    problems = check_images(manifest, paths.raw, params)
    suite = run_manifest_suite(manifest, params, None)
    return manifest, problems, suite, decide(manifest, problems, suite, params)


# Each bad kind -> (fixture rows, path expected in quarantine, expected reason code).
BAD_CASES = {
    "zero_byte": ([("images/MildDemented/empty.jpg", "MildDemented", "zero_byte", 1)], "zero_byte"),
    "text_as_jpg": ([("images/MildDemented/notes.jpg", "MildDemented", "text", 1)], "not_an_image"),
    "truncated": ([("images/MildDemented/cut.jpg", "MildDemented", "truncated", 1)], "truncated"),
    "rgb": ([("images/MildDemented/colour.jpg", "MildDemented", "rgb", 1)], "wrong_mode"),
    "wrong_size": ([("images/MildDemented/wide.jpg", "MildDemented", "wrong_size", 1)],
                   "wrong_size"),
    "blank": ([("images/MildDemented/flat.jpg", "MildDemented", "blank", 1)], "blank"),
    "unknown_label": ([("images/Other/odd.jpg", "Other", "good", 1)], "unknown_label"),
    # seed 1000 is NonDemented_00.jpg; the copy sorts after it and is the one quarantined.
    "exact_duplicate": ([("images/NonDemented/zz_copy.jpg", "NonDemented", "copy", 1000)],
                        "exact_duplicate"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_each_bad_kind_is_detected_and_named(tmp_path: Path, case: str) -> None:
    extra, reason = BAD_CASES[case]
    bad_path = extra[0][0]
    paths, _ = make_dataset(tmp_path, extra=extra)
    params = make_params(on_failure="quarantine")
    manifest, _, _, outcome = validate_frame(paths, params)

    q = outcome.quarantine.set_index("path")
    assert list(q.index) == [bad_path], outcome.quarantine.to_dict("records")
    assert reason in q.loc[bad_path, "reasons"].split(";")
    assert len(outcome.clean) + len(outcome.quarantine) == len(manifest)
    if case == "exact_duplicate":
        assert "images/NonDemented/NonDemented_00.jpg" in set(outcome.clean["path"])
        assert "same bytes as images/NonDemented/NonDemented_00.jpg" in q.loc[bad_path, "details"]


def test_image_checks_name_the_file_and_the_problem(tmp_path: Path) -> None:
    extra = [
        ("images/MildDemented/a_empty.jpg", "MildDemented", "zero_byte", 1),
        ("images/MildDemented/b_text.jpg", "MildDemented", "text", 2),
        ("images/MildDemented/c_cut.jpg", "MildDemented", "truncated", 3),
        ("images/MildDemented/d_rgb.jpg", "MildDemented", "rgb", 4),
        ("images/MildDemented/e_flat.jpg", "MildDemented", "blank", 5),
    ]
    paths, manifest = make_dataset(tmp_path, extra=extra)
    (paths.raw / "images/NonDemented/NonDemented_01.jpg").unlink()
    problems = check_images(manifest, paths.raw, make_params())
    found = dict(zip(problems["path"], problems["check"], strict=True))
    assert found == {
        "images/MildDemented/a_empty.jpg": "zero_byte",
        "images/MildDemented/b_text.jpg": "not_an_image",
        "images/MildDemented/c_cut.jpg": "truncated",
        "images/MildDemented/d_rgb.jpg": "wrong_mode",
        "images/MildDemented/e_flat.jpg": "blank",
        "images/NonDemented/NonDemented_01.jpg": "missing_file",
    }
    assert set(problems["check"]) <= set(IMAGE_CHECKS)
    detail = problems.set_index("path").loc["images/MildDemented/d_rgb.jpg", "detail"]
    assert "RGB" in detail and "expected L" in detail


def test_changed_file_is_caught_by_hash(tmp_path: Path) -> None:
    paths, manifest = make_dataset(tmp_path)
    write_file(paths.raw, "images/MildDemented/MildDemented_00.jpg", "good", 99)
    problems = check_images(manifest, paths.raw, make_params())
    assert problems[["path", "check"]].values.tolist() == [
        ["images/MildDemented/MildDemented_00.jpg", "sha256_mismatch"]
    ]


def test_expected_mode_any_and_check_size_off_accept_those_files(tmp_path: Path) -> None:
    extra = [
        ("images/MildDemented/colour.jpg", "MildDemented", "rgb", 1),
        ("images/MildDemented/wide.jpg", "MildDemented", "wrong_size", 2),
    ]
    paths, _ = make_dataset(tmp_path, extra=extra)
    params = make_params(expected_mode="any", check_size=False)
    _, problems, suite, outcome = validate_frame(paths, params)
    assert problems.empty and suite.success and outcome.quarantine.empty


def test_truncated_images_stay_detected_when_pillow_is_lenient(tmp_path, monkeypatch) -> None:
    paths, manifest = make_dataset(tmp_path, per_class=1)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        check_images(manifest, paths.raw, make_params())


def test_label_conflict_quarantines_every_copy(tmp_path: Path) -> None:
    extra = [
        ("images/MildDemented/scan.png", "MildDemented", "png", 7),
        ("images/VeryMildDemented/scan.png", "VeryMildDemented", "png", 7),
    ]
    paths, manifest = make_dataset(tmp_path, extra=extra)
    params = make_params(on_failure="quarantine")
    assert manifest["sha256"].nunique() == len(manifest)  # not exact duplicates
    _, _, suite, outcome = validate_frame(paths, params)
    assert not suite.expectations["no_label_conflict"].success
    q = outcome.quarantine.set_index("path")
    assert sorted(q.index) == sorted(p for p, *_ in extra)
    assert all(r == "label_conflict" for r in q["reasons"])
    assert "VeryMildDemented/scan.png" in q.loc["images/MildDemented/scan.png", "details"]


def test_class_below_min_count_stops_under_either_policy(tmp_path: Path) -> None:
    paths, _ = make_dataset(tmp_path, per_class=2)
    for policy in ("fail", "quarantine"):
        params = make_params(on_failure=policy, min_per_class=3)
        with pytest.raises(AlzstageError) as err:
            run_validate(params, paths)
        msg = str(err.value)
        assert "class_min_count" in msg and "ModerateDemented" in msg
        assert "validate.min_per_class" in msg
        assert not paths.validated_manifest.exists()


def test_missing_class_is_reported(tmp_path: Path) -> None:
    _, manifest = make_dataset(tmp_path)
    manifest = manifest[manifest["label"] != "ModerateDemented"]
    suite = run_manifest_suite(manifest, make_params(), None)
    assert not suite.expectations["classes_present"].success
    assert suite.expectations["class_min_count"].unexpected == ("ModerateDemented",)


def test_empty_class_folder_names_only_that_class(tmp_path: Path) -> None:
    # given a download whose ModerateDemented folder was empty
    paths, manifest = make_dataset(tmp_path)
    write_raw_manifest(manifest[manifest["label"] != "ModerateDemented"], paths.raw_manifest)
    # when / then: the three classes present are not reported missing
    with pytest.raises(AlzstageError) as err:
        run_validate(make_params(), paths)
    msg = str(err.value)
    assert "Missing ['ModerateDemented'] (observed ['MildDemented', 'NonDemented', " in msg


def test_wrong_size_reports_the_size_found_not_only_the_configured_one(tmp_path: Path) -> None:
    # given 32x40 images while base.image_size asks for 32x48 (WxH)
    paths, _ = make_dataset(tmp_path)
    params = Params.model_validate({"base": {"image_size": [H + 8, W]}})
    # when
    with pytest.raises(AlzstageError) as err:
        run_validate(params, paths)
    # then the rule says what it wants and the failure says what the images are
    msg = str(err.value)
    assert f"Images must be {W}x{H + 8}" in msg
    assert f"Found {W}x{H} (12 images)." in msg
    assert f"Images are {W}x{H + 8}" not in msg


def test_files_skipped_at_download_are_listed_in_quarantine_csv(tmp_path: Path) -> None:
    # given a download that skipped a BMP in a class folder
    paths, raw_manifest = make_dataset(tmp_path)
    (paths.raw / "skipped.csv").write_text(
        "path,label,reason,detail\n"
        "train/MildDemented/scan.bmp,MildDemented,unsupported_format,BMP image\n"
    )
    # when validation passes
    result = run_validate(make_params(), paths)
    # then the file is listed with its reason, and no valid row is lost
    quarantine = pd.read_csv(paths.quarantine, keep_default_na=False)
    assert list(quarantine.columns) == QUARANTINE_COLUMNS
    row = quarantine.set_index("path").loc["train/MildDemented/scan.bmp"]
    assert row["reasons"] == "unsupported_format" and "BMP image" in row["details"]
    assert "convert the file to PNG" in row["details"]
    assert len(read_manifest(paths.validated_manifest)) == len(raw_manifest)
    assert json.loads(paths.validation_report.read_text())["n_skipped_at_download"] == 1
    assert "1 skipped at download" in result.summary


def test_missing_manifest_column_is_named(tmp_path: Path) -> None:
    _, manifest = make_dataset(tmp_path, per_class=1)
    with pytest.raises(AlzstageError, match="pixel_hash"):
        run_manifest_suite(manifest.drop(columns=["pixel_hash"]), make_params(), None)


ALL_BAD = [
    ("images/MildDemented/empty.jpg", "MildDemented", "zero_byte", 1),
    ("images/MildDemented/notes.jpg", "MildDemented", "text", 2),
    ("images/MildDemented/cut.jpg", "MildDemented", "truncated", 3),
    ("images/MildDemented/colour.jpg", "MildDemented", "rgb", 4),
    ("images/MildDemented/wide.jpg", "MildDemented", "wrong_size", 5),
    ("images/MildDemented/flat.jpg", "MildDemented", "blank", 6),
    ("images/Other/odd.jpg", "Other", "good", 8),
    ("images/NonDemented/zz_copy.jpg", "NonDemented", "copy", 1000),
    ("images/MildDemented/scan.png", "MildDemented", "png", 9),
    ("images/VeryMildDemented/scan.png", "VeryMildDemented", "png", 9),
]


def test_fail_policy_raises_with_a_readable_summary(tmp_path: Path) -> None:
    paths, _ = make_dataset(tmp_path, extra=ALL_BAD)
    with pytest.raises(AlzstageError) as err:
        run_validate(make_params(on_failure="fail"), paths)
    msg = str(err.value)
    for rel, *_ in ALL_BAD:
        assert rel in msg, rel
    for name in (
        "zero_byte",
        "not_an_image",
        "truncated",
        "wrong_mode",
        "blank",
        "label_in_classes",
        "sha256_unique",
        "width_matches",
        "no_label_conflict",
    ):
        assert name in msg, name  # fmt: skip
    assert "validate.on_failure: quarantine" in msg
    assert not paths.validated_manifest.exists()
    # The evidence is still written for the person fixing the data.
    assert paths.quarantine.exists() and (paths.data_docs / "index.html").exists()
    report = json.loads(paths.validation_report.read_text())
    assert report["success"] is False and report["stage_passed"] is False


def test_quarantine_policy_writes_clean_manifest_and_csv(tmp_path: Path) -> None:
    paths, raw_manifest = make_dataset(tmp_path, extra=ALL_BAD)
    result = run_validate(make_params(on_failure="quarantine"), paths)

    clean = read_manifest(paths.validated_manifest)
    quarantine = pd.read_csv(paths.quarantine, keep_default_na=False)
    report = json.loads(paths.validation_report.read_text())

    assert list(clean.columns) == MANIFEST_COLUMNS
    assert list(quarantine.columns) == QUARANTINE_COLUMNS
    expected_bad = {p for p, *_ in ALL_BAD}
    assert set(quarantine["path"]) == expected_bad
    assert not set(clean["path"]) & expected_bad
    assert len(clean) + len(quarantine) == len(raw_manifest) == report["n_images"]
    assert report["n_valid"] == len(clean) == 12
    assert report["n_quarantined"] == len(quarantine) == len(ALL_BAD)
    assert report["success"] is False and report["stage_passed"] is True
    assert report["checks"]["zero_byte"] == 1 and report["checks"]["blank"] == 1
    assert report["expectations"]["sha256_unique"]["unexpected"] == 2
    assert report["expectations"]["no_label_conflict"]["unexpected"] == 2
    assert result.metrics["n_quarantined"] == len(ALL_BAD)
    assert paths.quarantine in result.artifacts and paths.validation_report in result.artifacts
    row = quarantine.set_index("path").loc["images/MildDemented/cut.jpg"]
    assert row["label"] == "MildDemented" and "truncated" in row["reasons"]


def test_clean_data_passes_and_writes_docs(tmp_path: Path) -> None:
    paths, raw_manifest = make_dataset(tmp_path)
    result = run_validate(make_params(), paths)

    clean = read_manifest(paths.validated_manifest)
    pd.testing.assert_frame_equal(clean, raw_manifest)
    assert paths.quarantine.read_text().strip() == ",".join(QUARANTINE_COLUMNS)
    report = json.loads(paths.validation_report.read_text())
    assert report["success"] is True and report["n_quarantined"] == 0
    assert all(e["success"] for e in report["expectations"].values())
    index = paths.data_docs / "index.html"
    assert index.exists() and "alzstage.manifest" in index.read_text()
    assert result.metrics["n_valid"] == len(raw_manifest)


def test_suite_is_derived_from_params() -> None:
    keys = {s.key for s in expectation_specs(make_params(expected_mode="any", check_size=False))}
    assert "mode_matches" not in keys and "width_matches" not in keys
    keys = {s.key for s in expectation_specs(make_params())}
    assert {"sha256_unique", "label_in_classes", "class_min_count", "no_label_conflict"} <= keys


def test_suite_frames_flag_empty_strings_and_label_conflicts() -> None:
    m = pd.DataFrame(
        [
            ["a.jpg", "MildDemented", "s1", "p1", 32, 40, "L", "JPEG", "", ""],
            ["b.jpg", "NonDemented", "s2", "p1", 32, 40, "L", "JPEG", "", ""],
            ["c.jpg", "NonDemented", "s3", "", 0, 0, "", "", "", ""],
        ],
        columns=MANIFEST_COLUMNS,
    )
    frames = suite_frames(m, make_params())
    assert frames["manifest"]["pixel_hash"].isna().tolist() == [False, False, True]
    assert frames["manifest"]["width"].isna().tolist() == [False, False, True]
    assert frames["label_conflicts"]["n_labels"].tolist() == [2, 2]
    counts = dict(frames["class_counts"].values.tolist())
    assert counts == {"NonDemented": 2, "VeryMildDemented": 0, "MildDemented": 1,
                      "ModerateDemented": 0}  # fmt: skip


def test_import_does_not_load_great_expectations_or_tensorflow() -> None:
    code = (
        "import sys, alzstage.data.validate\n"
        "bad = [m for m in ('great_expectations', 'tensorflow') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_each_row_rule_says_what_is_wrong_with_a_flagged_row() -> None:
    # given the manifest rules that quarantine single rows by a reason code
    specs = [s for s in expectation_specs(make_params()) if s.frame == "manifest" and s.reason]
    row = pd.Series({"label": "Other", "width": 8, "height": 9, "mode": "RGB"})

    # then each carries its own detail (none falls back to the bare code)
    details = {s.reason: s.row_detail(row) for s in specs}
    assert details == {
        "missing_path": "manifest column path is empty",
        "missing_label": "manifest column label is empty",
        "missing_sha256": "manifest column sha256 is empty",
        "undecodable": "manifest has no pixel_hash: the image could not be decoded at download",
        "duplicate_path": "path listed more than once in the manifest",
        "unknown_label": f"label 'Other' is not one of base.classes {CLASSES}",
        "exact_duplicate": "exact_duplicate",  # detailed per group in decide()
        "wrong_size": f"8x9 (WxH), expected {W}x{H}",
        "wrong_mode": "manifest mode 'RGB', expected L",
    }
