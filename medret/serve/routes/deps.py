"""What handlers depend on: the replica's :class:`~medret.serve.service.Service` and the bearer token."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from medret.serve.service import Service


async def get_service(request: Request) -> Service:
    """The service the app was built over (:func:`medret.serve.app.create_app` puts it in ``app.state``).

    The dependencies here are ``async`` though they never wait: FastAPI runs a plain ``def`` dependency
    on a worker thread, a hop that cost a lean query more than its search (``docs/benchmarks.md``).
    """
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


async def require_token(service: ServiceDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """401 unless the request carries the configured bearer token (none configured: anyone).

    :class:`~medret.serve.guard.RequestGuard` refuses such requests before their body is read;
    this check stands behind it and documents the header in the OpenAPI spec.
    """
    token = service.cfg.token
    if not token:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(
            401, "missing or wrong bearer token (send Authorization: Bearer TOKEN)", {"WWW-Authenticate": "Bearer"}
        )


#: the dependencies of every ``/v1`` route
AUTH = [Depends(require_token)]
