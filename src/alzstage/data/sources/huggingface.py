"""``data.source: huggingface``: pinned parquet files whose rows hold the images.

Files are fetched over plain HTTPS at a pinned revision (no hub client needed) and each
row is written to ``images/<split>/<Class>/`` by its label *name*, never by its id.
"""

from __future__ import annotations

import json
import urllib.parse
import warnings
from pathlib import Path

from alzstage.config import BaseParams, DataParams, Params, Paths
from alzstage.data.manifest import RawRecord
from alzstage.data.sources.fetch import fetch
from alzstage.data.sources.layout import IMAGE_SUFFIXES, SPLIT_NAMES
from alzstage.errors import AlzstageError
from alzstage.files import sha256_file


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
        raise AlzstageError(
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
        raise AlzstageError(f"{where}: not a readable parquet file ({exc})") from None
    columns = pf.schema_arrow.names
    if "image" not in columns or "label" not in columns:
        raise AlzstageError(
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
        raise AlzstageError(f"{where}: the parquet file has no rows")
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
        raise AlzstageError(
            f"{where}: row {row} has label {label_id!r}, not an id in 0..{len(classes) - 1} "
            f"of {names}"
        )
    image = item.get("image")
    blob = image.get("bytes") if isinstance(image, dict) else image
    if not isinstance(blob, bytes) or not blob:
        raise AlzstageError(
            f"{where}: row {row} has no embedded image bytes (image={str(image)[:80]!r}); "
            "only parquet files with the images inside are supported"
        )
    original = image.get("path") if isinstance(image, dict) else None
    target = staging / "images" / (split or ".") / classes[label_id]
    target.mkdir(parents=True, exist_ok=True)
    path = target / f"{stem}_{row:05d}{_image_suffix(blob, original)}"
    path.write_bytes(blob)
    return RawRecord(path=path, label=classes[label_id], source_split=split)


def collect_huggingface(params: Params, paths: Paths, staging: Path) -> list[RawRecord]:
    """Fetch each pinned parquet file over HTTPS and unpack its rows by label name.

    With ``data.path`` set, the files are read from that folder instead (a copy made by
    hand where huggingface.co is unreachable); the pinned sha256s are checked either way.
    """
    data = params.data
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
        records += extract_parquet(local, filename, staging, params.base, data.hf_label_names)
    return records
