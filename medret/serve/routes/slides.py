"""Slide-level search: the slide list, slides like an indexed slide, slides like an uploaded region.

A slide's id is its source URI (percent-encode it in the path, as item ids are). Every hit
carries the matched tile pairs as evidence, with the thumbnail URLs of both tiles.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, File, Form, Query, UploadFile
from pydantic import BaseModel

from medret.serve.routes.deps import AUTH, ServiceDep
from medret.serve.routes.search import _check_k, item_urls
from medret.serve.slides import slide_kind

Method = Literal["median_min", "symmetric", "vote"]
METHOD_HELP = (
    "median_min: median over the query's tiles of the nearest tile's distance (default); symmetric: the mean of "
    "both directions; vote: how many query tiles did not have their nearest tile in the slide"
)


class SlideInfo(BaseModel):
    id: str
    slide_id: str
    n_tiles: int
    bag_size: int
    label: str | None
    mpp: float | None
    thumbnail_url: str
    similar_url: str


class SlideList(BaseModel):
    table: str
    slides: list[SlideInfo]


class TilePair(BaseModel):
    query_tile: str | None  # None for a tile cut from an uploaded region
    query_x: int
    query_y: int
    query_thumbnail_url: str | None
    tile: str
    x: int
    y: int
    thumbnail_url: str
    distance: int


class SlideHit(BaseModel):
    rank: int
    id: str
    slide_id: str
    label: str | None
    n_tiles: int
    bag_size: int
    distance: float
    thumbnail_url: str
    similar_url: str
    evidence: list[TilePair]


class SlideSearchResponse(BaseModel):
    table: str
    encoder_id: str
    k: int
    method: str
    query: dict[str, Any]
    results: list[SlideHit]
    timings_ms: dict[str, float]


def slide_similar_url(table: str, slide: str) -> str:
    """The similar-slides URL of a slide.

    >>> slide_similar_url("t", "/a/b.svs")
    '/v1/slides/%2Fa%2Fb.svs/similar?table=t'
    """
    return f"/v1/slides/{quote(slide, safe='')}/similar?table={quote(table, safe='')}"


def _hits(table: str, found: dict[str, Any]) -> list[SlideHit]:
    out = []
    for rank, h in enumerate(found["results"], start=1):
        pairs = [
            TilePair(
                **e,
                query_thumbnail_url=item_urls(table, e["query_tile"])[0] if e["query_tile"] else None,
                thumbnail_url=item_urls(table, e["tile"])[0],
            )
            for e in h["evidence"]
        ]
        out.append(
            SlideHit(
                rank=rank,
                **{k: h[k] for k in ("id", "slide_id", "label", "n_tiles", "bag_size", "distance")},
                thumbnail_url=item_urls(table, h["cover_tile"])[0],
                similar_url=slide_similar_url(table, h["id"]),
                evidence=pairs,
            )
        )
    return out


async def slides(service: ServiceDep, table: str | None = None) -> SlideList:
    idx, rows = await asyncio.to_thread(service.engine.slides, table)
    return SlideList(
        table=idx.name,
        slides=[
            SlideInfo(
                **{k: r[k] for k in ("id", "slide_id", "n_tiles", "bag_size", "label", "mpp")},
                thumbnail_url=item_urls(idx.name, r["cover_tile"])[0],
                similar_url=slide_similar_url(idx.name, r["id"]),
            )
            for r in rows
        ],
    )


async def similar_slides(
    service: ServiceDep,
    slide: str,
    table: str | None = None,
    k: Annotated[int, Query(ge=1)] = 5,
    method: Annotated[Method, Query(description=METHOD_HELP)] = "median_min",
) -> SlideSearchResponse:
    t0 = time.perf_counter()
    _check_k(k, service.cfg.max_k)
    idx, found = await service.similar_slides(table, slide, k, method)
    total = round((time.perf_counter() - t0) * 1e3, 3)
    q = found["query"]
    for t in q["tiles"]:
        t["thumbnail_url"] = item_urls(idx.name, t["tile"])[0] if t["tile"] else None
    return SlideSearchResponse(
        table=idx.name,
        encoder_id=idx.encoder_id,
        k=k,
        method=method,
        query=q,
        results=_hits(idx.name, found),
        timings_ms={"search": total, "total": total},
    )


async def search_slide(
    service: ServiceDep,
    file: Annotated[UploadFile, File(description="a region cut from a slide: PNG/JPEG/TIFF, RGB")],
    mpp: Annotated[float, Form(gt=0, le=100, description="the region's microns per pixel")],
    table: Annotated[str | None, Form(description="the table to search; default: one that serves slides")] = None,
    k: Annotated[int, Form(ge=1)] = 5,
    method: Annotated[Method, Form(description=METHOD_HELP)] = "median_min",
) -> SlideSearchResponse:
    t0 = time.perf_counter()
    cfg, engine = service.cfg, service.engine
    _check_k(k, cfg.max_k)
    data = await file.read(cfg.max_upload_bytes + 1)
    name = file.filename or "upload"
    idx = await asyncio.to_thread(engine.index, table or engine.catalog.for_kind(slide_kind()))
    found = await service.search_region(idx, data, name, mpp, k, method)
    total = round((time.perf_counter() - t0) * 1e3, 3)
    return SlideSearchResponse(
        table=idx.name,
        encoder_id=idx.encoder_id,
        k=k,
        method=method,
        query=found["query"],
        results=_hits(idx.name, found),
        timings_ms={"total": total},
    )


def router() -> APIRouter:
    r = APIRouter(dependencies=AUTH)
    r.add_api_route("/v1/slides", slides, methods=["GET"])
    r.add_api_route("/v1/slides/{slide:path}/similar", similar_slides, methods=["GET"])
    r.add_api_route("/v1/search/slide", search_slide, methods=["POST"])
    return r
