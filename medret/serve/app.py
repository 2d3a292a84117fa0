"""The HTTP API and web page: a FastAPI app over a replica's :class:`~medret.serve.service.Service`.

The same app runs as the ingress of the Ray Serve deployment (:mod:`medret.serve.deployment`)
and, in tests, under Starlette's test client. Its routes live in :mod:`medret.serve.routes`,
one module per area; :func:`create_app` puts them together with the request guard, the
request metrics and the error mapping.

Errors are the client's (4xx) whenever the input is: an unreadable or unsupported
upload, a bad parameter, an unknown table or item, a body over the size limit. Each
says what was wrong with which input.
"""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medret import observability as obs
from medret.errors import (
    Busy,
    ConfigError,
    EncoderMismatchError,
    Forbidden,
    IndexError_,
    InvalidURIError,
    MedretError,
    NotFound,
    PixelBudgetError,
    SchemaError,
    SearchUnavailableError,
    StorageError,
    UnsupportedFormatError,
    UploadTooLarge,
)
from medret.serve.guard import ERROR_RESPONSES, RequestGuard, public_message
from medret.serve.routes import page, search, sketch, slides, status
from medret.serve.service import Service

log = logging.getLogger(__name__)


def status_of(err: BaseException) -> int:
    """The HTTP status an error answers with.

    >>> status_of(NotFound("no item")), status_of(Busy("full")), status_of(ValueError())
    (404, 503, 500)
    """
    if isinstance(err, NotFound):
        return 404
    if isinstance(err, Forbidden):
        return 403
    if isinstance(err, (PixelBudgetError, UploadTooLarge)):
        return 413
    if isinstance(err, UnsupportedFormatError):
        return 415
    if isinstance(err, (EncoderMismatchError, Busy, SearchUnavailableError)):
        return 503  # the service cannot answer this now: an operator's problem, a full queue or a shard down
    if isinstance(err, (ConfigError, SchemaError, InvalidURIError)):
        return 400
    if isinstance(err, StorageError):
        return 502
    if isinstance(err, (IndexError_, MedretError)):
        return 422
    return 500


async def medret_error(request: Request, err: MedretError) -> JSONResponse:
    """A medret error as ``{"detail": ...}`` with its status (:func:`status_of`); a full queue says Retry-After."""
    code = status_of(err)
    if code >= 500:
        log.error("%s %s: %s", request.method, request.url.path, err)
    headers = {"Retry-After": "5"} if isinstance(err, (Busy, SearchUnavailableError)) else None
    return JSONResponse({"detail": public_message(str(err))}, status_code=code, headers=headers)


class RequestMetrics:
    """Requests and their seconds by route template and status (``medret_query_requests_total``...).

    A plain ASGI middleware (Starlette's ``BaseHTTPMiddleware`` runs every request through a task group
    and memory streams: a measurable share of a lean query's time). A request that raised counts as a 500.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            name = getattr(scope.get("route"), "path", "unmatched")  # the router put the matched route here
            obs.QUERY_REQUESTS.labels(route=name, code=str(status)).inc()
            obs.QUERY_REQUEST_SECONDS.labels(route=name).observe(time.perf_counter() - t0)


def create_app(service: Service) -> FastAPI:
    """The app over ``service``: its routes, the error mapping, request metrics, host pinning and the guard."""
    cfg = service.cfg
    app = FastAPI(
        title="medret query service",
        version="1",
        description="Top-k similar medical images by Hamming distance over deep hashing codes.",
        redirect_slashes=False,  # a redirect would echo the client's Host header
        responses=ERROR_RESPONSES,
    )
    app.state.service = service
    app.add_middleware(RequestMetrics)
    app.exception_handler(MedretError)(medret_error)
    for area in (page, status, search, slides, sketch):
        app.include_router(area.router())
    if cfg.allowed_hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(cfg.allowed_hosts))
    # outermost: auth and body limits are decided before any body is read or parsed
    app.add_middleware(RequestGuard, cfg=cfg)
    return app
