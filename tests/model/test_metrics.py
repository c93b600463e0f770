"""Metrics against hand computations: every number in metrics.json must be checkable."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from alzstage.model.metrics import (
    aggregate_by_subject,
    bootstrap_ci,
    metrics_from_confusion,
    normalized_confusion,
    one_vs_rest_auc,
    per_class_metrics,
    pr_curves,
    quadratic_weighted_kappa,
    resample_counts,
    roc_curves,
    summary_metrics,
)

CLASSES = ["A", "B", "C"]


def test_summary_and_per_class_by_hand() -> None:
    y = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0])
    s = summary_metrics(y, pred, 3)
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert s["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    # F1: A p=1/2 r=1/2 -> 1/2; B p=2/3 r=1 -> 4/5; C 0
    assert s["macro_f1"] == pytest.approx((0.5 + 0.8 + 0) / 3)
    pc = per_class_metrics(y, pred, CLASSES)
    assert pc["B"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": 0.8, "support": 2}


def test_normalized_confusion_rows_sum_to_one_and_absent_rows_stay_zero() -> None:
    cm = np.array([[2, 2, 0], [0, 0, 0], [1, 0, 3]])
    n = normalized_confusion(cm)
    np.testing.assert_allclose(n, [[0.5, 0.5, 0], [0, 0, 0], [0.25, 0, 0.75]])


def test_qwk_by_hand() -> None:
    # O = [[1,0,0],[0,0,1],[0,0,1]], W = (i-j)^2/4, E = outer([1,1,1],[1,0,2])/3
    # sum(W*O) = 0.25, sum(W*E) = 2/3 + 1/4 + 1/3 = 1.25 -> kappa = 1 - 0.25/1.25 = 0.8
    y, pred = np.array([0, 1, 2]), np.array([0, 2, 2])
    assert quadratic_weighted_kappa(y, pred, 3) == pytest.approx(0.8)
    assert quadratic_weighted_kappa(y, pred, 3) == pytest.approx(
        cohen_kappa_score(y, pred, weights="quadratic")
    )
    assert quadratic_weighted_kappa(y, y, 3) == pytest.approx(1.0)


def test_qwk_punishes_distant_stages_more() -> None:
    y = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    near = np.array([1, 1, 2, 3, 0, 1, 2, 2])  # two off-by-one mistakes
    far = np.array([3, 1, 2, 3, 0, 1, 2, 0])  # two off-by-three mistakes
    assert summary_metrics(y, near, 4)["accuracy"] == summary_metrics(y, far, 4)["accuracy"]
    assert quadratic_weighted_kappa(y, near, 4) > quadratic_weighted_kappa(y, far, 4)


def test_qwk_undefined_when_everything_is_one_class() -> None:
    assert np.isnan(quadratic_weighted_kappa(np.zeros(4, int), np.zeros(4, int), 3))


def _probs_for_class_b() -> tuple[np.ndarray, np.ndarray]:
    # Class B scores: positives 0.9 and 0.4, negatives 0.5 and 0.1.
    y = np.array([1, 0, 1, 2])
    pb = np.array([0.9, 0.5, 0.4, 0.1])
    other = (1 - pb) / 2
    probs = np.stack([other, pb, other], axis=1)
    probs[3] = [0.2, 0.1, 0.7]
    probs[1] = [0.45, 0.5, 0.05]
    return y, probs


def test_auc_by_hand() -> None:
    y, probs = _probs_for_class_b()
    out = one_vs_rest_auc(y, probs, CLASSES)
    # ROC-AUC: pairs (pos > neg): 0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1 -> 3/4
    assert out["roc_auc"]["per_class"]["B"] == pytest.approx(0.75)
    # AP: ranked P(0.9) N(0.5) P(0.4) N(0.1): precisions at hits 1 and 2/3 -> 5/6
    assert out["pr_auc"]["per_class"]["B"] == pytest.approx(5 / 6)
    assert out["pr_auc"]["chance_level"]["B"] == pytest.approx(0.5)
    assert out["skipped"] == {}


def test_auc_skips_absent_class_and_says_why() -> None:
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1]])
    out = one_vs_rest_auc(y, probs, CLASSES)
    assert out["roc_auc"]["per_class"]["C"] is None
    assert "absent" in out["skipped"]["C"]
    assert out["roc_auc"]["macro"] == pytest.approx(1.0)  # mean over A and B only
    only = one_vs_rest_auc(np.zeros(3, int), probs[:3], CLASSES)
    assert "only class" in only["skipped"]["A"] and only["roc_auc"]["macro"] is None


def test_curves_share_a_grid_and_mark_skipped_classes() -> None:
    y = np.array([0, 0, 1, 1])
    perfect = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.1, 0.9, 0.0], [0.3, 0.7, 0.0]])
    roc = roc_curves(y, perfect, CLASSES, points=11)
    assert list(roc.columns) == ["fpr", "A", "B", "C", "macro"]
    assert roc["C"].isna().all()
    np.testing.assert_allclose(roc["A"], 1.0)  # perfect ranking: tpr 1 from fpr 0
    pr = pr_curves(y, perfect, CLASSES, points=11)
    np.testing.assert_allclose(pr["macro"], 1.0)
    y2, probs2 = _probs_for_class_b()
    assert np.all(np.diff(roc_curves(y2, probs2, CLASSES)["B"]) >= 0)


def test_metrics_from_confusion_match_sklearn() -> None:
    from alzstage.model.metrics import confusion

    rng = np.random.default_rng(0)
    y = rng.choice([0, 1, 3], 60)  # class 2 absent
    pred = rng.integers(0, 4, 60)
    got = metrics_from_confusion(confusion(y, pred, 4))
    want = summary_metrics(y, pred, 4)
    for k in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert float(got[k]) == pytest.approx(want[k])
    assert np.isnan(got["recall"][2])


def test_resample_counts_keep_every_stratum_size() -> None:
    strata = np.array([0, 0, 0, 1, 1, 2])
    counts = resample_counts(strata, 50, np.random.default_rng(0))
    assert counts.shape == (50, 6)
    np.testing.assert_array_equal(counts[:, :3].sum(1), 3)
    np.testing.assert_array_equal(counts[:, 3:5].sum(1), 2)
    np.testing.assert_array_equal(counts[:, 5], 1)


def _clustered(n_groups: int = 12, per_group: int = 5) -> tuple[np.ndarray, ...]:
    """Each subject is all right or all wrong: slices are clones, as in a real volume."""
    rng = np.random.default_rng(3)
    groups = np.repeat([f"s{i}" for i in range(n_groups)], per_group)
    y = np.repeat(np.arange(n_groups) % 2, per_group)
    right = np.repeat(rng.random(n_groups) < 0.6, per_group)
    pred = np.where(right, y, 1 - y)
    return y, pred, groups


def test_bootstrap_ci_brackets_the_point_estimate() -> None:
    y, pred, groups = _clustered()
    res = bootstrap_ci(y, pred, 2, groups=groups, n_resamples=500, seed=1)
    point = summary_metrics(y, pred, 2)
    for k in ("accuracy", "balanced_accuracy", "macro_f1"):
        lo, hi = res.intervals[k]
        assert lo <= point[k] <= hi, k
    for i in range(2):
        lo, hi = res.recall[i]
        assert lo <= per_class_metrics(y, pred, ["a", "b"])[["a", "b"][i]]["recall"] <= hi
    again = bootstrap_ci(y, pred, 2, groups=groups, n_resamples=500, seed=1)
    assert again.intervals == res.intervals  # seeded


def test_bootstrap_resamples_whole_subjects() -> None:
    y, pred, groups = _clustered(n_groups=12, per_group=5)
    by_subject = bootstrap_ci(
        y, pred, 2, groups=groups, n_resamples=400, seed=0, keep_replicates=True
    )
    assert by_subject.n_units == 12
    # Whole subjects drawn: replicate accuracy is (right subjects drawn) / 12 exactly.
    acc = by_subject.replicates["accuracy"] * 12
    np.testing.assert_allclose(acc, np.round(acc), atol=1e-9)
    by_image = bootstrap_ci(y, pred, 2, n_resamples=400, seed=0)
    assert by_image.n_units == 60

    def width(r: object) -> float:
        lo, hi = r.intervals["accuracy"]  # type: ignore[attr-defined]
        return hi - lo

    # Treating 5 clones as 5 independent samples understates uncertainty.
    assert width(by_subject) > 1.5 * width(by_image)


def test_aggregate_by_subject_uses_mean_log_probability() -> None:
    probs = np.array([[0.8, 0.2], [0.5, 0.5], [0.9, 0.1], [0.98, 0.02], [0.1, 0.9]])
    y = np.array([0, 0, 1, 1, 1])
    subjects = np.array(["a", "a", "b", "b", "b"])
    agg = aggregate_by_subject(probs, y, subjects)
    assert list(agg.subjects) == ["a", "b"] and list(agg.y) == [0, 1]
    assert list(agg.n_slices) == [2, 3]
    g = np.sqrt([0.8 * 0.5, 0.2 * 0.5])
    np.testing.assert_allclose(agg.probs[0], g / g.sum())
    # The slice that nearly rules class 1 out (0.02) weighs more than in a plain mean.
    g = np.cbrt([0.9 * 0.98 * 0.1, 0.1 * 0.02 * 0.9])
    np.testing.assert_allclose(agg.probs[1], g / g.sum())
    np.testing.assert_allclose(agg.probs.sum(1), 1.0)


def test_aggregate_splits_a_subject_seen_at_two_stages() -> None:
    probs = np.full((4, 2), 0.5)
    agg = aggregate_by_subject(probs, np.array([0, 0, 1, 1]), np.array(["a"] * 4))
    assert list(agg.y) == [0, 1] and list(agg.subjects) == ["a", "a"]
