"""The one prediction result type: what an image or a NIfTI volume got, however it is shown.

``alzstage predict`` and the REST API build the same objects with the same functions,
so a file gets the same fields and numbers whichever way it is sent. The API returns
them as they are (:mod:`alzstage.serve.schemas` publishes them in the OpenAPI schema);
the CLI renders them as JSON records, a CSV table or a terminal table
(:mod:`alzstage.inference.command`). Pure: no model, no files, no HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from pydantic import BaseModel, Field

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.errors import ImageReadError

#: ``brain_model`` of an answer made without a stored brain model (a model logged
#: before brain models existed): the fixed pooling rule gave the stage, with no set.
NO_BRAIN_MODEL = "pool (no brain model stored)"
#: What a person reads next to such an answer.
NO_BRAIN_MODEL_NOTE = "brain model: none stored with this model; fixed pooling rule"


class ModelRef(BaseModel):
    """Which registered model version produced the answer, and what it was trained on."""

    uri: str = Field(description="The reference the server was started with.")
    name: str | None = Field(None, description="Registered model name.")
    version: str | None = Field(None, description="Registry version actually loaded.")
    alias: str | None = Field(None, description="Alias it was loaded through, e.g. champion.")
    dataset: str | None = Field(
        None, description="Dataset the model was trained on (one champion per dataset)."
    )
    recipe: str | None = Field(None, description="Training recipe: scratch or transfer.")
    synthetic_demo: bool = Field(
        False,
        description="True when trained on the synthetic demo images: the answers mean "
        "nothing for real scans.",
    )
    provenance: str = Field("", description="The same facts as one line, as the CLI prints.")


class Prediction(BaseModel):
    """The outcome for one input; inputs fail independently of each other.

    A stage (with calibrated probabilities) or, when there is none, ``error`` saying
    why; an image judged out of distribution has neither.
    """

    index: int = Field(
        description="Position of the file in the request (the CLI: among its expanded inputs)."
    )
    filename: str = Field(
        description="Client file name, for display only (never used on disk); the CLI's "
        "`file`, the path it read."
    )
    status: int = Field(description="200, or the HTTP status this file alone would get.")
    error: str | None = Field(None, description="Why the file could not be used.")
    stage: str | None = None
    confidence: float | None = Field(None, description="Calibrated probability of `stage`.")
    low_confidence: bool | None = Field(
        None, description="confidence is below the evaluate.low_confidence threshold."
    )
    probabilities: dict[str, float] | None = Field(
        None, description="Temperature-calibrated probability per class, in class order."
    )

    @property
    def out_of_distribution_flag(self) -> bool:
        """Readable, but judged unlike the training slices (no stage)."""
        return False

    @property
    def seen_in_training_flag(self) -> bool:
        return False


class ImagePrediction(Prediction):
    """One uploaded or named image (JPEG or PNG slice)."""

    gradcam: str | None = Field(
        None,
        description="Grad-CAM overlay of the predicted class as a data:image/png URL (the "
        "CLI: the PNG file it wrote).",
    )
    width: int | None = Field(None, description="Width of the uploaded image in pixels.")
    height: int | None = Field(None, description="Height of the uploaded image in pixels.")
    out_of_distribution: bool | None = Field(
        None,
        description="True when the image is not like the model's training slices (size, "
        "contrast, foreground, border, texture, resemblance to the mean training slice): it "
        "then gets no stage, only `ood_reason`. Null for a model stored without the check.",
    )
    ood_reason: str | None = Field(None, description="Every rule the image broke, and by how much.")
    seen_in_training: bool | None = Field(
        None,
        description="True when the image is a near-duplicate of one of the model's training "
        "slices (thumbnail correlation >= 0.99): scoring the model on it measures memory, "
        "not skill.",
    )
    training_correlation: float | None = Field(
        None, description="Highest correlation with a training slice's 32x32 thumbnail."
    )

    @property
    def out_of_distribution_flag(self) -> bool:
        return self.out_of_distribution is True  # None (unchecked) is not True

    @property
    def seen_in_training_flag(self) -> bool:
        return self.seen_in_training is True


class SlicePrediction(BaseModel):
    """One slice of a brain: an axial slice of a volume in the training image format, or
    one file of a folder (or upload) of one brain's slices."""

    index: int = Field(
        description="Slice number: inferior to superior for a volume, the file's position "
        "among the brain's files otherwise."
    )
    z_mm: float | None = Field(
        None, description="MNI z coordinate of the slice in mm (volumes; null for files)."
    )
    filename: str | None = Field(None, description="The slice's file (a brain's files only).")
    stage: str | None = Field(
        None, description="The slice's own most probable stage (null when left out)."
    )
    confidence: float | None = None
    probabilities: dict[str, float] | None = None
    informative: bool = Field(
        False,
        description="One of the neuro.gradcam_slices slices that most support the brain's stage.",
    )
    out_of_distribution: bool | None = Field(
        None,
        description="A brain's file judged unlike the training slices by the input check "
        "(left out of the brain); null for volume slices and unchecked models.",
    )
    left_out: str | None = Field(
        None,
        description="Why this file is not part of the brain's answer (out of distribution "
        "or unreadable); null when it is.",
    )
    image: str | None = Field(
        None, description="The slice as the model saw it, a data:image/png URL (API only)."
    )
    gradcam: str | None = Field(
        None,
        description="Grad-CAM of the brain's stage on this slice (informative slices): a "
        "data:image/png URL (the CLI: the PNG file it wrote).",
    )


class VolumePrediction(Prediction):
    """The brain-level outcome for one brain: a NIfTI volume, or a folder (upload) of one
    brain's slices (``kind`` "brain").

    ``stage`` and ``probabilities`` are the brain model's (stored with the network, fitted
    on training brains), ``prediction_set`` its conformal set; the fixed pooling rule's
    stage stays beside it as the reference (``pooled_stage``). A model stored without a
    brain model gives the pooled stage and no set, and ``brain_model`` says so.
    """

    kind: str = Field(
        "volume", description="volume (a NIfTI volume) or brain (one brain's slice files)."
    )
    error: str | None = Field(None, description="Why the brain could not be used.")
    stage: str | None = Field(None, description="Brain-level stage from the brain model.")
    confidence: float | None = None
    low_confidence: bool | None = None
    probabilities: dict[str, float] | None = Field(
        None, description="The brain model's probability per class, in class order."
    )
    prediction_set: list[str] | None = Field(
        None,
        description="Conformal prediction set: the stages that cannot be ruled out at "
        "`set_confidence` coverage (calibrated on held-out brains); null when the model "
        "carries no calibrated brain model.",
    )
    set_confidence: float | None = Field(
        None, description="Coverage the set is calibrated for, e.g. 0.9."
    )
    set_text: str | None = Field(
        None, description='The set in words: "VeryMildDemented or MildDemented (90%)".'
    )
    brain_model: str | None = Field(
        None,
        description="The brain model's aggregator (logistic, pool), or "
        '"pool (no brain model stored)" for a model logged without one.',
    )
    pooled_stage: str | None = Field(
        None, description="The fixed pooling rule's stage (`aggregate`), the reference."
    )
    pooled_probabilities: dict[str, float] | None = Field(
        None, description="The fixed pooling rule's probability per class."
    )
    aggregate: str | None = Field(
        None, description="The reference pooling rule: mean_log, mean or vote."
    )
    n_slices: int | None = Field(None, description="Slices (or files) the brain came with.")
    n_slices_used: int | None = Field(
        None, description="Slices the brain-level answer rests on (the rest: `left_out`)."
    )
    csf_fraction: float | None = Field(
        None, description="The brain's mean CSF fraction of the head, measured at full size."
    )
    registration_score: float | None = Field(
        None, description="Correlation with MNI152 after affine registration (0..1)."
    )
    qc: dict[str, float | int | str] | None = Field(
        None, description="Per-volume measurements (voxel size, brain volume, tissue fractions)."
    )
    slices: list[SlicePrediction] | None = None

    @property
    def no_brain_model(self) -> bool:
        """Answered by the fixed pooling rule because the model stores no brain model."""
        return self.brain_model == NO_BRAIN_MODEL

    @property
    def informative_slices(self) -> list[int]:
        """The informative slices, most informative first: highest probability of the
        brain's stage, ties to the lower index (how they were chosen)."""
        if self.stage is None:
            return []
        chosen = [s for s in self.slices or [] if s.informative and s.probabilities]
        chosen.sort(key=lambda s: (-(s.probabilities or {})[self.stage], s.index))
        return [s.index for s in chosen]


class Summary(BaseModel):
    """Batch statistics over the files that could be read."""

    n_images: int
    n_predicted: int
    n_errors: int
    stage_counts: dict[str, int]
    stage_fractions: dict[str, float]
    mean_probabilities: dict[str, float]
    mean_confidence: float | None
    min_confidence: float | None
    low_confidence_threshold: float
    n_low_confidence: int
    low_confidence_files: list[str]
    n_out_of_distribution: int = Field(0, description="Readable but not like the training slices.")
    out_of_distribution_files: list[str] = Field(default_factory=list)
    n_seen_in_training: int = Field(0, description="Near-duplicates of training slices.")
    seen_in_training_files: list[str] = Field(default_factory=list)


def scored(classes: Sequence[str], probs: np.ndarray, low_confidence: float) -> dict[str, Any]:
    """Stage, confidence, low-confidence flag and per-class probabilities of one output."""
    k = int(np.argmax(probs))
    return {
        "stage": classes[k],
        "confidence": float(probs[k]),
        "low_confidence": bool(probs[k] < low_confidence),
        "probabilities": {c: float(v) for c, v in zip(classes, probs, strict=True)},
    }


def summarize(
    predictions: Sequence[Prediction], classes: Sequence[str], low_confidence: float
) -> Summary:
    """Batch statistics: stage distribution, mean confidence, which images are unsure.

    The mean probability per class is reported too: unlike the count of argmax stages,
    it does not hide a batch that is split 51/49 between two neighbouring stages.
    """
    readable = [p for p in predictions if not p.error]
    ood = [p.filename for p in readable if p.out_of_distribution_flag]
    seen = [p.filename for p in readable if p.seen_in_training_flag]
    ok = [p for p in readable if not p.out_of_distribution_flag]
    n_ok = len(ok)
    counts = {c: sum(p.stage == c for p in ok) for c in classes}
    confidences = [p.confidence for p in ok if p.confidence is not None]
    low = [p.filename for p in ok if p.low_confidence]

    def mean_probability(c: str) -> float:
        values = [p.probabilities[c] for p in ok if p.probabilities and c in p.probabilities]
        return float(np.mean(values)) if values else 0.0

    return Summary(
        n_images=len(predictions),
        n_predicted=n_ok,
        n_errors=len(predictions) - len(readable),
        n_out_of_distribution=len(ood),
        out_of_distribution_files=ood,
        n_seen_in_training=len(seen),
        seen_in_training_files=seen,
        stage_counts=counts,
        stage_fractions={c: (counts[c] / n_ok if n_ok else 0.0) for c in classes},
        mean_probabilities={c: mean_probability(c) for c in classes},
        mean_confidence=float(np.mean(confidences)) if confidences else None,
        min_confidence=float(np.min(confidences)) if confidences else None,
        low_confidence_threshold=low_confidence,
        n_low_confidence=len(low),
        low_confidence_files=low,
    )


# --------------------------------------------------------------------------- CLI renderings

CHECK_COLUMNS = ("out_of_distribution", "ood_reason", "seen_in_training", "training_correlation")
VOLUME_COLUMNS = (
    "n_slices",
    "aggregate",
    "registration_score",
    "n_slices_used",
    "brain_model",
    "pooled_stage",
    "set_text",
)
# Per-slice fields in --format json: a volume's slices have a z, a brain's files a name.
SLICE_DETAIL = {
    "volume": {"index", "z_mm", "stage", "probabilities"},
    "brain": {"index", "filename", "stage", "probabilities", "out_of_distribution", "left_out"},
}
BRAIN_DETAIL = (
    "prediction_set",
    "set_confidence",
    "set_text",
    "brain_model",
    "pooled_stage",
    "pooled_probabilities",
    "n_slices",
    "n_slices_used",
    "csf_fraction",
)


def records(
    predictions: Sequence[Prediction], classes: Sequence[str], gradcam: bool = False
) -> list[dict[str, Any]]:
    """One flat row per input, the table ``alzstage predict`` prints as JSON or CSV.

    Columns: ``file``, ``stage``, ``confidence``, ``low_confidence``, ``error``, one per
    class, then the input check's columns when there are images, ``kind`` (image, volume
    or brain) and the brain-level columns when there are volumes or brains (the set in
    words, ``set_text``; the pooled reference stage), and ``gradcam`` with ``--gradcam``. The
    columns depend only on the kinds of inputs, never on which of them failed. A field
    that does not apply is null; ``stage``, ``error`` and ``gradcam`` are "" instead.
    """
    has_images = any(isinstance(p, ImagePrediction) for p in predictions)
    has_volumes = any(isinstance(p, VolumePrediction) for p in predictions)
    rows = []
    for p in predictions:
        row: dict[str, Any] = {
            "file": p.filename,
            "stage": p.stage or "",
            "confidence": p.confidence,
            "low_confidence": bool(p.low_confidence),
            "error": p.error or "",
        }
        row.update({c: (p.probabilities or {}).get(c) for c in classes})
        if has_images:
            checked = isinstance(p, ImagePrediction) and not p.error
            row.update({k: getattr(p, k) if checked else None for k in CHECK_COLUMNS})
            if checked:  # an unchecked model's images: no reason, as for a valid image
                row["ood_reason"] = row["ood_reason"] or ""
        if has_volumes:
            row["kind"] = p.kind if isinstance(p, VolumePrediction) else "image"
            row.update({k: getattr(p, k, None) for k in VOLUME_COLUMNS})
        if gradcam:
            row["gradcam"] = ";".join(overlay_files(p))
        rows.append(row)
    return rows


def overlay_files(p: Prediction) -> list[str]:
    """The Grad-CAM overlays of one input: an image's one, a volume's per informative slice."""
    if isinstance(p, VolumePrediction):
        by_index = {s.index: s.gradcam for s in p.slices or []}
        return [g for i in p.informative_slices if (g := by_index.get(i))]
    gradcam = getattr(p, "gradcam", None)
    return [gradcam] if gradcam else []


def volume_details(volumes: Sequence[VolumePrediction], gradcam: bool = False) -> list[dict]:
    """Brain-level answer (set included), per-slice probabilities and QC of each volume
    or brain, for ``--format json`` (no pixels)."""
    out: list[dict[str, Any]] = []
    for v in volumes:
        if v.error:
            out.append({"file": v.filename, "kind": v.kind, "error": v.error})
            continue
        detail = {
            "file": v.filename,
            "kind": v.kind,
            "stage": v.stage,
            "confidence": v.confidence,
            "probabilities": v.probabilities,
            **{k: getattr(v, k) for k in BRAIN_DETAIL},
            "aggregate": v.aggregate,
            "informative_slices": v.informative_slices,
            "qc": v.qc,
            "slices": [
                s.model_dump(mode="json", include=SLICE_DETAIL.get(v.kind, SLICE_DETAIL["volume"]))
                for s in v.slices or []
            ],
        }
        if gradcam:
            detail["gradcam"] = overlay_files(v)
        out.append(detail)
    return out


P = TypeVar("P", bound=Prediction)


def failed(index: int, name: str, exc: ImageReadError, kind: type[P]) -> P:
    """The result of an input that could not be used: its status and why."""
    return kind(index=index, filename=name, status=int(getattr(exc, "status", 422)), error=str(exc))
