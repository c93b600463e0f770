"""Crash-safe file helpers shared by every stage.

A stage killed half-way must never leave a half-written output that DVC or the next
stage would trust. Everything is written to a temporary sibling and renamed into place:
``os.replace`` is atomic on one filesystem.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@functools.cache
def _umask() -> int:
    # os.umask can only be read by setting it; read it once, not on every write, so
    # threads writing files never see the brief stand-in value.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path beside ``target``; rename it onto ``target`` only on success.

    If the body raises, ``target`` is left exactly as it was and the temp file is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; give the output the permissions a plain open() would.
    os.chmod(tmp_path, 0o666 & ~_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(target: Path, text: str) -> None:
    """Write ``text`` atomically (see :func:`atomic_path`)."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_csv(target: Path, df: Any) -> Path:
    """Write a DataFrame as CSV atomically, ``\n`` line ends on every platform."""
    with atomic_path(target) as tmp:
        df.to_csv(tmp, index=False, lineterminator="\n")
    return Path(target)


def json_text(data: Any) -> str:
    """Sorted, indented JSON, numpy values as plain numbers: what :func:`write_json` writes."""
    return json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"


def write_json(target: Path, data: Any) -> None:
    """Write sorted, indented JSON atomically, so reports diff cleanly under DVC."""
    write_text(target, json_text(data))


def _json_default(o: Any) -> Any:
    # numpy scalars and arrays show up in metrics; json cannot encode them natively.
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: Path) -> Any:
    """Read a JSON file written by :func:`write_json`."""
    return json.loads(Path(path).read_text())


def _temp_dir_beside(target: Path) -> Path:
    """An empty temp directory next to ``target`` (same filesystem: rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    # mkdtemp creates 0700 directories; the output should be as readable as a mkdir().
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temp directory; swap it in for ``target`` only on success.

    The old ``target`` is kept until the new one is complete, so a failure leaves the
    previous good output (or nothing), never a mixture.
    """
    target = Path(target)
    tmp = _temp_dir_beside(target)
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            if old.exists():  # left by an earlier crash of a process with the same pid
                shutil.rmtree(old)
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:  # put the previous good output back
                os.replace(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_new_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temp directory; rename it to ``target`` on success, once.

    For caches whose entries are written once and never changed: if ``target`` appeared
    meanwhile (another process made the same entry), it is kept and the new copy dropped,
    so a reader never sees an entry disappear or half-written.
    """
    target = Path(target)
    tmp = _temp_dir_beside(target)
    try:
        yield tmp
        try:
            os.rename(tmp, target)  # fails if target exists and is not empty
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB archives need no memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def md5_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex md5 of a file: the hash DVC itself uses, so ours can be compared with it."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def md5_tree(path: Path) -> str:
    """Content hash of a file or a directory (sorted relative paths + file md5s)."""
    path = Path(path)
    if path.is_file():
        return md5_file(path)
    h = hashlib.md5()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(p.relative_to(path).as_posix().encode())
        h.update(md5_file(p).encode())
    return h.hexdigest()
