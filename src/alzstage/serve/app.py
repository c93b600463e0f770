"""The REST API and web page behind ``alzstage serve``: :func:`create_app` assembles them.

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
- each image is checked against the training images (:mod:`alzstage.inference.ood`): one
  that is not like them gets ``out_of_distribution`` and no stage;
- cross-origin POSTs and DNS-rebound Host names are refused, every response says
  ``X-Content-Type-Options: nosniff``, and the page and the API docs have a content
  security policy (:mod:`alzstage.serve.guards`);
- ``/health`` reports the limits the server runs with, so a deployment can be checked;
- nothing a client sends (file names included) is used as a path; uploads stay in
  memory or in Starlette's anonymous spooled temp files, closed after each request;
- errors are JSON with a message a person can act on, never a stack trace.

The model loads lazily on first use and is cached; a missing champion is a 503 that
says how to create one, and the server keeps answering ``/health`` meanwhile.

The endpoints live in :mod:`alzstage.serve.routes`, the shared settings and model cache
in :mod:`alzstage.serve.state`, the per-request work in :mod:`alzstage.serve.batch`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from alzstage.errors import ModelNotFound
from alzstage.serve.guards import (
    SECURITY_HEADERS,
    BodyLimit,
    DocsPolicy,
    InferenceGate,
    OriginGuard,
    SecurityHeaders,
    multipart_error,
)
from alzstage.serve.memory import release_memory
from alzstage.serve.routes import router
from alzstage.serve.state import ModelCache, ServeSettings

__all__ = ["ModelCache", "ServeSettings", "create_app"]

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


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    """Build the app; nothing is loaded until the first request that needs the model."""
    from fastapi_offline import FastAPIOffline

    from alzstage import __version__ as pkg_version

    settings = settings or ServeSettings()
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
    # The routes read both through request.app.state (alzstage.serve.routes.cache_of).
    app.state.settings = settings
    app.state.model_cache = ModelCache(settings)
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
    app.add_middleware(DocsPolicy)
    app.add_middleware(SecurityHeaders)
    app.add_exception_handler(ModelNotFound, _no_model)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Exception, _crash)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    app.include_router(router)
    return app


async def page() -> FileResponse:
    """The web page: a static file, under a content security policy of its own."""
    return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP})


async def _no_model(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": f"{exc}. {NO_MODEL_HINT}"}, status_code=503)


async def _http_error(request: Request, exc: Exception) -> Response:
    """FastAPI's answer to an HTTPException, except that a multipart body refused for a
    too-long part header (a file name of thousands of characters) names that limit."""
    from fastapi.exception_handlers import http_exception_handler

    assert isinstance(exc, StarletteHTTPException)
    detail = multipart_error(exc) if exc.status_code == 400 else None
    if detail is None:
        return await http_exception_handler(request, exc)
    return JSONResponse({"detail": detail}, status_code=400)


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
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


async def _crash(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    # Starlette answers this one outside every middleware, so it sets the headers.
    return JSONResponse(
        {"detail": f"internal error ({type(exc).__name__}); see the server log"},
        status_code=500,
        headers=SECURITY_HEADERS,
    )
