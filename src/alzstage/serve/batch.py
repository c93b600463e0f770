"""One request's uploads in, per-file results out: what ``POST /predict`` and
``POST /predict/volume`` run in a worker thread.

Kept apart from :mod:`alzstage.serve.routes` (the endpoints) because this is
where memory is decided: each upload is read, decoded (shrunk while decoding, within
the request's pixel budget), checked against the training images and only then
predicted, one file at a time, so a request holds one upload's bytes at most.
"""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from fastapi.responses import JSONResponse

from alzstage.errors import ImageReadError
from alzstage.serve.schemas import (
    ErrorResponse,
    FileResult,
    ModelRef,
    ModelResponse,
    SliceResult,
    Summary,
    VolumeResult,
)

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from alzstage.model.inputs import DecodedImage
    from alzstage.model.predict import LoadedModel
    from alzstage.serve.state import ModelCache, ServeSettings


def display_name(raw: str | None, index: int) -> str:
    """A client file name made safe to echo back: last path part, printable, bounded."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = re.sub(r"[\x00-\x1f\x7f]", "", name).strip()[:200]
    return name or f"file-{index + 1}"


def _png_data_url(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class UploadTooLarge(ImageReadError):
    """One file over the size cap (HTTP 413); the rest of the batch still runs."""

    status = 413


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
        """The file's bytes, up to ``max_bytes``; :class:`UploadTooLarge` beyond."""
        assert self.file is not None
        self.file.seek(0)
        data = self.file.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise UploadTooLarge(self.too_large())
        return data

    def too_large(self) -> str:
        return (
            f"{self.filename}: file is over the limit of {self.max_bytes:,} bytes; "
            f"{self.how_to_fix}"
        )


def failed_result(up: Upload) -> FileResult:
    return FileResult(index=up.index, filename=up.filename, status=up.status, error=up.error)


def _decode_all(uploads: list[Upload], s: ServeSettings) -> list[tuple[Upload, DecodedImage]]:
    """Read and decode one file at a time, shrunk while decoding: at most one upload's
    bytes are in memory at once, and what is kept per image is at most 512 px a side."""
    from alzstage.model.inputs import PixelBudget, decode_slice
    from alzstage.model.predict import DISPLAY_MAX_SIDE

    budget = PixelBudget(s.max_request_pixels)
    decoded = []
    for up in uploads:
        if up.error is not None:
            continue
        try:
            image = decode_slice(up.read(), s.max_pixels, up.filename, DISPLAY_MAX_SIDE, budget)
            decoded.append((up, image))
        except ImageReadError as exc:
            up.fail(exc)
    return decoded


def run_batch(
    cache: ModelCache, uploads: list[Upload], want_gradcam: bool
) -> tuple[LoadedModel | None, list[FileResult]]:
    """Decode, check, predict and explain one request's files (runs in a worker thread).

    Files that cannot be decoded fail alone; files the input check flags get
    ``out_of_distribution`` and no stage; the rest are predicted in one batch. The
    model is only loaded when some file could be decoded.
    """
    import numpy as np

    from alzstage.model.inputs import to_model_array
    from alzstage.model.predict import display_image, prediction_row

    s = cache.settings
    decoded = _decode_all(uploads, s)
    results = {up.index: failed_result(up) for up in uploads if up.error is not None}
    if not decoded:
        return None, [results[i] for i in sorted(results)]
    model = cache.get()
    checks = model.check([d.gray for _, d in decoded], [(d.height, d.width) for _, d in decoded])
    good = []
    for (up, image), check in zip(decoded, checks, strict=True):
        fields = {} if check is None else check.as_dict()
        size = {"width": image.width, "height": image.height}
        base = {"index": up.index, "filename": up.filename, "status": 200, **size, **fields}
        if check is not None and check.out_of_distribution:
            results[up.index] = FileResult(**base)
        else:
            good.append((base, image))
    if good:
        batch = np.stack([to_model_array(image.gray, model.size) for _, image in good])
        with cache.infer_lock:
            probs = model.predict(batch)
            overlays = (
                model.gradcam_overlays(batch, [display_image(image.gray) for _, image in good])
                if want_gradcam
                else [None] * len(good)
            )
        for (base, _), p, ov in zip(good, probs, overlays, strict=True):
            row = prediction_row(model.classes, p, s.low_confidence)
            results[base["index"]] = FileResult(
                **base,
                stage=row["stage"],
                confidence=row["confidence"],
                low_confidence=row["low_confidence"],
                probabilities={c: row[c] for c in model.classes},
                gradcam=None if ov is None else _png_data_url(ov),
            )
    return model, [results[i] for i in sorted(results)]


def _slice_results(pred: Any) -> list[SliceResult]:
    import numpy as np

    out = []
    for i, (z, p) in enumerate(zip(pred.z_mm, pred.slice_probabilities, strict=True)):
        k = int(np.argmax(p))
        overlay = pred.overlays.get(i)
        out.append(
            SliceResult(
                index=i,
                z_mm=round(float(z), 2),
                stage=pred.classes[k],
                confidence=float(p[k]),
                probabilities={c: float(v) for c, v in zip(pred.classes, p, strict=True)},
                informative=i in pred.informative,
                image=_png_data_url(pred.slices[i]),
                gradcam=None if overlay is None else _png_data_url(overlay),
            )
        )
    return out


def run_volumes(
    cache: ModelCache, uploads: list[Upload], want_gradcam: bool
) -> tuple[LoadedModel, list[VolumeResult]]:
    """Preprocess (no lock: CPU-heavy, model-free), then predict under the model lock.

    One volume at a time, its upload read only then: the bytes and the full-resolution
    arrays of one volume are all that is ever held (the header is checked first, see
    :func:`alzstage.neuro.volume.load_volume`).
    """
    from alzstage.model.subject import (
        predict_preprocessed,
        preprocess_for_prediction,
        volume_row,
    )

    model = cache.get()
    s = cache.settings
    results: list[VolumeResult] = []
    for up in uploads:
        if up.error is None:
            try:
                pre = preprocess_for_prediction(
                    up.read(), s.neuro, s.nifti_qc, s.image_size, up.filename
                )
            except ImageReadError as exc:
                up.fail(exc)
        if up.error is not None:
            results.append(
                VolumeResult(index=up.index, filename=up.filename, status=up.status, error=up.error)
            )
            continue
        with cache.infer_lock:
            pred = predict_preprocessed(model, pre, s.neuro, up.filename, want_gradcam)
        row = volume_row(pred, s.low_confidence)
        results.append(
            VolumeResult(
                index=up.index,
                filename=up.filename,
                status=200,
                stage=row["stage"],
                confidence=row["confidence"],
                low_confidence=row["low_confidence"],
                probabilities={c: row[c] for c in model.classes},
                aggregate=pred.rule,
                n_slices=row["n_slices"],
                registration_score=row["registration_score"],
                qc={k: v for k, v in pred.qc.items() if isinstance(v, (int, float, str))},
                slices=_slice_results(pred),
            )
        )
    return model, results


def summary(model: LoadedModel, results: list[Any], threshold: float) -> Summary:
    import pandas as pd

    from alzstage.model.predict import summarize

    rows = []
    for r in results:
        row: dict[str, Any] = {
            "filename": r.filename,
            "stage": r.stage or "",
            "confidence": r.confidence if r.confidence is not None else float("nan"),
            "low_confidence": bool(r.low_confidence),
            "error": r.error or "",
            "out_of_distribution": getattr(r, "out_of_distribution", None),
            "seen_in_training": getattr(r, "seen_in_training", None),
        }
        row.update(r.probabilities or {})
        rows.append(row)
    return Summary(**summarize(pd.DataFrame(rows), model.classes, threshold))


def failure(results: list[Any]) -> JSONResponse:
    """No file was usable: answer with their common status (else 422) and every reason."""
    statuses = {r.status for r in results}
    status = statuses.pop() if len(statuses) == 1 else 422
    detail = "no usable image in the request: " + "; ".join(r.error or "" for r in results)
    # Failed volumes carry only the fields of a failed image, so one schema serves both.
    outcomes = [
        FileResult(index=r.index, filename=r.filename, status=r.status, error=r.error)
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
        **model_ref(model).model_dump(),
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


def model_ref(model: LoadedModel) -> ModelRef:
    i = model.info
    return ModelRef(
        uri=i.uri,
        name=i.name,
        version=i.version,
        alias=i.alias,
        dataset=i.dataset,
        recipe=i.recipe,
        synthetic_demo=i.synthetic_demo,
        provenance=i.provenance,
    )
