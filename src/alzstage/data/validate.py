"""The ``validate`` stage: decide which raw images later stages may trust.

Two kinds of evidence are combined:

* **Image checks** (plain Python, every file fully decoded): missing, empty, not an
  image, truncated/corrupt JPEG, wrong colour mode, blank, changed since the manifest.
  These need the bytes, so they are cheap Pillow work done in a thread pool.
* **A Great Expectations suite** over the manifest and two frames derived from it
  (per-class counts, pixel-hash label groups). GX is used for the table-level rules
  because its results and Data Docs are the audit trail a reviewer can open in a browser.

``validate.on_failure`` decides what a failure means. ``fail`` stops the pipeline with a
summary naming the files. ``quarantine`` drops the bad rows from the validated manifest
and lists every one of them in ``reports/validation/quarantine.csv``: nothing vanishes
silently, and rows in == rows kept + rows quarantined is checked on every run.

Dataset-level problems (a class with too few images, an unreadable manifest) cannot be
fixed by dropping rows, so they stop the stage under either policy.

Great Expectations is imported lazily: importing this module (for the CLI's ``--help``,
for the tests of other stages) must stay fast and free of GX and TensorFlow.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from alzstage.config import Params, Paths
from alzstage.data.download import SKIP_REASONS, SKIPPED_FILE, Skipped, read_skipped
from alzstage.data.manifest import MANIFEST_COLUMNS, read_manifest
from alzstage.errors import MissingInputError
from alzstage.errors import ValidationError as ValidationFailed
from alzstage.files import atomic_dir, atomic_path, write_json
from alzstage.result import StageResult

log = logging.getLogger(__name__)

IMAGE_CHECK_COLUMNS = ["path", "check", "detail"]
QUARANTINE_COLUMNS = ["path", "label", "reasons", "details"]
EXAMPLES_PER_PROBLEM = 10
SUITE_PREFIX = "alzstage"

# Image-level checks: name -> how to fix it. The names are the ``check`` column of
# ``check_images`` and the reason codes written to quarantine.csv.
IMAGE_CHECKS: dict[str, str] = {
    "missing_file": "the manifest lists a file that is not on disk; re-run `dvc repro download`",
    "zero_byte": "the file is empty (interrupted copy?); re-run `dvc repro download` or delete it",
    "not_an_image": "the file has an image extension but is not an image; delete it at the source",
    "truncated": "the JPEG ends early (incomplete transfer); re-download it or delete it",
    "corrupt": "the image data cannot be decoded; re-download it or delete it",
    "wrong_mode": "convert the image, or change validate.expected_mode (L, RGB or any)",
    "blank": "the image has (almost) no contrast; delete it or lower validate.blank_std_threshold",
    "sha256_mismatch": "the file changed after the manifest was written; re-run download",
}

_CHANNELS = {
    "1": 1,
    "L": 1,
    "P": 1,
    "I": 1,
    "F": 1,
    "I;16": 1,
    "LA": 2,
    "RGB": 3,
    "YCbCr": 3,
    "LAB": 3,
    "HSV": 3,
    "RGBA": 4,
    "CMYK": 4,
}


# ============================================================== image checks (per file)


def _check_file(
    raw_dir: Path, rel: str, expected_sha: str, expected_mode: str, blank_std: float
) -> list[tuple[str, str]]:
    """Every problem with one file, as (check, detail); an empty list means the file is fine.

    The whole image is decoded: a header-only ``verify()`` passes truncated JPEGs, which
    would then crash (or silently train on grey padding) much later.
    """
    from PIL import Image, UnidentifiedImageError

    path = raw_dir / rel
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [("missing_file", f"{path} does not exist")]
    except OSError as exc:  # a directory, permissions, ...
        return [("missing_file", f"{path} cannot be read: {exc.strerror or exc}")]
    if not data:
        return [("zero_byte", "file is 0 bytes")]

    problems: list[tuple[str, str]] = []
    if expected_sha:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha:
            problems.append(
                (
                    "sha256_mismatch",
                    f"sha256 {actual[:12]}... but manifest says {expected_sha[:12]}...",
                )
            )
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode, size = im.mode, im.size
            pixels = np.asarray(im)
    except UnidentifiedImageError:
        problems.append(
            (
                "not_an_image",
                f"Pillow cannot identify an image ({len(data)} bytes, starts {data[:8]!r})",
            )
        )
        return problems
    except Exception as exc:  # any decoder error means the image is unusable
        kind = "truncated" if "truncat" in str(exc).lower() else "corrupt"
        problems.append((kind, f"decoding failed: {type(exc).__name__}: {exc}"))
        return problems

    if expected_mode != "any" and mode != expected_mode:
        problems.append(
            (
                "wrong_mode",
                f"mode {mode} ({_CHANNELS.get(mode, '?')} channel(s)), expected {expected_mode} "
                f"({_CHANNELS[expected_mode]} channel(s)); size {size[0]}x{size[1]}",
            )
        )
    std = float(pixels.std()) if pixels.size else 0.0
    if std < blank_std:
        problems.append(
            ("blank", f"pixel std {std:.3f} < validate.blank_std_threshold {blank_std:g}")
        )
    return problems


def check_images(manifest: pd.DataFrame, raw_dir: Path, params: Params) -> pd.DataFrame:
    """Open and fully decode every file in the manifest; one row per problem found.

    Returns columns ``path, check, detail`` (``check`` is a key of ``IMAGE_CHECKS``),
    sorted, empty when every file is fine. 6,400 small JPEGs take about 2-3 s on two cores.
    """
    from PIL import ImageFile

    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process, so truncated JPEGs "
            "would decode as if whole and pass validation; remove the code that sets it."
        )
    v = params.validate_
    raw_dir = Path(raw_dir)
    rels = manifest["path"].astype(str).tolist()
    shas = (
        manifest["sha256"].fillna("").astype(str).tolist()
        if "sha256" in manifest
        else [""] * len(rels)
    )

    def one(i: int) -> list[tuple[str, str]]:
        return _check_file(raw_dir, rels[i], shas[i], v.expected_mode, v.blank_std_threshold)

    # One thread per core: decoding releases the GIL, hashing/std barely matter; more
    # threads measured no faster on 2 cores.
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        found = list(pool.map(one, range(len(rels))))

    rows = [
        {"path": rel, "check": check, "detail": detail}
        for rel, problems in zip(rels, found, strict=True)
        for check, detail in problems
    ]
    df = pd.DataFrame(rows, columns=IMAGE_CHECK_COLUMNS)
    return df.sort_values(["path", "check"], kind="stable").reset_index(drop=True)


# ===================================================== expectation suite (declarative)


@dataclass(frozen=True)
class ExpectationSpec:
    """One GX expectation, described without importing GX.

    ``reason`` is the quarantine code for row-level expectations; ``None`` marks a
    dataset-level rule that dropping rows cannot fix (it stops the stage under either
    policy). ``index`` names the column that identifies unexpected rows in the results.
    """

    key: str
    frame: str  # "manifest" | "class_counts" | "label_conflicts"
    gx_class: str
    kwargs: dict[str, Any]
    description: str
    hint: str
    reason: str | None = None
    index: str = "path"


def expectation_specs(params: Params) -> list[ExpectationSpec]:
    """The suite, derived from params so that the rules and the docs never drift apart."""
    b, v = params.base, params.validate_
    redownload = "re-run `dvc repro download` to rebuild data/raw/manifest.csv"
    specs = [
        ExpectationSpec(
            "columns_present",
            "manifest",
            "ExpectTableColumnsToMatchSet",
            {"column_set": list(MANIFEST_COLUMNS), "exact_match": False},
            "The manifest has every column later stages read.",
            redownload,
        ),
    ]
    for col, reason in (
        ("path", "missing_path"),
        ("label", "missing_label"),
        ("sha256", "missing_sha256"),
        ("pixel_hash", "undecodable"),
    ):
        specs.append(
            ExpectationSpec(
                f"{col}_not_null",
                "manifest",
                "ExpectColumnValuesToNotBeNull",
                {"column": col},
                f"Every row has a {col} (empty counts as missing"
                + (
                    "; an empty pixel_hash means download could not decode the image)."
                    if col == "pixel_hash"
                    else ")."
                ),
                redownload
                if col != "pixel_hash"
                else "replace or delete the file; see the image checks",
                reason,
            )
        )
    specs += [
        ExpectationSpec(
            "path_unique",
            "manifest",
            "ExpectColumnValuesToBeUnique",
            {"column": "path"},
            "Each file is listed once.",
            redownload,
            "duplicate_path",
        ),
        ExpectationSpec(
            "label_in_classes",
            "manifest",
            "ExpectColumnValuesToBeInSet",
            {"column": "label", "value_set": list(b.classes)},
            f"Labels are configured classes {list(b.classes)}.",
            "rename the class folder, or map it with base.class_aliases in params.yaml",
            "unknown_label",
        ),
        ExpectationSpec(
            "sha256_unique",
            "manifest",
            "ExpectColumnValuesToBeUnique",
            {"column": "sha256"},
            "No two files have identical bytes (exact duplicates inflate a class and leak "
            "across the split).",
            "delete the extra copies; with validate.on_failure: quarantine the first copy "
            "(by path) is kept",
            "exact_duplicate",
        ),
    ]
    if v.min_per_class > 0:
        specs.append(
            ExpectationSpec(
                "classes_present",
                "manifest",
                "ExpectColumnDistinctValuesToContainSet",
                {"column": "label", "value_set": list(b.classes)},
                "Every configured class occurs at least once.",
                "add images for the missing class, or remove it from base.classes",
            )
        )
    if v.check_size:
        for col, want in (("width", b.width), ("height", b.height)):
            specs.append(
                ExpectationSpec(
                    f"{col}_matches",
                    "manifest",
                    "ExpectColumnValuesToBeInSet",
                    {"column": col, "value_set": [want]},
                    f"Images must be {b.width}x{b.height} (WxH; base.image_size is "
                    "[height, width]).",
                    "resize the images, fix base.image_size, or set validate.check_size: false",
                    "wrong_size",
                )
            )
    if v.expected_mode != "any":
        specs.append(
            ExpectationSpec(
                "mode_matches",
                "manifest",
                "ExpectColumnValuesToBeInSet",
                {"column": "mode", "value_set": [v.expected_mode]},
                f"Images have colour mode {v.expected_mode}.",
                IMAGE_CHECKS["wrong_mode"],
                "wrong_mode",
            )
        )
    specs += [
        ExpectationSpec(
            "class_min_count",
            "class_counts",
            "ExpectColumnValuesToBeBetween",
            {"column": "count", "min_value": v.min_per_class},
            f"Every class has at least validate.min_per_class = {v.min_per_class} images.",
            "add images for that class, or lower validate.min_per_class",
            index="label",
        ),
        ExpectationSpec(
            "no_label_conflict",
            "label_conflicts",
            "ExpectColumnValuesToBeBetween",
            {"column": "n_labels", "max_value": 1},
            "Identical pixels never carry two different labels.",
            "decide which label is right and delete the other copies; with "
            "validate.on_failure: quarantine every copy is excluded",
            "label_conflict",
        ),
    ]
    return specs


def suite_frames(manifest: pd.DataFrame, params: Params) -> dict[str, pd.DataFrame]:
    """The frames the suite validates (pure).

    Empty strings become nulls so the not-null rules catch them. Size and mode of rows
    whose pixels could not be decoded are blanked: those rows are already reported as
    undecodable, and '0x0 is the wrong size' would only add noise.
    """
    m = manifest.copy()
    for col in ("path", "label", "sha256", "pixel_hash", "mode", "format"):
        s = m[col]
        m[col] = s.where(s.notna() & (s.astype(str) != ""), None).astype(object)
    undecodable = m["pixel_hash"].isna()
    for col in ("width", "height"):
        m[col] = pd.to_numeric(m[col], errors="coerce").where(~undecodable)
    m["mode"] = m["mode"].where(~undecodable, None)

    known = m["label"].where(m["label"].isin(params.base.classes))
    counts = known.value_counts()
    class_counts = pd.DataFrame(
        {
            "label": list(params.base.classes),
            "count": [int(counts.get(c, 0)) for c in params.base.classes],
        }
    )

    hashed = m.loc[m["pixel_hash"].notna() & m["label"].notna(), ["path", "label", "pixel_hash"]]
    conflicts = hashed.assign(
        n_labels=hashed.groupby("pixel_hash")["label"].transform("nunique").astype(int)
    ).reset_index(drop=True)
    return {"manifest": m, "class_counts": class_counts, "label_conflicts": conflicts}


# ================================================ NIfTI volumes (data.source: nifti)

VOLUME_QUARANTINE_COLUMNS = ["file", "subject", "label", "reasons", "details", "n_slices"]
_VOLUME_TEXT = ("subject", "file", "label", "status", "error", "shape", "slice_prefix")


def volume_specs(params: Params) -> list[ExpectationSpec]:
    """Expectations on ``data/raw/volumes.csv``: one per ``validate.nifti`` rule.

    The rules themselves live in :mod:`alzstage.neuro.qc`, shared with ``predict``; a
    volume that could not be preprocessed at all fails ``volume_preprocessed`` (its
    other measurements are empty, and GX skips empty values in range checks).
    """
    from alzstage.neuro.qc import volume_rules

    specs = [
        ExpectationSpec(
            "volume_preprocessed",
            "volumes",
            "ExpectColumnValuesToBeInSet",
            {"column": "status", "value_set": ["ok"]},
            "Every volume in the subjects CSV could be read and preprocessed into slices.",
            "see each volume's error; fix or remove the file, or fix its row in the CSV",
            "volume_error",
            index="file",
        )
    ]
    for rule in volume_rules(params.validate_.nifti):
        bounds = {"min_value": rule.min_value, "max_value": rule.max_value}
        specs.append(
            ExpectationSpec(
                rule.key,
                "volumes",
                "ExpectColumnValuesToBeBetween",
                {"column": rule.column, **{k: v for k, v in bounds.items() if v is not None}},
                rule.description,
                rule.hint,
                rule.reason,
                index="file",
            )
        )
    return specs


def read_volume_qc(path: Path) -> pd.DataFrame:
    """Read ``volumes.csv`` with text columns as strings and measurements as numbers."""
    df = pd.read_csv(path, dtype={c: str for c in _VOLUME_TEXT}, keep_default_na=False)
    for col in df.columns:
        if col in _VOLUME_TEXT:
            df[col] = df[col].fillna("").astype(str)
        else:
            df[col] = pd.to_numeric(df[col].replace("", np.nan), errors="coerce")
    return df


def volume_frame(volumes: pd.DataFrame) -> pd.DataFrame:
    """The frame the volume expectations see: empty status counts as missing."""
    v = volumes.copy()
    v["status"] = v["status"].where(v["status"].astype(str) != "", None).astype(object)
    return v


def _volume_detail(spec_reason: str, row: pd.Series, e: dict) -> str:
    if spec_reason == "volume_error":
        return f"{row['status']}: {row['error']}"
    col = e["column"]
    bounds = e["kwargs"]
    limit = f">= {bounds['min_value']}" if "min_value" in bounds else f"<= {bounds['max_value']}"
    return f"{col} = {row[col]} (must be {limit}). Fix: {e['hint']}"


# ============================================================ expectation suite (GX shell)


def _gx_context(docs_dir: Path | None) -> Any:
    """An in-memory GX context whose only Data Docs site (if any) is ``docs_dir``.

    Ephemeral: GX configuration lives in code and params.yaml, not in a second project
    tree (gx/) that could drift from them.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if docs_dir is not None:
        sites["local_site"] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(Path(docs_dir).resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites=sites,
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _jsonable(value: Any) -> Any:
    """GX results hold numpy scalars; reports and messages want plain Python values."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(x) for x in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(x) for k, x in value.items()}
    return str(value)


def run_manifest_suite(
    manifest: pd.DataFrame,
    params: Params,
    docs_dir: Path | None,
    volumes: pd.DataFrame | None = None,
) -> dict:
    """Validate the manifest with Great Expectations; build Data Docs into ``docs_dir``.

    With ``volumes`` (the per-volume QC of a ``nifti`` source) its expectations run in
    the same suite, keyed by volume file instead of image path.

    Returns plain data (no GX objects) so callers and tests need not know GX::

        {"success": bool, "data_docs": "<index.html>" | None,
         "expectations": {key: {"success", "unexpected_count", "unexpected" (ids),
                                "values", "observed_value", "exception", "type",
                                "column", "frame", "description", "hint", "reason", "index"}}}

    ``unexpected`` holds paths for row-level rules and class names for ``class_min_count``.
    """
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValidationFailed(
            f"manifest is missing columns {missing} (has {list(manifest.columns)}); "
            "re-run `dvc repro download` to rebuild data/raw/manifest.csv"
        )
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    specs = expectation_specs(params)
    frames = suite_frames(manifest, params)
    if volumes is not None:
        specs += volume_specs(params)
        frames["volumes"] = volume_frame(volumes)
    context = _gx_context(docs_dir)
    source = context.data_sources.add_pandas(SUITE_PREFIX)

    by_key = {s.key: s for s in specs}
    out: dict[str, dict[str, Any]] = {}
    for frame_name, frame in frames.items():
        frame_specs = [s for s in specs if s.frame == frame_name]
        if not frame_specs:
            continue
        batch = source.add_dataframe_asset(frame_name).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=f"{SUITE_PREFIX}.{frame_name}"))
        for s in frame_specs:
            cls = getattr(gx.expectations, s.gx_class)
            suite.add_expectation(cls(**s.kwargs, meta={"key": s.key}, description=s.description))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{SUITE_PREFIX}.{frame_name}", data=batch, suite=suite)
        )
        index = frame_specs[0].index
        actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs")] if docs_dir else []
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"{SUITE_PREFIX}.{frame_name}",
                validation_definitions=[definition],
                actions=actions,
                result_format={
                    "result_format": "COMPLETE",
                    "unexpected_index_column_names": [index],
                    "return_unexpected_index_query": False,
                },
            )
        )
        run = checkpoint.run(batch_parameters={"dataframe": frame})
        for vres in run.run_results.values():
            for r in vres.results:
                key = (r.expectation_config.meta or {})["key"]
                out[key] = _summarise_result(r, by_key[key])

    docs_index = None
    if docs_dir is not None:
        docs_index = str(Path(docs_dir).resolve() / "index.html")
    return {
        "success": all(e["success"] for e in out.values()),
        "data_docs": docs_index,
        "expectations": {s.key: out[s.key] for s in specs},
    }


def _summarise_result(r: Any, spec: ExpectationSpec) -> dict[str, Any]:
    """Flatten one GX ExpectationValidationResult into the plain dict we report."""
    res = r.result or {}
    column = spec.kwargs.get("column")
    index_list = res.get("unexpected_index_list") or []
    exc = r.exception_info or {}
    if not isinstance(exc, dict) or "raised_exception" not in exc:
        # Multi-metric failures come keyed by metric; take the first that raised.
        raised = [
            v
            for v in (exc.values() if isinstance(exc, dict) else [])
            if isinstance(v, dict) and v.get("raised_exception")
        ]
        exc = raised[0] if raised else {}
    return {
        "success": bool(r.success),
        "unexpected_count": int(res.get("unexpected_count") or 0),
        "unexpected": [_jsonable(d.get(spec.index)) for d in index_list],
        "values": [_jsonable(d.get(column)) for d in index_list] if column else [],
        "observed_value": _jsonable(res.get("observed_value")),
        "exception": exc.get("exception_message") if exc.get("raised_exception") else None,
        "type": r.expectation_config.type,
        "kwargs": _jsonable(spec.kwargs),
        "column": column,
        "frame": spec.frame,
        "description": spec.description,
        "hint": spec.hint,
        "reason": spec.reason,
        "index": spec.index,
    }


# ======================================================================= decision (pure)


@dataclass
class Outcome:
    """What validation concluded; everything the report, the CSVs and the error need."""

    clean: pd.DataFrame
    quarantine: pd.DataFrame  # QUARANTINE_COLUMNS
    dataset_problems: list[str] = field(default_factory=list)  # cannot be fixed by dropping rows
    class_counts: dict[str, int] = field(default_factory=dict)  # after quarantine
    # NIfTI sources only: the volumes table with its verdict, and the failing volumes.
    volumes: pd.DataFrame | None = None  # QC_COLUMNS + passed, reasons, details
    volume_quarantine: pd.DataFrame | None = None  # VOLUME_QUARANTINE_COLUMNS

    @property
    def any_row_problem(self) -> bool:
        return not self.quarantine.empty


def _add(reasons: dict[str, list[tuple[str, str]]], path: str, reason: str, detail: str) -> None:
    reasons.setdefault(path, []).append((reason, detail))


def _row_detail(reason: str, row: pd.Series, params: Params) -> str:
    b, v = params.base, params.validate_
    if reason == "unknown_label":
        return f"label {row['label']!r} is not one of base.classes {list(b.classes)}"
    if reason == "wrong_size":
        return f"{row['width']}x{row['height']} (WxH), expected {b.width}x{b.height}"
    if reason == "wrong_mode":
        return f"manifest mode {row['mode']!r}, expected {v.expected_mode}"
    if reason == "duplicate_path":
        return "path listed more than once in the manifest"
    if reason == "undecodable":
        return "manifest has no pixel_hash: the image could not be decoded at download"
    if reason.startswith("missing_"):
        return f"manifest column {reason.removeprefix('missing_')} is empty"
    return reason


def decide(
    manifest: pd.DataFrame,
    image_problems: pd.DataFrame,
    suite: dict,
    params: Params,
    volumes: pd.DataFrame | None = None,
) -> Outcome:
    """Turn check and expectation results into kept rows, quarantined rows and fatal problems.

    Exact duplicates keep the first copy by path (one copy is legitimate data); label
    conflicts quarantine every copy (we cannot know which label is right). A volume that
    breaks a ``validate.nifti`` rule is quarantined whole: every one of its slices, and
    the volume itself in the volume list (also when it produced no slices at all).
    """
    reasons: dict[str, list[tuple[str, str]]] = {}
    for rec in image_problems.itertuples(index=False):
        _add(reasons, rec.path, rec.check, rec.detail)

    paths = manifest["path"].astype(str)
    index_of = dict(zip(paths, manifest.index, strict=True))
    dataset_problems: list[str] = []
    volume_reasons: dict[str, list[tuple[str, str]]] = {}
    for key, e in suite["expectations"].items():
        if e["exception"]:
            dataset_problems.append(f"expectation {key} could not be evaluated: {e['exception']}")
            continue
        if e["success"]:
            continue
        if e["reason"] is None:
            dataset_problems.append(_dataset_problem(key, e, manifest))
            continue
        flagged = sorted({"" if p is None else str(p) for p in e["unexpected"]})
        if e["frame"] == "volumes" and volumes is not None:
            by_file = volumes.set_index("file", drop=False)
            for f in flagged:
                if f not in by_file.index:
                    continue
                row = by_file.loc[f]
                detail = f"volume {f} (subject {row['subject']}): " + _volume_detail(
                    e["reason"], row, e
                )
                _add(volume_reasons, f, e["reason"], detail)
                prefix = str(row.get("slice_prefix", "") or "")
                if prefix:
                    for p in paths[paths.str.startswith(prefix)]:
                        _add(reasons, p, e["reason"], detail)
        elif e["reason"] == "exact_duplicate":
            sub = manifest[paths.isin(flagged)]
            for _, group in sub.groupby("sha256", sort=True):
                ordered = sorted(group["path"].astype(str))
                for p in ordered[1:]:
                    _add(reasons, p, "exact_duplicate", f"same bytes as {ordered[0]} (kept)")
        elif e["reason"] == "label_conflict":
            sub = manifest[paths.isin(flagged)]
            for _, group in sub.groupby("pixel_hash", sort=True):
                labels = sorted(set(group["label"].astype(str)))
                for p, lab in zip(
                    group["path"].astype(str), group["label"].astype(str), strict=True
                ):
                    others = sorted(q for q in group["path"].astype(str) if q != p)[:3]
                    _add(
                        reasons,
                        p,
                        "label_conflict",
                        f"labelled {lab!r}; identical pixels labelled {labels} in {others}",
                    )
        else:
            for p in flagged:
                i = index_of.get(p)
                detail = (
                    _row_detail(e["reason"], manifest.loc[i], params)
                    if i is not None
                    else e["reason"]
                )
                _add(reasons, p, e["reason"], detail)

    bad = paths.isin(set(reasons))
    clean = manifest[~bad].copy()
    q_rows = []
    for p, lab in zip(paths[bad], manifest.loc[bad, "label"].astype(str), strict=True):
        uniq = list(dict.fromkeys(reasons[p]))
        q_rows.append(
            {
                "path": p,
                "label": lab,
                "reasons": ";".join(dict.fromkeys(r for r, _ in uniq)),
                "details": " | ".join(f"{r}: {d}" for r, d in uniq),
            }
        )
    quarantine = pd.DataFrame(q_rows, columns=QUARANTINE_COLUMNS)
    unmatched = sorted(set(reasons) - set(paths))
    if len(clean) + len(quarantine) != len(manifest) or unmatched:
        raise RuntimeError(
            f"validation bookkeeping error: {len(manifest)} rows in, {len(clean)} kept + "
            f"{len(quarantine)} quarantined; reasons for unknown paths {unmatched[:5]}"
        )

    vols, vol_quarantine = _volume_verdicts(volumes, volume_reasons)

    counts = clean["label"].value_counts()
    class_counts = {c: int(counts.get(c, 0)) for c in params.base.classes}
    need = params.validate_.min_per_class
    short = {c: n for c, n in class_counts.items() if n < need}
    if short and not quarantine.empty:
        dataset_problems.append(
            f"after excluding bad rows, classes {short} have fewer than validate.min_per_class = "
            f"{need} valid images; fix the files listed above or lower validate.min_per_class"
        )
    return Outcome(
        clean,
        quarantine.reset_index(drop=True),
        dataset_problems,
        class_counts,
        vols,
        vol_quarantine,
    )


def _volume_verdicts(
    volumes: pd.DataFrame | None, volume_reasons: dict[str, list[tuple[str, str]]]
) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The volumes table with passed/reasons/details, and the quarantined volumes."""
    if volumes is None:
        return None, None
    v = volumes.copy()
    listed = [list(dict.fromkeys(volume_reasons.get(f, []))) for f in v["file"].astype(str)]
    v["passed"] = [not r for r in listed]
    v["reasons"] = [";".join(dict.fromkeys(code for code, _ in r)) for r in listed]
    v["details"] = [" | ".join(f"{code}: {d}" for code, d in r) for r in listed]
    unknown = sorted(set(volume_reasons) - set(v["file"].astype(str)))
    failed = v[~v["passed"]]
    quarantine = failed.reindex(columns=VOLUME_QUARANTINE_COLUMNS).reset_index(drop=True)
    if unknown or len(failed) + int(v["passed"].sum()) != len(v):
        raise RuntimeError(f"validation bookkeeping error for volumes: unknown {unknown[:5]}")
    return v, quarantine


def _dataset_problem(key: str, e: dict, manifest: pd.DataFrame) -> str:
    if key == "class_min_count":
        shown = dict(zip(e["unexpected"], e["values"], strict=False))
        return f"class_min_count: {e['description']} Too few: {shown}. Fix: {e['hint']}."
    if key == "classes_present":
        # GX leaves observed_value empty for this rule, so the labels are counted here:
        # an empty class folder names that class, not all of them.
        observed = set(manifest["label"].astype(str))
        missing = [c for c in e["kwargs"]["value_set"] if c not in observed]
        return (
            f"classes_present: {e['description']} Missing {missing} (observed "
            f"{sorted(map(str, observed))}). Fix: {e['hint']}."
        )
    return f"{key}: {e['description']} Observed {e['observed_value']!r}. Fix: {e['hint']}."


# ================================================================ reporting (pure)


def build_report(
    manifest: pd.DataFrame,
    image_problems: pd.DataFrame,
    suite: dict,
    outcome: Outcome,
    params: Params,
) -> dict[str, Any]:
    """``reports/validation.json``: numbers and booleans only, so ``dvc metrics`` can diff it."""
    check_counts = (
        image_problems.groupby("check")["path"].nunique().to_dict() if len(image_problems) else {}
    )
    clean_data = image_problems.empty and suite["success"]
    report: dict[str, Any] = {
        "success": bool(clean_data),
        "stage_passed": _stage_passes(outcome, image_problems, suite, params),
        "n_images": len(manifest),
        "n_valid": len(outcome.clean),
        "n_quarantined": len(outcome.quarantine),
        "checks": {name: int(check_counts.get(name, 0)) for name in IMAGE_CHECKS},
        "expectations": {
            k: {"success": bool(e["success"]), "unexpected": int(e["unexpected_count"])}
            for k, e in suite["expectations"].items()
        },
        "class_counts_valid": outcome.class_counts,
    }
    if outcome.volumes is not None:
        v = outcome.volumes
        codes = [c for r in v["reasons"] for c in str(r).split(";") if c]
        report["volumes"] = {
            "n_volumes": len(v),
            "n_valid": int(v["passed"].sum()),
            "n_quarantined": int((~v["passed"]).sum()),
            "checks": {c: codes.count(c) for c in sorted(set(codes))},
        }
    return report


def _stage_passes(
    outcome: Outcome, image_problems: pd.DataFrame, suite: dict, params: Params
) -> bool:
    if outcome.dataset_problems:
        return False
    if params.validate_.on_failure == "fail":
        return image_problems.empty and suite["success"]
    return True


def _examples(items: Iterable[str], limit: int = EXAMPLES_PER_PROBLEM) -> list[str]:
    items = list(items)
    shown = [f"      - {x}" for x in items[:limit]]
    if len(items) > limit:
        shown.append(f"      ... and {len(items) - limit} more")
    return shown


def _found_sizes(manifest: pd.DataFrame, flagged: list[str]) -> str:
    """`` Found 128x128 (12 images).``: the sizes of the flagged images, most common first."""
    rows = manifest[manifest["path"].astype(str).isin(set(map(str, flagged)))]
    sizes = (rows["width"].astype(str) + "x" + rows["height"].astype(str)).value_counts()
    shown = ", ".join(f"{size} ({n} images)" for size, n in sizes.head(5).items())
    return f" Found {shown}." if shown else ""


def format_failure(
    manifest_name: str,
    manifest: pd.DataFrame,
    image_problems: pd.DataFrame,
    suite: dict,
    outcome: Outcome,
    params: Params,
    quarantine_csv: str,
    docs_index: str | None,
) -> str:
    """The ValidationFailed message: what broke, which files, how to fix it."""
    policy = params.validate_.on_failure
    lines = [
        f"Validation of {manifest_name} failed ({len(manifest)} images, "
        f"validate.on_failure: {policy})."
    ]
    if not image_problems.empty:
        lines.append("  Image checks:")
        for check, group in image_problems.groupby("check", sort=True):
            lines.append(
                f"    {check}: {group['path'].nunique()} file(s). Fix: {IMAGE_CHECKS[check]}"
            )
            lines += _examples(
                f"{p}: {d}" for p, d in zip(group["path"], group["detail"], strict=True)
            )
    failed = {
        k: e
        for k, e in suite["expectations"].items()
        if not e["success"] and e["frame"] != "volumes"
    }
    vq = outcome.volume_quarantine
    if vq is not None and len(vq):
        lines.append(f"  Volumes (NIfTI QC, validate.nifti): {len(vq)} volume(s) failed.")
        lines += _examples(f"{f}: {d}" for f, d in zip(vq["file"], vq["details"], strict=True))
    if failed:
        lines.append("  Expectations (Great Expectations suite on the manifest):")
        for key, e in failed.items():
            if e["reason"] is None or e["exception"]:
                continue
            found = _found_sizes(manifest, e["unexpected"]) if e["reason"] == "wrong_size" else ""
            lines.append(
                f"    {key} ({e['type']} on {e['column']}): {e['unexpected_count']} row(s). "
                f"{e['description']}{found} Fix: {e['hint']}"
            )
            lines += _examples(
                f"{p}: {e['column']}={v!r}"
                for p, v in zip(e["unexpected"], e["values"], strict=False)
            )
    if outcome.dataset_problems:
        lines.append("  Dataset problems (excluding rows cannot fix these):")
        lines += [f"    {p}" for p in outcome.dataset_problems]
    lines.append(f"  Every failing row with its reasons: {quarantine_csv}")
    if docs_index:
        lines.append(f"  Great Expectations Data Docs: {docs_index}")
    if policy == "fail" and not outcome.dataset_problems:
        lines.append(
            "  To exclude the bad rows and continue instead, set `validate.on_failure: quarantine` "
            "in params.yaml (they stay listed in the quarantine CSV)."
        )
    return "\n".join(lines)


# ============================================================================ stage (I/O)


def skipped_rows(skipped: list[Skipped]) -> pd.DataFrame:
    """Download's skip list as quarantine rows (path relative to the source, not data/raw)."""
    rows = [
        {
            "path": s.path,
            "label": s.label,
            "reasons": s.reason,
            "details": f"{s.reason}: skipped at download, not in data/raw: {s.detail}; "
            + SKIP_REASONS.get(s.reason, ""),
        }
        for s in skipped
    ]
    return pd.DataFrame(rows, columns=QUARANTINE_COLUMNS)


def _write_csv(df: pd.DataFrame, target: Path) -> None:
    with atomic_path(target) as tmp:
        df.to_csv(tmp, index=False)


def run_validate(params: Params, paths: Paths) -> StageResult:
    """Validate data/raw, write the validated manifest, quarantine list, report and Data Docs.

    The report, quarantine list and Data Docs are written even when the stage fails, so
    the person fixing the data has them; the validated manifest only when it passes.
    """
    if not paths.raw_manifest.exists():
        raise MissingInputError(
            f"{paths.raw_manifest} not found; run `dvc repro download` (alzstage download) first"
        )
    manifest = read_manifest(paths.raw_manifest)
    image_problems = check_images(manifest, paths.raw, params)
    # The per-volume QC table exists only for data.source: nifti (see alzstage.neuro.dataset).
    volumes = read_volume_qc(paths.raw_volumes) if paths.raw_volumes.exists() else None

    docs_root = paths.validation_dir / "data_docs"
    with atomic_dir(docs_root) as tmp_docs:
        suite = run_manifest_suite(manifest, params, tmp_docs, volumes)
    docs_index = docs_root / "index.html"
    suite["data_docs"] = str(docs_index)

    outcome = decide(manifest, image_problems, suite, params, volumes)
    report = build_report(manifest, image_problems, suite, outcome, params)
    # Files download saw but did not keep are listed here too: one list of everything
    # that is not trained on. They never reached the manifest, so they fail no rule.
    skipped = skipped_rows(read_skipped(paths.raw / SKIPPED_FILE))
    report["n_skipped_at_download"] = len(skipped)
    listed = [df for df in (outcome.quarantine, skipped) if len(df)] or [outcome.quarantine]
    _write_csv(pd.concat(listed, ignore_index=True), paths.quarantine)
    for stale in (paths.volume_qc, paths.quarantine_volumes):
        stale.unlink(missing_ok=True)  # from an earlier run on a nifti source
    if outcome.volumes is not None and outcome.volume_quarantine is not None:
        _write_csv(outcome.volumes, paths.volume_qc)
        _write_csv(outcome.volume_quarantine, paths.quarantine_volumes)
    write_json(paths.validation_report, report)

    rel = _relative_to(paths.root)
    if not report["stage_passed"]:
        raise ValidationFailed(
            format_failure(
                rel(paths.raw_manifest),
                manifest,
                image_problems,
                suite,
                outcome,
                params,
                rel(paths.quarantine),
                rel(docs_index),
            )
        )
    if not outcome.quarantine.empty:
        log.warning(
            "validate: quarantined %d of %d images (reasons in %s)",
            len(outcome.quarantine),
            len(manifest),
            rel(paths.quarantine),
        )
    if len(skipped):
        log.warning(
            "validate: %d file(s) skipped at download are listed in %s",
            len(skipped),
            rel(paths.quarantine),
        )
    vq = outcome.volume_quarantine
    if vq is not None and len(vq):
        log.warning(
            "validate: quarantined %d volume(s) (subjects %s; reasons in %s)",
            len(vq),
            ", ".join(vq["subject"].astype(str)),
            rel(paths.quarantine_volumes),
        )
    _write_csv(outcome.clean, paths.validated_manifest)

    metrics: dict[str, float] = {
        "n_images": float(report["n_images"]),
        "n_valid": float(report["n_valid"]),
        "n_quarantined": float(report["n_quarantined"]),
        "n_skipped_at_download": float(len(skipped)),
        "success": float(report["success"]),
    }
    metrics.update({f"check.{k}": float(n) for k, n in report["checks"].items()})
    metrics.update(
        {
            f"expectation.{k}.unexpected": float(e["unexpected"])
            for k, e in report["expectations"].items()
        }
    )
    metrics.update({f"class_count.{c}": float(n) for c, n in outcome.class_counts.items()})
    if "volumes" in report:
        metrics.update(
            {f"volumes.{k}": float(report["volumes"][k]) for k in ("n_volumes", "n_valid")}
        )
        metrics["volumes.n_quarantined"] = float(report["volumes"]["n_quarantined"])
    return StageResult(
        metrics=metrics,
        artifacts=[paths.validation_report, paths.quarantine, docs_root],
        tags={
            "validate.on_failure": params.validate_.on_failure,
            "validate.success": str(report["success"]).lower(),
        },
        summary=(
            f"validated {len(manifest)} images: {len(outcome.clean)} valid, "
            f"{len(outcome.quarantine)} quarantined"
            + (f", {len(skipped)} skipped at download" if len(skipped) else "")
            + f"; Data Docs {rel(docs_index)}"
        ),
    )


def _relative_to(root: Path):
    def rel(p: Path) -> str:
        try:
            return Path(p).resolve().relative_to(root).as_posix()
        except ValueError:
            return str(p)

    return rel
