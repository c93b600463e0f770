"""Safe archive extraction: refuse traversal, links, repeated names and zip bombs first.

Every entry is checked before a single byte is written, so a refused archive leaves
nothing behind in ``dest`` beyond what the caller discards anyway.
"""

from __future__ import annotations

import functools
import gzip
import lzma
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from alzstage.errors import AlzstageError

_RATIO_FLOOR = 1 << 20


@dataclass(frozen=True)
class ArchiveLimits:
    max_total_bytes: int = 8 * 1024**3
    max_ratio: float = 200.0
    max_entries: int = 200_000


@dataclass(frozen=True)
class _Entry:
    name: str
    size: int
    compressed: int
    is_dir: bool


def _safe_relpath(name: str, archive: Path) -> PurePosixPath:
    """Refuse absolute paths and ``..``: an archive must not write outside its folder."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise AlzstageError(f"{archive}: entry {name!r} has an absolute path; refusing to extract")
    if any(part == ".." for part in p.parts):
        raise AlzstageError(
            f"{archive}: entry {name!r} contains '..' (path traversal); refusing to extract"
        )
    return p


def _zip_entries(zf: zipfile.ZipFile, archive: Path) -> list[_Entry]:
    entries = []
    for info in zf.infolist():
        mode = (info.external_attr >> 16) & 0o170000
        if mode and stat.S_ISLNK(mode):
            raise AlzstageError(f"{archive}: entry {info.filename!r} is a symlink; refusing")
        if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise AlzstageError(
                f"{archive}: entry {info.filename!r} is a device or special file; refusing"
            )
        _safe_relpath(info.filename, archive)
        entries.append(_Entry(info.filename, info.file_size, info.compress_size, info.is_dir()))
    return entries


def _tar_entries(tf: tarfile.TarFile, archive: Path) -> list[_Entry]:
    entries = []
    for m in tf.getmembers():
        if m.issym() or m.islnk():
            raise AlzstageError(f"{archive}: entry {m.name!r} is a link; refusing")
        if not (m.isfile() or m.isdir()):
            raise AlzstageError(
                f"{archive}: entry {m.name!r} is a device or special file; refusing"
            )
        _safe_relpath(m.name, archive)
        entries.append(_Entry(m.name, m.size, m.size, m.isdir()))
    return entries


def check_unique_names(entries: list[_Entry], archive: Path) -> None:
    """Refuse repeated file names: extracting them would let a later entry overwrite one."""
    seen: dict[str, int] = {}
    for e in entries:
        if not e.is_dir:
            key = _safe_relpath(e.name, archive).as_posix()
            seen[key] = seen.get(key, 0) + 1
    repeated = sorted((name, n) for name, n in seen.items() if n > 1)
    if repeated:
        shown = ", ".join(f"{name!r} ({n} times)" for name, n in repeated[:5])
        more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
        raise AlzstageError(
            f"{archive}: {len(repeated)} entry name(s) occur more than once: {shown}{more}; "
            "later copies would overwrite earlier ones. Refusing: rebuild the archive with "
            "unique names"
        )


def check_limits(
    entries: list[_Entry], archive: Path, archive_bytes: int, limits: ArchiveLimits
) -> None:
    """Zip-bomb guard: bound entry count, total size and compression ratio *before* extracting."""
    if len(entries) > limits.max_entries:
        raise AlzstageError(
            f"{archive}: {len(entries)} entries exceeds the limit of {limits.max_entries}"
        )
    total = sum(e.size for e in entries)
    if total > limits.max_total_bytes:
        raise AlzstageError(
            f"{archive}: would extract {total} bytes, over the limit of {limits.max_total_bytes}"
            " (raise data.max_extract_bytes if the archive is trusted)"
        )
    # Ratios are only judged above 1 MiB: a few highly compressible small files (blank
    # fixtures, text) are harmless, and a bomb has to expand to something big to hurt.
    for e in entries:
        if e.compressed > 0 and e.size / e.compressed > limits.max_ratio and e.size > _RATIO_FLOOR:
            raise AlzstageError(
                f"{archive}: entry {e.name!r} has compression ratio {e.size / e.compressed:.0f}"
                f" > {limits.max_ratio:.0f} (zip bomb?); refusing"
            )
    if archive_bytes > 0 and total / archive_bytes > limits.max_ratio and total > _RATIO_FLOOR:
        raise AlzstageError(
            f"{archive}: overall compression ratio {total / archive_bytes:.0f} > "
            f"{limits.max_ratio:.0f} (zip bomb?); refusing (raise data.max_compression_ratio "
            "if the archive is trusted)"
        )


def extract_archive(archive: Path, dest: Path, limits: ArchiveLimits | None = None) -> None:
    """Safely extract a zip or tar(.gz/.bz2/.xz) into ``dest`` (which must exist).

    A damaged archive (bad CRC, forged sizes, cut short) is an :class:`AlzstageError`
    naming the file; ``dest`` may then hold part of it, which the caller discards.
    """
    limits = limits or ArchiveLimits()
    size = archive.stat().st_size
    try:
        _extract(archive, dest, limits, size)
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, EOFError) as exc:
        raise _damaged(archive, exc) from None
    except OSError as exc:
        # gzip and bz2 report damaged data as OSErrors ("Invalid data stream" is bz2's);
        # any other OSError (disk full, permissions) is not the archive's fault.
        if not isinstance(exc, gzip.BadGzipFile) and "Invalid data stream" not in str(exc):
            raise
        raise _damaged(archive, exc) from None


def _damaged(archive: Path, exc: BaseException) -> AlzstageError:
    why = str(exc).strip() or type(exc).__name__
    return AlzstageError(
        f"{archive}: the archive is corrupt or truncated ({why}); download it again (pin "
        "data.sha256 so that a damaged copy is refused before unpacking)"
    )


# Leading bytes of the archive formats extract_archive reads, to tell a damaged archive
# from a file that is not an archive at all.
_ARCHIVE_MAGIC = (
    (b"PK\x03\x04", "zip"),
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
)


def _extract(archive: Path, dest: Path, limits: ArchiveLimits, size: int) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            openers = [functools.partial(zf.open, info) for info in zf.infolist()]
            _check_and_write(archive, dest, _zip_entries(zf, archive), openers, limits, size)
        return
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            openers = [functools.partial(tf.extractfile, m) for m in tf.getmembers()]
            _check_and_write(archive, dest, _tar_entries(tf, archive), openers, limits, size)
        return
    with open(archive, "rb") as f:
        head = f.read(8)
    kind = next((k for magic, k in _ARCHIVE_MAGIC if head.startswith(magic)), None)
    if kind is not None:  # the start of an archive whose index or data is missing
        raise AlzstageError(
            f"{archive}: starts like a {kind} archive but cannot be read: the file is "
            "truncated or corrupt; download it again (pin data.sha256 so that a damaged copy "
            "is refused before unpacking)"
        )
    raise AlzstageError(
        f"{archive}: neither a zip nor a tar archive; point data.path at a .zip or .tar.gz"
    )


def _check_and_write(
    archive: Path,
    dest: Path,
    entries: list[_Entry],
    openers: list[Callable[[], IO[bytes] | None]],
    limits: ArchiveLimits,
    size: int,
) -> None:
    """Check every entry first, then write them under ``dest`` (``openers[i]`` reads entry i)."""
    from tqdm import tqdm

    check_unique_names(entries, archive)
    check_limits(entries, archive, size, limits)
    pairs = list(zip(entries, openers, strict=True))
    for entry, open_entry in tqdm(
        pairs, desc=f"extract {archive.name}", unit="file", disable=None, leave=False
    ):
        target = dest.joinpath(*_safe_relpath(entry.name, archive).parts)
        if entry.is_dir:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        src = open_entry()
        if src is None:  # pragma: no cover - a tar's regular files always have data
            continue
        with src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
