"""What one replica of the query service holds: :class:`Service`, the engine behind the HTTP app.

Uploads are decoded and searched in worker threads; encoding goes through ``serve.batch``,
so concurrent queries share one model call while a lone query does not wait for company
(``batch_wait_s`` 0). A cheap upload that finds the model idle skips the queue altogether:
:meth:`Service.answer` decodes, encodes and searches it in one worker-thread call, since each
hop between the event loop and a thread costs about as much as the search itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from ray import serve
from ray.serve.context import _get_internal_replica_context

from medret import kinds
from medret import observability as obs
from medret.errors import Busy, CorruptFileError, MedretError, NotFound
from medret.index.store import CodeIndex
from medret.serve.config import ServiceConfig
from medret.serve.engine import QueryEngine
from medret.serve.uploads import Query


@dataclass(frozen=True)
class Upload:
    """An upload to answer: its bytes and name, the table named (else one that serves its kind), the query mode,
    the NIfTI level or DICOM frame, a tile's mpp, how many hits, the filters, and whether to re-rank."""

    data: bytes
    name: str
    table: str | None = None
    kind: str = kinds.AUTO_QUERY
    slice: int | None = None
    mpp: float | None = None
    k: int = 10
    filters: Mapping[str, Any] = field(default_factory=dict)
    rerank: bool = True


@dataclass
class Answer:
    """An upload answered: its table, the prepared query, its code, the hits and the seconds each stage took."""

    idx: CodeIndex
    query: Query
    code: npt.NDArray[np.uint8]
    reranked: bool
    rows: list[dict[str, Any]]
    timings: dict[str, float]  # seconds: prepare, encode, search


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
        # queries being answered by the model: in the batch queue or a model call, or answered alone (decoded,
        # encoded and searched in one worker-thread call); only the event loop changes it
        self._encoding = 0
        # batches get a thread of their own: behind decoding and searching in the shared pool, a batch
        # would wait for a free thread while new queries pile up elsewhere instead of in the batch queue
        # (a query answered alone runs the model on its worker thread; the encoders are thread-safe)
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
            groups.setdefault(f"{idx.encoder_id}/{idx.has_features}", []).append(
                i
            )  # features only for tables that keep them
        for members in groups.values():
            idx = items[members[0]][0]
            try:
                loop = asyncio.get_running_loop()
                images = [items[i][1] for i in members]
                t0 = time.perf_counter()
                codes, feats = await loop.run_in_executor(self._model, self.engine.encode_features, idx, images)
                obs.QUERY_MODEL_SECONDS.observe(time.perf_counter() - t0)
                for j, i in enumerate(members):
                    out[i] = (codes[j], None if feats is None else feats[j])
            except Exception as err:  # each caller gets its error, the batch goes on
                for i in members:
                    out[i] = err
        return out

    async def prepare(
        self, idx: CodeIndex, data: bytes, name: str, kind: str, slice: int | None, mpp: float | None
    ) -> Query:
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

    async def route_and_prepare(
        self, table: str | None, data: bytes, name: str, kind: str, slice: int | None, mpp: float | None
    ) -> tuple[CodeIndex, Query]:
        """The table that answers an upload (:meth:`QueryEngine.route`) and the upload prepared for it: for a
        cheap kind, one hop to a worker thread for both."""
        if not self.engine.is_heavy(data, name, kind):
            return await asyncio.to_thread(_route_and_prepare, self.engine, table, data, name, kind, slice, mpp)
        idx = await asyncio.to_thread(self.engine.route, table, data, name, kind)
        return idx, await self.prepare(idx, data, name, kind, slice, mpp)

    async def answer(self, up: Upload) -> Answer:
        """An upload's top-``k``: routed, prepared, encoded and searched.

        A cheap upload that finds the model idle is answered in one call on a worker thread (it encodes
        by itself, as it would alone in a batch). Otherwise the stages take their own paths: volumes
        are prepared on the bounded pool, and the code comes through the batch queue, so queries that
        arrive together share model calls.
        """
        if self._encoding == 0 and not self.engine.is_heavy(up.data, up.name, up.kind):
            self._encoding += 1  # queries arriving meanwhile queue for the batch, which the model thread runs
            try:
                return await asyncio.to_thread(_answer_alone, self.engine, up)
            finally:
                self._encoding -= 1
        idx, q = await self.route_and_prepare(up.table, up.data, up.name, up.kind, up.slice, up.mpp)
        t0 = time.perf_counter()
        code, feature = await self.encode(idx, q.image)
        return await asyncio.to_thread(_search_answer, self.engine, up, idx, q, code, feature, time.perf_counter() - t0)

    async def similar_slides(self, table: str | None, slide: str, k: int, method: str) -> tuple[CodeIndex, Any]:
        """Slides like an indexed slide (cheap), else like the slide at that URI under the roots (read, tiled
        and encoded on the bounded pool, like a volume)."""
        try:
            return await asyncio.to_thread(self.engine.similar_slides, table, slide, k, method)
        except NotFound:
            if "/" not in slide:  # a name, not a URI: nothing to read
                raise
        if self._heavy_admitted >= self.cfg.heavy_queue:
            raise Busy(f"{slide[:200]}: {self._heavy_admitted} expensive queries are already running; retry shortly")
        self._heavy_admitted += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._heavy, self.engine.similar_to_slide_at, table, slide, k, method)
        finally:
            self._heavy_admitted -= 1

    async def search_region(
        self, idx: CodeIndex, data: bytes, name: str, mpp: float, k: int, method: str
    ) -> dict[str, Any]:
        """Slide search by an uploaded region: tiled and encoded on the bounded pool, like a volume."""
        if self._heavy_admitted >= self.cfg.heavy_queue:
            raise Busy(
                f"{name[:200]}: {self._heavy_admitted} expensive uploads are already being prepared "
                f"(heavy_queue={self.cfg.heavy_queue}); retry shortly"
            )
        self._heavy_admitted += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._heavy, _search_region, self.engine, idx, data, name, mpp, k, method)
        finally:
            self._heavy_admitted -= 1

    async def encode(
        self, idx: CodeIndex, image: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int8] | None]:
        """The upload's packed code and (where its table keeps them) compact features, through the batch
        queue inside a Serve replica."""
        self._encoding += 1
        try:
            result = await self.encode_batched((idx, image))
        finally:
            self._encoding -= 1
        if isinstance(result, BaseException):
            raise result
        code, feature = result
        return np.asarray(code), feature


def _limit_itk(threads: int) -> None:
    """ITK's own thread pool at the heavy pool's size (it would take every core)."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _search_region(
    engine: QueryEngine, idx: CodeIndex, data: bytes, name: str, mpp: float, k: int, method: str
) -> dict[str, Any]:
    try:
        return engine.search_region(idx, data, name, mpp, k, method)
    except MedretError:
        raise
    except Exception as err:  # a decoder tripped over bad bytes: still the upload's fault
        raise CorruptFileError(name, f"could not decode: {type(err).__name__}: {err}") from err


def _route_and_prepare(
    engine: QueryEngine, table: str | None, data: bytes, name: str, kind: str, slice: int | None, mpp: float | None
) -> tuple[CodeIndex, Query]:
    idx = engine.route(table, data, name, kind)
    return idx, _prepare(engine, idx, data, name, kind, slice, mpp)


def _answer_alone(engine: QueryEngine, up: Upload) -> Answer:
    idx, q = _route_and_prepare(engine, up.table, up.data, up.name, up.kind, up.slice, up.mpp)
    obs.QUERY_BATCH_SIZE.observe(1)
    t0 = time.perf_counter()
    codes, feats = engine.encode_features(idx, [q.image])
    encode_s = time.perf_counter() - t0
    obs.QUERY_MODEL_SECONDS.observe(encode_s)
    return _search_answer(engine, up, idx, q, np.asarray(codes[0]), None if feats is None else feats[0], encode_s)


def _search_answer(
    engine: QueryEngine,
    up: Upload,
    idx: CodeIndex,
    q: Query,
    code: npt.NDArray[np.uint8],
    feature: npt.NDArray[np.int8] | None,
    encode_s: float,
) -> Answer:
    """The upload's hits for its code (re-ranked by its features where asked and kept), and the stages' seconds."""
    feature = feature if up.rerank else None
    t0 = time.perf_counter()
    rows = engine.search(idx, code, up.k, filters=up.filters, features=feature)
    seconds = {"prepare": q.timings["prepare"], "encode": encode_s, "search": time.perf_counter() - t0}
    return Answer(idx, q, code, engine.reranks(idx, feature is not None), rows, seconds)


def _prepare(
    engine: QueryEngine, idx: CodeIndex, data: bytes, name: str, kind: str, slice: int | None, mpp: float | None
) -> Query:
    try:
        return engine.prepare(idx, data, name, kind=kind, slice=slice, mpp=mpp)
    except MedretError:
        raise
    except Exception as err:  # a decoder tripped over bad bytes: still the upload's fault
        raise CorruptFileError(name, f"could not decode: {type(err).__name__}: {err}") from err
