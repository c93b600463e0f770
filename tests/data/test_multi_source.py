"""Two sources, one brain (issue #24): several data.sources, resized copies grouped as one.

The fixture is the demo set plus a resized, renamed copy of half of its brains, the way
public repackagings of the Kaggle slices look: other folder spellings, other file names,
128x128 instead of 208x176 (half squashed, half padded to a square first). Every stage
from download to split runs for real on it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from alzstage.artifacts import read_raw_manifest, read_split
from alzstage.cli import app
from alzstage.config import REQUIRED_SECTIONS, ConfigError, Params, Paths, parse_params
from alzstage.data.demo import generate_demo
from alzstage.data.duplicates import copies_across_splits, copies_report, merge_brains
from alzstage.data.sources.layout import read_skipped
from alzstage.stages import STAGES

DEMO = {"subjects_per_class": [4, 4, 3, 3], "slices_per_subject": 5}
FOLDERS = {  # the copy's own spellings of the class folders
    "NonDemented": "Non_Demented",
    "VeryMildDemented": "very mild demented",
    "MildDemented": "Mild_Demented",
    "ModerateDemented": "MODERATE-DEMENTED",
}


def params_for(copy: Path, **split: object) -> Params:
    return Params.model_validate(
        {
            "data": {
                "source": "multi",
                "demo": DEMO,
                "sources": [
                    {"id": "demo", "source": "demo"},
                    {"id": "kaggle128", "source": "folder", "path": str(copy)},
                ],
            },
            "validate": {"check_size": False},  # the copy is 128x128, the demo 208x176
            "split": split,
        }
    )


def resized(gray: np.ndarray, pad: bool) -> np.ndarray:
    if pad:
        h, w = gray.shape
        s = max(h, w)
        square = np.zeros((s, s), dtype=np.uint8)
        square[(s - h) // 2 : (s - h) // 2 + h, (s - w) // 2 : (s - w) // 2 + w] = gray
        gray = square
    return np.asarray(Image.fromarray(gray).resize((128, 128), Image.Resampling.BILINEAR))


def make_copy(tmp: Path, classes: list[str]) -> dict[str, str]:
    """Half the demo's brains, resized and renamed into ``tmp/copy``: {copy file: demo file}."""
    records = generate_demo(
        tmp / "generated",
        classes=classes,
        subjects_per_class=DEMO["subjects_per_class"],
        slices_per_subject=DEMO["slices_per_subject"],
        image_size=(208, 176),
        seed=Params().base.seed,
    )
    subjects = sorted({r.subject for r in records})[::2]
    order = np.random.default_rng(5).permutation(len(records))
    truth = {}
    for n, k in enumerate(order):
        rec = records[k]
        if rec.subject not in subjects:
            continue
        with Image.open(rec.path) as im:
            gray = np.asarray(im.convert("L"))
        target = tmp / "copy" / FOLDERS[rec.label] / f"img_{n:04d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(resized(gray, pad=n % 2 == 1)).save(target)
        original = Path(rec.path).relative_to(tmp / "generated").as_posix()
        truth[f"kaggle128/images/{rec.label}/{target.name}"] = original
    return truth


@pytest.fixture(scope="module")
def combined(tmp_path_factory: pytest.TempPathFactory) -> tuple[Paths, Path, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("multi")
    truth = make_copy(tmp, Params().base.classes)
    paths = Paths(tmp / "project")
    params = params_for(tmp / "copy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("download", "validate", "decode"):  # as the CLI runs them: scoped params
            next(s for s in STAGES if s.name == name).run(params, paths, tracker=None)
    return paths, tmp / "copy", truth


def split_with(paths: Paths, copy: Path, **split: object) -> tuple[pd.DataFrame, dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        next(s for s in STAGES if s.name == "split").run(params_for(copy, **split), paths, None)
    return read_split(paths.split_file), json.loads(paths.split_report.read_text())


def split_by_cli(paths: Paths, copy: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """``alzstage split`` in the project: params.yaml, the run logged to its MLflow store."""
    raw = params_for(copy).model_dump(by_alias=True, mode="json")
    (paths.root / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("ALZSTAGE_ROOT", str(paths.root))
    result = CliRunner().invoke(app, ["split"])
    assert result.exit_code == 0, result.output
    return json.loads(paths.split_report.read_text())


def test_each_source_lands_in_its_own_folder_with_its_subjects_prefixed(combined) -> None:
    # given: the demo and its copy downloaded as two sources
    paths, _, truth = combined
    # when
    manifest = read_raw_manifest(paths.raw_manifest)
    # then: paths start with the source id; the demo's given ids carry it too
    top = manifest["path"].str.split("/").str[0]
    assert sorted(set(top)) == ["demo", "kaggle128"]
    assert set(manifest.loc[top == "kaggle128", "path"]) == set(truth)
    demo_subjects = manifest.loc[top == "demo", "subject"]
    assert demo_subjects.str.startswith("demo:demo-").all()
    assert (manifest.loc[top == "kaggle128", "subject"] == "").all()
    assert read_skipped(paths.raw / "skipped.csv") == []


def test_every_resized_copy_is_grouped_with_its_original_and_never_split_apart(
    combined, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given: 7 of the 14 demo brains copied at 128x128 (half squashed, half padded)
    paths, copy, truth = combined
    # when: the split stage runs as a user runs it
    report = split_by_cli(paths, copy, monkeypatch)
    df = read_split(paths.split_file)
    # then: every copy was found, in the one pair of sources, with no label conflict
    found = report["cross_source"]["pairs"]["demo/kaggle128"]
    assert found["n_matched_slices"] == len(truth)
    assert found["n_brains"]["demo"] == 7  # the copy's side counts its recovered fragments
    assert found["n_label_conflicts"] == 0
    assert report["cross_source"]["n_matched_slices_in_two_splits"] == 0
    # and each copy sits with its original: same subject, same split
    rows = df.set_index("path")
    for copy_path, original in truth.items():
        assert rows.loc[copy_path, "subject"] == rows.loc[f"demo/images/{original}", "subject"]
        assert rows.loc[copy_path, "split"] == rows.loc[f"demo/images/{original}", "split"]
    # and no two demo brains were merged: one group per demo brain
    assert report["groups"]["n_groups"] == sum(DEMO["subjects_per_class"])
    assert report["leakage"]["shared_subjects"]["train_test"] == 0


def test_a_slice_level_split_is_shown_to_put_copies_on_both_sides(combined) -> None:
    # given: the same two sources, split by slice (leaky)
    paths, copy, truth = combined
    # when
    _, report = split_with(paths, copy, strategy="stratified")
    # then: the check measures what the strategy does instead of assuming it
    assert report["cross_source"]["pairs"]["demo/kaggle128"]["n_matched_slices"] == len(truth)
    assert report["cross_source"]["n_matched_slices_in_two_splits"] > 0


def test_matched_groups_merge_into_the_smallest_id_and_label_conflicts_are_counted() -> None:
    # given: two sources; b:x copies a slice of a:1 under another label, b:y a slice of a:2
    df = pd.DataFrame(
        {
            "path": ["a/1.png", "a/2.png", "a/3.png", "b/1.png", "b/2.png", "b/3.png"],
            "label": ["MildDemented"] * 3 + ["ModerateDemented", "MildDemented", "MildDemented"],
            "subject": ["a:1", "a:2", "a:3", "b:x", "b:y", "b:y"],
        }
    )
    sources = np.asarray(["a", "a", "a", "b", "b", "b"])
    copies = pd.DataFrame({"i": [0, 1], "j": [3, 4], "corr": [0.999, 0.995], "pair": "a/b"})
    # when
    merged = merge_brains(df, copies)
    report = copies_report(df, copies, sources, threshold=0.99)
    # then: each copy's whole group joins its original's (b/3.png with b/2.png), a:3 alone
    assert merged["subject"].tolist() == ["a:1", "a:2", "a:3", "a:1", "a:2", "a:2"]
    pair = report["pairs"]["a/b"]
    assert pair["n_matched_slices"] == 2 and pair["n_label_conflicts"] == 1
    assert pair["n_brains"] == {"a": 2, "b": 2} and pair["min_corr"] == 0.995
    # and a split that separates b/3.png from a:2 is counted
    out = merged.assign(split=["train", "test", "train", "train", "train", "train"])
    assert copies_across_splits(out, df, copies) == 1


def sections(**data: object) -> dict:
    return {s: {} for s in REQUIRED_SECTIONS} | {"data": data}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"sources": [{"id": "a", "source": "demo"}]}, "data.sources is read only when"),
        ({"source": "multi"}, "data.source multi needs data.sources"),
        (
            {"source": "multi", "sources": [{"id": "a/b", "source": "demo"}]},
            "data.sources[0]: id must be a folder name",
        ),
        (
            {"source": "multi", "sources": [{"id": "a", "source": "demo"}] * 2},
            "data.sources[1]: id 'a' is used twice",
        ),
        (
            {"source": "multi", "sources": [{"id": "a", "source": "nifti"}]},
            "data.sources[0] (a): source must be one of",
        ),
        (
            {"source": "multi", "sources": [{"id": "a", "source": "folder"}]},
            "data.sources[0] (a): data.path is required when data.source is 'folder'",
        ),
        (
            {"source": "multi", "sources": [{"id": "a", "source": "demo", "pth": "x"}]},
            "data.sources[0] (a): pth: unknown key",
        ),
    ],
)
def test_a_bad_sources_list_is_one_line_naming_the_entry(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_params(sections(**data))
    assert "\n" not in str(err.value) and expected in str(err.value)


def test_entries_inherit_the_data_section_but_not_its_file() -> None:
    # given: limits and a pin at the top, two entries overriding some keys
    params = parse_params(
        sections(
            source="multi",
            max_compression_ratio=50.0,
            sha256="ab" * 32,
            sources=[
                {"id": "zip", "source": "archive", "path": "a.zip"},
                {"id": "hf", "source": "huggingface", "hf_repo": "other/repo"},
            ],
        )
    )
    # when
    (zip_id, zipped), (hf_id, hf) = params.data.entries()
    # then
    assert (zip_id, zipped.source, zipped.path, zipped.sha256) == ("zip", "archive", "a.zip", None)
    assert zipped.max_compression_ratio == hf.max_compression_ratio == 50.0
    assert (hf_id, hf.hf_repo, hf.path) == ("hf", "other/repo", None)
