"""Searching a code table: top-k by Hamming distance for a code, by an item's own code, one item's row.

Filters are checked against the table's columns before any work (:func:`where`); tables
at least ``ivf_min_rows`` large that have an IVF index are searched through it, all others
by the exact scan. A row whose label is a class id with a name (:mod:`medret.index.labels`)
also carries ``label_name``.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from medret.errors import ConfigError, NotFound
from medret.index.filters import where_clause
from medret.index.labels import LabelNames
from medret.index.schema import FEATURE_COLUMN
from medret.index.shards import ShardedIndex
from medret.index.store import RESULT_COLUMNS, CodeIndex, features_column
from medret.models import rerank
from medret.serve.config import ServiceConfig
from medret.serve.tables import Tables


def where(filters: Mapping[str, Any]) -> str | None:
    """The SQL filter for column -> value (or list of values); unset values are left out.

    >>> where({"label": None, "dataset": ""}) is None
    True
    """
    return where_clause({k: v for k, v in filters.items() if v not in (None, "", [])})


def row_of(r: dict[str, Any]) -> dict[str, Any]:
    """A table row as the API shows it: no nulls, ``indexed_at`` as ISO text, ``extra`` parsed when it is JSON.

    >>> row_of({"item_id": "a", "label": None, "extra": '{"n": 1}', "indexed_at": None})
    {'item_id': 'a', 'extra': {'n': 1}}
    """
    out = {k: v for k, v in r.items() if v is not None and k != "indexed_at"}
    if r.get("indexed_at") is not None:
        out["indexed_at"] = r["indexed_at"].isoformat()
    if out.get("extra"):
        with contextlib.suppress(ValueError):
            out["extra"] = json.loads(out["extra"])
    else:
        out.pop("extra", None)
    return out


class Searcher:
    """Top-k queries and item look-ups over the tables of :class:`~medret.serve.tables.Tables`. Thread-safe."""

    def __init__(self, cfg: ServiceConfig, tables: Tables) -> None:
        self.cfg = cfg
        self.tables = tables
        self._lock = threading.Lock()
        self._ivf: dict[tuple[str, int], bool] = {}

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
        """Top-``k`` hits (dicts) for one packed code; ``exclude`` drops that item (a by-id query's own).

        With ``features`` (the query's compact features) and a table that keeps them, the Hamming top
        ``max(k, rerank_candidates)`` is re-ranked by feature similarity (hits carry ``similarity``);
        without, the order is the Hamming order, ties to the earlier row."""
        if not 1 <= k <= self.cfg.max_k:
            raise ConfigError(f"k must be between 1 and {self.cfg.max_k}, got {k}")
        clause = where(filters or {})
        q, want = np.asarray(codes).reshape(1, -1), k + (1 if exclude else 0)
        sharded = self.tables.sharded(idx)
        if sharded is not None:
            hits = self._search_shards(idx, sharded, q, want, clause, features if idx.has_features else None)
        elif features is not None and idx.has_features and not self.use_ivf(idx):
            hits = idx.search_reranked(q, features, want, candidates=self.cfg.rerank_candidates, where=clause)
        elif self.use_ivf(idx):
            (hits,) = idx.search_ivf(q, want, nprobes=self.cfg.ivf_nprobes, where=clause)
        else:
            (hits,) = idx.search(q, want, where=clause)
        names = LabelNames(idx.encoder.extra)
        rows = [names.add_to(row_of(r)) for r in hits.to_pylist() if r["item_id"] != exclude][:k]
        for rank, r in enumerate(rows):
            r["rank"] = rank
        return rows

    def _search_shards(
        self,
        idx: CodeIndex,
        sharded: ShardedIndex,
        q: npt.NDArray[np.uint8],
        k: int,
        clause: str | None,
        features: npt.NDArray[np.int8] | None,
    ) -> pa.Table:
        """The exact top-``k`` from the table's shards (re-ranked like :meth:`CodeIndex.search_reranked` when
        ``features``), its rows read by position from the version the shards answered at."""
        got = sharded.search(q, max(k, self.cfg.rerank_candidates) if features is not None else k, where=clause)
        found = got.positions[0] >= 0
        pos, dist = got.positions[0][found], got.distances[0][found]
        columns = [*RESULT_COLUMNS, *([FEATURE_COLUMN] if features is not None else [])]
        meta = idx.take_at(got.version, pos, columns)
        if meta.column("item_id").to_pylist() != got.item_ids[0][found].tolist():
            raise RuntimeError(f"table {idx.name!r} v{got.version}: rows read by position are not the shards' hits")
        sims = None
        if features is not None:
            sims = rerank.similarity(features, features_column(meta.column(FEATURE_COLUMN)))
            order = rerank.rerank_order(pos, dist, sims)[:k]
            meta, dist, sims = meta.take(pa.array(order)).drop_columns([FEATURE_COLUMN]), dist[order], sims[order]
        hits = meta.add_column(0, "distance", pa.array(dist, pa.int32())).add_column(
            0, "rank", pa.array(np.arange(meta.num_rows), pa.int32())
        )
        if sims is not None:
            cos = np.round(sims.astype(np.float64) / rerank.SCALE**2, 4)
            hits = hits.append_column("similarity", pa.array(cos, pa.float64()))
        return hits

    def reranks(self, idx: CodeIndex, features: bool) -> bool:
        """Whether a query with (``features``) or without compact features is re-ranked on this table."""
        return features and idx.has_features and (self.tables.sharded(idx) is not None or not self.use_ivf(idx))

    def use_ivf(self, idx: CodeIndex) -> bool:
        """The approximate path, for tables at least ``ivf_min_rows`` large that have an IVF index."""
        if self.cfg.ivf_min_rows is None:
            return False
        key = (idx.name, idx.version)
        with self._lock:
            if key not in self._ivf:
                self._ivf[key] = idx.count() >= self.cfg.ivf_min_rows and idx.has_ivf()
            return self._ivf[key]

    def item(self, table: str | None, item_id: str) -> dict[str, Any]:
        """One item's row (without its code)."""
        idx = self.tables.open(table)
        t = idx.get([item_id])
        if t.num_rows == 0:
            raise NotFound(f"no item {item_id[:200]!r} in table {idx.name!r}")
        t = t.drop_columns([c for c in ("code", "feature") if c in t.column_names])
        return LabelNames(idx.encoder.extra).add_to(row_of(t.to_pylist()[0]))

    def similar(
        self,
        table: str | None,
        item_id: str,
        k: int = 10,
        *,
        filters: Mapping[str, Any] | None = None,
        rerank: bool = True,
    ) -> list[dict[str, Any]]:
        """Top-``k`` hits for an indexed item's own code, the item itself left out; re-ranked by its stored
        features where the table keeps them and ``rerank`` is on."""
        idx = self.tables.open(table)
        try:
            codes = idx.codes_of([item_id])
            features = idx.features_of([item_id]) if rerank else None
        except KeyError as err:
            raise NotFound(f"no item {item_id[:200]!r} in table {idx.name!r}") from err
        return self.search(
            idx, codes, k, filters=filters, exclude=item_id, features=None if features is None else features[0]
        )
