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
- :mod:`medret.serve.thumbnails`: an item rendered again from its source, within the roots.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from medret import kinds
from medret.errors import MedretError
from medret.index.store import CodeIndex
from medret.models.encoder import Encoder
from medret.serve import uploads
from medret.serve.config import ServiceConfig
from medret.serve.encoders import Encoders
from medret.serve.search import Searcher
from medret.serve.tables import Tables, read_context
from medret.serve.thumbnails import Thumbnails
from medret.serve.uploads import Query

log = logging.getLogger(__name__)


class QueryEngine:
    """Answers queries against the code tables at one index URI. Thread-safe."""

    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        self.catalog = Tables(cfg)
        self.encoders = Encoders(cfg.checkpoint)
        self.searcher = Searcher(cfg, self.catalog)
        self.thumbnails = Thumbnails(cfg)

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

    # -- the encoder -------------------------------------------------------------------
    def encoder(self, idx: CodeIndex) -> Encoder:
        """The table's encoder, loaded once; its id must equal the table's."""
        return self.encoders.get(idx)

    def encode(self, idx: CodeIndex, images: Sequence[npt.NDArray[np.float32]]) -> npt.NDArray[np.uint8]:
        """Packed codes of prepared images, one model call, by the table's encoder."""
        return self.encoders.encode(idx, images)

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
    ) -> list[dict[str, Any]]:
        """Top-``k`` hits (dicts) for one packed code; ``exclude`` drops that item (a by-id query's own)."""
        return self.searcher.search(idx, codes, k, filters=filters, exclude=exclude)

    def use_ivf(self, idx: CodeIndex) -> bool:
        """The approximate path, for tables at least ``ivf_min_rows`` large that have an IVF index."""
        return self.searcher.use_ivf(idx)

    def item(self, table: str | None, item_id: str) -> dict[str, Any]:
        """One item's row (without its code)."""
        return self.searcher.item(table, item_id)

    def similar(
        self, table: str | None, item_id: str, k: int = 10, *, filters: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Top-``k`` hits for an indexed item's own code, the item itself left out."""
        return self.searcher.similar(table, item_id, k, filters=filters)

    # -- thumbnails --------------------------------------------------------------------
    def thumbnail(self, table: str | None, item_id: str) -> bytes:
        """A PNG of the item as the encoder saw it (slide tiles in colour), rendered from its source."""
        idx = self.index(table)
        return self.thumbnails.png(idx, item_id, self.item(idx.name, item_id))
