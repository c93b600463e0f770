"""The decision (pure): check and expectation results become kept rows, quarantined
rows and the dataset-level problems that stop the stage under either policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from alzstage.config import Params
from alzstage.data.validation.rules import (
    VOLUME_QUARANTINE_COLUMNS,
    ExpectationResult,
    ExpectationSpec,
    SuiteResult,
    volume_detail,
)

QUARANTINE_COLUMNS = ["path", "label", "reasons", "details"]


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


def decide(
    manifest: pd.DataFrame,
    image_problems: pd.DataFrame,
    suite: SuiteResult,
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
    for key, e in suite.expectations.items():
        spec = e.spec
        if e.exception:
            dataset_problems.append(f"expectation {key} could not be evaluated: {e.exception}")
            continue
        if e.success:
            continue
        if spec.reason is None:
            dataset_problems.append(_dataset_problem(key, e, manifest))
            continue
        _flag(spec, e.unexpected, manifest, index_of, volumes, reasons, volume_reasons)

    clean, quarantine = _apply(manifest, reasons)

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


def _flag(
    spec: ExpectationSpec,
    unexpected: Any,
    manifest: pd.DataFrame,
    index_of: dict[str, Any],
    volumes: pd.DataFrame | None,
    reasons: dict[str, list[tuple[str, str]]],
    volume_reasons: dict[str, list[tuple[str, str]]],
) -> None:
    """Record why each row (and volume) a failed per-row expectation flagged is excluded."""
    paths = manifest["path"].astype(str)
    flagged = sorted({"" if p is None else str(p) for p in unexpected})
    if spec.frame == "volumes" and volumes is not None:
        by_file = volumes.set_index("file", drop=False)
        for f in flagged:
            if f not in by_file.index:
                continue
            row = by_file.loc[f]
            detail = f"volume {f} (subject {row['subject']}): " + volume_detail(spec, row)
            _add(volume_reasons, f, spec.reason, detail)
            prefix = str(row["slice_prefix"])
            if prefix:
                for p in paths[paths.str.startswith(prefix)]:
                    _add(reasons, p, spec.reason, detail)
    elif spec.reason == "exact_duplicate":
        sub = manifest[paths.isin(flagged)]
        for _, group in sub.groupby("sha256", sort=True):
            ordered = sorted(group["path"].astype(str))
            for p in ordered[1:]:
                _add(reasons, p, "exact_duplicate", f"same bytes as {ordered[0]} (kept)")
    elif spec.reason == "label_conflict":
        sub = manifest[paths.isin(flagged)]
        for _, group in sub.groupby("pixel_hash", sort=True):
            labels = sorted(set(group["label"].astype(str)))
            for p, lab in zip(group["path"].astype(str), group["label"].astype(str), strict=True):
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
            row = manifest.loc[i] if i is not None else None
            _add(reasons, p, spec.reason, spec.row_detail(row))


def _apply(
    manifest: pd.DataFrame, reasons: dict[str, list[tuple[str, str]]]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The kept rows and the quarantine table (every reason of every excluded row)."""
    paths = manifest["path"].astype(str)
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
    return clean, quarantine


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


def _dataset_problem(key: str, e: ExpectationResult, manifest: pd.DataFrame) -> str:
    spec = e.spec
    if key == "class_min_count":
        shown = dict(zip(e.unexpected, e.values, strict=False))
        return f"class_min_count: {spec.description} Too few: {shown}. Fix: {spec.hint}."
    if key == "classes_present":
        # GX leaves observed_value empty for this rule, so the labels are counted here:
        # an empty class folder names that class, not all of them.
        observed = set(manifest["label"].astype(str))
        missing = [c for c in spec.kwargs["value_set"] if c not in observed]
        return (
            f"classes_present: {spec.description} Missing {missing} (observed "
            f"{sorted(map(str, observed))}). Fix: {spec.hint}."
        )
    return f"{key}: {spec.description} Observed {e.observed_value!r}. Fix: {spec.hint}."
