"""Baselines and the paired subject bootstrap, checked against hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from alzstage.data.similarity import correlation_rows
from alzstage.data.split_report import leakage_report
from alzstage.evaluate.baselines import (
    BASELINES,
    compare_with_baselines,
    headline_metrics,
    majority_baseline,
    nearest_baseline,
    paired_bootstrap_difference,
    pixel_baseline,
    score_baselines,
    verdict,
)
from alzstage.model.metrics import summary_metrics

CLASSES = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]


def _separable(n_per_class: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images whose class is the row band holding a bright bar: easy for pixels."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(4), n_per_class)
    x = rng.normal(0, 20, (len(y), size, size)) + 60
    for i, k in enumerate(y):
        x[i, 4 * k : 4 * k + 3, 2:-2] += 120
    return x.astype(np.float32), y


# --------------------------------------------------------------------------- majority


def test_majority_predicts_the_most_frequent_training_label_for_every_slice() -> None:
    # given: training labels where class 2 is the most frequent
    train_y = np.array([2, 2, 2, 0, 1, 3])
    # when
    pred = majority_baseline(train_y, n_test=5, n_classes=4)
    # then
    assert pred.tolist() == [2] * 5


def test_majority_breaks_ties_towards_the_lower_class_index() -> None:
    assert majority_baseline(np.array([3, 1, 3, 1]), 2, 4).tolist() == [1, 1]


def test_majority_scores_one_over_k_balanced_accuracy_on_a_k_class_test_set() -> None:
    # given: a test set with three classes present, one slice count each unequal
    y_test = np.array([0, 0, 0, 0, 1, 2, 2])
    # when
    pred = majority_baseline(np.array([0, 0, 1]), len(y_test), 4)
    # then: recall 1 on class 0, 0 on classes 1 and 2
    assert summary_metrics(y_test, pred, 4)["balanced_accuracy"] == pytest.approx(1 / 3)


# --------------------------------------------------------------------------- nearest


def test_nearest_copies_labels_exactly_when_test_images_duplicate_training_images() -> None:
    # given: six distinct training images and a test set of the same images, reordered,
    # brightened and contrast-stretched (correlation ignores both)
    rng = np.random.default_rng(0)
    train_x = rng.normal(size=(6, 8, 8))
    train_y = np.array([0, 1, 2, 3, 1, 0])
    order = np.array([5, 3, 0, 4, 1, 2])
    test_x = train_x[order] * 3.0 + 40.0
    # when
    pred = nearest_baseline(train_x, train_y, test_x)
    # then
    assert pred.tolist() == train_y[order].tolist()


def test_nearest_reproduces_the_split_reports_nearest_neighbour_number() -> None:
    # given: a train/test split of images, the test ones noisy enough to be misread
    train_x, train_y = _separable(10, seed=1)
    test_x, test_y = _separable(10, seed=2)
    test_x = test_x + np.random.default_rng(3).normal(0, 500, test_x.shape)
    images = np.concatenate([train_x, test_x])
    labels = np.concatenate([train_y, test_y])
    df = pd.DataFrame(
        {
            "path": [f"{i}.png" for i in range(len(images))],
            "label": [CLASSES[k] for k in labels],
            "subject": "",
            "split": ["train"] * len(train_y) + ["test"] * len(test_y),
        }
    )
    split_says = leakage_report(df, correlation_rows(images), 0.99)["test"]
    # when
    pred = nearest_baseline(train_x, train_y, test_x)
    # then: the evaluate stage's baseline and split.json's look-up give one number
    ours = summary_metrics(test_y, pred, 4)
    nn = split_says["nearest_train_neighbour"]
    assert ours["balanced_accuracy"] == pytest.approx(nn["balanced_accuracy"], abs=1e-6)
    assert ours["accuracy"] == pytest.approx(nn["accuracy"], abs=1e-6)
    assert 0.25 < ours["balanced_accuracy"] < 1.0  # it makes mistakes: the check has teeth


def test_nearest_refuses_an_empty_training_set() -> None:
    with pytest.raises(ValueError, match="train split is empty"):
        nearest_baseline(np.zeros((0, 4)), np.zeros(0, int), np.ones((2, 4)))


# --------------------------------------------------------------------------- pixel


def test_pixel_model_learns_classes_that_differ_in_their_pixels() -> None:
    # given: separable classes, fresh test images
    train_x, train_y = _separable(30, seed=0)
    test_x, test_y = _separable(10, seed=1)
    # when
    pred = pixel_baseline(train_x, train_y, test_x, seed=0)
    # then
    assert summary_metrics(test_y, pred, 4)["balanced_accuracy"] >= 0.9


def test_pixel_model_weighs_a_rare_class_up_so_it_is_still_predicted() -> None:
    # given: 190 vs 10 training images, the rare class one faintly brighter row
    rng = np.random.default_rng(0)
    train_y = np.r_[np.zeros(190, int), np.ones(10, int)]
    train_x = rng.normal(0, 1, (200, 8, 8))
    train_x[:, 0, :] += train_y[:, None] * 0.8
    test_y = np.r_[np.zeros(100, int), np.ones(100, int)]
    test_x = np.random.default_rng(10).normal(0, 1, (200, 8, 8))
    test_x[:, 0, :] += test_y[:, None] * 0.8
    # when
    pred = pixel_baseline(train_x, train_y, test_x, seed=0)
    # then: half the rare class is found (unweighted, the fit finds under a quarter)
    assert (pred[test_y == 1] == 1).mean() >= 0.4


def test_pixel_model_is_reproducible_for_a_seed() -> None:
    train_x, train_y = _separable(20, seed=0)
    test_x, _ = _separable(5, seed=3)
    a = pixel_baseline(train_x, train_y, test_x, seed=7)
    b = pixel_baseline(train_x, train_y, test_x, seed=7)
    assert np.array_equal(a, b)


def test_pixel_model_with_one_training_class_predicts_that_class() -> None:
    pred = pixel_baseline(np.ones((3, 4, 4)), np.array([2, 2, 2]), np.zeros((2, 4, 4)), seed=0)
    assert pred.tolist() == [2, 2]


# --------------------------------------------------------------------------- paired bootstrap


def test_identical_predictions_differ_by_exactly_zero_with_a_zero_width_interval() -> None:
    # given: arbitrary predictions shared by model and baseline; subjects of 4 slices
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 12)
    pred = rng.integers(0, 4, len(y))
    subjects = np.repeat([f"s{i}" for i in range(12)], 4)
    # when
    out = paired_bootstrap_difference(y, pred, pred.copy(), subjects, 4, n_resamples=200, seed=1)
    # then: pairing makes every replicate's difference exactly 0
    assert out["difference"] == 0.0
    assert out["ci"] == {"low": 0.0, "high": 0.0}
    assert out["beats"] is False


def test_a_model_right_everywhere_beats_a_baseline_wrong_everywhere() -> None:
    # given
    y = np.repeat([0, 1, 2], 6)
    subjects = np.repeat([f"s{i}" for i in range(9)], 2)
    wrong = (y + 1) % 3
    # when
    out = paired_bootstrap_difference(y, y, wrong, subjects, 3, n_resamples=300, seed=0)
    # then
    assert out["difference"] == pytest.approx(1.0)
    assert out["ci"]["low"] > 0 and out["beats"] is True
    assert out["unit"] == "subject" and out["n_units"] == 9


def _one_big_one_small_subject() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Class 0: subject A (99 slices, model right, baseline wrong) and B (1 slice, the
    reverse); class 1: subject C (1 slice, both right).

    Point difference by hand: recall_0 is 0.99 vs 0.01, recall_1 is 1 vs 1, so the
    balanced-accuracy gap is (0.99 - 0.01) / 2 = 0.49. Drawing subjects, the class-0
    stratum is {B, B} with probability 1/4, a replicate where the gap is -0.5; drawing
    slices, B's single slice is almost never all of class 0.
    """
    y = np.array([0] * 100 + [1])
    subjects = np.array(["A"] * 99 + ["B", "C"])
    model = np.array([0] * 99 + [1, 1])
    baseline = np.array([1] * 99 + [0, 1])
    return y, model, baseline, subjects


def test_resampling_draws_whole_subjects_so_a_many_slice_subject_counts_once() -> None:
    # given
    y, model, baseline, subjects = _one_big_one_small_subject()
    # when
    by_subject = paired_bootstrap_difference(y, model, baseline, subjects, 2, seed=0)
    by_slice = paired_bootstrap_difference(y, model, baseline, None, 2, seed=0)
    # then: same point difference, but only the subject draw sees the {B, B} replicates
    assert by_subject["difference"] == pytest.approx(0.49)
    assert by_slice["difference"] == pytest.approx(0.49)
    assert by_subject["n_units"] == 3 and by_subject["unit"] == "subject"
    assert by_subject["ci"]["low"] == pytest.approx(-0.5)
    assert by_subject["beats"] is False
    assert by_slice["unit"] == "image" and by_slice["n_units"] == 101
    assert by_slice["ci"]["low"] > 0.4 and by_slice["beats"] is True


def test_slices_without_a_subject_id_are_their_own_units() -> None:
    y, model, baseline, subjects = _one_big_one_small_subject()
    subjects = subjects.copy()
    subjects[:99] = ""  # A's slices lose their id: 99 independent units
    out = paired_bootstrap_difference(y, model, baseline, subjects, 2, n_resamples=50)
    assert out["unit"] == "subject" and out["n_units"] == 99 + 2
    assert out["n_slices_without_subject"] == 99
    all_unknown = paired_bootstrap_difference(y, model, baseline, np.full(101, ""), 2)
    assert all_unknown["unit"] == "image"


def test_the_bootstrap_names_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match=r"\(3,\), \(2,\), \(3,\)"):
        paired_bootstrap_difference(np.zeros(3), np.zeros(2), np.zeros(3), None, 2)


def test_verdict_says_plainly_whether_the_network_beats_the_baseline() -> None:
    base = {"n_units": 12, "unit": "subject", "level": 0.95}
    win = {**base, "difference": 0.2, "ci": {"low": 0.05, "high": 0.3}, "beats": True}
    tie = {**base, "difference": 0.02, "ci": {"low": -0.05, "high": 0.1}, "beats": False}
    loss = {**base, "difference": -0.2, "ci": {"low": -0.3, "high": -0.1}, "beats": False}
    assert verdict("pixel", win).startswith("the network beats the pixel baseline (")
    assert verdict("pixel", tie).startswith("the network does NOT beat the pixel baseline:")
    assert "interval includes 0" in verdict("pixel", tie)
    assert "the baseline is better" in verdict("pixel", loss)
    assert "12 subjects" in verdict("pixel", win)


# --------------------------------------------------------------------------- report


def test_score_baselines_reports_every_baseline_with_a_verdict_as_strict_json() -> None:
    # given: separable data and a "network" that always says NonDemented
    train_x, train_y = _separable(25, seed=0)
    test_x, test_y = _separable(8, seed=1)
    subjects = np.array([f"s{i // 4}" for i in range(len(test_y))])  # 2 subjects per class
    lazy_network = np.zeros(len(test_y), dtype=np.int64)
    # when
    rep = score_baselines(
        train_x, train_y, test_x, test_y, subjects, lazy_network, CLASSES, seed=0, n_resamples=200
    )
    # then
    json.dumps(rep, allow_nan=False)
    assert set(rep["baselines"]) == set(BASELINES)
    pixel = rep["baselines"]["pixel"]
    assert pixel["balanced_accuracy"] >= 0.9 and pixel["beats"] is False
    assert pixel["verdict"].startswith("the network does NOT beat the pixel baseline")
    assert rep["network"]["balanced_accuracy"] == pytest.approx(0.25)
    assert rep["baselines"]["majority"]["network_minus_baseline"]["difference"] == 0.0
    assert rep["baselines"]["majority"]["network_minus_baseline"]["n_units"] == 8
    assert rep["n_train"] == 100 and rep["beats_all"] is False
    head = headline_metrics(rep)
    assert head["beats_pixel_baseline"] is False
    assert head["baseline_pixel_balanced_accuracy"] == pixel["balanced_accuracy"]
    assert head["baseline_majority_balanced_accuracy"] == pytest.approx(0.25)
    assert head["network_minus_pixel_balanced_accuracy"] < 0


def test_compare_with_baselines_takes_pooled_predictions_as_they_are() -> None:
    # given: out-of-fold style inputs, a network right everywhere, a baseline wrong everywhere
    y = np.repeat(np.arange(4), 6)
    subjects = np.repeat([f"s{i}" for i in range(8)], 3)
    # when
    rep = compare_with_baselines(
        y, y, {"pixel": (y + 1) % 4}, subjects, CLASSES, seed=0, n_resamples=100
    )
    # then
    assert rep["baselines"]["pixel"]["beats"] is True and rep["beats_all"] is True
    assert rep["baselines"]["pixel"]["verdict"].startswith("the network beats the pixel baseline")
    assert headline_metrics(rep) == {
        "baseline_pixel_balanced_accuracy": 0.0,
        "beats_pixel_baseline": True,
        "network_minus_pixel_balanced_accuracy": 1.0,
    }
