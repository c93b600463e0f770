"""Promotion rules (better on the metric, same test split, never a leaky split by default),
and promote against a real sqlite registry: idempotent per training run, one at a time."""

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


# --------------------------------------------------------------------------- a real registry


def promote_in_process(root):
    from store_helpers import project_store

    from alzstage.config import Params, Paths
    from alzstage.promote import run_promote

    with project_store(root):
        return run_promote(Params(), Paths(root))


def test_run_promote_moves_champion_only_when_better(tmp_path):
    import json

    from store_helpers import aliases, log_train_run, make_project

    # given a first model, then a worse one, then a better one on another test split
    root = make_project(tmp_path / "p")
    log_train_run(root, score=0.5)
    promote_in_process(root)
    assert aliases(root) == {"challenger": 1, "champion": 1}
    log_train_run(root, score=0.4)
    promote_in_process(root)
    # then the worse one is only challenger, and the report says why
    assert aliases(root) == {"challenger": 2, "champion": 1}
    report = json.loads((root / "reports" / "promotion.json").read_text())
    assert report["promoted"] is False and "does not beat" in report["reason"]
    log_train_run(root, score=0.9, fingerprint="another-split")
    promote_in_process(root)
    assert aliases(root)["champion"] == 1


def test_crash_midway_keeps_exactly_one_champion(tmp_path, monkeypatch):
    import pytest
    from store_helpers import aliases, log_train_run, make_project

    from alzstage import tracking

    # given a champion, and a better model whose promote dies while moving the alias
    root = make_project(tmp_path / "p")
    log_train_run(root, score=0.5)
    promote_in_process(root)
    log_train_run(root, score=0.9)
    real_set_alias = tracking.set_alias

    def dies_on_champion(name, alias, version):
        if alias == tracking.ALIAS_CHAMPION:
            raise RuntimeError("killed while setting champion")
        real_set_alias(name, alias, version)

    monkeypatch.setattr(tracking, "set_alias", dies_on_champion)
    with pytest.raises(RuntimeError):
        promote_in_process(root)
    # then the old champion still stands, and the report still describes it
    assert aliases(root)["champion"] == 1
    assert '"version": 1' in (root / "reports" / "promotion.json").read_text()


def test_promote_run_twice_for_one_training_run_registers_one_version(tmp_path):
    import json

    from store_helpers import aliases, log_train_run, make_project, versions

    # given one training run, promoted once
    root = make_project(tmp_path / "p")
    run_id = log_train_run(root, score=0.5)
    first = promote_in_process(root)
    # when promote runs again for the same run
    again = promote_in_process(root)
    # then there is still one version, champion, and the second run says it was there
    assert versions(root) == [(1, run_id)]
    assert aliases(root) == {"challenger": 1, "champion": 1}
    assert first.tags["registry.version"] == again.tags["registry.version"] == "1"
    assert "registered before" in again.summary
    report = json.loads((root / "reports" / "promotion.json").read_text())
    assert report["version"] == 1 and report["champion_version"] == 1


def _running_promotes(root) -> int:
    from mlflow import MlflowClient

    from alzstage import tracking

    store = MlflowClient(tracking.tracking_uri(root))
    exp = store.get_experiment_by_name(tracking.EXPERIMENT)
    where = f"tags.`{tracking.TAG_STAGE}` = 'promote' and attributes.status = 'RUNNING'"
    return len(store.search_runs([exp.experiment_id], where))


def test_two_promotes_at_once_register_one_version(tmp_path):
    import time

    from store_helpers import aliases, log_train_run, make_project, start_cli, versions

    from alzstage import tracking

    # given one training run and its evaluation, and three `alzstage promote` processes
    # started while the registry is held (as by another promote)
    root = make_project(tmp_path / "p")
    run_id = log_train_run(root, score=0.5)
    with tracking.registry_lock(root):
        procs = [start_cli(root, "promote") for _ in range(3)]
        deadline = time.monotonic() + 300
        while _running_promotes(root) < 3:  # each is inside run_promote, at the lock
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.5)
        time.sleep(5)  # an unserialised promote registers in about a second
        assert versions(root) == [] and all(p.poll() is None for p in procs)
    # when the registry is free, all three go for it at once
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    # then all succeed, and the registry holds one version of that run, champion
    assert [code for code, _, _ in results] == [0, 0, 0], results
    assert versions(root) == [(1, run_id)]
    assert aliases(root) == {"challenger": 1, "champion": 1}
    assert sum("registered before" in out for _, out, _ in results) == 2, results


def test_a_model_file_no_train_run_wrote_is_refused_in_one_line(tmp_path):
    import pytest
    from mlflow import MlflowClient
    from store_helpers import log_train_run, make_project

    from alzstage import tracking
    from alzstage.artifacts import TrainRun
    from alzstage.errors import AlzstageError

    # given a train_run.json whose model md5 no train run in the store is tagged with
    # (the store was replaced after training, or the model file came from elsewhere)
    root = make_project(tmp_path / "p")
    log_train_run(root, score=0.5)
    path = root / "models" / "train_run.json"
    TrainRun.read(path).model_copy(update={"model_md5": "f" * 32}).write(path)

    # when promote runs, then it names the store and the stage to re-run, and registers nothing
    with pytest.raises(AlzstageError, match=r"mlflow\.db: no finished train run wrote") as err:
        promote_in_process(root)
    assert "\n" not in str(err.value) and "alzstage train" in str(err.value)
    uri = tracking.tracking_uri(root)
    assert MlflowClient(uri, uri).search_registered_models() == []
