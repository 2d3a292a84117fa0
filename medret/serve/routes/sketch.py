"""Sketch/template query: the templates (levels, a PNG per level) and the sketch search.

``GET /v1/templates``: per sketch-searchable table, its template, grid, levels (each with a PNG
of the template slice over the box a sketch must cover), classes and how many patients it holds.
``POST /v1/sketch/search``: a level and a mask per class (a PNG over that box, or polygons in
template mm) -> the top patients by Dice, each with its best slice, region profile and a thumbnail;
the rasterised query is echoed back.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field, ValidationError

from medret.serve.routes.deps import AUTH, ServiceDep
from medret.serve.routes.search import _check_k
from medret.serve.sketch import options, sketch_search_of


class TemplateList(BaseModel):
    templates: list[dict[str, Any]]


class SketchMask(BaseModel):
    png: str | None = Field(default=None, description="base64 PNG (or data URL) covering the level's template box")
    polygons: list[list[tuple[float, float]]] | None = Field(
        default=None, description="polygons of (x, y) points in template mm (LPS)", max_length=64
    )


class SketchRequest(BaseModel):
    table: str | None = Field(default=None, description="the code table; default: the first with lesion masks")
    level: int = Field(description="template level (GET /v1/templates lists them)")
    masks: dict[str, SketchMask] = Field(description="lesion class -> its sketch", min_length=1, max_length=8)
    k: int = Field(default=10, ge=1)
    tolerance: int = Field(default=1, ge=0, le=10, description="levels either side searched")
    region_weight: float = Field(default=0.0, ge=0.0, le=1.0, description="weight of the region-profile term")
    thumbnails: bool = True


class SketchResponse(BaseModel):
    table: str
    template: str
    level: int
    level_mm: float
    candidates: int
    patients_searchable: int
    query: dict[str, Any]
    results: list[dict[str, Any]]
    timings_ms: dict[str, float]


async def templates(service: ServiceDep) -> TemplateList:
    return TemplateList(templates=await asyncio.to_thread(sketch_search_of(service).templates))


async def level_png(
    service: ServiceDep,
    table: str,
    level: int,
    regions: Annotated[bool, Query(description="outline the regions")] = False,
) -> Response:
    png = await asyncio.to_thread(sketch_search_of(service).level_png, table, level, outlines=regions)
    return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})


def parse_request(raw: bytes) -> SketchRequest:
    """The JSON body as a :class:`SketchRequest`; anything else is a 422 that says what was wrong, without echoing
    the body (FastAPI's own error would try to render arbitrary bytes)."""
    try:
        return SketchRequest.model_validate_json(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors()[:5])
        raise HTTPException(422, f"bad sketch request: {problems}") from None


async def sketch_search(service: ServiceDep, request: Request) -> SketchResponse:
    """The body is a :class:`SketchRequest` (JSON), parsed here (see :func:`parse_request`)."""
    body = parse_request(await request.body())
    _check_k(body.k, service.cfg.max_k)
    masks = {c: m.model_dump() for c, m in body.masks.items()}
    opts = options(body.k, body.tolerance, body.region_weight)
    found = await asyncio.to_thread(
        sketch_search_of(service).search, body.table, body.level, masks, opts, thumbnails=body.thumbnails
    )
    return SketchResponse(**found)


async def sketch_js() -> Response:
    """The page's Sketch tab (a static script, public like the page itself)."""
    js = resources.files("medret.serve").joinpath("static/sketch.js").read_text()
    return Response(js, media_type="text/javascript")


def router() -> APIRouter:
    r = APIRouter()
    r.add_api_route("/static/sketch.js", sketch_js, methods=["GET"], include_in_schema=False)
    r.include_router(api_router())
    return r


def api_router() -> APIRouter:
    r = APIRouter(dependencies=AUTH)
    r.add_api_route("/v1/templates", templates, methods=["GET"])
    r.add_api_route("/v1/templates/{table}/levels/{level}.png", level_png, methods=["GET"], response_class=Response)
    body = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": SketchRequest.model_json_schema()}},
        }
    }
    r.add_api_route("/v1/sketch/search", sketch_search, methods=["POST"], openapi_extra=body)
    return r
