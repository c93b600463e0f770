"""The REST API's request and response types: the contract ``/docs`` publishes.

One place for every field a client sees, so the OpenAPI schema, the page and the tests
read the same names (``tests/test_serve.py`` checks responses against the schema).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


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


class FileResult(BaseModel):
    """The outcome for one uploaded file; files fail independently of each other."""

    index: int = Field(description="Position of the file in the request.")
    filename: str = Field(description="Client file name, for display only (never used on disk).")
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
    gradcam: str | None = Field(
        None, description="Grad-CAM overlay of the predicted class as a data:image/png URL."
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


class SliceResult(BaseModel):
    """One axial slice of a volume, in the training image format."""

    index: int = Field(description="Slice number, inferior to superior.")
    z_mm: float = Field(description="MNI z coordinate of the slice in mm.")
    stage: str = Field(description="The slice's own most probable stage.")
    confidence: float
    probabilities: dict[str, float]
    informative: bool = Field(
        description="One of the neuro.gradcam_slices slices that most support the volume's stage."
    )
    image: str = Field(description="The slice as the model saw it, a data:image/png URL.")
    gradcam: str | None = Field(
        None, description="Grad-CAM of the volume's stage on this slice (informative slices)."
    )


class VolumeResult(BaseModel):
    """The subject-level outcome for one uploaded NIfTI volume."""

    index: int = Field(description="Position of the file in the request.")
    filename: str = Field(description="Client file name, for display only (never used on disk).")
    status: int = Field(description="200, or the HTTP status this file alone would get.")
    error: str | None = Field(None, description="Why the volume could not be used.")
    stage: str | None = Field(None, description="Subject-level stage pooled from the slices.")
    confidence: float | None = None
    low_confidence: bool | None = None
    probabilities: dict[str, float] | None = Field(
        None, description="Pooled probability per class, in class order."
    )
    aggregate: str | None = Field(None, description="Pooling rule: mean_log, mean or vote.")
    n_slices: int | None = None
    registration_score: float | None = Field(
        None, description="Correlation with MNI152 after affine registration (0..1)."
    )
    qc: dict[str, float | int | str] | None = Field(
        None, description="Per-volume measurements (voxel size, brain volume, tissue fractions)."
    )
    slices: list[SliceResult] | None = None


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


class PredictResponse(BaseModel):
    model: ModelRef
    classes: list[str]
    predictions: list[FileResult]
    summary: Summary


class VolumeResponse(BaseModel):
    model: ModelRef
    classes: list[str]
    predictions: list[VolumeResult]
    summary: Summary


class ErrorResponse(BaseModel):
    """Every error: a message saying what went wrong and how to fix it."""

    detail: str
    predictions: list[FileResult] | None = Field(
        None, description="Per-file outcomes, when the request got as far as reading files."
    )


class ModelResponse(ModelRef):
    """``ModelRef`` (the same facts every prediction carries) plus what the page shows."""

    backbone: str | None = None
    chosen_because: str = Field(
        "", description="Why the server serves this model (the configured dataset's champion)."
    )
    classes: list[str]
    input_size: list[int]
    temperature: float = Field(description="Calibration temperature applied to every output.")
    low_confidence_threshold: float
    metrics: dict[str, float] = Field(
        description="Test-split metrics from the registry tags (balanced_accuracy, macro_f1, "
        "accuracy)."
    )
    split_strategy: str | None = None
    split_leaky: bool | None = Field(
        None, description="True when those metrics come from a leaky (slice-level) split."
    )
    input_check: dict[str, Any] | None = Field(
        None,
        description="The out-of-distribution check stored with the model: what it was fitted "
        "on (training image count and sizes) and the bounds it applies; null when the model "
        "was stored without one (its answers are then unchecked).",
    )


class HealthResponse(BaseModel):
    status: str
    model_loaded: bool


ERRORS: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorResponse, "description": "A POST from a page on another origin."},
    413: {"model": ErrorResponse, "description": "Request, file or file count over the limit."},
    415: {"model": ErrorResponse, "description": "No file was a JPEG or PNG (or a NIfTI)."},
    422: {"model": ErrorResponse, "description": "Malformed request or no usable image."},
    503: {
        "model": ErrorResponse,
        "description": "No model to serve (no champion yet), or the server is busy: every "
        "inference slot and queue place is taken (retry after `Retry-After` seconds).",
    },
}
