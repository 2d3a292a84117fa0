"""The HTTP API and web page: a FastAPI app over :class:`~medret.serve.engine.QueryEngine`.

The same app runs as the ingress of the Ray Serve deployment (:mod:`medret.serve.deployment`)
and, in tests, under Starlette's test client. Uploads are decoded and searched in
worker threads; encoding goes through ``serve.batch``, so concurrent queries share
one model call while a lone query does not wait for company (``batch_wait_s`` 0).

Errors are the client's (4xx) whenever the input is: an unreadable or unsupported
upload, a bad parameter, an unknown table or item, a body over the size limit. Each
says what was wrong with which input.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Annotated, Any
from urllib.parse import quote

import numpy as np
import numpy.typing as npt
from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from ray import serve
from ray.serve.context import _get_internal_replica_context

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
    StorageError,
    UnsupportedFormatError,
    UploadTooLarge,
)
from medret.index.store import CodeIndex
from medret.serve.engine import QueryEngine, ServiceConfig
from medret.serve.guard import ERROR_RESPONSES, RequestGuard, public_message

log = logging.getLogger(__name__)

FILTER_FIELDS = ("modality", "dataset", "label")


class Hit(BaseModel):
    rank: int
    item_id: str
    distance: int
    source_uri: str
    thumbnail_url: str
    similar_url: str
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    table: str
    encoder_id: str
    k: int
    query: dict[str, Any]
    results: list[Hit]
    timings_ms: dict[str, float]


class TableInfo(BaseModel):
    name: str
    rows: int
    version: int
    encoder_id: str
    encoder: dict[str, Any]
    recipes: dict[str, Any]


class Health(BaseModel):
    status: str
    auth: bool


class Service:
    """What one replica holds: the engine, a batched encoder, and a bounded pool for expensive uploads.

    Volumes (MRI registration, seconds to a minute of CPU each) are prepared on
    ``heavy_workers`` threads of their own with ITK limited to as many threads, and at most
    ``heavy_queue`` are admitted at once (more get 503 with Retry-After), so a PNG query
    never waits behind them.
    """

    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        self.engine = QueryEngine(cfg)
        self._heavy = concurrent.futures.ThreadPoolExecutor(
            cfg.heavy_workers, thread_name_prefix="medret-heavy", initializer=_limit_itk, initargs=(cfg.heavy_workers,)
        )
        self._heavy_admitted = 0
        # the model gets a thread of its own: behind decoding and searching in the shared pool, a batch
        # would wait for a free thread while new queries pile up elsewhere instead of in the batch queue
        self._model = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="medret-encode")
        # serve.batch lives in a Serve replica; elsewhere (tests, a plain ASGI server) each query encodes alone
        self.encode_batched: Callable[[Any], Awaitable[Any]] = self._encode_one
        if _get_internal_replica_context() is not None:
            self.encode_batched = serve.batch(max_batch_size=cfg.batch_max_size, batch_wait_timeout_s=cfg.batch_wait_s)(
                self._encode_many
            )

    async def _encode_one(self, item: tuple[CodeIndex, npt.NDArray[np.float32]]) -> Any:
        (out,) = await self._encode_many([item])
        return out

    async def _encode_many(self, items: list[tuple[CodeIndex, npt.NDArray[np.float32]]]) -> list[Any]:
        """One model call per encoder for everything that queued up meanwhile."""
        obs.QUERY_BATCH_SIZE.observe(len(items))
        out: list[Any] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, (idx, _) in enumerate(items):
            groups.setdefault(idx.encoder_id, []).append(i)
        for members in groups.values():
            idx = items[members[0]][0]
            try:
                loop = asyncio.get_running_loop()
                images = [items[i][1] for i in members]
                t0 = time.perf_counter()
                codes = await loop.run_in_executor(self._model, self.engine.encode, idx, images)
                obs.QUERY_MODEL_SECONDS.observe(time.perf_counter() - t0)
                for j, i in enumerate(members):
                    out[i] = codes[j]
            except Exception as err:  # each caller gets its error, the batch goes on
                for i in members:
                    out[i] = err
        return out

    async def prepare(
        self, idx: CodeIndex, data: bytes, name: str, kind: str, slice: int | None, mpp: float | None
    ) -> Any:
        """Decode and preprocess an upload: cheap kinds on the shared threads, volumes on the bounded pool."""
        if not self.engine.is_heavy(data, name, kind):
            return await asyncio.to_thread(_prepare, self.engine, idx, data, name, kind, slice, mpp)
        if self._heavy_admitted >= self.cfg.heavy_queue:
            raise Busy(
                f"{name[:200]}: {self._heavy_admitted} volume uploads are already being prepared "
                f"(heavy_queue={self.cfg.heavy_queue}); retry shortly"
            )
        self._heavy_admitted += 1  # the event loop is one thread: no lock needed
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._heavy, _prepare, self.engine, idx, data, name, kind, slice, mpp)
        finally:
            self._heavy_admitted -= 1

    async def encode(self, idx: CodeIndex, image: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
        result = await self.encode_batched((idx, image))
        if isinstance(result, BaseException):
            raise result
        return np.asarray(result)


def status_of(err: BaseException) -> int:
    if isinstance(err, NotFound):
        return 404
    if isinstance(err, Forbidden):
        return 403
    if isinstance(err, (PixelBudgetError, UploadTooLarge)):
        return 413
    if isinstance(err, UnsupportedFormatError):
        return 415
    if isinstance(err, (EncoderMismatchError, Busy)):
        return 503  # the service cannot answer this now: an operator's problem or a full queue, said plainly
    if isinstance(err, (ConfigError, SchemaError, InvalidURIError)):
        return 400
    if isinstance(err, StorageError):
        return 502
    if isinstance(err, (IndexError_, MedretError)):
        return 422
    return 500


def _page() -> str:
    return resources.files("medret.serve").joinpath("static/index.html").read_text()


def create_app(service: Service) -> FastAPI:
    cfg, engine = service.cfg, service.engine
    app = FastAPI(
        title="medret query service",
        version="1",
        description="Top-k similar medical images by Hamming distance over deep hashing codes.",
        redirect_slashes=False,  # a redirect would echo the client's Host header
        responses=ERROR_RESPONSES,
    )

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if not cfg.token:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), cfg.token.encode()):
            raise HTTPException(
                401, "missing or wrong bearer token (send Authorization: Bearer TOKEN)", {"WWW-Authenticate": "Bearer"}
            )

    auth = [Depends(require_token)]

    @app.middleware("http")
    async def count(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        obs.QUERY_REQUESTS.labels(route=name, code=str(response.status_code)).inc()
        obs.QUERY_REQUEST_SECONDS.labels(route=name).observe(time.perf_counter() - t0)
        return response

    @app.exception_handler(MedretError)
    async def medret_error(request: Request, err: MedretError) -> JSONResponse:
        code = status_of(err)
        if code >= 500:
            log.error("%s %s: %s", request.method, request.url.path, err)
        headers = {"Retry-After": "5"} if isinstance(err, Busy) else None
        return JSONResponse({"detail": public_message(str(err))}, status_code=code, headers=headers)

    def item_urls(table: str, item_id: str) -> tuple[str, str]:
        q = quote(item_id, safe="")
        t = quote(table, safe="")
        return f"/v1/items/{q}/thumbnail?table={t}", f"/v1/items/{q}/similar?table={t}"

    def hits(table: str, rows: list[dict[str, Any]]) -> list[Hit]:
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

    def parse_filters(modality: str | None, dataset: str | None, label: str | None, where: str | None) -> dict:
        filters: dict[str, Any] = {"modality": modality, "dataset": dataset, "label": label}
        if where:
            try:
                extra = json.loads(where)
            except (ValueError, RecursionError) as err:
                raise ConfigError(f"filters must be a JSON object of column: value, got {where[:100]!r}") from err
            if not isinstance(extra, dict) or not all(
                isinstance(v, (str, int, float))
                or (isinstance(v, list) and all(isinstance(x, (str, int, float)) for x in v))
                for v in extra.values()
            ):
                raise ConfigError('filters must map columns to a value or a list of values, e.g. {"label": ["1"]}')
            filters.update(extra)
        engine.filters(filters)  # validates column names and values now, before any work
        return filters

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_page())

    @app.get("/healthz", responses={503: {"model": Health, "description": "the index cannot be reached"}})
    async def healthz() -> Any:
        """Whether this replica can answer queries (the index's tables are reachable)."""
        try:
            await asyncio.to_thread(engine.health)
        except Exception as err:
            log.warning("health check failed: %s", err)
            return JSONResponse({"status": "unavailable", "auth": bool(cfg.token)}, status_code=503)
        return Health(status="ok", auth=bool(cfg.token))

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/tables", dependencies=auth)
    async def tables() -> list[TableInfo]:
        return [TableInfo(**t) for t in await asyncio.to_thread(engine.tables)]

    @app.post("/v1/search", dependencies=auth)
    async def search(
        file: Annotated[UploadFile, File(description="PNG/JPEG, DICOM, NIfTI, or a slide region as an image tile")],
        table: Annotated[str | None, Form()] = None,
        k: Annotated[int, Form(ge=1)] = 10,
        kind: Annotated[str, Form(description="auto, image, dicom, nifti or tile")] = "auto",
        slice: Annotated[int | None, Form(ge=0, description="NIfTI level or DICOM frame (0-based)")] = None,
        mpp: Annotated[float | None, Form(gt=0, description="microns per pixel of an uploaded tile")] = None,
        modality: Annotated[str | None, Form()] = None,
        dataset: Annotated[str | None, Form()] = None,
        label: Annotated[str | None, Form()] = None,
        filters: Annotated[str | None, Form(description='JSON object, e.g. {"label": ["1", "2"]}')] = None,
    ) -> SearchResponse:
        t0 = time.perf_counter()
        if k > cfg.max_k:
            raise ConfigError(f"k must be at most {cfg.max_k}, got {k}")
        chosen = parse_filters(modality, dataset, label, filters)
        data = await file.read(cfg.max_upload_bytes + 1)
        name = file.filename or "upload"
        idx = await asyncio.to_thread(engine.index, table)
        q = await service.prepare(idx, data, name, kind, slice, mpp)
        t1 = time.perf_counter()
        code = await service.encode(idx, q.image)
        t2 = time.perf_counter()
        rows = await asyncio.to_thread(engine.search, idx, code, k, filters=chosen)
        t3 = time.perf_counter()
        timings = {
            "decode": q.timings["decode"] * 1e3,
            "preprocess": q.timings["preprocess"] * 1e3,
            "encode": (t2 - t1) * 1e3,
            "search": (t3 - t2) * 1e3,
            "total": (t3 - t0) * 1e3,
        }
        for stage, ms in timings.items():
            obs.QUERY_STAGE_SECONDS.labels(stage=stage).observe(ms / 1e3)
        return SearchResponse(
            table=idx.name,
            encoder_id=idx.encoder_id,
            k=k,
            query={"filename": name, "kind": q.kind, "bytes": len(data), "code": bytes(code).hex(), **q.meta},
            results=hits(idx.name, rows),
            timings_ms={s: round(v, 3) for s, v in timings.items()},
        )

    # the sub-resources first: item ids may hold slashes, and {item_id:path} would swallow them
    @app.get("/v1/items/{item_id:path}/similar", dependencies=auth)
    async def similar(
        item_id: str,
        table: str | None = None,
        k: Annotated[int, Query(ge=1)] = 10,
        modality: str | None = None,
        dataset: str | None = None,
        label: str | None = None,
        filters: str | None = None,
    ) -> SearchResponse:
        t0 = time.perf_counter()
        if k > cfg.max_k:
            raise ConfigError(f"k must be at most {cfg.max_k}, got {k}")
        chosen = parse_filters(modality, dataset, label, filters)
        idx = await asyncio.to_thread(engine.index, table)
        rows = await asyncio.to_thread(engine.similar, idx.name, item_id, k, filters=chosen)
        total = (time.perf_counter() - t0) * 1e3
        obs.QUERY_STAGE_SECONDS.labels(stage="search").observe(total / 1e3)
        return SearchResponse(
            table=idx.name,
            encoder_id=idx.encoder_id,
            k=k,
            query={"item_id": item_id},
            results=hits(idx.name, rows),
            timings_ms={"search": round(total, 3), "total": round(total, 3)},
        )

    @app.get(
        "/v1/items/{item_id:path}/thumbnail",
        dependencies=auth,
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    async def thumbnail(item_id: str, table: str | None = None) -> Response:
        png = await asyncio.to_thread(engine.thumbnail, table, item_id)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/v1/items/{item_id:path}", dependencies=auth)
    async def item(item_id: str, table: str | None = None) -> dict[str, Any]:
        idx = await asyncio.to_thread(engine.index, table)
        row = await asyncio.to_thread(engine.item, idx.name, item_id)
        thumb, similar_url = item_urls(idx.name, item_id)
        return {"table": idx.name, **row, "thumbnail_url": thumb, "similar_url": similar_url}

    if cfg.allowed_hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(cfg.allowed_hosts))
    # outermost: auth and body limits are decided before any body is read or parsed
    app.add_middleware(RequestGuard, cfg=cfg)
    return app


def _limit_itk(threads: int) -> None:
    """ITK's own thread pool at the heavy pool's size (it would take every core)."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _prepare(
    engine: QueryEngine, idx: CodeIndex, data: bytes, name: str, kind: str, slice: int | None, mpp: float | None
) -> Any:
    try:
        return engine.prepare(idx, data, name, kind=kind, slice=slice, mpp=mpp)
    except MedretError:
        raise
    except Exception as err:  # a decoder tripped over bad bytes: still the upload's fault
        from medret.errors import CorruptFileError

        raise CorruptFileError(name, f"could not decode: {type(err).__name__}: {err}") from err
