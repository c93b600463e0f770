"""The raw layout every image source ends in, and the files it leaves out.

Images go to ``images/[<source split>/]<Class>/<file>``; a file the source holds but that
is not placed there is listed with its reason in ``skipped.csv`` (validate folds it in).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from alzstage.config import BaseParams
from alzstage.data.manifest import RawRecord
from alzstage.errors import AlzstageError

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
        raise AlzstageError(
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
            raise AlzstageError(
                f"{f}: two source files map to {target.relative_to(raw_dir)}; rename one of them"
            )
        (shutil.move if move else shutil.copy2)(f, target)
        records.append(RawRecord(path=target, label=label, source_split=split))
    write_skipped(skipped, raw_dir / SKIPPED_FILE)
    if not records:
        raise AlzstageError(
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
    from alzstage.artifacts import SKIPPED_CSV

    if not path.exists():
        return []
    rows = SKIPPED_CSV.read(path)[SKIPPED_COLUMNS].itertuples(index=False)
    return [Skipped(*row) for row in rows]


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
