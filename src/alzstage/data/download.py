"""The ``download`` stage: every data source ends as one normalised raw layout.

``data/raw/images/[<source split>/]<Class>/<file>`` plus ``data/raw/manifest.csv``. Later
stages read only that, so adding a source never touches validation, split or training.

The whole raw tree is built in a temporary directory and renamed into place at the end:
an interrupted download or a refused archive leaves no half-extracted ``data/raw``.
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import time
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from alzstage.config import BaseParams, Params, Paths
from alzstage.data.manifest import RawRecord, build_manifest
from alzstage.files import atomic_dir, atomic_path, sha256_file
from alzstage.result import StageResult

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
SPLIT_NAMES = {"train": "train", "training": "train", "test": "test", "testing": "test",
               "val": "val", "valid": "val", "validation": "val"}


class DownloadError(RuntimeError):
    """A source could not be fetched or unpacked; the message says which and how to fix it."""


class UnsafeArchiveError(DownloadError):
    """An archive entry that would escape, link or explode on extraction."""


# ------------------------------------------------------------------ archive safety


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
        raise UnsafeArchiveError(f"{archive}: entry {name!r} has an absolute path; refusing to extract")
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


def check_limits(entries: list[_Entry], archive: Path, archive_bytes: int, limits: ArchiveLimits) -> None:
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
    for e in entries:
        if e.compressed > 0 and e.size / e.compressed > limits.max_ratio and e.size > 1 << 20:
            raise UnsafeArchiveError(
                f"{archive}: entry {e.name!r} has compression ratio {e.size / e.compressed:.0f}"
                f" > {limits.max_ratio:.0f} (zip bomb?); refusing"
            )
    if archive_bytes > 0 and total / archive_bytes > limits.max_ratio:
        raise UnsafeArchiveError(
            f"{archive}: overall compression ratio {total / archive_bytes:.0f} > {limits.max_ratio:.0f}"
        )


def extract_archive(archive: Path, dest: Path, limits: ArchiveLimits | None = None) -> None:
    """Safely extract a zip or tar(.gz/.bz2/.xz) into ``dest`` (which must exist)."""
    from tqdm import tqdm

    limits = limits or ArchiveLimits()
    size = archive.stat().st_size
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            entries = _zip_entries(zf, archive)
            check_limits(entries, archive, size, limits)
            for info in tqdm(zf.infolist(), desc=f"extract {archive.name}", unit="file",
                             disable=None, leave=False):
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
            check_limits(entries, archive, size, limits)
            for m in tqdm(tf.getmembers(), desc=f"extract {archive.name}", unit="file",
                          disable=None, leave=False):
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
    raise DownloadError(f"{archive}: neither a zip nor a tar archive; point data.path at a .zip or .tar.gz")


# ------------------------------------------------------------------ fetching


def fetch(url_or_path: str, cache_dir: Path, sha256: str | None, retries: int = 3) -> Path:
    """Return a local file for a path or URL, verified against ``sha256`` when given.

    URLs are cached by content hash, so re-running with an unchanged source does not
    download again; downloads go to a temp file and are renamed only once verified.
    """
    parsed = urllib.parse.urlparse(url_or_path)
    if parsed.scheme in ("", "file"):
        local = Path(urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else url_or_path)
        local = local.expanduser()
        if not local.exists():
            raise DownloadError(
                f"data.path: {local} does not exist; set data.path to the archive's location"
            )
        if sha256:
            _verify(local, sha256)
        return local
    if parsed.scheme not in ("http", "https"):
        raise DownloadError(f"data.path: unsupported URL scheme {parsed.scheme!r} (use http, https or file)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = Path(parsed.path).name or "download"
    cached = cache_dir / f"{sha256 or 'unpinned'}-{name}"
    if sha256 and cached.exists() and sha256_file(cached) == sha256.lower():
        return cached
    last: Exception | None = None
    for attempt in range(retries):
        try:
            with atomic_path(cached) as tmp:
                _http_get(url_or_path, tmp)
                if sha256:
                    _verify(tmp, sha256, shown=url_or_path)
            return cached
        except DownloadError:
            raise
        except OSError as exc:  # URLError is an OSError
            last = exc
            time.sleep(min(2**attempt, 10) * 0.5)
    raise DownloadError(
        f"{url_or_path}: download failed after {retries} attempts ({last}); check the URL and "
        "your network, or download it by hand and set data.path to the local file"
    )


def _http_get(url: str, target: Path) -> None:
    from tqdm import tqdm

    req = urllib.request.Request(url, headers={"User-Agent": "alzstage"})
    with urllib.request.urlopen(req, timeout=60) as resp, open(target, "wb") as out:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {Path(url).name}",
                  disable=None, leave=False) as bar:
            while block := resp.read(1 << 20):
                out.write(block)
                bar.update(len(block))


def _verify(path: Path, expected: str, shown: str | None = None) -> None:
    actual = sha256_file(path)
    if actual != expected.lower():
        raise DownloadError(
            f"{shown or path}: sha256 mismatch: expected {expected}, got {actual}; "
            "update data.sha256 only if you trust the new file"
        )


# ------------------------------------------------------------------ layout


def find_class_images(root: Path, base: BaseParams) -> Iterator[tuple[Path, str, str]]:
    """Yield (file, canonical class, source split) for images under class-named folders.

    A folder counts as a class folder when its name maps onto ``base.classes`` (directly,
    by alias, or ignoring case and separators); a ``train``/``test`` folder above it gives
    the source's own split. Unknown folders holding images are an error, not a skip, so a
    mis-spelt class never silently loses its images.
    """
    unknown: dict[str, int] = {}
    for f in sorted(root.rglob("*")):
        if not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if any(part.startswith(".") or part == "__MACOSX" for part in f.relative_to(root).parts):
            continue
        label = base.canonical_label(f.parent.name)
        if label is None:
            unknown[str(f.parent.relative_to(root))] = unknown.get(str(f.parent.relative_to(root)), 0) + 1
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
    """Copy (or move) class-folder images into ``raw_dir/images/[split/]Class/``."""
    records = []
    for f, label, split in find_class_images(src_root, base):
        target = raw_dir / "images" / (split or ".") / label / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            raise DownloadError(
                f"{f}: two source files map to {target.relative_to(raw_dir)}; rename one of them"
            )
        (shutil.move if move else shutil.copy2)(f, target)
        records.append(RawRecord(path=target, label=label, source_split=split))
    if not records:
        raise DownloadError(
            f"{src_root}: no images found in folders named after base.classes {base.classes};"
            " expected <Class>/<image>.jpg (optionally under train/ and test/)"
        )
    return records


# ------------------------------------------------------------------ stage


def collect(params: Params, paths: Paths, staging: Path) -> list[RawRecord]:
    """Fill ``staging`` (the future data/raw) from the configured source."""
    data, base = params.data, params.base
    if data.source == "demo":
        from alzstage.data.demo import generate_demo

        records = generate_demo(
            staging / "images",
            classes=base.classes,
            subjects_per_class=data.demo.subjects_per_class,
            slices_per_subject=data.demo.slices_per_subject,
            image_size=base.image_size,
            seed=base.seed,
        )
        # The generator writes into the staging dir; rebase records onto it.
        return records
    assert data.path is not None  # enforced by DataParams
    if data.source == "folder":
        folder = Path(data.path).expanduser()
        if not folder.is_dir():
            raise DownloadError(f"data.path: {folder} is not a directory of class folders")
        return place_images(folder, staging, base, move=False)
    archive = fetch(data.path, paths.cache / "downloads", data.sha256)
    limits = ArchiveLimits(max_total_bytes=data.max_extract_bytes, max_ratio=data.max_compression_ratio)
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
    counts = manifest["label"].value_counts().to_dict()
    metrics = {"n_images": float(len(manifest))}
    metrics.update({f"n_{k}": float(v) for k, v in counts.items()})
    return StageResult(
        metrics=metrics,
        artifacts=[paths.raw_manifest],
        tags={"data.source": params.data.source},
        summary=f"{len(manifest)} images from source {params.data.source!r}: {counts}",
    )
