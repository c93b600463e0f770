"""The decode stage: every image decoded once, and later stages never open data/raw.

What it stores must be exactly what the stages used to decode for themselves
(``load_batch``, ``load_thumbnails``, the input check's ``fit_from_split``), so moving
the decoding here changes no number downstream.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import split_frame, write_jpeg
from PIL import Image
from test_split import make_project

from alzstage.artifacts import PixelStore, write_manifest, write_split
from alzstage.config import Params, Paths
from alzstage.data.decode import run_decode
from alzstage.data.images import load_batch
from alzstage.data.manifest import RawRecord, build_manifest
from alzstage.data.pixels import thumbnail_sizes
from alzstage.data.similarity import correlation_rows, load_thumbnails
from alzstage.data.split_stage import run_split
from alzstage.errors import AlzstageError
from alzstage.inference.ood import THUMB_SIZE, fit_from_pixels, fit_from_split

CLASS = "NonDemented"


def mixed_project(root: Path) -> Paths:
    """A validated manifest over files of every kind decode meets: RGB JPEG, grey PNG,
    16-bit PNG, odd sizes, a constant frame."""
    paths = Paths(root)
    folder = paths.raw_images / CLASS
    rng = np.random.default_rng(0)
    files = [write_jpeg(folder / f"rgb{k}.jpg", k, size=(208, 176)) for k in range(3)]
    for k, (h, w) in enumerate([(96, 112), (57, 49), (300, 260)]):
        gray = (rng.random((h, w)) * 255).astype(np.uint8)
        gray[h // 4 : h // 2, w // 4 : w // 2] = 250
        files.append(folder / f"gray{k}.png")
        Image.fromarray(gray).save(files[-1])
    files.append(folder / "wide16.png")
    Image.fromarray((rng.random((80, 120)) * 60000).astype(np.uint16)).save(files[-1])
    files.append(folder / "blank.png")
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(files[-1])
    records = [RawRecord(path=f, label=CLASS) for f in files]
    paths.interim.mkdir(parents=True)
    write_manifest(build_manifest(records, paths.raw), paths.validated_manifest)
    return paths


def manifest_paths(paths: Paths) -> list[str]:
    return pd.read_csv(paths.validated_manifest)["path"].tolist()


# --------------------------------------------------------------------------- what it writes


def test_decode_stores_exactly_the_pixels_load_batch_and_load_thumbnails_make(
    tmp_path: Path,
) -> None:
    # given: a validated manifest over mixed files, and a non-default thumbnail side
    paths = mixed_project(tmp_path)
    params = Params.model_validate({"split": {"thumb_size": 24}, "model": {"input_size": [64, 40]}})
    rels = manifest_paths(paths)
    files = [paths.raw / p for p in rels]

    # when: the stage runs
    result = run_decode(params, paths)

    # then: network inputs, split thumbnails and the fixed 32 px ones are the very arrays
    store = PixelStore.read(paths.pixels)
    assert np.array_equal(store.images_for(rels, (64, 40)), load_batch(files, (64, 40)))
    for side in (24, THUMB_SIZE):
        rows = correlation_rows(store.thumbnails_for(rels, side))
        assert np.array_equal(rows, load_thumbnails(files, side)), side
    assert store.meta.thumb_sizes == (24, 32) and result.metrics["n_images"] == len(rels)


def test_rows_come_back_in_the_order_asked_for_whatever_the_store_order(tmp_path: Path) -> None:
    # given: a decoded project; when: rows are asked for backwards
    paths = mixed_project(tmp_path)
    run_decode(Params(), paths)
    rels = manifest_paths(paths)[::-1]
    # then: each row is its own file's
    store = PixelStore.read(paths.pixels)
    assert np.array_equal(
        store.images_for(rels, (56, 48)), load_batch([paths.raw / p for p in rels], (56, 48))
    )
    assert store.images_for([], (56, 48)).shape == (0, 56, 48)


def test_the_input_check_fitted_from_the_store_equals_the_one_fitted_from_the_files(
    tmp_path: Path,
) -> None:
    # given: a decoded project and a split.csv over it
    paths = mixed_project(tmp_path)
    run_decode(Params(), paths)
    rels = manifest_paths(paths)
    split = ["train" if i % 3 else "val" for i in range(len(rels))]
    write_split(split_frame(rels, "x", split), tmp_path / "split.csv")

    # when: the check is fitted both ways
    from_files = fit_from_split(tmp_path / "split.csv", paths.raw, (56, 48))
    from_store = fit_from_pixels(tmp_path / "split.csv", PixelStore.read(paths.pixels), (56, 48))

    # then: the same bounds, ranges, sizes and training thumbnails
    assert from_store[0] == from_files[0]
    assert np.array_equal(from_store[1], from_files[1])


# --------------------------------------------------------------------------- errors


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_a_path_the_store_lacks_is_one_line_naming_the_store_and_the_stage(
    tmp_path: Path,
) -> None:
    # given: a store decoded before an image was added
    paths = mixed_project(tmp_path)
    run_decode(Params(), paths)
    # when: a later stage asks for the new image
    with pytest.raises(AlzstageError) as err:
        PixelStore.read(paths.pixels).images_for(["images/new.jpg"], (56, 48))
    # then: it names the store, the path and what to run
    text = one_line(err)
    assert str(paths.pixels) in text and "'images/new.jpg'" in text
    assert "alzstage decode" in text


def test_a_store_at_another_input_size_is_refused_not_resized(tmp_path: Path) -> None:
    paths = mixed_project(tmp_path)
    run_decode(Params(), paths)
    with pytest.raises(AlzstageError) as err:
        PixelStore.read(paths.pixels).images_for(manifest_paths(paths), (112, 96))
    assert "56x48" in one_line(err) and "alzstage decode" in str(err.value)
    with pytest.raises(AlzstageError, match=r"split\.thumb_size"):
        PixelStore.read(paths.pixels).thumbnails_for(manifest_paths(paths), 16)


def test_the_baselines_ask_for_the_thumbnail_side_decode_always_stores() -> None:
    from alzstage.evaluate import baselines

    assert baselines.THUMB_SIZE == THUMB_SIZE
    assert THUMB_SIZE in thumbnail_sizes(Params.model_validate({"split": {"thumb_size": 16}}))


def test_no_store_yet_says_to_run_decode(tmp_path: Path) -> None:
    with pytest.raises(AlzstageError) as err:
        PixelStore.read(Paths(tmp_path).pixels)
    assert "not found" in one_line(err) and "dvc repro decode" in str(err.value)


def test_a_missing_image_names_the_file_and_keeps_the_previous_store(tmp_path: Path) -> None:
    # given: a decoded project whose image then disappears
    paths = mixed_project(tmp_path)
    run_decode(Params(), paths)
    before = sorted(f.name for f in paths.pixels.iterdir())
    gone = paths.raw / manifest_paths(paths)[0]
    gone.unlink()
    # when: the stage runs again
    with pytest.raises(AlzstageError) as err:
        run_decode(Params(), paths)
    # then: one line naming the file; the previous complete store is untouched
    assert str(gone) in one_line(err) and "alzstage download" in str(err.value)
    assert sorted(f.name for f in paths.pixels.iterdir()) == before
    assert PixelStore.read(paths.pixels).meta.n_images == len(manifest_paths(paths))


def test_decode_without_a_validated_manifest_says_to_validate(tmp_path: Path) -> None:
    with pytest.raises(AlzstageError, match="alzstage validate"):
        run_decode(Params(), Paths(tmp_path))


# --------------------------------------------------------------------------- data/raw


def test_after_validate_only_the_decode_stage_declares_data_raw() -> None:
    from alzstage.stages import STAGES

    readers = {stage.name for stage in STAGES if "data/raw" in stage.reads}
    assert readers == {"validate", "decode"}


def test_stages_after_decode_never_open_data_raw(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given: a decoded project whose data/raw is then removed, and no image may be opened
    from alzstage.artifacts import read_folds, role_column
    from alzstage.cv.fold import _role_arrays
    from alzstage.cv.split import run_cv_split
    from alzstage.data.augment import run_augment
    from alzstage.data.pixels import load_split_images
    from alzstage.evaluate.baselines import thumbnail_rows

    paths = make_project(tmp_path)
    shutil.rmtree(paths.raw)

    def no_files(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a stage opened an image: {args[:1]}")

    monkeypatch.setattr(Image, "open", no_files)
    params = Params.model_validate({"augment": {"views": 1}, "cv": {"folds": [0, 1, 2]}})

    # when: split, augment, the train and evaluate loaders and a CV fold's loaders run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_split(params, paths)
        run_augment(params, paths)
        run_cv_split(params, paths)
    x_val, _, _ = load_split_images(paths, params, "val")
    x_test, _, test_rows = load_split_images(paths, params, "test")
    spec, _ = fit_from_pixels(paths.split_file, PixelStore.read(paths.pixels), (56, 48))
    folds = read_folds(paths.cv_folds)
    x_fold, _, fold_rows = _role_arrays(folds, role_column(0), "test", params, paths)
    thumbs = thumbnail_rows(PixelStore.read(paths.pixels), fold_rows["path"])

    # then: everything came from data/processed/pixels
    with np.load(paths.augmented / "train.npz") as npz:
        assert npz["images"].shape[1:] == (56, 48)
    assert x_val.shape[1:] == x_test.shape[1:] == x_fold.shape[1:] == (56, 48)
    assert len(test_rows) and spec.n_images > 0
    assert thumbs.shape == (len(fold_rows), THUMB_SIZE * THUMB_SIZE)
