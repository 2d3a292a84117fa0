"""What the service is and holds: its health (for probes), its metrics (Prometheus), its tables."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from medret.serve.routes.deps import AUTH, ServiceDep
from medret.serve.routes.schemas import Health, TableInfo

log = logging.getLogger(__name__)


async def healthz(service: ServiceDep) -> Any:
    """Whether this replica can answer queries (the index's tables are reachable)."""
    auth = bool(service.cfg.token)
    try:
        await asyncio.to_thread(service.engine.health)
    except Exception as err:
        log.warning("health check failed: %s", err)
        return JSONResponse({"status": "unavailable", "auth": auth}, status_code=503)
    return Health(status="ok", auth=auth)


async def metrics() -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def tables(service: ServiceDep) -> list[TableInfo]:
    return [TableInfo(**t) for t in await asyncio.to_thread(service.engine.tables)]


def router() -> APIRouter:
    r = APIRouter()
    unavailable = {"model": Health, "description": "the index cannot be reached"}
    r.add_api_route("/healthz", healthz, methods=["GET"], responses={503: unavailable})
    r.add_api_route("/metrics", metrics, methods=["GET"], response_class=Response)
    r.add_api_route("/v1/tables", tables, methods=["GET"], dependencies=AUTH)
    return r
