"""The validation rules, declared once as data: :class:`ExpectationSpec` per rule.

The manifest rules (``expectation_specs``) and, for NIfTI sources, the volume rules
(``volume_specs``, from ``neuro.qc``), with the frames they are evaluated on, and the
typed result of running them (:class:`SuiteResult`). Each rule carries everything said
about it: what it checks, how to fix it, its quarantine code and what a flagged row's
line in quarantine.csv reads. Nothing here imports Great Expectations; ``gx.py`` turns
the specs into a suite and its results into a :class:`SuiteResult`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from alzstage.config import Params
from alzstage.data.manifest import MANIFEST_COLUMNS
from alzstage.data.validation.checks import IMAGE_CHECKS


@dataclass(frozen=True)
class ExpectationSpec:
    """One GX expectation, described without importing GX.

    ``reason`` is the quarantine code for row-level expectations; ``None`` marks a
    dataset-level rule that dropping rows cannot fix (it stops the stage under either
    policy). ``index`` names the column that identifies unexpected rows in the results.
    ``detail`` says what is wrong with one flagged manifest row (quarantine.csv).
    """

    key: str
    frame: str  # "manifest" | "class_counts" | "label_conflicts" | "volumes"
    gx_class: str
    kwargs: dict[str, Any]
    description: str
    hint: str
    reason: str | None = None
    index: str = "path"
    detail: Callable[[pd.Series], str] | None = None

    @property
    def column(self) -> str | None:
        """The column a column-level expectation checks; ``None`` for table-level ones."""
        return self.kwargs.get("column")

    def row_detail(self, row: pd.Series | None) -> str:
        """The quarantine detail for one flagged row (the reason code when none is known)."""
        if row is None or self.detail is None:
            return str(self.reason)
        return self.detail(row)


@dataclass(frozen=True)
class ExpectationResult:
    """One expectation's outcome, as plain values (no GX objects)."""

    spec: ExpectationSpec
    success: bool
    unexpected_count: int
    #: Ids of the failing rows (``spec.index``: paths, class names or volume files).
    unexpected: tuple[Any, ...]
    #: The failing rows' values of ``spec.column``, aligned with ``unexpected``.
    values: tuple[Any, ...]
    observed_value: Any
    exception: str | None  # GX could not evaluate the rule
    type: str  # the GX expectation type, e.g. expect_column_values_to_be_in_set


@dataclass(frozen=True)
class SuiteResult:
    """The suite's outcome: every expectation's result, keyed and ordered as the specs."""

    success: bool
    expectations: Mapping[str, ExpectationResult]
    data_docs: str | None  # index.html of the Data Docs, when they were built


def expectation_specs(params: Params) -> list[ExpectationSpec]:
    """The suite, derived from params so that the rules and the docs never drift apart."""
    return [*_row_specs(params), *_configured_specs(params), *_count_specs(params)]


def _row_specs(params: Params) -> list[ExpectationSpec]:
    """What every manifest row must hold, whatever the params: columns, ids, labels."""
    b = params.base
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
    for col in ("path", "label", "sha256"):
        specs.append(
            ExpectationSpec(
                f"{col}_not_null",
                "manifest",
                "ExpectColumnValuesToNotBeNull",
                {"column": col},
                f"Every row has a {col} (empty counts as missing).",
                redownload,
                f"missing_{col}",
                detail=lambda row, col=col: f"manifest column {col} is empty",
            )
        )
    specs.append(
        ExpectationSpec(
            "pixel_hash_not_null",
            "manifest",
            "ExpectColumnValuesToNotBeNull",
            {"column": "pixel_hash"},
            "Every row has a pixel_hash (empty counts as missing; an empty pixel_hash means "
            "download could not decode the image).",
            "replace or delete the file; see the image checks",
            "undecodable",
            detail=lambda row: (
                "manifest has no pixel_hash: the image could not be decoded at download"
            ),
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
            detail=lambda row: "path listed more than once in the manifest",
        ),
        ExpectationSpec(
            "label_in_classes",
            "manifest",
            "ExpectColumnValuesToBeInSet",
            {"column": "label", "value_set": list(b.classes)},
            f"Labels are configured classes {list(b.classes)}.",
            "rename the class folder, or map it with base.class_aliases in params.yaml",
            "unknown_label",
            detail=lambda row: (
                f"label {row['label']!r} is not one of base.classes {list(b.classes)}"
            ),
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
    return specs


def _configured_specs(params: Params) -> list[ExpectationSpec]:
    """The rules a param switches on: every class present, one image size, one mode."""
    b, v = params.base, params.validate_
    specs: list[ExpectationSpec] = []
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
                    detail=lambda row: (
                        f"{row['width']}x{row['height']} (WxH), expected {b.width}x{b.height}"
                    ),
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
                detail=lambda row: f"manifest mode {row['mode']!r}, expected {v.expected_mode}",
            )
        )
    return specs


def _count_specs(params: Params) -> list[ExpectationSpec]:
    """The rules on aggregates: images per class, and labels per identical image."""
    v = params.validate_
    return [
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


def volume_frame(volumes: pd.DataFrame) -> pd.DataFrame:
    """The frame the volume expectations see: empty status counts as missing."""
    v = volumes.copy()
    v["status"] = v["status"].where(v["status"].astype(str) != "", None).astype(object)
    return v


def volume_detail(spec: ExpectationSpec, row: pd.Series) -> str:
    """What is wrong with one flagged volume (its line in quarantine_volumes.csv)."""
    if spec.reason == "volume_error":
        return f"{row['status']}: {row['error']}"
    col, bounds = spec.column, spec.kwargs
    limit = f">= {bounds['min_value']}" if "min_value" in bounds else f"<= {bounds['max_value']}"
    return f"{col} = {row[col]} (must be {limit}). Fix: {spec.hint}"
