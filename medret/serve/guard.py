"""The query service's outer wall: decided before a request body is read.

:class:`RequestGuard` is the outermost ASGI layer of the app. In order, for each HTTP request:

1. **Auth first.** With a token configured, a request for anything but the page, health,
   metrics and the API description (:data:`PUBLIC`) without the right bearer token gets 401
   at once: its body is never read, spooled or parsed.
2. **Size.** A declared ``Content-Length`` over the limit gets 413 at once; a chunked body
   that grows past it gets 413 as soon as it does (not the parser's 400).
3. **Deadlines.** Each piece of the body must arrive within ``body_idle_s``, and after
   ``body_grace_s`` the body must average at least ``min_body_rate`` bytes/s, else 408: a
   client that sends a few bytes and stalls holds a replica slot for seconds, not forever.

Error bodies are ``{"detail": ...}`` as everywhere in the API (:data:`ERROR_RESPONSES` documents
them in the OpenAPI spec), and never carry paths of the libraries' build machines.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
from typing import Any

from pydantic import BaseModel

from medret.serve.config import ServiceConfig

#: source locations that library errors carry (Lance's Rust build paths and the like)
_BUILD_PATH = re.compile(r",?\s*/(?:home|build|root|rustc|usr/src|tmp)/\S*?\.(?:rs|c|cc|cpp|h)(?::\d+)+")


def public_message(text: str) -> str:
    """An error message fit for a client: no build-machine source paths.

    >>> public_message("LanceError(IO): not found, /home/runner/work/lance/rust/lance-io/src/x.rs:1576:42")
    'LanceError(IO): not found'
    """
    return _BUILD_PATH.sub("", text)


class Problem(BaseModel):
    """Every error: what was wrong, naming the input (validation errors: a list of them)."""

    detail: str | list[dict[str, Any]]


def _documented(description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _documented("a bad parameter or filter (names it)"),
    401: _documented("missing or wrong bearer token"),
    403: _documented("the item's source lies outside the roots the service may read"),
    404: _documented("no such table or item"),
    408: _documented("the request body arrived too slowly"),
    413: _documented("the upload or the image it declares is over the limits"),
    415: _documented("an upload of a kind the service cannot take"),
    422: _documented("an unreadable upload or invalid parameters"),
    502: _documented("the storage behind the index failed"),
    503: _documented("the service cannot answer now (busy, or no encoder for the table); see Retry-After"),
}


class _Refused(Exception):
    def __init__(self, status: int, detail: str) -> None:
        self.status, self.detail = status, detail


async def _send_problem(send: Any, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if status in (408, 413):
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


#: what anyone may fetch: the page, health, metrics and the API's description; everything else needs the token
PUBLIC = frozenset(
    {"/", "/static/sketch.js", "/healthz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)


def _route(scope: Any) -> str:
    """The path the app routes on: under a Serve ``route_prefix`` the ASGI path carries ``root_path`` first.

    >>> _route({"path": "/medret/v1/search", "root_path": "/medret"}), _route({"path": "/v1/tables"})
    ('/v1/search', '/v1/tables')
    """
    path, root = str(scope.get("path", "")), str(scope.get("root_path", "")).rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root) :]
    return path or "/"


class RequestGuard:
    """ASGI middleware: auth, body size and body deadlines, before the app sees the body."""

    def __init__(self, app: Any, cfg: ServiceConfig) -> None:
        self.app, self.cfg = app, cfg
        self.limit = cfg.max_upload_bytes + (1 << 16)  # multipart framing on top of the file
        self.token = cfg.token.encode() if cfg.token else None
        self.too_big = f"request body is over the upload limit of {cfg.max_upload_bytes} bytes"

    def _authorised(self, scope: Any) -> bool:
        if self.token is None or _route(scope) in PUBLIC:
            return True
        headers = dict(scope.get("headers") or [])
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._authorised(scope):
            await _send_problem(
                send,
                401,
                "missing or wrong bearer token (send Authorization: Bearer TOKEN)",
                {"WWW-Authenticate": "Bearer"},
            )
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_problem(
                send, 413, f"request body is over the upload limit of {self.cfg.max_upload_bytes} bytes"
            )
            return
        cfg = self.cfg
        start = time.monotonic()
        seen = 0
        refused: list[_Refused] = []
        started = done = False

        async def guarded_receive() -> Any:
            nonlocal seen, done
            if refused:
                raise refused[0]
            if done:  # the body is in: what follows is waiting for a disconnect, with no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), cfg.body_idle_s)
            except asyncio.TimeoutError:
                refused.append(_Refused(408, f"no request body data for {cfg.body_idle_s:g} s"))
                raise refused[0] from None
            if message["type"] == "http.request":
                done = not message.get("more_body", False)
                seen += len(message.get("body", b""))
                elapsed = time.monotonic() - start
                if seen > self.limit:
                    refused.append(
                        _Refused(413, f"request body is over the upload limit of {cfg.max_upload_bytes} bytes")
                    )
                elif elapsed > cfg.body_grace_s and message.get("more_body") and seen < cfg.min_body_rate * elapsed:
                    refused.append(
                        _Refused(408, f"request body arrives slower than {cfg.min_body_rate} bytes/s; send it faster")
                    )
                if refused:
                    raise refused[0]
            return message

        async def guarded_send(message: Any) -> None:
            nonlocal started
            if refused:  # the app answers an aborted body with its own error: ours says what happened
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _send_problem(send, refused[0].status, refused[0].detail)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except _Refused as err:
            if not started:
                await _send_problem(send, err.status, err.detail)
