"""Search and items: top-k by an uploaded image or by an indexed item, one item's row, its thumbnail.

Every route here needs the bearer token when one is configured.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response

from medret import kinds
from medret import observability as obs
from medret.errors import ConfigError
from medret.index.store import CodeIndex
from medret.serve.engine import QueryEngine
from medret.serve.routes.deps import AUTH, ServiceDep
from medret.serve.routes.schemas import Hit, SearchResponse
from medret.serve.search import where
from medret.serve.service import Upload

RERANK = (
    "re-rank the Hamming shortlist by the items' compact features where the table keeps them (hits then carry "
    "similarity); false: the pure Hamming order"
)


def item_urls(table: str, item_id: str) -> tuple[str, str]:
    """The thumbnail and similar-items URLs of an item.

    >>> item_urls("codes", "/a/b.png")
    ('/v1/items/%2Fa%2Fb.png/thumbnail?table=codes', '/v1/items/%2Fa%2Fb.png/similar?table=codes')
    """
    q = quote(item_id, safe="")
    t = quote(table, safe="")
    return f"/v1/items/{q}/thumbnail?table={t}", f"/v1/items/{q}/similar?table={t}"


def hits(table: str, rows: list[dict[str, Any]]) -> list[Hit]:
    """Search rows as hits: the item's columns beyond rank, id, distance and source go to ``metadata``."""
    out = []
    for r in rows:
        thumb, similar = item_urls(table, r["item_id"])
        meta = {k: v for k, v in r.items() if k not in ("rank", "item_id", "distance", "source_uri")}
        out.append(
            Hit(
                rank=r["rank"],
                item_id=r["item_id"],
                distance=r["distance"],
                source_uri=r["source_uri"],
                thumbnail_url=thumb,
                similar_url=similar,
                metadata=meta,
            )
        )
    return out


def parse_filters(modality: str | None, dataset: str | None, label: str | None, text: str | None) -> dict[str, Any]:
    """The filter fields and the ``filters`` JSON object as one column -> value mapping, checked now.

    >>> parse_filters("CR", None, None, '{"label": ["1", "2"]}')
    {'modality': 'CR', 'dataset': None, 'label': ['1', '2']}
    """
    filters: dict[str, Any] = {"modality": modality, "dataset": dataset, "label": label}
    if text:
        try:
            extra = json.loads(text)
        except (ValueError, RecursionError) as err:
            raise ConfigError(f"filters must be a JSON object of column: value, got {text[:100]!r}") from err
        if not isinstance(extra, dict) or not all(
            isinstance(v, (str, int, float))
            or (isinstance(v, list) and all(isinstance(x, (str, int, float)) for x in v))
            for v in extra.values()
        ):
            raise ConfigError('filters must map columns to a value or a list of values, e.g. {"label": ["1"]}')
        filters.update(extra)
    where(filters)  # validates column names and values now, before any work
    return filters


def _check_k(k: int, max_k: int) -> None:
    if k > max_k:
        raise ConfigError(f"k must be at most {max_k}, got {k}")


async def search(
    service: ServiceDep,
    file: Annotated[UploadFile, File(description="PNG/JPEG, DICOM, NIfTI, or a slide region as an image tile")],
    table: Annotated[
        str | None, Form(description="the table to search; default: a table that serves the upload's kind")
    ] = None,
    k: Annotated[int, Form(ge=1)] = 10,
    kind: Annotated[str, Form(description=f"what to read the upload as: {', '.join(kinds.query_modes())}")] = (
        kinds.AUTO_QUERY
    ),
    slice: Annotated[int | None, Form(ge=0, description="NIfTI level or DICOM frame (0-based)")] = None,
    mpp: Annotated[float | None, Form(gt=0, description="microns per pixel of an uploaded tile")] = None,
    modality: Annotated[str | None, Form()] = None,
    dataset: Annotated[str | None, Form()] = None,
    label: Annotated[str | None, Form()] = None,
    filters: Annotated[str | None, Form(description='JSON object, e.g. {"label": ["1", "2"]}')] = None,
    rerank: Annotated[bool, Form(description=RERANK)] = True,
) -> SearchResponse:
    t0 = time.perf_counter()
    cfg = service.cfg
    _check_k(k, cfg.max_k)
    chosen = parse_filters(modality, dataset, label, filters)
    data = await file.read(cfg.max_upload_bytes + 1)
    name = file.filename or "upload"
    # the table named, else one that serves the upload's kind
    got = await service.answer(Upload(data, name, table, kind, slice, mpp, k, chosen, rerank))
    timings = {s: v * 1e3 for s, v in got.timings.items()}
    timings["total"] = (time.perf_counter() - t0) * 1e3
    for stage, ms in timings.items():
        obs.QUERY_STAGE_SECONDS.labels(stage=stage).observe(ms / 1e3)
    idx, q = got.idx, got.query
    return SearchResponse(
        table=idx.name,
        encoder_id=idx.encoder_id,
        k=k,
        query={
            "filename": name,
            "kind": q.kind,
            "bytes": len(data),
            "code": bytes(got.code).hex(),
            "reranked": got.reranked,
            **q.meta,
        },
        results=hits(idx.name, got.rows),
        timings_ms={s: round(v, 3) for s, v in timings.items()},
    )


async def similar(
    service: ServiceDep,
    item_id: str,
    table: str | None = None,
    k: Annotated[int, Query(ge=1)] = 10,
    modality: str | None = None,
    dataset: str | None = None,
    label: str | None = None,
    filters: str | None = None,
    rerank: Annotated[bool, Query(description=RERANK)] = True,
) -> SearchResponse:
    t0 = time.perf_counter()
    engine = service.engine
    _check_k(k, service.cfg.max_k)
    chosen = parse_filters(modality, dataset, label, filters)
    idx, rows = await asyncio.to_thread(_similar, engine, table, item_id, k, chosen, rerank)
    total = (time.perf_counter() - t0) * 1e3
    obs.QUERY_STAGE_SECONDS.labels(stage="search").observe(total / 1e3)
    return SearchResponse(
        table=idx.name,
        encoder_id=idx.encoder_id,
        k=k,
        query={"item_id": item_id, "reranked": engine.reranks(idx, rerank)},
        results=hits(idx.name, rows),
        timings_ms={"search": round(total, 3), "total": round(total, 3)},
    )


def _similar(
    engine: QueryEngine, table: str | None, item_id: str, k: int, filters: dict[str, Any], rerank: bool
) -> tuple[CodeIndex, list[dict[str, Any]]]:
    idx = engine.index(table)  # one hop to a worker thread for both
    return idx, engine.similar(idx.name, item_id, k, filters=filters, rerank=rerank)


async def thumbnail(service: ServiceDep, item_id: str, table: str | None = None) -> Response:
    png = await asyncio.to_thread(service.engine.thumbnail, table, item_id)
    return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})


async def item(service: ServiceDep, item_id: str, table: str | None = None) -> dict[str, Any]:
    engine = service.engine
    idx = await asyncio.to_thread(engine.index, table)
    row = await asyncio.to_thread(engine.item, idx.name, item_id)
    thumb, similar_url = item_urls(idx.name, item_id)
    return {"table": idx.name, **row, "thumbnail_url": thumb, "similar_url": similar_url}


def router() -> APIRouter:
    r = APIRouter(dependencies=AUTH)
    r.add_api_route("/v1/search", search, methods=["POST"])
    # the sub-resources first: item ids may hold slashes, and {item_id:path} would swallow them
    r.add_api_route("/v1/items/{item_id:path}/similar", similar, methods=["GET"])
    png: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}}}
    r.add_api_route(
        "/v1/items/{item_id:path}/thumbnail", thumbnail, methods=["GET"], response_class=Response, responses=png
    )
    r.add_api_route("/v1/items/{item_id:path}", item, methods=["GET"])
    return r
