"""Promotion rules: better on the metric, same test split, never a leaky split by default."""

from __future__ import annotations

from alzstage.model.promote import decide

FP = "abc123"


def tags(value: float, fp: str = FP, leaky: str = "False") -> dict[str, str]:
    return {"balanced_accuracy": str(value), "split_fingerprint": fp, "split_leaky": leaky}


def test_first_model_becomes_champion():
    d = decide(tags(0.4), None, "balanced_accuracy", 0.0, allow_leaky=False)
    assert d.promote and "no champion" in d.reason


def test_better_challenger_on_same_split_wins():
    assert decide(tags(0.6), tags(0.5), "balanced_accuracy", 0.0, False).promote


def test_worse_or_equal_challenger_loses():
    assert not decide(tags(0.5), tags(0.5), "balanced_accuracy", 0.0, False).promote
    assert not decide(tags(0.55), tags(0.5), "balanced_accuracy", 0.1, False).promote


def test_different_test_split_is_not_comparable():
    d = decide(tags(0.9, fp="other"), tags(0.5), "balanced_accuracy", 0.0, False)
    assert not d.promote and "different test splits" in d.reason


def test_leaky_split_never_promoted_unless_allowed():
    d = decide(tags(0.99, leaky="True"), None, "balanced_accuracy", 0.0, False)
    assert not d.promote and "leaky" in d.reason
    assert decide(tags(0.99, leaky="True"), None, "balanced_accuracy", 0.0, True).promote
