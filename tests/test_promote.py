"""Promotion rules: better on the metric, same test split, never a leaky split by default."""

from __future__ import annotations

from alzstage.promote import decide

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


class FakeRegistry:
    """In-memory stand-in for the MLflow registry calls promote makes (aliases are unique)."""

    def __init__(self) -> None:
        self.versions: dict[int, dict[str, str]] = {}
        self.aliases: dict[str, int] = {}
        self.fail_on: str | None = None

    def register(self, uri, name, tags):
        from types import SimpleNamespace

        v = len(self.versions) + 1
        self.versions[v] = dict(tags)
        return SimpleNamespace(version=v, tags=tags)

    def set_alias(self, name, alias, version):
        if self.fail_on == alias:
            raise RuntimeError(f"crash while setting {alias}")
        self.aliases[alias] = int(version)

    def get_alias_version(self, name, alias):
        from types import SimpleNamespace

        v = self.aliases.get(alias)
        return None if v is None else SimpleNamespace(version=v, tags=self.versions[v])


def _setup(tmp_path, monkeypatch, value, fp=FP):
    from alzstage import tracking
    from alzstage.artifacts import MetricsReport, TrainRun
    from alzstage.config import Params, Paths

    paths = Paths(tmp_path)
    paths.models.mkdir(parents=True, exist_ok=True)
    paths.reports.mkdir(parents=True, exist_ok=True)
    TrainRun(
        run_id="r1",
        model_uri="models:/m-1",
        runs_uri="runs:/r1/model",
        temperature=1.0,
        input_size=(32, 32),
        recipe="transfer",
        backbone="efficientnetb0",
        weights="imagenet",
    ).write(paths.train_run)
    MetricsReport(
        balanced_accuracy=value,
        macro_f1=value,
        accuracy=value,
        split_fingerprint=fp,
        split_strategy="subject",
        split_leaky=False,
        dataset="demo",
        data_source="demo",
    ).write(paths.metrics)
    return Params(), paths, tracking


def test_run_promote_moves_champion_only_when_better(tmp_path, monkeypatch):
    import json

    from alzstage.promote import run_promote

    reg = FakeRegistry()
    params, paths, tracking = _setup(tmp_path, monkeypatch, 0.5)
    for fn in ("register", "set_alias", "get_alias_version"):
        monkeypatch.setattr(tracking, fn, getattr(reg, fn))
    run_promote(params, paths)
    assert reg.aliases == {"challenger": 1, "champion": 1}
    _setup(tmp_path, monkeypatch, 0.4)
    run_promote(params, paths)
    assert reg.aliases == {"challenger": 2, "champion": 1}
    report = json.loads(paths.promotion.read_text())
    assert report["promoted"] is False and "does not beat" in report["reason"]
    _setup(tmp_path, monkeypatch, 0.9, fp="another-split")
    run_promote(params, paths)
    assert reg.aliases["champion"] == 1


def test_crash_midway_keeps_exactly_one_champion(tmp_path, monkeypatch):
    import pytest

    from alzstage.promote import run_promote

    reg = FakeRegistry()
    params, paths, tracking = _setup(tmp_path, monkeypatch, 0.5)
    for fn in ("register", "set_alias", "get_alias_version"):
        monkeypatch.setattr(tracking, fn, getattr(reg, fn))
    run_promote(params, paths)
    _setup(tmp_path, monkeypatch, 0.9)
    reg.fail_on = "champion"
    with pytest.raises(RuntimeError):
        run_promote(params, paths)
    assert reg.aliases["champion"] == 1  # the old champion still stands
    assert not paths.promotion.exists() or '"version": 1' in paths.promotion.read_text()
