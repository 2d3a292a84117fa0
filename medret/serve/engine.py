"""The query path without a server: decode an upload, preprocess and encode it as the index was, search.

:class:`QueryEngine` is what ``medret search`` calls directly and what the Ray Serve
deployment (:class:`medret.serve.service.Service`) calls per request, so both answer the
same query the same way. Everything about *how* codes were made comes from the table:
the encoder config and checkpoint from its schema metadata, the per-kind preprocessing
recipes and slide tiling from what the indexing job recorded there.

It is a facade over one module per concern:

- :mod:`medret.serve.tables`: listing and opening the code tables, their recipes;
- :mod:`medret.serve.encoders`: the table's encoder, loaded once;
- :mod:`medret.serve.uploads`: an upload -> the prepared image, through :mod:`medret.kinds`;
- :mod:`medret.serve.search`: top-k by code or by item, one item's row;
- :mod:`medret.serve.thumbnails`: an item rendered again from its source, within the roots;
- :mod:`medret.serve.slides`: slide-level search over the tables' slide bags.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from medret import kinds
from medret.errors import DataError, MedretError
from medret.index.store import CodeIndex
from medret.models.encoder import Encoder
from medret.serve import uploads
from medret.serve.config import ServiceConfig
from medret.serve.encoders import Encoders
from medret.serve.search import Searcher
from medret.serve.slides import SlideSearch, slide_kind
from medret.serve.tables import Tables, read_context
from medret.serve.thumbnails import Thumbnails
from medret.serve.uploads import Query

log = logging.getLogger(__name__)

#: tiles read from a slide queried by URI (spread evenly over its tissue): bounds a query's cost
QUERY_SLIDE_TILES = 256


class QueryEngine:
    """Answers queries against the code tables at one index URI. Thread-safe."""

    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        self.catalog = Tables(cfg)
        self.encoders = Encoders(cfg.checkpoint, runtime=cfg.encoder_runtime, threads=cfg.encoder_threads)
        self.searcher = Searcher(cfg, self.catalog)
        self.thumbnails = Thumbnails(cfg)
        self.slide_search = SlideSearch(cfg.s3)

    # -- tables ------------------------------------------------------------------------
    def index(self, table: str | None = None) -> CodeIndex:
        """The table, following new versions at most every ``refresh_s`` seconds."""
        return self.catalog.open(table)

    def route(self, table: str | None, data: bytes, filename: str, kind: str = kinds.AUTO_QUERY) -> CodeIndex:
        """The table that answers an upload: the one named, else one that serves the upload's kind
        (:meth:`~medret.serve.tables.Tables.for_kind`)."""
        if table:
            return self.index(table)
        chosen = uploads.kind_of(data, filename, max_bytes=self.cfg.max_upload_bytes, kind=kind)
        return self.index(self.catalog.for_kind(chosen.name))

    def tables(self) -> list[dict[str, Any]]:
        """Each table's name, size, version, encoder, recipes, and the kinds and modality it serves."""
        return self.catalog.describe()

    def health(self) -> None:
        """Raise if this engine cannot answer: the index's table list is unreachable."""
        self.catalog.names()

    def warm(self) -> None:
        """Load the codes and encoder of the default table and of every table a routed job wrote (uploads
        are sent to those by kind), and run one search on each, so the first query is fast."""
        try:
            names = [self.catalog.default()]
            names += [n for n in self.catalog.names() if n not in names and self.index(n).serves is not None]
        except MedretError as err:  # an empty index: the requests will say so
            log.warning("warm-up skipped: %s", err)
            return
        for name in names:
            try:
                idx = self.index(name)
                enc = idx.encoder
                shape = enc.input_size if enc.channels == 1 else (*enc.input_size, enc.channels)
                self.search(idx, self.encode(idx, [np.zeros(shape, np.float32)])[0], 1)
            except MedretError as err:  # a missing checkpoint: the requests will say so
                log.warning("warm-up of table %s skipped: %s", name, err)
        from medret.slides.match import warm as warm_slide_kernels

        warm_slide_kernels()  # numba compiles them on first use: not during a slide query

    # -- the encoder -------------------------------------------------------------------
    def encoder(self, idx: CodeIndex) -> Encoder:
        """The table's encoder, loaded once; its id must equal the table's."""
        return self.encoders.get(idx)

    def encode(self, idx: CodeIndex, images: Sequence[npt.NDArray[np.float32]]) -> npt.NDArray[np.uint8]:
        """Packed codes of prepared images, one model call, by the table's encoder."""
        return self.encoders.encode(idx, images)

    def encode_features(
        self, idx: CodeIndex, images: Sequence[npt.NDArray[np.float32]]
    ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int8] | None]:
        """Packed codes and, where the table keeps them, compact features for re-ranking."""
        return self.encoders.encode_features(idx, images)

    # -- uploads -----------------------------------------------------------------------
    def prepare(
        self,
        idx: CodeIndex,
        data: bytes,
        filename: str,
        *,
        kind: str = kinds.AUTO_QUERY,
        slice: int | None = None,
        mpp: float | None = None,
    ) -> Query:
        """Decode an upload and preprocess it exactly as the indexing job preprocessed its kind."""
        ctx = read_context(idx, pixel_budget=self.cfg.pixel_budget)
        return uploads.prepare(
            ctx, data, filename, max_bytes=self.cfg.max_upload_bytes, kind=kind, slice=slice, mpp=mpp
        )

    @staticmethod
    def is_heavy(data: bytes, filename: str, kind: str) -> bool:
        """Whether preparing this upload is expensive (a volume: registration to the template)."""
        return uploads.is_heavy(data, filename, kind)

    # -- search ------------------------------------------------------------------------
    def search(
        self,
        idx: CodeIndex,
        codes: npt.NDArray[np.uint8],
        k: int = 10,
        *,
        filters: Mapping[str, Any] | None = None,
        exclude: str | None = None,
        features: npt.NDArray[np.int8] | None = None,
    ) -> list[dict[str, Any]]:
        """Top-``k`` hits (dicts) for one packed code; ``exclude`` drops that item (a by-id query's own);
        with ``features``, the Hamming shortlist re-ranked by them."""
        return self.searcher.search(idx, codes, k, filters=filters, exclude=exclude, features=features)

    def reranks(self, idx: CodeIndex, features: bool) -> bool:
        """Whether a query with (``features``) or without compact features is re-ranked on this table."""
        return self.searcher.reranks(idx, features)

    def use_ivf(self, idx: CodeIndex) -> bool:
        """The approximate path, for tables at least ``ivf_min_rows`` large that have an IVF index."""
        return self.searcher.use_ivf(idx)

    def item(self, table: str | None, item_id: str) -> dict[str, Any]:
        """One item's row (without its code)."""
        return self.searcher.item(table, item_id)

    def similar(
        self,
        table: str | None,
        item_id: str,
        k: int = 10,
        *,
        filters: Mapping[str, Any] | None = None,
        rerank: bool = True,
    ) -> list[dict[str, Any]]:
        """Top-``k`` hits for an indexed item's own code, the item itself left out (re-ranked by its stored
        features where the table keeps them, unless ``rerank`` is off)."""
        return self.searcher.similar(table, item_id, k, filters=filters, rerank=rerank)

    # -- slides ------------------------------------------------------------------------
    def slides(self, table: str | None) -> tuple[CodeIndex, list[dict[str, Any]]]:
        """The table's indexed slides (from its slide table); default: the table that serves slides."""
        idx = self.index(table or self.catalog.for_kind(slide_kind()))
        return idx, self.slide_search.slides(idx)

    def similar_slides(self, table: str | None, slide: str, k: int, method: str) -> tuple[CodeIndex, dict[str, Any]]:
        """The ``k`` slides most like the indexed slide ``slide`` (its id: the source URI, or its name)."""
        idx = self.index(table or self.catalog.for_kind(slide_kind()))
        return idx, self.slide_search.similar(idx, slide, k, method)

    def similar_to_slide_at(self, table: str | None, uri: str, k: int, method: str) -> tuple[CodeIndex, dict[str, Any]]:
        """The ``k`` slides most like a slide that is not indexed, read from ``uri`` (under the roots the
        service may read): tiled over tissue on the table's grid and mpp, at most ``QUERY_SLIDE_TILES`` tiles
        evenly spread over the tissue, encoded by the table's encoder; its bag chosen by the table's rule."""
        import dataclasses
        import json

        from medret.kinds import Unit

        idx = self.index(table or self.catalog.for_kind(slide_kind()))
        store, key = self.thumbnails.store_for(idx, uri)
        ctx = read_context(idx, pixel_budget=self.cfg.pixel_budget, store=store)
        kind = kinds.get(slide_kind())
        unit = Unit(uri, key, store.info(key).etag)
        positions = [p for plan in kind.plan(ctx, unit) for p in json.loads(plan)]
        if not positions:
            raise DataError(f"{uri[:200]}: no tile of the slide has enough tissue at {ctx.tiling.mpp:g} mpp")
        if len(positions) > QUERY_SLIDE_TILES:
            keep = np.unique(np.linspace(0, len(positions) - 1, QUERY_SLIDE_TILES).round().astype(np.int64))
            positions = [positions[i] for i in keep]
        items, _, _ = kind.read_items(ctx, dataclasses.replace(unit, plan=json.dumps(positions)))
        codes = self.encode(idx, [it.image for it in items])
        xy = np.array([[int(it.meta["tile_x"]), int(it.meta["tile_y"])] for it in items], np.int64)
        query = {"uri": uri, "slide_id": uri.rsplit("/", 1)[-1], "tiles_on_tissue": len(positions)}
        return idx, self.slide_search.of_codes(idx, codes, xy, query, k, method)

    def search_region(
        self, idx: CodeIndex, data: bytes, filename: str, mpp: float, k: int, method: str
    ) -> dict[str, Any]:
        """The ``k`` slides most like an uploaded slide region at ``mpp`` microns per pixel."""
        from medret.io.raster import read_raster
        from medret.preprocess.wsi.tiling import SlideTiles

        name = uploads.upload_name(filename)
        uploads.kind_of(data, name, max_bytes=self.cfg.max_upload_bytes, kind="image")  # size and format checked
        ctx = read_context(idx, pixel_budget=self.cfg.pixel_budget)
        rgb = np.asarray(read_raster(data, name=name, pixel_budget=self.cfg.pixel_budget).frame(0))
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[..., None], 3, axis=2)
        recipe = ctx.recipe(slide_kind())

        def prepare(tile: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
            (prepared,) = recipe(SlideTiles.of_region(tile, ctx.tiling), input_size=ctx.input_size)
            return np.asarray(prepared.image, np.float32)

        return self.slide_search.region(
            idx, rgb[..., :3], name, mpp, k, lambda images: self.encode(idx, images), prepare, method
        )

    # -- thumbnails --------------------------------------------------------------------
    def thumbnail(self, table: str | None, item_id: str) -> bytes:
        """A PNG of the item as the encoder saw it (slide tiles in colour), rendered from its source."""
        idx = self.index(table)
        return self.thumbnails.png(idx, item_id, self.item(idx.name, item_id))
