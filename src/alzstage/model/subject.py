"""Subject-level prediction from a NIfTI volume: slices in, one stage out.

A volume is preprocessed into the training slice format (:mod:`alzstage.neuro`), every
slice goes through the same model as an uploaded JPEG, and the slice probabilities are
pooled into one stage with ``neuro.aggregate`` (:func:`alzstage.model.metrics.pool_slices`;
mean log-probability by default, the rule the evaluate stage's subject-level metrics use).

Grad-CAM is drawn on the *most informative* slices: those that give the subject's stage
the highest probability, i.e. the slices whose evidence the pooled decision rests on.
They explain the subject's stage, not each slice's own argmax, so a reader sees why the
volume got its label.

Shared by ``alzstage predict`` and the REST API, so both give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from alzstage.model.inputs import ImageReadError, to_model_array

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.config import NeuroParams, NiftiQCParams, Params
    from alzstage.model.predict import LoadedModel
    from alzstage.neuro.preprocess import Preprocessed


@dataclass
class VolumePrediction:
    """One volume's subject-level result, its slices and what explains it."""

    file: str
    classes: list[str]
    rule: str
    probabilities: np.ndarray  # (k,) pooled
    slice_probabilities: np.ndarray  # (n, k)
    z_mm: np.ndarray  # (n,) MNI z of each slice
    slices: np.ndarray  # uint8 (n, H, W) in the training image format
    informative: list[int]  # slice indices, most informative first
    overlays: dict[int, np.ndarray] = field(default_factory=dict)  # slice -> RGB Grad-CAM
    qc: dict[str, Any] = field(default_factory=dict)

    @property
    def stage_index(self) -> int:
        return int(np.argmax(self.probabilities))

    @property
    def stage(self) -> str:
        return self.classes[self.stage_index]

    @property
    def confidence(self) -> float:
        return float(self.probabilities[self.stage_index])


def informative_slices(slice_probs: np.ndarray, stage: int, n: int) -> list[int]:
    """The ``n`` slices that give ``stage`` the highest probability (ties: lower index)."""
    p = np.asarray(slice_probs)[:, stage]
    order = np.lexsort((np.arange(len(p)), -p))
    return [int(i) for i in order[: max(0, n)]]


def preprocess_for_prediction(
    source: Path | bytes,
    neuro: NeuroParams,
    qc: NiftiQCParams,
    image_size: tuple[int, int],
    name: str,
) -> Preprocessed:
    """Preprocess a volume with the ``validate.nifti`` rules enforced (fail fast).

    Separate from :func:`predict_preprocessed` so a server can run this CPU-heavy part
    outside the lock that serialises model calls.
    """
    from alzstage.neuro.preprocess import preprocess_volume
    from alzstage.neuro.qc import volume_rules

    return preprocess_volume(
        source, neuro.preprocess, image_size, name=name, rules=volume_rules(qc)
    )


def predict_preprocessed(
    model: LoadedModel, pre: Preprocessed, neuro: NeuroParams, name: str, gradcam: bool = True
) -> VolumePrediction:
    """Predict every slice, pool them, and explain the most informative slices."""
    from alzstage.model.metrics import pool_slices

    arrays = np.stack([to_model_array(s, model.size) for s in pre.slices])
    probs = np.asarray(model.predict(arrays), dtype=np.float64)
    pooled = pool_slices(probs, neuro.aggregate)
    stage = int(np.argmax(pooled))
    chosen = informative_slices(probs, stage, neuro.gradcam_slices)
    overlays: dict[int, np.ndarray] = {}
    if gradcam and chosen:
        from alzstage.model.explain import gradcam as gradcam_maps
        from alzstage.model.explain import overlay

        maps = gradcam_maps(model.keras_model, arrays[chosen], class_index=stage)
        overlays = {i: overlay(pre.slices[i], m) for i, m in zip(chosen, maps, strict=True)}
    return VolumePrediction(
        file=name,
        classes=list(model.classes),
        rule=neuro.aggregate,
        probabilities=pooled,
        slice_probabilities=probs,
        z_mm=np.asarray(pre.z_mm, dtype=np.float64),
        slices=pre.slices,
        informative=chosen,
        overlays=overlays,
        qc=pre.qc,
    )


def predict_volume(
    model: LoadedModel,
    source: Path | bytes,
    params: Params,
    name: str | None = None,
    gradcam: bool = True,
) -> VolumePrediction:
    """Preprocess, predict every slice, pool, and explain the most informative slices.

    Raises :class:`~alzstage.neuro.errors.VolumeError` (an ``ImageReadError``) when the
    volume breaks a ``validate.nifti`` rule or cannot be preprocessed.
    """
    name = name or str(source if isinstance(source, Path) else "upload")
    pre = preprocess_for_prediction(
        source, params.neuro, params.validate_.nifti, params.base.image_size, name
    )
    return predict_preprocessed(model, pre, params.neuro, name, gradcam)


def volume_row(pred: VolumePrediction, low_confidence: float) -> dict[str, Any]:
    """The volume's row in the predict table: the image row's columns plus volume facts."""
    from alzstage.model.predict import prediction_row

    row = prediction_row(pred.classes, pred.probabilities, low_confidence)
    row.update(
        kind="volume",
        n_slices=len(pred.slices),
        aggregate=pred.rule,
        registration_score=float(pred.qc.get("registration_score", np.nan)),
    )
    return row


def volume_detail(pred: VolumePrediction) -> dict[str, Any]:
    """Per-slice probabilities and QC for JSON output (no pixels)."""
    return {
        "file": pred.file,
        "stage": pred.stage,
        "confidence": pred.confidence,
        "aggregate": pred.rule,
        "probabilities": dict(zip(pred.classes, map(float, pred.probabilities), strict=True)),
        "informative_slices": pred.informative,
        "qc": pred.qc,
        "slices": [
            {
                "index": i,
                "z_mm": round(float(z), 2),
                "stage": pred.classes[int(np.argmax(p))],
                "probabilities": dict(zip(pred.classes, map(float, p), strict=True)),
            }
            for i, (z, p) in enumerate(zip(pred.z_mm, pred.slice_probabilities, strict=True))
        ],
    }


def predict_volume_files(
    model: LoadedModel,
    files: list[Path],
    params: Params,
    low_confidence: float,
    gradcam_dir: Path | None = None,
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """One row per volume (errors as error rows, the others continue) plus JSON details.

    With ``gradcam_dir``, each informative slice's overlay is written there as
    ``<volume>.sNNN.gradcam.png`` (never overwriting) and listed in the details.
    """
    from PIL import Image

    from alzstage.model.predict import unique_png

    rows: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = []
    taken: set[str] = set()
    for f in files:
        try:
            pred = predict_volume(model, Path(f), params, str(f), gradcam=gradcam_dir is not None)
        except ImageReadError as exc:
            rows.append(
                {
                    "file": str(f),
                    "kind": "volume",
                    "stage": "",
                    "confidence": np.nan,
                    "low_confidence": False,
                    "error": str(exc),
                }
            )
            details.append({"file": str(f), "error": str(exc)})
            continue
        row = {"file": str(f), **volume_row(pred, low_confidence)}
        detail = volume_detail(pred)
        if gradcam_dir is not None:
            gradcam_dir.mkdir(parents=True, exist_ok=True)
            stem = Path(f).name
            for suffix in (".gz", ".nii"):
                stem = stem.removesuffix(suffix).removesuffix(suffix.upper())
            written = []
            for i in pred.informative:
                target = unique_png(gradcam_dir, f"{stem}.s{i:03d}", taken)
                Image.fromarray(pred.overlays[i]).save(target, format="PNG")
                written.append(str(target))
            detail["gradcam"] = written
            row["gradcam"] = ";".join(written)
        rows.append(row)
        details.append(detail)
    return pd.DataFrame(rows), details
