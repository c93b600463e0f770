"""The API's endpoints: ``/health``, ``/model``, ``POST /predict``, ``POST /predict/volume``
and ``POST /predict/brain``.

Each route reads the server's shared state (the model cache and its settings) through a
dependency on ``request.app.state``, set once by :func:`alzstage.serve.app.create_app`; the work of
a prediction request runs in :mod:`alzstage.serve.batch`, in a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from alzstage.inference.prediction import summarize
from alzstage.serve import batch
from alzstage.serve.schemas import (
    ERRORS,
    HealthResponse,
    ImagePrediction,
    ModelResponse,
    PredictResponse,
    ServerLimits,
    VolumeResponse,
)
from alzstage.serve.state import ModelCache, ServeSettings


def cache_of(request: Request) -> ModelCache:
    """The server's model cache, and through it its settings (set by ``create_app``)."""
    return request.app.state.model_cache


Cache = Annotated[ModelCache, Depends(cache_of)]

router = APIRouter()


@router.get("/health", response_model=HealthResponse, summary="Liveness and limits")
async def health(cache: Cache) -> HealthResponse:
    """Always 200 while the process runs; says whether the model is loaded yet and the
    limits the server runs with (the ``alzstage serve`` flags), so a deployment can be
    checked from outside. No secret is among them; the model is described by ``/model``."""
    return HealthResponse(status="ok", model_loaded=cache.loaded, limits=limits_of(cache.settings))


def limits_of(s: ServeSettings) -> ServerLimits:
    """The limits a server with settings ``s`` enforces, as ``/health`` reports them."""
    from alzstage.serve.guards import BODY_TIMEOUT_S, MAX_PART_HEADER_BYTES

    return ServerLimits(
        max_file_bytes=s.max_file_bytes,
        max_request_bytes=s.max_request_bytes,
        max_files=s.max_files,
        max_volume_bytes=s.max_volume_bytes,
        max_pixels=s.max_pixels,
        max_request_pixels=s.max_request_pixels,
        max_concurrent=s.max_concurrent,
        max_queued=s.max_queued,
        allowed_origins=list(s.allowed_origins),
        allowed_hosts=list(s.allowed_hosts),
        max_filename_header_bytes=MAX_PART_HEADER_BYTES,
        shown_filename_chars=batch.SHOWN_NAME_CHARS,
        body_timeout_s=BODY_TIMEOUT_S,
    )


@router.get(
    "/model",
    response_model=ModelResponse,
    responses={503: ERRORS[503]},
    summary="The model being served and its evaluation metrics",
)
async def model_info(cache: Cache) -> ModelResponse:
    """Name, version and alias of the loaded model, the dataset and recipe it was
    trained on (``synthetic_demo`` flags the demo images), with the test metrics and
    split protocol that ``promote`` recorded on the registry version. Loads the model
    if needed, so the page can show the version before the first upload."""
    model = await run_in_threadpool(cache.get)
    return batch.model_response(model, cache.settings)


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=ERRORS,
    summary="Predict the stage of one or many uploaded slices",
)
async def predict(
    files: Annotated[
        list[UploadFile], File(min_length=1, description="One or more JPEG/PNG MRI slices.")
    ],
    cache: Cache,
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
    s = cache.settings
    how = "downscale it or start the server with a larger --max-upload-mb"
    uploads = _uploads(files, s.max_files, s.max_file_bytes, how)
    return await _answer(cache, files, uploads, batch.run_batch, PredictResponse, gradcam)


@router.post(
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
    cache: Cache,
    gradcam: Annotated[
        bool,
        Query(description="Add Grad-CAM overlays on the most informative slices."),
    ] = False,
) -> JSONResponse:
    """Each volume is registered to MNI152, cut into the training slice format
    (``neuro.preprocess``), checked against ``validate.nifti`` and given one
    brain-level stage: the brain model stored with the network, with its conformal
    ``prediction_set`` and ``set_text`` ("VeryMildDemented or MildDemented (90%)"), and
    the fixed pooling rule's ``pooled_stage`` (``neuro.aggregate``) beside it; with
    every slice's probabilities and image. Volumes fail independently, with a per-file
    ``status`` and ``error`` naming the problem and the fix (415 not NIfTI, 422
    unusable, 413 too large)."""
    s = cache.settings
    how = "start the server with a larger --max-volume-mb"
    uploads = _uploads(files, s.max_files, s.max_volume_bytes, how)
    return await _answer(cache, files, uploads, batch.run_volumes, VolumeResponse, gradcam)


@router.post(
    "/predict/brain",
    response_model=VolumeResponse,
    responses=ERRORS,
    summary="One brain-level stage, with its conformal set, from one brain's slices",
)
async def predict_brain(
    files: Annotated[
        list[UploadFile],
        File(min_length=1, description="The JPEG/PNG slices of ONE brain."),
    ],
    cache: Cache,
    gradcam: Annotated[
        bool,
        Query(description="Add Grad-CAM overlays on the most informative slices."),
    ] = False,
) -> JSONResponse:
    """All the files are one brain's slices: one answer (``kind`` "brain") with the
    brain model's stage, its conformal ``prediction_set`` and ``set_text``, the pooled
    reference stage, and the per-slice table (``slices``). Files that cannot be read
    or are out of distribution are left out of the brain and listed with why
    (``left_out``); the request fails (413, 415 or 422) only when no file is usable.
    The same limits as ``POST /predict`` apply (file size, file count, pixels)."""
    s = cache.settings
    how = "downscale it or start the server with a larger --max-upload-mb"
    uploads = _uploads(files, s.max_files, s.max_file_bytes, how)
    return await _answer(cache, files, uploads, batch.run_brain, VolumeResponse, gradcam)


def _uploads(
    files: list[UploadFile], max_files: int, max_bytes: int, how_to_fix: str
) -> list[batch.Upload]:
    """One upload per part; sizes checked from the parser's count, not read yet.

    An oversized file becomes a per-file 413 so the rest of the batch still runs;
    too many files fail the whole request, before anything is read.
    """
    if len(files) > max_files:
        raise HTTPException(
            413,
            f"{len(files)} files in one request; the limit is {max_files}. "
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
    cache: ModelCache,
    files: list[UploadFile],
    uploads: list[batch.Upload],
    run: Callable[..., Any],
    response_type: type[PredictResponse] | type[VolumeResponse],
    gradcam: bool,
) -> JSONResponse:
    """Run the uploads; fail the request only if none gave a result. Always closes
    the uploads' spooled files, whatever happened."""
    try:
        if all(up.error for up in uploads):  # nothing to decode: no need for the model
            return batch.failure([batch.failed_result(up, ImagePrediction) for up in uploads])
        model, results = await run_in_threadpool(run, cache, uploads, gradcam)
    finally:
        for f in files:
            await f.close()
    if model is not None and any(r.status == 200 for r in results):
        body = response_type(
            model=model.info.ref,
            classes=model.classes,
            predictions=results,
            summary=summarize(results, model.classes, cache.settings.low_confidence),
        )
        return JSONResponse(body.model_dump(mode="json"))
    return batch.failure(results)
