"""Per-volume quality rules, defined once for the validate stage and for predict.

The download stage only *measures* (voxel size, non-finite voxels, brain volume,
registration score) and writes the numbers to ``data/raw/volumes.csv``; the rules here
*judge* them against ``validate.nifti``. The validate stage turns each rule into a Great
Expectations expectation on that table; ``alzstage predict`` and the REST API apply the
same rules directly to the one volume in hand. So a threshold lives in one place, and
changing it re-runs validation, not the (slow) preprocessing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from alzstage.artifacts import VOLUMES_CSV
from alzstage.config import NiftiQCParams
from alzstage.errors import VolumeError

# Columns of data/raw/volumes.csv, one row per subjects.csv row (the contract, with notes,
# is artifacts.VOLUMES_CSV).
QC_COLUMNS = VOLUMES_CSV.names


@dataclass(frozen=True)
class VolumeRule:
    """One threshold on one QC column; ``reason`` is the check code in reports."""

    key: str
    column: str
    min_value: float | None
    max_value: float | None
    reason: str
    description: str
    hint: str


def volume_rules(q: NiftiQCParams) -> list[VolumeRule]:
    """The rules for ``validate.nifti``, in the order a volume meets them."""
    lo, hi = q.voxel_size_mm
    return [
        VolumeRule(
            "voxel_size_min",
            "voxel_min_mm",
            lo,
            None,
            "voxel_size",
            f"No voxel side is below validate.nifti.voxel_size_mm[0] = {lo:g} mm.",
            "check the header's pixdim (a wrong unit?), or lower validate.nifti.voxel_size_mm",
        ),
        VolumeRule(
            "voxel_size_max",
            "voxel_max_mm",
            None,
            hi,
            "voxel_size",
            f"No voxel side is above validate.nifti.voxel_size_mm[1] = {hi:g} mm (thick "
            "slices lose the anatomy the model reads).",
            "use a 3D T1 acquisition with thinner slices, or raise validate.nifti.voxel_size_mm",
        ),
        VolumeRule(
            "finite_voxels",
            "n_nonfinite",
            None,
            0,
            "nonfinite",
            "No voxel is NaN or infinite.",
            "re-run the conversion; or replace them, e.g. `fslmaths in -nan out`",
        ),
        VolumeRule(
            "brain_mask_nonempty",
            "brain_ml",
            q.min_brain_ml,
            None,
            "empty_brain_mask",
            f"The brain mask holds at least validate.nifti.min_brain_ml = {q.min_brain_ml:g} ml.",
            "check it is a whole-brain T1 volume (not blank, cropped or another contrast), "
            "or lower validate.nifti.min_brain_ml",
        ),
        VolumeRule(
            "registration_quality",
            "registration_score",
            q.min_registration_score,
            None,
            "registration",
            "Correlation with MNI152 after affine registration is at least "
            f"validate.nifti.min_registration_score = {q.min_registration_score:g}.",
            "check the header orientation and that it is a T1-weighted whole-brain scan; "
            "or lower validate.nifti.min_registration_score",
        ),
    ]


def rule_failure(rule: VolumeRule, value: Any) -> str | None:
    """Why ``value`` breaks ``rule`` (a short phrase), or None when it passes or is unknown."""
    if value is None or value != value:  # missing: the volume stopped before this was measured
        return None
    v = float(value)
    if rule.min_value is not None and v < rule.min_value:
        return f"{rule.column} = {v:g} < {rule.min_value:g}"
    if rule.max_value is not None and v > rule.max_value:
        return f"{rule.column} = {v:g} > {rule.max_value:g}"
    return None


def check_measurements(
    qc: Mapping[str, Any], rules: list[VolumeRule], name: str, columns: set[str] | None = None
) -> None:
    """Raise the matching :class:`VolumeError` for the first rule ``qc`` breaks.

    ``columns`` limits the check to rules on those columns, so predict can stop as soon
    as a measurement is bad instead of registering a volume that is already rejected.
    """
    for rule in rules:
        if columns is not None and rule.column not in columns:
            continue
        why = rule_failure(rule, qc.get(rule.column))
        if why:
            raise VolumeError(
                f"{name}: {why}. {rule.description} Fix: {rule.hint}", check=rule.reason
            )
