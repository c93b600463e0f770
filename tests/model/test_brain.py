"""The brain-level model: atrophy measurements, slice order, aggregation, conformal sets,
brain-level scores and the guards that keep test brains out of every fit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from alzstage.cv.brain import assert_disjoint, cv_brains
from alzstage.data.morphometry import MORPH_FEATURES, slice_morphometry, slice_order
from alzstage.evaluate.brain import binary_view, bootstrap_brains, main_classes
from alzstage.model.brain import BrainModel, brain_table, fit_brain_model
from alzstage.model.conformal import (
    calibrate,
    coverage_report,
    describe_set,
    prediction_sets,
)
from alzstage.model.metrics import aggregate_by_subject

CLASSES = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]


def _disk_slice(csf: float, size: int = 96) -> np.ndarray:
    """A bright disk (the head) whose central area ``csf`` (share of the disk) is dark."""
    yy, xx = np.mgrid[:size, :size]
    r2 = (yy - size / 2) ** 2 + (xx - size / 2) ** 2
    head = r2 < (size * 0.4) ** 2
    img = np.where(head, 200, 0).astype(np.uint8)
    img[r2 < csf * (size * 0.4) ** 2] = 20
    return img


def _brains(n_per_class: list[int], slices: int, rng: np.random.Generator, signal: float):
    """Slices of synthetic brains whose CSF fraction and network probabilities follow the
    stage; returns (subjects, labels, probs, morph) per slice."""
    rows = []
    for k, n in enumerate(n_per_class):
        for b in range(n):
            csf = 0.1 + 0.06 * k + rng.normal(0, 0.02)
            for _ in range(slices):
                logits = rng.normal(0, 1, len(CLASSES))
                logits[k] += signal
                p = np.exp(logits) / np.exp(logits).sum()
                rows.append((f"{CLASSES[k]}-{b}", k, p, [csf + rng.normal(0, 0.01), 0.5]))
    subjects, y, probs, morph = zip(*rows, strict=True)
    return np.array(subjects), np.array(y), np.array(probs), np.array(morph)


# --------------------------------------------------------------------------- morphometry


def test_csf_fraction_measures_the_dark_share_of_the_head() -> None:
    # given: heads whose dark centre is 10% and 30% of the disk
    # when
    small, large = (slice_morphometry(_disk_slice(f)) for f in (0.1, 0.3))
    # then: the measurement follows the truth within the pixel grid, and blank is 0
    assert small["morph_csf_fraction"] == pytest.approx(0.1, abs=0.02)
    assert large["morph_csf_fraction"] == pytest.approx(0.3, abs=0.02)
    assert set(small) == set(MORPH_FEATURES)
    assert slice_morphometry(np.zeros((20, 20), np.uint8))["morph_csf_fraction"] == 0.0


def test_csf_fraction_does_not_depend_on_the_grey_level_scale() -> None:
    # given: the same slice in 8-bit and scaled by 100 (a 16-bit export)
    img = _disk_slice(0.2)
    # when / then: the threshold is relative to the head's own range
    assert slice_morphometry(img) == pytest.approx(slice_morphometry(img.astype(float) * 100))


def test_slice_order_recovers_a_shuffled_run_of_adjacent_slices() -> None:
    # given: 12 slices whose head shrinks step by step, shuffled
    sizes = np.linspace(40, 20, 12)
    yy, xx = np.mgrid[:64, :64]
    stack = np.stack([((yy - 32) ** 2 + (xx - 32) ** 2 < r**2) * 200.0 for r in sizes])
    stack += np.random.default_rng(0).normal(0, 1, stack.shape)
    shuffle = np.random.default_rng(1).permutation(12)
    heads = np.array([slice_morphometry(s)["morph_head_fraction"] for s in stack[shuffle]])
    # when
    order = slice_order(stack[shuffle], heads)
    # then: back in anatomical order, oriented so that the head shrinks
    assert shuffle[order].tolist() == list(range(12))


# --------------------------------------------------------------------------- aggregation


def test_brain_table_pools_slices_as_the_subject_level_metrics_do() -> None:
    # given
    subjects, y, probs, morph = _brains([3, 3, 2, 1], 5, np.random.default_rng(0), 1.0)
    # when
    table = brain_table(subjects, probs, morph, y)
    reference = aggregate_by_subject(probs, y, subjects)
    # then: the same brains, the same pooled probabilities; morphometry is the mean
    assert table.subjects.tolist() == reference.subjects.tolist()
    np.testing.assert_allclose(table.pooled, reference.probs)
    first = table.subjects.tolist().index(subjects[0])
    assert table.morph[first, 0] == pytest.approx(morph[subjects == subjects[0], 0].mean())


def test_a_brain_with_two_labels_is_refused() -> None:
    probs = np.full((2, 4), 0.25)
    with pytest.raises(ValueError, match="different labels"):
        brain_table(np.array(["a", "a"]), probs, np.zeros((2, 2)), np.array([0, 1]))


def test_logistic_aggregator_learns_atrophy_and_round_trips_through_json() -> None:
    # given: a network that knows nothing (signal 0) and a CSF fraction that tracks stage
    rng = np.random.default_rng(0)
    train = brain_table(*_ordered(_brains([20, 20, 20, 0], 4, rng, 0.0)))
    test = brain_table(*_ordered(_brains([10, 10, 10, 0], 4, rng, 0.0)))
    # when
    model = BrainModel(CLASSES, "logistic", ("cnn", "morphometry")).fit(train)
    pooled = BrainModel(CLASSES, "pool").fit(train)
    probs = model.predict_proba(test)
    again = BrainModel.from_dict(model.to_dict()).predict_proba(test)
    # then: the aggregator beats the uninformed pooling rule; a class with no training
    # brain gets probability 0; the JSON copy answers identically
    acc = (probs.argmax(1) == test.y).mean()
    assert acc > 0.8 > (pooled.predict_proba(test).argmax(1) == test.y).mean()
    assert np.all(probs[:, 3] == 0)
    np.testing.assert_allclose(again, probs, atol=1e-9)


def _ordered(parts: tuple) -> tuple:
    subjects, y, probs, morph = parts
    return subjects, probs, morph, y


# --------------------------------------------------------------------------- guards


def test_the_aggregator_and_the_sets_never_share_a_brain() -> None:
    # given: a calibration set holding one of the training brains
    rng = np.random.default_rng(0)
    subjects, y, probs, morph = _brains([4, 4, 4, 0], 3, rng, 1.0)
    table = brain_table(subjects, probs, morph, y)
    # when / then
    with pytest.raises(ValueError, match="disjoint"):
        fit_brain_model(
            table,
            table,
            CLASSES,
            aggregator="logistic",
            features=("cnn",),
            C=1.0,
            max_class_weight=5.0,
            confidence=0.9,
            mondrian=False,
        )


def _cv_frames(rng: np.random.Generator, leak: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    subjects, y, probs, morph = _brains([6, 6, 6, 0], 3, rng, 1.0)
    frame = pd.DataFrame({"subject": subjects, "label": [CLASSES[k] for k in y]})
    for i, c in enumerate(CLASSES):
        frame[f"p_{c}"] = probs[:, i]
    frame[list(MORPH_FEATURES)] = morph
    brains = sorted(set(subjects))
    test_ids = set(brains[::3])
    val_ids = set(brains[1::3])
    test = frame[frame["subject"].isin(test_ids)].assign(repeat=0, fold=0)
    for name in ("pixel", "nearest"):
        test[f"baseline_{name}"] = test["label"]
    fit = frame[~frame["subject"].isin(test_ids) | leak].assign(repeat=0, fold=0)
    fit["role"] = np.where(fit["subject"].isin(val_ids), "val", "train")
    return fit, test


def test_cv_report_refuses_a_fold_whose_brain_model_saw_its_test_brains() -> None:
    # given: a fold whose fitting slices include its test brains
    fit, test = _cv_frames(np.random.default_rng(0), leak=True)
    # when / then
    with pytest.raises(ValueError, match="own test brains"):
        assert_disjoint(fit, test)


def test_cv_brains_score_every_test_brain_once_with_every_variant() -> None:
    # given: an honest fold
    fit, test = _cv_frames(np.random.default_rng(0), leak=False)
    assert_disjoint(fit, test)
    brain = type("B", (), {"C": 1.0, "max_class_weight": 5.0, "confidence": 0.9})()
    # when
    brains = cv_brains(test, fit, CLASSES, brain, seed=0)
    # then: one row per test brain; sets are lists of stages; the vote of perfect slice
    # baselines is perfect
    assert sorted(brains["subject"]) == sorted(test["subject"].unique())
    assert (brains["pixel_pred"] == brains["y"]).all()
    for column in ("logistic_set_marginal", "morphometric_set_mondrian", "pool_p_MildDemented"):
        assert column in brains
    assert brains["n_val_brains"].iloc[0] == 6


# --------------------------------------------------------------------------- conformal


def _calibrated_draws(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A perfectly calibrated model: labels drawn from its own probabilities."""
    logits = rng.normal(size=(n, 4)) * 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = (rng.random(n)[:, None] > probs.cumsum(axis=1)).sum(axis=1)
    return probs, y


@pytest.mark.parametrize("mondrian", [False, True])
def test_conformal_sets_reach_their_coverage_on_a_problem_with_known_answer(
    mondrian: bool,
) -> None:
    # given: 40 calibration sets of 200 draws and fresh test draws, exchangeable
    rng = np.random.default_rng(0)
    coverages, per_class = [], []
    for _ in range(40):
        cal = calibrate(*_calibrated_draws(200, rng), mondrian=mondrian)
        probs, y = _calibrated_draws(1000, rng)
        # when
        sets = prediction_sets(cal, probs, 0.9)
        report = coverage_report(sets, y, list("abcd"), 0.9)
        coverages.append(report["coverage"])
        per_class.append([v["coverage"] for v in report["per_class"].values()])
    # then: coverage averages the nominal 90% (non-smoothed sets: at or just above it),
    # and the Mondrian sets hold it per class too
    assert 0.89 <= np.mean(coverages) <= 0.93
    if mondrian:
        assert np.min(np.mean(per_class, axis=0)) >= 0.88


def test_too_few_calibration_brains_give_every_stage() -> None:
    # given: 5 calibration brains: a 90% set cannot rule anything out
    cal = calibrate(np.full((5, 4), 0.25), np.array([0, 1, 2, 3, 0]), mondrian=False)
    # when
    sets = prediction_sets(cal, np.array([[0.97, 0.01, 0.01, 0.01]]), 0.9)
    # then
    assert sets.all()
    assert describe_set(["VeryMildDemented", "MildDemented"], 0.9) == (
        "VeryMildDemented or MildDemented (90%)"
    )


# --------------------------------------------------------------------------- scores


def test_binary_view_by_hand() -> None:
    # given: 4 brains without dementia, 4 with; the model calls 3 of each right
    y = np.array([0, 0, 0, 0, 1, 2, 2, 3])
    p_none = np.array([0.9, 0.8, 0.7, 0.4, 0.6, 0.3, 0.2, 0.1])  # p(NonDemented)
    probs = np.stack([p_none, 1 - p_none, np.zeros(8), np.zeros(8)], axis=1)
    # when
    view = binary_view(y, probs, np.array([f"s{i}" for i in range(8)]), seed=0, n_resamples=200)
    # then: sensitivity 3/4, specificity 3/4, AUC = pairs ranked right / 16 = 15/16
    assert view["sensitivity"] == pytest.approx(0.75)
    assert view["specificity"] == pytest.approx(0.75)
    assert view["roc_auc"] == pytest.approx(15 / 16)
    assert view["ci"]["roc_auc"]["low"] <= view["roc_auc"] <= view["ci"]["roc_auc"]["high"]


def test_main_classes_leave_out_a_class_of_two_brains() -> None:
    # given: 3 brains of classes 0-2 and 2 of class 3, some seen twice (repeats)
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    subjects = np.array(["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "j"])
    # when / then
    assert main_classes(y, subjects, 4) == [0, 1, 2]


def test_paired_difference_of_a_predictor_with_itself_is_zero_and_never_beats() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    pred = np.where(rng.random(60) < 0.6, y, rng.integers(0, 3, 60))
    subjects = np.array([f"s{i}" for i in range(60)])
    out = bootstrap_brains(
        y,
        {"a": pred, "b": pred.copy()},
        subjects,
        CLASSES[:3],
        reference="a",
        seed=0,
        n_resamples=200,
    )
    diff = out["predictors"]["b"]["vs_reference"]["balanced_accuracy_main"]
    assert diff["difference"] == 0 and diff["beats"] is False
    assert diff["ci"] == {"low": 0.0, "high": 0.0}


def test_ensemble_gain_is_zero_when_every_repeat_agrees() -> None:
    from alzstage.cv.brain import ensemble_gain

    # given: two repeats that give every brain the same probabilities
    rows = []
    for repeat in (0, 1):
        for b in range(12):
            y = b % 3
            p = np.full(4, 0.1)
            p[(y + (b % 2)) % 3] = 0.7
            rows.append(
                {
                    "repeat": repeat,
                    "subject": f"s{b}",
                    "y": y,
                    "v_pred": int(p.argmax()),
                    **{f"v_p_{c}": p[i] for i, c in enumerate(CLASSES)},
                }
            )
    # when
    gain = ensemble_gain(pd.DataFrame(rows), "v", CLASSES, seed=0, n_resamples=200)
    # then: averaging identical models changes nothing
    assert gain["difference"] == 0 and gain["ensemble"] == gain["single_mean"]
    assert gain["beats"] is False
