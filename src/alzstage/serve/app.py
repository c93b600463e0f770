"""The REST API and web page behind ``alzstage serve``.

One FastAPI app serves three audiences from the same code path as ``alzstage predict``:
scripts (``POST /predict``), people (the page at ``/``, with Grad-CAM so a prediction can
be questioned, not just read) and operators (``/health``, ``/model``, ``/docs``).

Hardening that matters for a service that decodes images from strangers:

- request bodies and single files have size caps (413), checked before parsing where
  the client sends ``Content-Length`` and while streaming where it does not;
- only JPEG and PNG decoders run, and the pixel count is capped before decoding
  (decompression bombs);
- nothing a client sends (file names included) is used as a path; uploads stay in
  memory or in Starlette's anonymous spooled temp files, closed after each request;
- errors are JSON with a message a person can act on, never a stack trace.

The model loads lazily on first use and is cached; a missing champion is a 503 that
says how to create one, and the server keeps answering ``/health`` meanwhile.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from alzstage.config import NeuroParams, NiftiQCParams

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from alzstage.model.predict import LoadedModel

log = logging.getLogger("alzstage.serve")
STATIC = Path(__file__).parent / "static"
NO_MODEL_HINT = (
    "Run `dvc repro` or `alzstage promote` to create a champion, or start the server with "
    "--model pointing at a version, alias or path."
)
# The page is self-contained: scripts, styles and images only from this server (or
# data:/blob: URLs it makes itself). This also blocks any injected inline script.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class ServeSettings:
    """Everything the app needs, resolved by the CLI (or a test) before it starts.

    ``classes`` and ``input_size`` are only used for a bare ``.keras`` model; a registry
    model carries its own in the pyfunc.
    """

    model_uri: str = "models:/alzstage-demo@champion"
    model_choice: str = ""  # why this model (predict.ModelChoice.reason), shown by /model
    tracking_uri: str | None = None
    registry_uri: str | None = None
    classes: list[str] = field(
        default_factory=lambda: [
            "NonDemented",
            "VeryMildDemented",
            "MildDemented",
            "ModerateDemented",
        ]
    )
    input_size: tuple[int, int] = (112, 96)
    low_confidence: float = 0.5
    max_file_bytes: int = 20 * 2**20
    max_request_bytes: int = 200 * 2**20
    max_files: int = 64
    max_pixels: int = 4096 * 4096
    # NIfTI volumes (POST /predict/volume): how they are cut into slices and judged.
    max_volume_bytes: int = 128 * 2**20
    neuro: NeuroParams = field(default_factory=NeuroParams)
    nifti_qc: NiftiQCParams = field(default_factory=NiftiQCParams)
    image_size: tuple[int, int] = (208, 176)


# --------------------------------------------------------------------------- schema


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


class ModelResponse(BaseModel):
    uri: str
    name: str | None
    version: str | None
    alias: str | None
    dataset: str | None = Field(None, description="Dataset the model was trained on.")
    recipe: str | None = Field(None, description="Training recipe: scratch or transfer.")
    backbone: str | None = None
    synthetic_demo: bool = Field(
        False, description="True when trained on the synthetic demo images, not real MRI."
    )
    provenance: str = Field("", description="Dataset and recipe as one line.")
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


class HealthResponse(BaseModel):
    status: str
    model_loaded: bool


ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "Request, file or file count over the limit."},
    415: {"model": ErrorResponse, "description": "No file was a JPEG or PNG (or a NIfTI)."},
    422: {"model": ErrorResponse, "description": "Malformed request or no usable image."},
    503: {"model": ErrorResponse, "description": "No model to serve (no champion yet)."},
}


# --------------------------------------------------------------------------- model cache


class ModelCache:
    """Load the model once, on first use, and share it between requests.

    A failed load is not cached: after ``alzstage promote`` the next request succeeds
    without restarting the server. Inference holds a lock because one Keras model is
    not guaranteed to be safe under concurrent ``predict`` calls, and on a CPU box
    parallel calls would only compete for the same cores.
    """

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self._model: LoadedModel | None = None
        self._load_lock = threading.Lock()
        self.infer_lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def get(self) -> LoadedModel:
        if self._model is None:
            with self._load_lock:
                if self._model is None:
                    from alzstage.model.predict import LoadedModel

                    s = self.settings
                    self._model = LoadedModel(
                        s.model_uri,
                        s.classes,
                        s.input_size,
                        tracking_uri=s.tracking_uri,
                        registry_uri=s.registry_uri,
                    )
                    log.info("loaded %s", self._model.info.label)
        return self._model


# --------------------------------------------------------------------------- body limit


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, before the multipart parser runs.

    A declared ``Content-Length`` is checked up front; a chunked body is counted as it
    streams in and cut off at the limit, so neither can fill the disk with temp files.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _detail(self) -> str:
        return (
            f"request body is over the limit of {self.max_bytes:,} bytes; send fewer or "
            "smaller files per request, or start the server with a larger --max-request-mb"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                await JSONResponse({"detail": "invalid Content-Length header"}, 400)(
                    scope, receive, send
                )
                return
            if too_big:
                await JSONResponse({"detail": self._detail()}, 413)(scope, receive, send)
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, self._detail())
            return message

        await self.app(scope, counted, send)


# --------------------------------------------------------------------------- helpers


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


@dataclass
class _Upload:
    index: int
    filename: str
    data: bytes | None = None
    error: str | None = None
    status: int = 200


def _run_batch(
    cache: ModelCache, uploads: list[_Upload], want_gradcam: bool
) -> tuple[LoadedModel, list[FileResult]]:
    """Decode, predict and explain one request's files (runs in a worker thread)."""
    import numpy as np

    from alzstage.model.inputs import ImageReadError, to_model_array
    from alzstage.model.predict import decode_image, display_image, prediction_row

    model = cache.get()
    s = cache.settings
    results: dict[int, FileResult] = {}
    good: list[tuple[_Upload, np.ndarray]] = []
    for up in uploads:
        if up.error is None:
            try:
                good.append((up, decode_image(up.data or b"", s.max_pixels, up.filename)))
            except ImageReadError as exc:
                up.error = str(exc)
                up.status = int(getattr(exc, "status", 422))
            finally:
                up.data = None  # drop the raw bytes as soon as they are decoded
        if up.error is not None:
            results[up.index] = FileResult(
                index=up.index, filename=up.filename, status=up.status, error=up.error
            )
    if good:
        batch = np.stack([to_model_array(g, model.size) for _, g in good])
        with cache.infer_lock:
            probs = model.predict(batch)
            overlays = (
                model.gradcam_overlays(batch, [display_image(g) for _, g in good])
                if want_gradcam
                else [None] * len(good)
            )
        for (up, gray), p, ov in zip(good, probs, overlays, strict=True):
            row = prediction_row(model.classes, p, s.low_confidence)
            results[up.index] = FileResult(
                index=up.index,
                filename=up.filename,
                status=200,
                stage=row["stage"],
                confidence=row["confidence"],
                low_confidence=row["low_confidence"],
                probabilities={c: row[c] for c in model.classes},
                gradcam=None if ov is None else _png_data_url(ov),
                width=int(gray.shape[1]),
                height=int(gray.shape[0]),
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


def _run_volumes(
    cache: ModelCache, uploads: list[_Upload], want_gradcam: bool
) -> tuple[LoadedModel, list[VolumeResult]]:
    """Preprocess (no lock: CPU-heavy, model-free), then predict under the model lock."""
    from alzstage.model.inputs import ImageReadError
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
                    up.data or b"", s.neuro, s.nifti_qc, s.image_size, up.filename
                )
            except ImageReadError as exc:
                up.error = str(exc)
                up.status = int(getattr(exc, "status", 422))
            finally:
                up.data = None
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


def _summary(model: LoadedModel, results: list[Any], threshold: float) -> Summary:
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
        }
        row.update(r.probabilities or {})
        rows.append(row)
    return Summary(**summarize(pd.DataFrame(rows), model.classes, threshold))


def _failure(results: list[Any]) -> JSONResponse:
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


def _model_ref(model: LoadedModel) -> ModelRef:
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


# --------------------------------------------------------------------------- app


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    """Build the app; nothing is loaded until the first request that needs the model."""
    from fastapi_offline import FastAPIOffline

    from alzstage import __version__ as pkg_version
    from alzstage.model.predict import ModelNotFound

    settings = settings or ServeSettings()
    cache = ModelCache(settings)
    # FastAPIOffline serves Swagger UI / ReDoc from the installed package, not a CDN,
    # so /docs works on an air-gapped machine like the page does.
    app = FastAPIOffline(
        title="alzstage",
        version=pkg_version,
        description=(
            "Alzheimer's-stage classification of brain MRI slices with calibrated "
            "probabilities and Grad-CAM. **Research use only; not a diagnosis.**"
        ),
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.settings = settings
    app.state.model_cache = cache
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(ModelNotFound)
    async def _no_model(request: Request, exc: ModelNotFound) -> JSONResponse:
        return JSONResponse({"detail": f"{exc}. {NO_MODEL_HINT}"}, status_code=503)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'request'}: "
            f"{e.get('msg', 'invalid')}"
            for e in exc.errors()
        )
        return JSONResponse(
            {
                "detail": f"{problems}. Send images as multipart/form-data, one or more "
                "parts named 'files'."
            },
            status_code=422,
        )

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            {"detail": f"internal error ({type(exc).__name__}); see the server log"},
            status_code=500,
        )

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(
            STATIC / "index.html",
            headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff"},
        )

    @app.get("/health", response_model=HealthResponse, summary="Liveness")
    async def health() -> HealthResponse:
        """Always 200 while the process runs; says whether the model is loaded yet."""
        return HealthResponse(status="ok", model_loaded=cache.loaded)

    @app.get(
        "/model",
        response_model=ModelResponse,
        responses={503: ERRORS[503]},
        summary="The model being served and its evaluation metrics",
    )
    async def model_info() -> ModelResponse:
        """Name, version and alias of the loaded model, the dataset and recipe it was
        trained on (``synthetic_demo`` flags the demo images), with the test metrics and
        split protocol that ``promote`` recorded on the registry version. Loads the model
        if needed, so the page can show the version before the first upload."""
        model = await run_in_threadpool(cache.get)
        info = model.info
        return ModelResponse(
            uri=info.uri,
            name=info.name,
            version=info.version,
            alias=info.alias,
            dataset=info.dataset,
            recipe=info.recipe,
            backbone=info.tags.get("backbone") or None,
            synthetic_demo=info.synthetic_demo,
            provenance=info.provenance,
            chosen_because=settings.model_choice,
            classes=model.classes,
            input_size=list(model.size),
            temperature=model.temperature,
            low_confidence_threshold=settings.low_confidence,
            metrics=info.metrics,
            split_strategy=info.split_strategy,
            split_leaky=info.split_leaky,
        )

    async def _read_uploads(
        files: list[UploadFile], max_bytes: int, how_to_fix: str
    ) -> list[_Upload]:
        """Read every upload up to ``max_bytes`` (+1 to detect "too big"); always close them.

        An oversized file becomes a per-file 413 so the rest of the batch still runs;
        too many files fail the whole request, before anything is read.
        """
        try:
            if len(files) > settings.max_files:
                raise HTTPException(
                    413,
                    f"{len(files)} files in one request; the limit is {settings.max_files}. "
                    "Split the batch or start the server with a larger --max-files",
                )
            uploads = []
            for i, f in enumerate(files):
                up = _Upload(index=i, filename=display_name(f.filename, i))
                data = await f.read(max_bytes + 1)
                if len(data) > max_bytes:
                    up.error = (
                        f"{up.filename}: file is over the limit of {max_bytes:,} bytes; "
                        f"{how_to_fix}"
                    )
                    up.status = 413
                else:
                    up.data = data
                uploads.append(up)
            return uploads
        finally:
            for f in files:
                await f.close()

    async def _answer(
        uploads: list[_Upload], run: Any, result_type: Any, response_type: Any, gradcam: bool
    ) -> JSONResponse:
        """Run the uploads that could be read; fail the request only if none gave a result."""
        if all(up.error for up in uploads):  # nothing to decode: no need for the model
            return _failure(
                [
                    result_type(index=u.index, filename=u.filename, status=u.status, error=u.error)
                    for u in uploads
                ]
            )
        model, results = await run_in_threadpool(run, cache, uploads, gradcam)
        if any(r.status == 200 for r in results):
            body = response_type(
                model=_model_ref(model),
                classes=model.classes,
                predictions=results,
                summary=_summary(model, results, settings.low_confidence),
            )
            return JSONResponse(body.model_dump(mode="json"))
        return _failure(results)

    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses=ERRORS,
        summary="Predict the stage of one or many uploaded slices",
    )
    async def predict(
        files: Annotated[
            list[UploadFile], File(min_length=1, description="One or more JPEG/PNG MRI slices.")
        ],
        gradcam: Annotated[
            bool, Query(description="Add a Grad-CAM overlay (PNG data URL) per image.")
        ] = False,
    ) -> JSONResponse:
        """Each file is judged on its own: unreadable files get a per-file ``status`` and
        ``error`` while the others still get a stage. The request itself fails (413, 415
        or 422, with every file's outcome) only when no file could be used."""
        uploads = await _read_uploads(
            files,
            settings.max_file_bytes,
            "downscale it or start the server with a larger --max-upload-mb",
        )
        return await _answer(uploads, _run_batch, FileResult, PredictResponse, gradcam)

    @app.post(
        "/predict/volume",
        response_model=VolumeResponse,
        responses=ERRORS,
        summary="Subject-level stage of one or many uploaded NIfTI volumes",
    )
    async def predict_volume(
        files: Annotated[
            list[UploadFile],
            File(min_length=1, description="One or more 3D NIfTI volumes (.nii or .nii.gz)."),
        ],
        gradcam: Annotated[
            bool,
            Query(description="Add Grad-CAM overlays on the most informative slices."),
        ] = False,
    ) -> JSONResponse:
        """Each volume is registered to MNI152, cut into the training slice format
        (``neuro.preprocess``), checked against ``validate.nifti`` and given one stage
        pooled from its slices (``neuro.aggregate``), with every slice's probabilities
        and image. Volumes fail independently, with a per-file ``status`` and ``error``
        naming the problem and the fix (415 not NIfTI, 422 unusable, 413 too large)."""
        uploads = await _read_uploads(
            files, settings.max_volume_bytes, "start the server with a larger --max-volume-mb"
        )
        return await _answer(uploads, _run_volumes, VolumeResult, VolumeResponse, gradcam)

    return app
