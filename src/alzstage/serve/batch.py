"""One request's uploads in, per-file results out: what ``POST /predict``,
``POST /predict/volume`` and ``POST /predict/brain`` run in a worker thread.

Kept apart from :mod:`alzstage.serve.routes` (the endpoints) because this is
where memory is decided: each upload is read, decoded (shrunk while decoding, within
the request's pixel budget), checked against the training images and only then
predicted, one file at a time, so a request holds one upload's bytes at most.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, TypeVar

from fastapi.responses import JSONResponse

from alzstage.errors import ImageReadError, RequestTooLarge
from alzstage.inference.prediction import ImagePrediction, Prediction, VolumePrediction
from alzstage.serve.schemas import ErrorResponse, ModelResponse

P = TypeVar("P", bound=Prediction)

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from alzstage.data.images import DecodedImage
    from alzstage.inference.loading import LoadedModel
    from alzstage.serve.state import ModelCache, ServeSettings


SHOWN_NAME_CHARS = 200  # longer client file names are echoed cut to this


def display_name(raw: str | None, index: int) -> str:
    """A client file name made safe to echo back: last path part, printable, bounded."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = re.sub(r"[\x00-\x1f\x7f]", "", name).strip()[:SHOWN_NAME_CHARS]
    return name or f"file-{index + 1}"


def png_data_url(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class Upload:
    """One file part of a request; its bytes are read (once) only when it is processed."""

    index: int
    filename: str
    file: IO[bytes] | None = None
    max_bytes: int = 0
    how_to_fix: str = ""
    error: str | None = None
    status: int = 200

    def fail(self, exc: ImageReadError) -> None:
        self.error = str(exc)
        self.status = int(getattr(exc, "status", 422))

    def read(self) -> bytes:
        """The file's bytes, up to ``max_bytes``; :class:`RequestTooLarge` beyond."""
        assert self.file is not None
        self.file.seek(0)
        data = self.file.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise RequestTooLarge(self.too_large())
        return data

    def too_large(self) -> str:
        return (
            f"{self.filename}: file is over the limit of {self.max_bytes:,} bytes; "
            f"{self.how_to_fix}"
        )


def failed_result(up: Upload, kind: type[P]) -> P:
    """The result of an upload that could not be used: its status and why."""
    return kind(index=up.index, filename=up.filename, status=up.status, error=up.error)


def _decode_all(uploads: list[Upload], s: ServeSettings) -> list[tuple[int, str, DecodedImage]]:
    """Read and decode one file at a time, shrunk while decoding: at most one upload's
    bytes are in memory at once, and what is kept per image is at most 512 px a side."""
    from alzstage.data.images import PixelBudget, decode_slice
    from alzstage.inference.predict import DISPLAY_MAX_SIDE

    budget = PixelBudget(s.max_request_pixels)
    decoded = []
    for up in uploads:
        if up.error is not None:
            continue
        try:
            image = decode_slice(up.read(), s.max_pixels, up.filename, DISPLAY_MAX_SIDE, budget)
            decoded.append((up.index, up.filename, image))
        except ImageReadError as exc:
            up.fail(exc)
    return decoded


def run_batch(
    cache: ModelCache, uploads: list[Upload], want_gradcam: bool
) -> tuple[LoadedModel | None, list[ImagePrediction]]:
    """Decode, check, predict and explain one request's files (runs in a worker thread).

    Files that cannot be decoded fail alone; the rest go through
    :func:`alzstage.inference.predict.predict_decoded`, as ``alzstage predict`` runs them,
    with the model lock held around the model calls. The model is only loaded when some
    file could be decoded.
    """
    from alzstage.inference.predict import predict_decoded

    s = cache.settings
    decoded = _decode_all(uploads, s)
    results = {
        up.index: failed_result(up, ImagePrediction) for up in uploads if up.error is not None
    }
    if not decoded:
        return None, [results[i] for i in sorted(results)]
    model = cache.get()
    overlay_to = (lambda _, rgb: png_data_url(rgb)) if want_gradcam else None
    for r in predict_decoded(model, decoded, s.low_confidence, overlay_to, cache.infer_lock):
        results[r.index] = r
    return model, [results[i] for i in sorted(results)]


def run_volumes(
    cache: ModelCache, uploads: list[Upload], want_gradcam: bool
) -> tuple[LoadedModel, list[VolumePrediction]]:
    """Preprocess (no lock: CPU-heavy, model-free), then predict under the model lock.

    One volume at a time, its upload read only then: the bytes and the full-resolution
    arrays of one volume are all that is ever held (the header is checked first, see
    :func:`alzstage.neuro.volume.load_volume`).
    """
    from alzstage.inference.volume import (
        predict_preprocessed,
        preprocess_for_prediction,
        volume_prediction,
    )

    model = cache.get()
    s = cache.settings
    results: list[VolumePrediction] = []
    for up in uploads:
        if up.error is None:
            try:
                pre = preprocess_for_prediction(
                    up.read(), s.neuro, s.nifti_qc, s.image_size, up.filename
                )
            except ImageReadError as exc:
                up.fail(exc)
        if up.error is not None:
            results.append(failed_result(up, VolumePrediction))
            continue
        with cache.infer_lock:
            pred = predict_preprocessed(model, pre, s.neuro, up.filename, want_gradcam)
        results.append(
            volume_prediction(
                pred,
                up.index,
                up.filename,
                s.low_confidence,
                slice_image=png_data_url,
                overlay_to=lambda _, rgb: png_data_url(rgb),
            )
        )
    return model, results


def run_brain(
    cache: ModelCache, uploads: list[Upload], want_gradcam: bool
) -> tuple[LoadedModel | None, list[VolumePrediction]]:
    """One brain from all the request's slice files (runs in a worker thread).

    Decoded as ``POST /predict`` decodes (one upload's bytes at a time, shrunk while
    decoding, within the request's pixel budget), then
    :func:`alzstage.inference.volume.predict_brain_slices`, as ``alzstage predict --brain``
    runs it: unreadable and out-of-distribution files are left out of the brain and
    listed among its slices. The model is only loaded when some file could be decoded.
    """
    from alzstage.inference.volume import predict_brain_slices

    s = cache.settings
    decoded = _decode_all(uploads, s)
    if not decoded:
        return None, [failed_result(up, VolumePrediction) for up in uploads]
    unreadable = [(up.index, up.filename, up.error or "") for up in uploads if up.error]
    model = cache.get()
    name = f"brain of {len(uploads)} slice file(s)"
    brain = predict_brain_slices(
        model,
        decoded,
        unreadable,
        name,
        s.neuro,
        s.low_confidence,
        slice_image=png_data_url,
        overlay_to=(lambda _, rgb: png_data_url(rgb)) if want_gradcam else None,
        lock=cache.infer_lock,
    )
    return model, [brain]


def failure(results: Sequence[Prediction]) -> JSONResponse:
    """No file was usable: answer with their common status (else 422) and every reason."""
    statuses = {r.status for r in results}
    status = statuses.pop() if len(statuses) == 1 else 422
    detail = "no usable image in the request: " + "; ".join(r.error or "" for r in results)
    # Failed volumes carry only the fields of a failed image, so one schema serves both.
    outcomes = [
        ImagePrediction(index=r.index, filename=r.filename, status=r.status, error=r.error)
        for r in results
    ]
    return JSONResponse(
        ErrorResponse(detail=detail, predictions=outcomes).model_dump(mode="json"),
        status_code=status,
    )


def input_check_summary(model: LoadedModel) -> dict[str, Any] | None:
    """What /model says about the stored input check (not the 32x32 mean slice)."""
    guard = model.bundle.guard
    if guard is None:
        return None
    spec = guard.spec.model_dump(mode="json", exclude={"mean_thumbnail"})
    spec["n_training_thumbnails"] = guard.n_thumbnails
    return spec


def model_response(model: LoadedModel, s: ServeSettings) -> ModelResponse:
    """What ``/model`` says: the model reference plus what the page shows about it."""
    info = model.info
    return ModelResponse(
        **model.info.ref.model_dump(),
        backbone=info.tags.get("backbone") or None,
        chosen_because=s.model_choice,
        classes=model.classes,
        input_size=list(model.size),
        temperature=model.temperature,
        low_confidence_threshold=s.low_confidence,
        metrics=info.metrics,
        split_strategy=info.split_strategy,
        split_leaky=info.split_leaky,
        input_check=input_check_summary(model),
    )
