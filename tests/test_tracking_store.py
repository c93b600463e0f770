"""The tracking store survives mistakes: a damaged mlflow.db is refused in one line and never
replaced by an empty store; a schema migration is preceded by a backup. Real sqlite stores."""

from __future__ import annotations

import pytest
from store_helpers import log_train_run, make_project, one_line_error, project_store, run_cli

from alzstage import tracking
from alzstage.errors import AlzstageError


@pytest.fixture
def no_server(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


def test_an_empty_store_file_is_refused_in_one_line_and_left_as_it_is(tmp_path, no_server):
    # given a project whose mlflow.db was emptied (a full disk, a bad copy)
    root = make_project(tmp_path / "p")
    (root / "mlflow.db").write_bytes(b"")
    # when promote runs (as a stage, or to set an alias by hand), or MLflow is pointed at it
    line = one_line_error(run_cli(root, "promote"))
    by_hand = one_line_error(run_cli(root, "promote", "--version", "1"))
    with pytest.raises(AlzstageError):
        tracking.configure(root)
    # then one line names the file and how to recover; no fresh store was made over it
    assert f"{root / 'mlflow.db'}: the MLflow store is empty (0 bytes)" in line
    assert "mv " in line and "never creates a fresh store" in line
    assert "the MLflow store is empty (0 bytes)" in by_hand
    assert (root / "mlflow.db").stat().st_size == 0


def test_a_truncated_store_is_refused_in_one_line(tmp_path, no_server):
    # given a store with a run in it, cut short (a copy interrupted half-way)
    root = make_project(tmp_path / "p")
    log_train_run(root)
    db = root / "mlflow.db"
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])
    # when a stage starts
    line = one_line_error(run_cli(root, "promote"))
    # then it says the store is truncated, by how much, and how to get it back
    assert f"{db}: the MLflow store is truncated ({len(data) // 2} of {len(data)} bytes)" in line
    assert "restore" in line and f"{db}.broken" in line
    assert db.stat().st_size == len(data) // 2


def test_a_file_that_is_not_a_database_is_refused(tmp_path, no_server):
    db = tmp_path / "mlflow.db"
    db.write_text("not sqlite at all, but long enough to have a header " * 4)
    with pytest.raises(AlzstageError, match=r"mlflow\.db: not an SQLite database"):
        tracking.tracking_uri(tmp_path)


def test_a_healthy_or_missing_store_passes_the_check(tmp_path, no_server):
    # a missing store is fine (MLflow creates it); a healthy one with runs is fine
    assert tracking.tracking_uri(tmp_path).endswith("mlflow.db")
    root = make_project(tmp_path / "p")
    log_train_run(root)
    assert tracking.tracking_uri(root) == f"sqlite:///{root / 'mlflow.db'}"


def _downgrade_one_revision(db) -> str:
    """Put the store one MLflow schema revision back (as an older MLflow left it)."""
    import sqlalchemy
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config

    from alzstage.tracking_store import schema_revision

    config = _get_alembic_config(f"sqlite:///{db}")
    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "-1")
    engine.dispose()
    return schema_revision(db)


def test_an_old_schema_is_backed_up_before_it_is_upgraded(tmp_path, no_server, capfd):
    from mlflow import MlflowClient

    from alzstage.tracking_store import backups, schema_revision

    # given a store with a run, at the schema revision before the installed MLflow's
    root = make_project(tmp_path / "p")
    run_id = log_train_run(root)
    db = root / "mlflow.db"
    head = schema_revision(db)
    old = _downgrade_one_revision(db)
    assert old != head and backups(db) == []
    # when a stage points MLflow at it
    with project_store(root):
        pass
    # then a copy at the old revision was made first, and the store is upgraded, run intact
    (copy,) = backups(db)
    assert copy.name.startswith(f"mlflow.db.bak-{old}-")
    assert schema_revision(copy) == old and schema_revision(db) == head
    uri = tracking.tracking_uri(root)
    assert MlflowClient(uri).get_run(run_id).info.run_id == run_id
    assert f"backed up to {copy.name}" in capfd.readouterr().err
    # and a current store is not copied again
    with project_store(root):
        pass
    assert backups(db) == [copy]


def test_a_store_from_a_newer_mlflow_is_refused_untouched(tmp_path, no_server):
    import sqlite3

    # given a store whose schema revision the installed MLflow does not know
    root = make_project(tmp_path / "p")
    log_train_run(root)
    db = root / "mlflow.db"
    with sqlite3.connect(db) as con:
        con.execute("UPDATE alembic_version SET version_num = 'f00dfeed0001'")
    before = db.read_bytes()
    # when it is opened; then it is refused in one line, and left exactly as it was
    with pytest.raises(AlzstageError, match=r"written by a newer MLflow \(schema f00dfeed0001"):
        tracking.tracking_uri(root)
    assert db.read_bytes() == before
