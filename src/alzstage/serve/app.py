"""The REST API and web page behind ``alzstage serve``.

One FastAPI app serves three audiences from the same code path as ``alzstage predict``:
scripts (``POST /predict``), people (the page at ``/``, with Grad-CAM so a prediction can
be questioned, not just read) and operators (``/health``, ``/model``, ``/docs``).

Hardening that matters for a service that decodes images from strangers
(``docs/threat-model.md`` has the full list, with what is *not* defended):

- request bodies and single files have size caps (413), checked before parsing where
  the client sends ``Content-Length`` and while streaming where it does not;
- only JPEG and PNG decoders run; the pixel count is capped per file and per request
  before decoding (decompression bombs), and large images are shrunk while decoding;
- NIfTI volumes are judged from their header (dimensions, data type, voxel count)
  before a voxel is read (:mod:`alzstage.neuro.volume`);
- at most ``max_concurrent`` prediction requests run and ``max_queued`` wait; more get
  503, and freed memory goes back to the OS when the server is idle again;
- each image is checked against the training images (:mod:`alzstage.model.ood`): one
  that is not like them gets ``out_of_distribution`` and no stage;
- cross-origin POSTs and DNS-rebound Host names are refused, and every response says
  ``X-Content-Type-Options: nosniff`` (:mod:`alzstage.serve.guards`);
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
from typing import IO, TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from alzstage.config import NeuroParams, NiftiQCParams
from alzstage.errors import ImageReadError
from alzstage.serve.guards import (
    SECURITY_HEADERS,
    BodyLimit,
    InferenceGate,
    OriginGuard,
    SecurityHeaders,
)
from alzstage.serve.memory import release_memory
from alzstage.serve.schemas import (
    ERRORS,
    ErrorResponse,
    FileResult,
    HealthResponse,
    ModelRef,
    ModelResponse,
    PredictResponse,
    SliceResult,
    Summary,
    VolumeResponse,
    VolumeResult,
)

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from alzstage.model.inputs import DecodedImage
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
    # Decoded pixels (from the headers) of all images in one request together: four
    # maximum-size images, or 64 slices of 1024 x 1024. Without it, 64 files of 4096^2
    # passed every per-file cap and cost 1 GB (issue 16).
    max_request_pixels: int = 4 * 4096 * 4096
    # Prediction requests running at once, and waiting; more get 503. Two overlap one
    # request's decoding with another's inference; more would only share the same cores
    # while multiplying peak memory.
    max_concurrent: int = 2
    max_queued: int = 8
    # Origins besides this server's own that may POST (e.g. a team's dashboard), and
    # Host names besides loopback ones served over loopback (e.g. behind a local proxy).
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    # NIfTI volumes (POST /predict/volume): how they are cut into slices and judged.
    max_volume_bytes: int = 128 * 2**20
    neuro: NeuroParams = field(default_factory=NeuroParams)
    nifti_qc: NiftiQCParams = field(default_factory=NiftiQCParams)
    image_size: tuple[int, int] = (208, 176)


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


class UploadTooLarge(ImageReadError):
    """One file over the size cap (HTTP 413); the rest of the batch still runs."""

    status = 413


@dataclass
class _Upload:
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


def _failed(up: _Upload) -> FileResult:
    return FileResult(index=up.index, filename=up.filename, status=up.status, error=up.error)


def _decode_all(uploads: list[_Upload], s: ServeSettings) -> list[tuple[_Upload, DecodedImage]]:
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


def _run_batch(
    cache: ModelCache, uploads: list[_Upload], want_gradcam: bool
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
    results = {up.index: _failed(up) for up in uploads if up.error is not None}
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


def _run_volumes(
    cache: ModelCache, uploads: list[_Upload], want_gradcam: bool
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
            "out_of_distribution": getattr(r, "out_of_distribution", None),
            "seen_in_training": getattr(r, "seen_in_training", None),
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


def _input_check_summary(model: LoadedModel) -> dict[str, Any] | None:
    """What /model says about the stored input check (not the 32x32 mean slice)."""
    guard = model.bundle.guard
    if guard is None:
        return None
    spec = guard.spec.model_dump(mode="json", exclude={"mean_thumbnail"})
    spec["n_training_thumbnails"] = guard.n_thumbnails
    return spec


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
    # Added innermost first: a request meets SecurityHeaders, OriginGuard, BodyLimit and
    # then the gate, so each refusal happens before the costlier checks behind it.
    app.add_middleware(
        InferenceGate,
        max_active=settings.max_concurrent,
        max_queued=settings.max_queued,
        on_idle=release_memory,
    )
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(
        OriginGuard,
        allowed_origins=settings.allowed_origins,
        allowed_hosts=settings.allowed_hosts,
    )
    app.add_middleware(SecurityHeaders)
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
        # Starlette answers this one outside every middleware, so it sets the headers.
        return JSONResponse(
            {"detail": f"internal error ({type(exc).__name__}); see the server log"},
            status_code=500,
            headers=SECURITY_HEADERS,
        )

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(
            STATIC / "index.html",
            headers={"Content-Security-Policy": PAGE_CSP},
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
            input_check=_input_check_summary(model),
        )

    def _uploads(files: list[UploadFile], max_bytes: int, how_to_fix: str) -> list[_Upload]:
        """One :class:`_Upload` per part; sizes checked from the parser's count, unread.

        An oversized file becomes a per-file 413 so the rest of the batch still runs;
        too many files fail the whole request, before anything is read.
        """
        if len(files) > settings.max_files:
            raise HTTPException(
                413,
                f"{len(files)} files in one request; the limit is {settings.max_files}. "
                "Split the batch or start the server with a larger --max-files",
            )
        uploads = []
        for i, f in enumerate(files):
            up = _Upload(index=i, filename=display_name(f.filename, i))
            up.file, up.max_bytes, up.how_to_fix = f.file, max_bytes, how_to_fix
            if f.size is not None and f.size > max_bytes:
                up.error, up.status = up.too_large(), 413
            uploads.append(up)
        return uploads

    async def _answer(
        files: list[UploadFile],
        uploads: list[_Upload],
        run: Any,
        response_type: Any,
        gradcam: bool,
    ) -> JSONResponse:
        """Run the uploads; fail the request only if none gave a result. Always closes
        the uploads' spooled files, whatever happened."""
        try:
            if all(up.error for up in uploads):  # nothing to decode: no need for the model
                return _failure([_failed(up) for up in uploads])
            model, results = await run_in_threadpool(run, cache, uploads, gradcam)
        finally:
            for f in files:
                await f.close()
        if model is not None and any(r.status == 200 for r in results):
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
        ``error`` while the others still get a stage. A file that is not like the
        model's training slices gets ``out_of_distribution: true`` and its reason instead
        of a stage; one that is a near-copy of a training slice, ``seen_in_training``.
        The request itself fails (413, 415 or 422, with every file's outcome) only when
        no file could be used."""
        how = "downscale it or start the server with a larger --max-upload-mb"
        uploads = _uploads(files, settings.max_file_bytes, how)
        return await _answer(files, uploads, _run_batch, PredictResponse, gradcam)

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
        how = "start the server with a larger --max-volume-mb"
        uploads = _uploads(files, settings.max_volume_bytes, how)
        return await _answer(files, uploads, _run_volumes, VolumeResponse, gradcam)

    return app
