"""The ``download`` stage: every data source ends as one normalised raw layout.

``data/raw/images/[<source split>/]<Class>/<file>`` plus ``data/raw/manifest.csv``. Later
stages read only that, so adding a source never touches validation, split or training.

The whole raw tree is built in a temporary directory and renamed into place at the end:
an interrupted download or a refused archive leaves no half-extracted ``data/raw``.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
import stat
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from alzstage.config import BaseParams, DataParams, Params, Paths
from alzstage.data.manifest import RawRecord, build_manifest
from alzstage.errors import DownloadError, UnsafeArchiveError
from alzstage.files import atomic_dir, atomic_path, sha256_file
from alzstage.result import StageResult

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
SKIPPED_FILE = "skipped.csv"  # data/raw/skipped.csv: files seen but not kept, with reasons
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "test": "test",
    "testing": "test",
    "val": "val",
    "valid": "val",
    "validation": "val",
}


# ------------------------------------------------------------------ archive safety


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
        raise UnsafeArchiveError(
            f"{archive}: entry {name!r} has an absolute path; refusing to extract"
        )
    if any(part == ".." for part in p.parts):
        raise UnsafeArchiveError(
            f"{archive}: entry {name!r} contains '..' (path traversal); refusing to extract"
        )
    return p


def _zip_entries(zf: zipfile.ZipFile, archive: Path) -> list[_Entry]:
    entries = []
    for info in zf.infolist():
        mode = (info.external_attr >> 16) & 0o170000
        if mode and stat.S_ISLNK(mode):
            raise UnsafeArchiveError(f"{archive}: entry {info.filename!r} is a symlink; refusing")
        if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise UnsafeArchiveError(
                f"{archive}: entry {info.filename!r} is a device or special file; refusing"
            )
        _safe_relpath(info.filename, archive)
        entries.append(_Entry(info.filename, info.file_size, info.compress_size, info.is_dir()))
    return entries


def _tar_entries(tf: tarfile.TarFile, archive: Path) -> list[_Entry]:
    entries = []
    for m in tf.getmembers():
        if m.issym() or m.islnk():
            raise UnsafeArchiveError(f"{archive}: entry {m.name!r} is a link; refusing")
        if not (m.isfile() or m.isdir()):
            raise UnsafeArchiveError(
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
        raise UnsafeArchiveError(
            f"{archive}: {len(repeated)} entry name(s) occur more than once: {shown}{more}; "
            "later copies would overwrite earlier ones. Refusing: rebuild the archive with "
            "unique names"
        )


def check_limits(
    entries: list[_Entry], archive: Path, archive_bytes: int, limits: ArchiveLimits
) -> None:
    """Zip-bomb guard: bound entry count, total size and compression ratio *before* extracting."""
    if len(entries) > limits.max_entries:
        raise UnsafeArchiveError(
            f"{archive}: {len(entries)} entries exceeds the limit of {limits.max_entries}"
        )
    total = sum(e.size for e in entries)
    if total > limits.max_total_bytes:
        raise UnsafeArchiveError(
            f"{archive}: would extract {total} bytes, over the limit of {limits.max_total_bytes}"
            " (raise data.max_extract_bytes if the archive is trusted)"
        )
    # Ratios are only judged above 1 MiB: a few highly compressible small files (blank
    # fixtures, text) are harmless, and a bomb has to expand to something big to hurt.
    for e in entries:
        if e.compressed > 0 and e.size / e.compressed > limits.max_ratio and e.size > _RATIO_FLOOR:
            raise UnsafeArchiveError(
                f"{archive}: entry {e.name!r} has compression ratio {e.size / e.compressed:.0f}"
                f" > {limits.max_ratio:.0f} (zip bomb?); refusing"
            )
    if archive_bytes > 0 and total / archive_bytes > limits.max_ratio and total > _RATIO_FLOOR:
        raise UnsafeArchiveError(
            f"{archive}: overall compression ratio {total / archive_bytes:.0f} > "
            f"{limits.max_ratio:.0f} (zip bomb?); refusing (raise data.max_compression_ratio "
            "if the archive is trusted)"
        )


def extract_archive(archive: Path, dest: Path, limits: ArchiveLimits | None = None) -> None:
    """Safely extract a zip or tar(.gz/.bz2/.xz) into ``dest`` (which must exist).

    A damaged archive (bad CRC, forged sizes, cut short) is a :class:`DownloadError`
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


def _damaged(archive: Path, exc: BaseException) -> DownloadError:
    why = str(exc).strip() or type(exc).__name__
    return DownloadError(
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
    from tqdm import tqdm

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            entries = _zip_entries(zf, archive)
            check_unique_names(entries, archive)
            check_limits(entries, archive, size, limits)
            for info in tqdm(
                zf.infolist(),
                desc=f"extract {archive.name}",
                unit="file",
                disable=None,
                leave=False,
            ):
                rel = _safe_relpath(info.filename, archive)
                target = dest.joinpath(*rel.parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
        return
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            entries = _tar_entries(tf, archive)
            check_unique_names(entries, archive)
            check_limits(entries, archive, size, limits)
            for m in tqdm(
                tf.getmembers(),
                desc=f"extract {archive.name}",
                unit="file",
                disable=None,
                leave=False,
            ):
                rel = _safe_relpath(m.name, archive)
                target = dest.joinpath(*rel.parts)
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(m)
                if src is None:  # pragma: no cover - regular files always have data
                    continue
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
        return
    with open(archive, "rb") as f:
        head = f.read(8)
    kind = next((k for magic, k in _ARCHIVE_MAGIC if head.startswith(magic)), None)
    if kind is not None:  # the start of an archive whose index or data is missing
        raise DownloadError(
            f"{archive}: starts like a {kind} archive but cannot be read: the file is "
            "truncated or corrupt; download it again (pin data.sha256 so that a damaged copy "
            "is refused before unpacking)"
        )
    raise DownloadError(
        f"{archive}: neither a zip nor a tar archive; point data.path at a .zip or .tar.gz"
    )


# ------------------------------------------------------------------ fetching


def fetch(
    url_or_path: str,
    cache_dir: Path,
    sha256: str | None,
    retries: int = 3,
    *,
    base_dir: Path | None = None,
    key: str = "data.path",
    sha_key: str = "data.sha256",
    by_hand: str | None = None,
) -> Path:
    """Return a local file for a path or URL, verified against ``sha256`` when given.

    URLs are cached by content hash, so re-running with an unchanged source does not
    download again; downloads go to a temp file and are renamed only once verified.
    Relative local paths are taken from ``base_dir`` (the project root), not the current
    directory, so ``alzstage download`` means the same file wherever it is started from.
    ``key`` and ``sha_key`` are the params keys named in error messages; ``by_hand`` says
    how to use a copy downloaded by hand (default: point ``key`` at the local file).
    """
    parsed = urllib.parse.urlparse(url_or_path)
    if parsed.scheme in ("", "file") or _is_windows_drive(parsed.scheme):
        raw = urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else url_or_path
        local = Path(raw).expanduser()
        if not local.is_absolute() and base_dir is not None:
            local = base_dir / local
        if not local.exists():
            raise DownloadError(f"{key}: {local} does not exist; set {key} to the file's location")
        if sha256:
            _verify(local, sha256, key=sha_key)
        return local
    if parsed.scheme not in ("http", "https"):
        raise DownloadError(
            f"{key}: unsupported URL scheme {parsed.scheme!r} in {url_or_path!r} "
            "(use http, https, file or a local path)"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = Path(parsed.path).name or "download"
    cached = cache_dir / f"{sha256.lower() if sha256 else 'unpinned'}-{name}"
    if sha256 and cached.exists() and sha256_file(cached) == sha256.lower():
        return cached
    last: Exception | None = None
    for attempt in range(retries):
        try:
            with atomic_path(cached) as tmp:
                _http_get(url_or_path, tmp)
                if sha256:
                    _verify(tmp, sha256, shown=url_or_path, key=sha_key)
            return cached
        except urllib.error.HTTPError as exc:
            # 4xx (a wrong URL, revision or file name) will not fix itself: do not retry.
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                raise DownloadError(
                    f"{key}: {url_or_path}: HTTP {exc.code} {exc.reason}; check the URL "
                    "(repository, revision and file name)"
                ) from None
            last = exc
        except OSError as exc:  # URLError and socket timeouts are OSErrors
            last = exc
        if attempt + 1 < retries:
            time.sleep(min(2**attempt, 10) * 0.5)
    by_hand = by_hand or f"point {key} at the local file"
    raise DownloadError(
        f"{key}: {url_or_path}: download failed after {retries} attempts ({last}); check the "
        f"URL and your network, or download it by hand and {by_hand}"
    )


def _is_windows_drive(scheme: str) -> bool:
    # urlparse reads "C:\\data\\x.zip" as scheme "c".
    return len(scheme) == 1 and scheme.isalpha()


def _http_get(url: str, target: Path) -> None:
    from tqdm import tqdm

    req = urllib.request.Request(url, headers={"User-Agent": "alzstage"})
    with urllib.request.urlopen(req, timeout=60) as resp, open(target, "wb") as out:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=f"download {Path(url).name}",
            disable=None,
            leave=False,
        ) as bar:
            while block := resp.read(1 << 20):
                out.write(block)
                bar.update(len(block))


def _verify(path: Path, expected: str, shown: str | None = None, key: str = "data.sha256") -> None:
    actual = sha256_file(path)
    if actual != expected.lower():
        raise DownloadError(
            f"{shown or path}: sha256 mismatch for {key}: expected {expected}, got {actual}; "
            "update the pinned sha256 only if you trust the new file"
        )


# ------------------------------------------------------------------ layout


@dataclass(frozen=True)
class Skipped:
    """A file the source holds that is not placed in data/raw, and why."""

    path: str  # relative to the source root (it never reaches data/raw)
    label: str  # the class of its folder, "" outside class folders
    reason: str  # a key of SKIP_REASONS
    detail: str


SKIPPED_COLUMNS = ["path", "label", "reason", "detail"]
SKIP_REASONS = {
    "unsupported_format": "only JPEG and PNG are read; convert the file to PNG and download again",
    "not_in_class_folder": "not under a folder named after base.classes; move it into one",
    "hidden": "a hidden or macOS metadata file (.DS_Store, ._*, __MACOSX); nothing to do",
}
# Enough of each header to name what a file is when it is not a JPEG or PNG.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)
_KEPT_FORMATS = {"JPEG": ".jpg", "PNG": ".png"}


def sniff_format(path: Path) -> str | None:
    """The image format a file's first bytes announce, or None (the suffix is not trusted)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _SIGNATURES if head.startswith(magic)), None)


def find_class_images(
    root: Path, base: BaseParams, skipped: list[Skipped] | None = None
) -> Iterator[tuple[Path, str, str]]:
    """Yield (file, canonical class, source split) for images under class-named folders.

    A folder counts as a class folder when its name maps onto ``base.classes`` (directly,
    by alias, or ignoring case and separators); a ``train``/``test`` folder above it gives
    the source's own split. Unknown folders holding images are an error, not a skip, so a
    mis-spelt class never silently loses its images.

    Every other file is appended to ``skipped`` with its reason, so that nothing the
    source holds disappears without a word. A ``.jpg``/``.jpeg``/``.png`` is always kept
    (validate judges its bytes); a file with another suffix, or none, is kept when its
    bytes are JPEG or PNG, and skipped as ``unsupported_format`` otherwise (BMP, TIFF,
    GIF, WebP...): only the JPEG and PNG decoders are trusted, here as in ``predict``.
    """
    unknown: dict[str, int] = {}
    skipped = [] if skipped is None else skipped
    for f in sorted(root.rglob("*")):
        if not f.is_file():
            continue
        rel = f.relative_to(root)
        label = base.canonical_label(f.parent.name) or ""
        if any(part.startswith(".") or part == "__MACOSX" for part in rel.parts):
            skipped.append(Skipped(rel.as_posix(), label, "hidden", "hidden or metadata file"))
            continue
        fmt = None if f.suffix.lower() in IMAGE_SUFFIXES else sniff_format(f)
        if f.suffix.lower() not in IMAGE_SUFFIXES and fmt not in _KEPT_FORMATS:
            what = f"{fmt} image" if fmt else f"not a JPEG or PNG (suffix {f.suffix or 'none'!r})"
            reason = "unsupported_format" if label or fmt else "not_in_class_folder"
            skipped.append(Skipped(rel.as_posix(), label, reason, what))
            continue
        if not label:
            folder = str(f.parent.relative_to(root))
            unknown[folder] = unknown.get(folder, 0) + 1
            continue
        split = ""
        for part in reversed(f.parent.relative_to(root).parts[:-1]):
            if part.lower() in SPLIT_NAMES:
                split = SPLIT_NAMES[part.lower()]
                break
        yield f, label, split
    if unknown:
        listing = ", ".join(f"{k!r} ({v} images)" for k, v in sorted(unknown.items()))
        raise DownloadError(
            f"{root}: image folders that match no class in base.classes {base.classes}: {listing}."
            " Add them to base.class_aliases (alias: class) or remove them"
        )


def place_images(src_root: Path, raw_dir: Path, base: BaseParams, *, move: bool) -> list[RawRecord]:
    """Copy (or move) class-folder images into ``raw_dir/images/[split/]Class/``.

    Files that are not placed are listed with their reason in ``raw_dir/skipped.csv``.
    A JPEG or PNG without its suffix (``scan``, ``scan.dat``) gets one appended.
    """
    records = []
    skipped: list[Skipped] = []
    for f, label, split in find_class_images(src_root, base, skipped):
        name = f.name
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            name += _KEPT_FORMATS[sniff_format(f) or "JPEG"]
        target = raw_dir / "images" / (split or ".") / label / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            raise DownloadError(
                f"{f}: two source files map to {target.relative_to(raw_dir)}; rename one of them"
            )
        (shutil.move if move else shutil.copy2)(f, target)
        records.append(RawRecord(path=target, label=label, source_split=split))
    write_skipped(skipped, raw_dir / SKIPPED_FILE)
    if not records:
        raise DownloadError(
            f"{src_root}: no images found in folders named after base.classes {base.classes};"
            " expected <Class>/<image>.jpg (optionally under train/ and test/)"
            + (f"; skipped {describe_skipped(skipped)}" if skipped else "")
        )
    return records


def write_skipped(skipped: list[Skipped], target: Path) -> None:
    """``skipped.csv`` (header only when nothing was skipped); validate folds it in."""
    import csv

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SKIPPED_COLUMNS)
        writer.writerows([s.path, s.label, s.reason, s.detail] for s in skipped)


def read_skipped(path: Path) -> list[Skipped]:
    """The files download saw but did not keep; none when the file is absent (old data/raw)."""
    import csv

    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [Skipped(r["path"], r["label"], r["reason"], r["detail"]) for r in csv.DictReader(f)]


def describe_skipped(skipped: list[Skipped], examples: int = 3) -> str:
    """``5 files (3 unsupported_format: a.bmp (BMP image), ...; 2 hidden)`` for summaries."""
    by_reason: dict[str, list[Skipped]] = {}
    for item in skipped:
        by_reason.setdefault(item.reason, []).append(item)
    parts = []
    for reason, items in sorted(by_reason.items()):
        shown = ", ".join(f"{i.path} ({i.detail})" for i in items[:examples])
        more = f", and {len(items) - examples} more" if len(items) > examples else ""
        parts.append(f"{len(items)} {reason}: {shown}{more}")
    return f"{len(skipped)} file(s) ({'; '.join(parts)})"


# ------------------------------------------------------------------ kaggle


def kaggle_credentials(env: dict[str, str] | None = None, home: Path | None = None) -> str | None:
    """Where Kaggle credentials would come from, or None when there are none.

    Checked here, before ``kagglehub`` is imported or the network touched, so that a
    missing login fails in a second with what to set, not with a 401 deep in a download.
    """
    env = dict(os.environ) if env is None else env
    home = Path(env.get("HOME") or Path.home()) if home is None else home
    if env.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    folder = Path(env["KAGGLE_CONFIG_DIR"]) if env.get("KAGGLE_CONFIG_DIR") else home / ".kaggle"
    for name in ("kaggle.json", "access_token"):
        if (folder / name).is_file():
            return str(folder / name)
    return None


def download_kaggle(handle: str) -> Path:
    """Download (or reuse kagglehub's cache of) a Kaggle dataset; return its folder."""
    if kaggle_credentials() is None:
        partial = [k for k in ("KAGGLE_USERNAME", "KAGGLE_KEY") if os.environ.get(k)]
        note = f" (only {partial[0]} is set)" if len(partial) == 1 else ""
        raise DownloadError(
            f"data.source=kaggle: no Kaggle credentials found{note}. Set KAGGLE_USERNAME and "
            "KAGGLE_KEY (from kaggle.com > Settings > API > Create New Token), or save that "
            "kaggle.json as ~/.kaggle/kaggle.json; or use data.source: archive with a "
            "downloaded copy of the zip"
        )
    try:
        import kagglehub
    except ImportError:
        raise DownloadError(
            "data.source=kaggle needs the kagglehub package: pip install 'alzstage[kaggle]'"
        ) from None
    try:
        folder = Path(kagglehub.dataset_download(handle))
    except Exception as exc:  # network, auth and 404s all mean "could not fetch"
        raise DownloadError(
            f"data.kaggle_dataset={handle!r}: Kaggle download failed ({type(exc).__name__}: "
            f"{exc}); check the handle, your credentials and network access to kaggle.com"
        ) from None
    if not folder.is_dir():
        raise DownloadError(
            f"data.kaggle_dataset={handle!r}: kagglehub returned {folder}, not a folder"
        )
    return folder


# ------------------------------------------------------------------ hugging face


def hf_url(data: DataParams, filename: str) -> str:
    """The plain-HTTPS URL of one file at the pinned revision (no hub client needed)."""
    endpoint = data.hf_endpoint.rstrip("/")
    revision = urllib.parse.quote(data.hf_revision, safe="")
    return f"{endpoint}/datasets/{data.hf_repo}/resolve/{revision}/data/{filename}"


def parquet_label_names(schema_metadata: dict[bytes, bytes] | None) -> list[str] | None:
    """ClassLabel names (in id order) from a ``datasets`` parquet export, if recorded."""
    raw = (schema_metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        features = json.loads(raw).get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        return None
    names = features.get("label", {}).get("names") if isinstance(features, dict) else None
    return [str(n) for n in names] if isinstance(names, list) and names else None


def label_table(names: list[str], base: BaseParams, where: str) -> list[str]:
    """Map label names (index = label id) onto base.classes, one to one, or refuse.

    Ids are never trusted by position: a revision that renames, merges or drops classes
    (e.g. a 3-class "Demented / Non / Very mild" relabelling) would otherwise silently
    train on the wrong labels.
    """
    mapped = [base.canonical_label(n) for n in names]
    unmapped = [n for n, m in zip(names, mapped, strict=True) if m is None]
    dupes = sorted({m for m in mapped if m is not None and mapped.count(m) > 1})
    missing = [c for c in base.classes if c not in mapped]
    if unmapped or dupes or missing:
        problems = []
        if unmapped:
            problems.append(f"no class for {unmapped}")
        if dupes:
            problems.append(f"several labels map to {dupes}")
        if missing:
            problems.append(f"no label for {missing}")
        raise DownloadError(
            f"{where}: label names {names} do not map one-to-one onto base.classes "
            f"{base.classes} ({'; '.join(problems)}). The dataset's label set differs from "
            "this project's: pin data.hf_revision to a revision whose labels match base.classes, "
            "or add base.class_aliases for renamed labels"
        )
    return [m for m in mapped if m is not None]


_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"))


def _image_suffix(blob: bytes, original: str | None) -> str:
    for magic, suffix in _MAGIC:
        if blob.startswith(magic):
            return suffix
    suffix = Path(original or "").suffix.lower()
    # Unknown bytes keep a non-image suffix so validation reports them, not Pillow later.
    return suffix if suffix in IMAGE_SUFFIXES else ".bin"


def extract_parquet(
    parquet: Path, filename: str, staging: Path, base: BaseParams, fallback_names: list[str]
) -> list[RawRecord]:
    """Write each row's image bytes to ``staging/images/<split>/<Class>/`` by label name."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    where = f"data.hf_files[{filename!r}]"
    try:
        pf = pq.ParquetFile(parquet)
    except Exception as exc:  # pyarrow raises several types for bad files
        raise DownloadError(f"{where}: not a readable parquet file ({exc})") from None
    columns = pf.schema_arrow.names
    if "image" not in columns or "label" not in columns:
        raise DownloadError(
            f"{where}: expected columns 'image' and 'label', found {columns}; is this the "
            "Hugging Face image-classification layout?"
        )
    names = parquet_label_names(pf.schema_arrow.metadata)
    origin = "ClassLabel names in the parquet metadata"
    if names is None:
        names, origin = list(fallback_names), "data.hf_label_names"
    classes = label_table(names, base, f"{where} ({origin})")
    if names != list(fallback_names):
        warnings.warn(
            f"{where}: parquet label names {names} differ from data.hf_label_names "
            f"{list(fallback_names)}; using the file's own names",
            UserWarning,
            stacklevel=2,
        )
    split = SPLIT_NAMES.get(filename.split("-", 1)[0].lower(), "")
    stem = filename.split("-of-")[0] if "-of-" in filename else Path(filename).stem
    records: list[RawRecord] = []
    row = 0
    with tqdm(
        total=pf.metadata.num_rows, desc=f"unpack {filename}", unit="img", disable=None, leave=False
    ) as bar:
        for batch in pf.iter_batches(batch_size=256, columns=["image", "label"]):
            for item in batch.to_pylist():
                records.append(_write_row(item, row, where, names, classes, staging, split, stem))
                row += 1
                bar.update(1)
    if not records:
        raise DownloadError(f"{where}: the parquet file has no rows")
    return records


def _write_row(
    item: dict,
    row: int,
    where: str,
    names: list[str],
    classes: list[str],
    staging: Path,
    split: str,
    stem: str,
) -> RawRecord:
    label_id = item.get("label")
    if not isinstance(label_id, int) or not 0 <= label_id < len(classes):
        raise DownloadError(
            f"{where}: row {row} has label {label_id!r}, not an id in 0..{len(classes) - 1} "
            f"of {names}"
        )
    image = item.get("image")
    blob = image.get("bytes") if isinstance(image, dict) else image
    if not isinstance(blob, bytes) or not blob:
        raise DownloadError(
            f"{where}: row {row} has no embedded image bytes (image={str(image)[:80]!r}); "
            "only parquet files with the images inside are supported"
        )
    original = image.get("path") if isinstance(image, dict) else None
    target = staging / "images" / (split or ".") / classes[label_id]
    target.mkdir(parents=True, exist_ok=True)
    path = target / f"{stem}_{row:05d}{_image_suffix(blob, original)}"
    path.write_bytes(blob)
    return RawRecord(path=path, label=classes[label_id], source_split=split)


def collect_huggingface(
    data: DataParams, base: BaseParams, paths: Paths, staging: Path
) -> list[RawRecord]:
    """Fetch each pinned parquet file over HTTPS and unpack its rows by label name.

    With ``data.path`` set, the files are read from that folder instead (a copy made by
    hand where huggingface.co is unreachable); the pinned sha256s are checked either way.
    """
    records: list[RawRecord] = []
    for filename, digest in data.hf_files.items():
        key = f"data.hf_files[{filename!r}]"
        if data.path:
            source, key = str(Path(data.path).expanduser() / filename), "data.path"
        else:
            source = hf_url(data, filename)
        local = fetch(
            source,
            paths.cache / "downloads",
            digest,
            base_dir=paths.root,
            key=key,
            sha_key=f"data.hf_files[{filename!r}]",
            by_hand="set data.path to the folder holding the parquet files",
        )
        if digest is None:
            warnings.warn(
                f"data.hf_files[{filename!r}] is not pinned; downloaded sha256 is "
                f"{sha256_file(local)}: put it in params.yaml to pin this file",
                UserWarning,
                stacklevel=2,
            )
        records += extract_parquet(local, filename, staging, base, data.hf_label_names)
    return records


# ------------------------------------------------------------------ stage


def collect(params: Params, paths: Paths, staging: Path) -> list[RawRecord]:
    """Fill ``staging`` (the future data/raw) from the configured source."""
    data, base = params.data, params.base
    if data.source == "demo":
        from alzstage.data.demo import generate_demo

        # The generator writes straight into the staging dir, so its records already
        # point there.
        return generate_demo(
            staging / "images",
            classes=base.classes,
            subjects_per_class=data.demo.subjects_per_class,
            slices_per_subject=data.demo.slices_per_subject,
            image_size=base.image_size,
            seed=base.seed,
        )
    if data.source == "kaggle":
        return place_images(download_kaggle(data.kaggle_dataset), staging, base, move=False)
    if data.source == "huggingface":
        return collect_huggingface(data, base, paths, staging)
    if data.source == "nifti":
        from alzstage.neuro.dataset import collect_nifti

        # Also writes staging/volumes.csv, the per-volume QC the validate stage judges.
        return collect_nifti(params, paths, staging)
    assert data.path is not None  # enforced by DataParams
    if data.source == "folder":
        folder = Path(data.path).expanduser()
        if not folder.is_absolute():
            folder = paths.root / folder
        if not folder.is_dir():
            raise DownloadError(f"data.path: {folder} is not a directory of class folders")
        return place_images(folder, staging, base, move=False)
    archive = fetch(data.path, paths.cache / "downloads", data.sha256, base_dir=paths.root)
    limits = ArchiveLimits(
        max_total_bytes=data.max_extract_bytes, max_ratio=data.max_compression_ratio
    )
    unpack = staging.parent / f".{staging.name}.unpack"
    if unpack.exists():
        shutil.rmtree(unpack)
    unpack.mkdir()
    try:
        extract_archive(archive, unpack, limits)
        return place_images(unpack, staging, base, move=True)
    finally:
        shutil.rmtree(unpack, ignore_errors=True)


def run_download(params: Params, paths: Paths) -> StageResult:
    """Build data/raw atomically and describe every file in the manifest."""
    with atomic_dir(paths.raw) as staging:
        records = collect(params, paths, staging)
        manifest = build_manifest(records, staging)
        manifest.to_csv(staging / "manifest.csv", index=False)
        if not (staging / SKIPPED_FILE).exists():  # sources that place every file they see
            write_skipped([], staging / SKIPPED_FILE)
    skipped = read_skipped(paths.raw / SKIPPED_FILE)
    counts = manifest["label"].value_counts().to_dict()
    metrics = {"n_images": float(len(manifest)), "n_skipped": float(len(skipped))}
    metrics.update({f"n_{k}": float(v) for k, v in counts.items()})
    artifacts = [paths.raw_manifest, paths.raw / SKIPPED_FILE]
    if params.data.source == "nifti":
        import csv

        with open(paths.raw_volumes, newline="") as f:
            statuses = [row["status"] for row in csv.DictReader(f)]
        metrics["n_volumes"] = float(len(statuses))
        metrics["n_volumes_not_preprocessed"] = float(sum(s != "ok" for s in statuses))
        artifacts.append(paths.raw_volumes)
    return StageResult(
        metrics=metrics,
        artifacts=artifacts,
        tags={"data.source": params.data.source},
        summary=f"{len(manifest)} images from source {params.data.source!r}: {counts}"
        + (
            f"; skipped {describe_skipped(skipped)}, listed in data/raw/{SKIPPED_FILE}"
            if skipped
            else ""
        ),
    )
