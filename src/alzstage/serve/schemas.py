"""The REST API's request and response types: the contract ``/docs`` publishes.

One place for every field a client sees, so the OpenAPI schema, the page and the tests
read the same names (``tests/serve/test_serve.py`` checks responses against the schema). The
per-file results are :mod:`alzstage.inference.prediction`'s types, the ones ``alzstage
predict`` renders, re-exported here with the responses that carry them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

# The per-file results are the one prediction type the CLI renders too; re-exported.
from alzstage.inference.prediction import (
    ImagePrediction,
    ModelRef,
    SlicePrediction,
    Summary,
    VolumePrediction,
)

__all__ = [
    "ERRORS",
    "ErrorResponse",
    "HealthResponse",
    "ImagePrediction",
    "ModelRef",
    "ModelResponse",
    "PredictResponse",
    "SlicePrediction",
    "Summary",
    "VolumePrediction",
    "VolumeResponse",
]


class PredictResponse(BaseModel):
    model: ModelRef
    classes: list[str]
    predictions: list[ImagePrediction]
    summary: Summary


class VolumeResponse(BaseModel):
    model: ModelRef
    classes: list[str]
    predictions: list[VolumePrediction]
    summary: Summary


class ErrorResponse(BaseModel):
    """Every error: a message saying what went wrong and how to fix it."""

    detail: str
    predictions: list[ImagePrediction] | None = Field(
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


class ServerLimits(BaseModel):
    """The limits this server runs with (the flags of ``alzstage serve``), so an operator
    can check a deployment from outside."""

    max_file_bytes: int = Field(description="Largest image file (--max-upload-mb).")
    max_request_bytes: int = Field(description="Largest request body (--max-request-mb).")
    max_files: int = Field(description="Most files in one request (--max-files).")
    max_volume_bytes: int = Field(description="Largest NIfTI volume (--max-volume-mb).")
    max_pixels: int = Field(description="Most pixels in one image (--max-pixels).")
    max_request_pixels: int = Field(
        description="Most decoded pixels of one request's images (--max-request-pixels)."
    )
    max_concurrent: int = Field(description="Prediction requests run at once (--max-concurrent).")
    max_queued: int = Field(description="Prediction requests that may wait (--max-queued).")
    allowed_origins: list[str] = Field(description="Other origins that may POST (--allow-origin).")
    allowed_hosts: list[str] = Field(description="Extra Host names on loopback (--allow-host).")
    max_filename_header_bytes: int = Field(
        description="Longest multipart part header, file name included (the parser's limit)."
    )
    shown_filename_chars: int = Field(description="File names are echoed cut to this length.")
    body_timeout_s: float = Field(description="A request body that stalls this long gets 408.")


class HealthResponse(BaseModel):
    status: str
    model_loaded: bool
    limits: ServerLimits | None = None


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
