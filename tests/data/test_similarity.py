"""Tests for near-duplicate detection: one measure, aspect-free across sizes, bounded tiles."""

from __future__ import annotations

import numpy as np
from conftest import demo_slices
from PIL import Image

from alzstage.data.image_features import thumbnail
from alzstage.data.similarity import (
    aspect_free,
    best_both_ways,
    correlation_rows,
    most_correlated,
    mutual_matches,
)


def squashed(gray: np.ndarray, side: int = 128) -> np.ndarray:
    """The whole frame resized to side x side (aspect ratio lost), as public copies do."""
    return np.asarray(Image.fromarray(gray).resize((side, side), Image.Resampling.BILINEAR))


def padded(gray: np.ndarray, side: int = 128) -> np.ndarray:
    """Padded with black to a square, then resized: aspect kept, frame changed."""
    h, w = gray.shape
    s = max(h, w)
    square = np.zeros((s, s), dtype=np.uint8)
    square[(s - h) // 2 : (s - h) // 2 + h, (s - w) // 2 : (s - w) // 2 + w] = gray
    return squashed(square, side)


def test_aspect_free_thumbnails_match_padded_copies_that_plain_thumbnails_miss(tmp_path) -> None:
    # given: demo slices of 8 brains, and copies padded to a square and resized to 128x128
    slices = demo_slices(tmp_path, per_class=2, slices=3, seed=7)
    originals = np.stack([thumbnail(g) for g in slices])
    copies = np.stack([thumbnail(padded(g)) for g in slices])
    # when: each copy is compared with every original, plainly and aspect-free
    plain = np.diag(correlation_rows(copies) @ correlation_rows(originals).T)
    free = aspect_free(copies) @ aspect_free(originals).T
    # then: plain thumbnails lose the copies; aspect-free ones find each copy's own original
    assert plain.min() < 0.95
    assert np.diag(free).min() >= 0.99
    assert (free.argmax(axis=1) == np.arange(len(slices))).all()


def test_aspect_free_rows_are_correlation_rows_and_constant_images_stay_zero() -> None:
    # given: a black and a grey thumbnail (no content), and a bright square on black
    blank = np.zeros((32, 32), dtype=np.uint8)
    grey = np.full((32, 32), 128, dtype=np.uint8)
    square = blank.copy()
    square[8:20, 10:26] = 200
    # when
    rows = aspect_free(np.stack([blank, grey, square]))
    # then: the constant rows are all zero (they match nothing), the other zero-mean, unit-norm
    assert not rows[0].any() and not rows[1].any()
    assert abs(float(rows[2].mean())) < 1e-5 and abs(float(np.linalg.norm(rows[2])) - 1) < 1e-5


def test_tiles_give_the_answer_of_one_product() -> None:
    # given: two random sets of correlation rows
    rng = np.random.default_rng(0)
    a = correlation_rows(rng.normal(size=(23, 16)))
    b = correlation_rows(rng.normal(size=(17, 16)))
    # when: the best matches are found in 5 x 5 tiles
    best_a, arg_a, best_b, arg_b = best_both_ways(a, b, block=5)
    # then: as from the whole product at once
    full = a @ b.T
    assert (arg_a == full.argmax(axis=1)).all() and (arg_b == full.argmax(axis=0)).all()
    np.testing.assert_allclose(best_a, full.max(axis=1), atol=1e-6)
    np.testing.assert_allclose(best_b, full.max(axis=0), atol=1e-6)
    assert (most_correlated(a, b)[1] == arg_a).all()


def test_mutual_matches_pair_copies_and_leave_slices_without_one() -> None:
    # given: b holds noisy copies of a's rows 0-4 plus 3 rows a does not have
    rng = np.random.default_rng(1)
    a = correlation_rows(rng.normal(size=(8, 64)))
    extra = correlation_rows(rng.normal(size=(3, 64)))
    b = correlation_rows(np.vstack([a[:5] + 0.01 * rng.normal(size=(5, 64)), extra]))
    # when
    i, j, corr = mutual_matches(a, b, threshold=0.99, block=3)
    # then: exactly the five copies, each with its original
    assert i.tolist() == [0, 1, 2, 3, 4] and j.tolist() == [0, 1, 2, 3, 4]
    assert (corr >= 0.99).all()
    assert mutual_matches(a, b[:0], 0.99)[0].size == 0
