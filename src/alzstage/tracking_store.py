"""The project's sqlite MLflow store as a file: refuse a damaged one, back it up before a migration.

Why: MLflow opens a ``sqlite:///`` store by creating whatever tables are missing. Over a
0-byte ``mlflow.db`` that silently makes a fresh, empty store (every run and registered
model gone, not a word said); over a truncated file it fails deep in SQLAlchemy; over a
store written by an older MLflow it migrates the schema in place, with no copy kept. So
:func:`check_sqlite_store` reads the file before MLflow ever sees it (header, size, tables:
no MLflow import, well under a millisecond), and :func:`upgrade_with_backup` copies the
store aside before any schema migration runs.

Part of the MLflow boundary with :mod:`alzstage.tracking`, which is what callers use.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from alzstage.config import tracking_home
from alzstage.errors import AlzstageError

_MAGIC = b"SQLite format 3\x00"
_MLFLOW_TABLE = "alembic_version"  # MLflow's schema revision: every MLflow store has it


def backups(db: Path) -> list[Path]:
    """Copies made by :func:`upgrade_with_backup`, oldest first (``mlflow.db.bak-...``)."""
    return sorted(db.parent.glob(f"{db.name}.bak-*"))


def _recover(db: Path) -> str:
    copies = backups(db)
    restore = f"restore {copies[-1].name} (cp {copies[-1]} {db})" if copies else "restore a copy"
    return (
        f"{restore}, or move it aside (mv {db} {db}.broken) to start an empty store; "
        "alzstage never creates a fresh store over an existing file"
    )


def _expected_size(header: bytes) -> int | None:
    """Bytes the header says the database has, or None when it does not say reliably."""
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    # The in-header page count is valid only when "version-valid-for" equals the change
    # counter (sqlite.org/fileformat.html, offsets 24 and 92).
    if pages == 0 or header[24:28] != header[92:96]:
        return None
    return pages * page_size


def _tables(db: Path) -> set[str]:
    """The table names, read without writing (no journal, no lock held afterwards)."""
    con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        return {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        con.close()


def check_sqlite_store(db: Path) -> None:
    """Raise :class:`AlzstageError` (one line: the file, what is wrong, how to recover)
    when ``db`` exists but is not a usable MLflow store; a missing file is fine (MLflow
    creates it), and so is a valid sqlite file with no tables at all (nothing to lose).
    """
    db = Path(db)
    try:
        size = db.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        raise AlzstageError(
            f"{db}: the MLflow store is empty (0 bytes), so its runs and registered models "
            f"are gone; {_recover(db)}"
        )
    with db.open("rb") as fh:
        header = fh.read(100)
    if len(header) < 100 or not header.startswith(_MAGIC):
        raise AlzstageError(
            f"{db}: not an SQLite database (damaged or overwritten); {_recover(db)}"
        )
    expected = _expected_size(header)
    if expected is not None and size < expected:
        raise AlzstageError(
            f"{db}: the MLflow store is truncated ({size} of {expected} bytes); {_recover(db)}"
        )
    try:
        tables = _tables(db)
    except sqlite3.DatabaseError as exc:
        raise AlzstageError(
            f"{db}: the MLflow store cannot be read (sqlite: {exc}); {_recover(db)}"
        ) from None
    if tables and _MLFLOW_TABLE not in tables:
        raise AlzstageError(
            f"{db}: an SQLite database but not an MLflow store (no {_MLFLOW_TABLE} table); "
            f"point MLFLOW_TRACKING_URI elsewhere or move it aside (mv {db} {db}.other)"
        )


def schema_revision(db: Path) -> str | None:
    """The store's MLflow schema revision, or None for a missing or table-less store."""
    if not db.exists() or _MLFLOW_TABLE not in _tables(db):
        return None
    con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        row = con.execute(f"SELECT version_num FROM {_MLFLOW_TABLE}").fetchone()
    finally:
        con.close()
    return row[0] if row else None


def backup(db: Path, label: str) -> Path:
    """A consistent copy of ``db`` beside it, ``<name>.bak-<label>-<UTC time>``.

    sqlite's online backup (not a file copy), so a writer elsewhere cannot tear it; written
    to a temporary name first, so a crash leaves no half copy under the backup's name.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = db.with_name(f"{db.name}.bak-{label}-{stamp}")
    tmp = target.with_name(f".{target.name}.tmp")
    src = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    dst = sqlite3.connect(tmp)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    tmp.replace(target)
    return target


@functools.cache
def _schema_head() -> tuple[str, frozenset[str]]:
    """The installed MLflow's schema head and every revision it knows (read once).

    Read from the ``revision`` / ``down_revision`` lines of MLflow's migration scripts:
    loading them through alembic imports MLflow, seconds on every ``tracking_uri`` of a
    process that has not loaded it (and that may never need to).
    """
    import importlib.util
    import re

    spec = importlib.util.find_spec("mlflow")
    assert spec is not None and spec.origin is not None
    revisions, parents = set(), set()
    for script in (Path(spec.origin).parent / "store" / "db_migrations" / "versions").glob("*.py"):
        text = script.read_text()
        rev = re.search(r"^revision\s*=\s*[\"'](\w+)[\"']", text, re.M)
        down = re.search(r"^down_revision\s*=\s*(.+)$", text, re.M)
        if rev:
            revisions.add(rev[1])
            parents.update(re.findall(r"[\"'](\w+)[\"']", down[1]) if down else ())
    heads = revisions - parents
    if len(heads) != 1:
        raise AlzstageError(f"MLflow's migration scripts have {len(heads)} heads, not one")
    return heads.pop(), frozenset(revisions)


def upgrade_with_backup(db: Path) -> Path | None:
    """Bring an existing store to the installed MLflow's schema, backing it up first.

    Returns the backup made, or None when the schema was current (or the store new): then
    it costs one sqlite read, and MLflow's migration scripts are never parsed. A store
    written by a newer MLflow than the installed one is refused, never touched.
    """
    current = schema_revision(db)
    if current is None or current == _CURRENT.get(db):
        return None
    head, known = _schema_head()
    if current == head:
        _CURRENT[db] = head
        return None
    if current not in known:
        raise AlzstageError(
            f"{db}: written by a newer MLflow (schema {current}) than the installed one "
            f"(schema {head}); upgrade mlflow (pip install -U mlflow) to use this store"
        )
    try:
        copy = backup(db, current)
    except OSError as exc:
        raise AlzstageError(
            f"{db}: MLflow must upgrade its schema ({current} -> {head}) but no backup could "
            f"be written beside it ({exc.strerror}); make {db.parent} writable and run again"
        ) from None
    print(
        f"alzstage: {db.name} is at MLflow schema {current}, the installed MLflow needs "
        f"{head}: backed up to {copy.name}, upgrading",
        file=sys.stderr,
    )
    import sqlalchemy
    from mlflow.store.db import utils as db_utils

    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    try:
        db_utils._upgrade_db(engine)
    finally:
        engine.dispose()
    _CURRENT[db] = head
    return copy


#: Stores this process has seen at the installed schema (skips re-reading the scripts).
_CURRENT: dict[Path, str] = {}


@contextlib.contextmanager
def registry_lock(root: Path, timeout_s: float = 600.0) -> Iterator[None]:
    """Hold the registry for one promote at a time among this machine's processes.

    A file lock (``flock``: the kernel releases it when its process dies, so a killed
    promote never leaves it held) under the store's ``.cache``. Processes on other hosts
    sharing a tracking server are not serialised by it; :func:`register_once` still
    finds their version once it is there.
    """
    from filelock import FileLock, Timeout

    path = tracking_home(root) / ".cache" / "alzstage" / "registry.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=timeout_s)
    try:
        lock.acquire()
    except Timeout:
        raise AlzstageError(
            f"{path}: another promote has held the registry for {timeout_s:.0f} s; wait for it "
            "to finish (the lock goes with its process) and run promote again"
        ) from None
    try:
        yield
    finally:
        lock.release()
