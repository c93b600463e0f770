"""Tests for the augment stage: reproducible views, training rows only, balanced classes."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CLASSES, write_jpeg
from PIL import Image

from alzstage.artifacts import SPLIT_CSV, write_split
from alzstage.config import AugmentParams, ModelParams, Params, Paths
from alzstage.data.augment import (
    augment_image,
    build_views,
    plan_views,
    preview_grid,
    preview_indices,
    run_augment,
)
from alzstage.data.pixels import write_pixels


def images(n: int, seed: int = 0, size: tuple[int, int] = (40, 32)) -> np.ndarray:
    """Smooth-ish blobs, so rotations and shifts visibly change pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: size[0], : size[1]]
    out = np.empty((n, *size), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(8, size[0] - 8), rng.uniform(8, size[1] - 8)
        out[i] = (255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40)).astype(np.uint8)
    return out


def test_same_seed_same_views() -> None:
    x, y = images(6), np.array([0, 0, 1, 1, 2, 3])
    p = AugmentParams(views=2, oversample="balance")
    a = build_views(x, y, p, seed=7, n_classes=4)
    b = build_views(x, y, p, seed=7, n_classes=4)
    for left, right in zip(a, b, strict=True):
        np.testing.assert_array_equal(left, right)
    c = build_views(x, y, p, seed=8, n_classes=4)
    assert not np.array_equal(a[0], c[0])
    np.testing.assert_array_equal(a[0][: len(x)], x)  # originals come first, untouched


def test_views_are_new_pixels_of_the_same_shape() -> None:
    x = images(1)[0]
    out = augment_image(x, np.random.default_rng(0), AugmentParams(rotation_deg=20))
    assert out.shape == x.shape and out.dtype == np.uint8
    assert not np.array_equal(out, x)


def test_no_perturbation_is_identity() -> None:
    p = AugmentParams(
        rotation_deg=0, shift=0, zoom=0, horizontal_flip=False, brightness=0, contrast=0
    )
    x = images(1)[0]
    out = augment_image(x, np.random.default_rng(0), p)
    assert np.abs(out.astype(int) - x.astype(int)).max() <= 1


@pytest.mark.parametrize("views", [0, 1, 3])
def test_balance_equalises_class_counts(views: int) -> None:
    y = np.array([0] * 10 + [1] * 4 + [2] * 1 + [3] * 2)
    plan = plan_views(y, AugmentParams(views=views, oversample="balance"), n_classes=4)
    counts = np.bincount(np.concatenate([y, y[plan]]), minlength=4)
    assert (counts == 10 * (1 + views)).all(), counts


def test_balance_skips_empty_classes_and_none_adds_nothing() -> None:
    y = np.array([0, 0, 0, 2])
    plan = plan_views(y, AugmentParams(views=1, oversample="balance"), n_classes=4)
    assert np.bincount(np.concatenate([y, y[plan]]), minlength=4).tolist() == [6, 0, 6, 0]
    plan = plan_views(y, AugmentParams(views=2, oversample="none"), n_classes=4)
    assert sorted(plan.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_preview_grid_shape() -> None:
    x, y = images(5), np.zeros(5, np.int64)
    all_x, _, source = build_views(x, y, AugmentParams(views=2), seed=0, n_classes=4)
    grid = preview_grid(all_x, source, n_orig=5, picks=[0, 1, 2])
    assert grid.shape == (3 * 40, 4 * 32)  # rows of [original | up to 3 views], zero-padded
    np.testing.assert_array_equal(grid[:40, :32], x[0])
    assert (grid[:40, 3 * 32 :] == 0).all()  # only 2 views: last tile is padding


def test_preview_covers_every_class() -> None:
    y = np.array([0] * 10 + [1] * 3 + [3] * 2)
    picks = preview_indices(y, 6)
    assert len(picks) == 6 and {int(y[i]) for i in picks} == {0, 1, 3}
    assert len(preview_indices(y, 50)) == len(y)


def test_run_augment_uses_only_training_rows(tmp_path) -> None:
    paths = Paths(tmp_path)
    rows = []
    for k, (split, cls) in enumerate(
        [("train", CLASSES[0])] * 3
        + [("train", CLASSES[1])]
        + [("val", CLASSES[2])]
        + [("test", CLASSES[3])] * 2
    ):
        rel = f"images/{cls}/{k}.jpg"
        write_jpeg(paths.raw / rel, k, size=(48, 40))
        rows.append(
            {
                "path": rel,
                "label": cls,
                "subject": f"s{k}",
                "subject_source": "given",
                "source_split": "",
                "split": split,
            }
        )
    paths.split_file.parent.mkdir(parents=True)
    write_split(SPLIT_CSV.frame(rows), paths.split_file)
    params = Params(
        augment=AugmentParams(views=1, oversample="balance", preview_count=2),
        model=ModelParams(input_size=(32, 32)),
    )

    write_pixels(paths.raw, [r["path"] for r in rows], params, paths.pixels)

    result = run_augment(params, paths)

    with np.load(paths.augmented / "train.npz") as npz:
        assert npz["paths"].tolist() == [r["path"] for r in rows if r["split"] == "train"]
        assert npz["images"].shape[1:] == (32, 32)
        assert np.bincount(npz["labels"], minlength=4).tolist() == [6, 6, 0, 0]
        assert npz["source"].max() < 4
    assert result.metrics["n_train_originals"] == 4.0
    preview = np.asarray(Image.open(paths.figures / "augment_preview.png"))
    assert preview.shape == (2 * 32, 4 * 32)
