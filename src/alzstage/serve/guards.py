"""ASGI middleware that guards the server before any route runs.

Each answers from the request line and headers alone, so a refused request costs no
body parsing, decoding or model time:

* :class:`SecurityHeaders`: ``X-Content-Type-Options: nosniff`` (and framing,
  referrer and cross-origin-resource policies) on every response, API, ``/docs`` and
  static files alike;
* :class:`OriginGuard`: refuses a POST that a browser sends from a page of another
  origin (a page on the internet cannot make the server do heavy work), and on a
  loopback connection a ``Host`` that is not a loopback name (DNS rebinding);
* :class:`DocsPolicy`: a content security policy on the API docs pages (``/docs``,
  ``/redoc``), whose one inline script each is allowed by its hash, nothing else inline;
* :class:`BodyLimit`: request bodies over the size cap get 413 before the multipart
  parser runs;
* :class:`InferenceGate`: at most ``max_active`` prediction requests run at once and
  ``max_queued`` wait; the next gets 503 with ``Retry-After``. Memory is bounded by the
  active requests, whatever the number of clients, and is handed back to the OS when
  the last one finishes (:func:`alzstage.serve.memory.release_memory`).

``docs/threat-model.md`` says what each defends against and what it does not.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
# A request body that stalls this long gets 408 (InferenceGate).
BODY_TIMEOUT_S = 60.0
# python-multipart's limit on one header line of a part (Content-Disposition carries
# the file name): a longer one fails the whole request (:func:`multipart_error`).
MAX_PART_HEADER_BYTES = 4096 + 128
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


class SecurityHeaders:
    """Add :data:`SECURITY_HEADERS` to every HTTP response that does not set them itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._raw = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self._raw if k not in present]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, with_headers)


DOCS_PATHS = ("/docs", "/redoc", "/docs/oauth2-redirect")
# Swagger UI and ReDoc set styles from their scripts (style attributes), so styles may be
# inline; scripts may not, except the page's own, by hash. ReDoc runs a blob: worker.
DOCS_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'{hashes}; worker-src 'self' blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


def docs_policy(html: bytes) -> str:
    """The CSP for one docs page: :data:`DOCS_CSP` allowing exactly its inline scripts."""
    digests = [
        base64.b64encode(hashlib.sha256(m.group(1)).digest()).decode("ascii")
        for m in _INLINE_SCRIPT.finditer(html)
    ]
    return DOCS_CSP.format(hashes="".join(f" 'sha256-{d}'" for d in digests))


class DocsPolicy:
    """Add a ``Content-Security-Policy`` to the docs pages (:data:`DOCS_PATHS`).

    The pages are generated HTML with one inline script that starts Swagger UI or
    ReDoc, so the policy is made from the page itself: that script's SHA-256 is
    allowed, and any other inline script (an injected one) is not. The pages are a few
    KB, so the body is held until its hash is known.
    """

    def __init__(self, app: ASGIApp, paths: Iterable[str] = DOCS_PATHS) -> None:
        self.app = app
        self.paths = set(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def with_policy(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            policy = (b"content-security-policy", docs_policy(body).encode("ascii"))
            await send({**start, "headers": [*start.get("headers", []), policy]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, with_policy)


def multipart_error(exc: BaseException) -> str | None:
    """The message for a multipart body the parser refused because one part's header
    line was too long (a long file name); None for any other refusal.

    Starlette answers both with a bare "Invalid multipart data."; the cause is found in
    the exception's chain (python-multipart's "Maximum header size exceeded").
    """
    seen: BaseException | None = exc
    for _ in range(6):
        seen = seen.__cause__ or seen.__context__ if seen is not None else None
        if seen is None:
            return None
        if "maximum header size" in str(seen).lower():
            return (
                f"invalid multipart data: a part's header line is over {MAX_PART_HEADER_BYTES:,} "
                "bytes, the limit of the multipart parser. The file name travels in that "
                f"header, so it can be at most about {MAX_PART_HEADER_BYTES - 200:,} "
                "characters; rename the file (names are shown cut to 200 characters anyway)"
            )
    return None


def _host_and_port(netloc: str, scheme: str) -> tuple[str, int | None]:
    parts = urlsplit(f"{scheme}://{netloc}")
    try:
        port = parts.port
    except ValueError:  # a port that is not a number
        return netloc.lower(), -1
    return (parts.hostname or "").lower(), port or _DEFAULT_PORTS.get(scheme)


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class OriginGuard:
    """Refuse cross-origin POSTs and, on loopback, Host names that are not loopback.

    The policy (``docs/threat-model.md``): the API is for this server's own page and for
    non-browser clients (scripts, ``curl``), which send no ``Origin``. A browser always
    sends ``Origin`` with a POST, so a POST whose ``Origin`` is not this server (or one
    of ``allowed_origins``) comes from another site's page: 403, before the body is
    read. No CORS headers are ever sent, so such pages cannot read any answer either.

    A page can get around an ``Origin`` check by DNS rebinding (its own host name
    re-pointed at 127.0.0.1, so the browser thinks it is same-origin). Its requests then
    carry that name in ``Host``; so on a loopback connection only loopback names
    (``localhost``, 127.x, ``[::1]``) and ``allowed_hosts`` are served (421), as
    Jupyter does for the same reason.
    """

    def __init__(
        self,
        app: ASGIApp,
        allowed_origins: Iterable[str] = (),
        allowed_hosts: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.allowed_origins = {o.rstrip("/").lower() for o in allowed_origins}
        self.allowed_hosts = {h.lower() for h in allowed_hosts}

    def _host_ok(self, host: str) -> bool:
        name, _ = _host_and_port(host, "http")  # "[::1]:8000" -> "::1"
        return (
            name == "localhost"
            or _is_loopback_ip(name)
            or name in self.allowed_hosts
            or host.lower() in self.allowed_hosts
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        server = scope.get("server") or ("", None)
        if _is_loopback_ip(str(server[0])) and not self._host_ok(host):
            detail = (
                f"Host {host!r} is not a loopback name, but the request came over loopback "
                "(DNS-rebinding guard); open the page as http://127.0.0.1:<port>/ or "
                "http://localhost:<port>/"
            )
            await _error(421, detail)(scope, receive, send)
            return
        origin = headers.get("origin")
        if scope["method"] in UNSAFE_METHODS and origin is not None:
            scheme = scope.get("scheme", "http")
            own = _host_and_port(host, scheme)
            theirs = (
                _host_and_port(urlsplit(origin).netloc, urlsplit(origin).scheme)
                if "://" in origin
                else ("", None)
            )
            same = theirs == own and urlsplit(origin).scheme == scheme
            if not same and origin.rstrip("/").lower() not in self.allowed_origins:
                detail = (
                    f"cross-origin {scope['method']} from {origin!r} refused: this API "
                    "answers its own page and non-browser clients; use the page this "
                    "server serves, or call the API from a script"
                )
                await _error(403, detail)(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
                await _error(400, "invalid Content-Length header")(scope, receive, send)
                return
            if too_big:
                await _error(413, self._detail())(scope, receive, send)
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


class InferenceGate:
    """Bound concurrent prediction requests: ``max_active`` run, ``max_queued`` wait.

    Applies to POSTs under ``prefix``. A waiting request has not read its body yet, so
    it holds a socket and nothing else; one that would exceed the queue gets 503 at once
    with ``Retry-After``. A client that stops sending its body for ``body_timeout``
    seconds gets 408, so a slow sender cannot hold a slot. When the last active request
    finishes, ``on_idle`` runs in a worker thread (memory release).
    """

    def __init__(
        self,
        app: ASGIApp,
        max_active: int,
        max_queued: int,
        prefix: str = "/predict",
        retry_after_s: int = 5,
        body_timeout_s: float = BODY_TIMEOUT_S,
        on_idle: Callable[[], object] | None = None,
    ) -> None:
        self.app = app
        self.max_active = max(1, int(max_active))
        self.max_queued = max(0, int(max_queued))
        self.prefix = prefix
        self.retry_after_s = retry_after_s
        self.body_timeout_s = body_timeout_s
        self.on_idle = on_idle
        self.active = 0
        self.waiting = 0
        self._slots: asyncio.Semaphore | None = None

    def _busy(self) -> JSONResponse:
        return _error(
            503,
            f"server busy: {self.active} prediction request(s) running and {self.waiting} "
            f"waiting (limits {self.max_active} and {self.max_queued}); retry in "
            f"{self.retry_after_s} s, or send larger batches less often",
            headers={"Retry-After": str(self.retry_after_s)},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or not scope["path"].startswith(self.prefix)
        ):
            await self.app(scope, receive, send)
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_active)
        if self.active + self.waiting >= self.max_active + self.max_queued:
            await self._busy()(scope, receive, send)
            return
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        try:
            await self.app(scope, self._timed(receive), send)
        finally:
            self.active -= 1
            self._slots.release()
            if self.active == 0 and self.on_idle is not None:
                from starlette.concurrency import run_in_threadpool

                await run_in_threadpool(self.on_idle)

    def _timed(self, receive: Receive) -> Receive:
        done = False

        async def timed() -> Message:
            nonlocal done
            if done:  # after the body, receive() waits for a disconnect: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except asyncio.TimeoutError:
                raise HTTPException(
                    408,
                    f"no request body data for {self.body_timeout_s:g} s; send the whole "
                    "request at once",
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                done = True
            return message

        return timed
