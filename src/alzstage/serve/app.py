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

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from alzstage.config import NeuroParams, NiftiQCParams
from alzstage.serve import batch
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
    HealthResponse,
    ModelResponse,
    PredictResponse,
    VolumeResponse,
)

if TYPE_CHECKING:  # pragma: no cover
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
            **batch.model_ref(model).model_dump(),
            backbone=info.tags.get("backbone") or None,
            chosen_because=settings.model_choice,
            classes=model.classes,
            input_size=list(model.size),
            temperature=model.temperature,
            low_confidence_threshold=settings.low_confidence,
            metrics=info.metrics,
            split_strategy=info.split_strategy,
            split_leaky=info.split_leaky,
            input_check=batch.input_check_summary(model),
        )

    def _uploads(files: list[UploadFile], max_bytes: int, how_to_fix: str) -> list[batch.Upload]:
        """One upload per part; sizes checked from the parser's count, not read yet.

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
            up = batch.Upload(index=i, filename=batch.display_name(f.filename, i))
            up.file, up.max_bytes, up.how_to_fix = f.file, max_bytes, how_to_fix
            if f.size is not None and f.size > max_bytes:
                up.error, up.status = up.too_large(), 413
            uploads.append(up)
        return uploads

    async def _answer(
        files: list[UploadFile],
        uploads: list[batch.Upload],
        run: Any,
        response_type: Any,
        gradcam: bool,
    ) -> JSONResponse:
        """Run the uploads; fail the request only if none gave a result. Always closes
        the uploads' spooled files, whatever happened."""
        try:
            if all(up.error for up in uploads):  # nothing to decode: no need for the model
                return batch.failure([batch.failed_result(up) for up in uploads])
            model, results = await run_in_threadpool(run, cache, uploads, gradcam)
        finally:
            for f in files:
                await f.close()
        if model is not None and any(r.status == 200 for r in results):
            body = response_type(
                model=batch.model_ref(model),
                classes=model.classes,
                predictions=results,
                summary=batch.summary(model, results, settings.low_confidence),
            )
            return JSONResponse(body.model_dump(mode="json"))
        return batch.failure(results)

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
        return await _answer(files, uploads, batch.run_batch, PredictResponse, gradcam)

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
        return await _answer(files, uploads, batch.run_volumes, VolumeResponse, gradcam)

    return app
