"""The code index: binary codes + metadata in a LanceDB table, searched by Hamming distance.

Rows are keyed by ``item_id``: :meth:`CodeIndex.upsert` replaces an existing item
and never duplicates it. Every write is a new table version (old versions stay
readable until :meth:`CodeIndex.optimize` cleans them up). Exact search runs on
packed codes held in memory (:mod:`medret.index.search`), reloaded when the table
version changes; :meth:`CodeIndex.search_ivf` uses LanceDB's IVF_FLAT index with
``hamming`` for tables too large to scan.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from medret import observability as obs
from medret.config import S3Config
from medret.errors import ConfigError, EncoderMismatchError, SchemaError, TableNotFoundError
from medret.index import schema as sch
from medret.index.filters import quote
from medret.index.live import LiveSearch
from medret.index.search import to_columns, topk_columns
from medret.models import rerank
from medret.models.codes import as_codes, to_words
from medret.models.encoder import EncoderConfig
from medret.storage.s3 import lance_storage_options

log = logging.getLogger(__name__)

RESULT_COLUMNS = [c for c in sch.METADATA_COLUMNS if c != "encoder_id"]
#: the default of :attr:`CodeIndex.metadata_in_memory_rows`: about 100-300 MB of ids, URIs and labels
METADATA_IN_MEMORY_ROWS = 1_000_000
#: columns the indexing job keeps a BTREE index on (:meth:`CodeIndex.ensure_scalar_indices`)
SCALAR_INDEX_COLUMNS = ("item_id", "source_uri")


def connect(uri: str, s3: S3Config | None = None) -> Any:
    import lancedb

    return lancedb.connect(uri, storage_options=lance_storage_options(uri, s3))


#: the tables medret keeps beside a code table ``T``: ``T__manifest`` (what was indexed) and ``T__slides``
#: (slide search's bags); they are not code tables themselves
COMPANION_SUFFIXES = ("__manifest", "__slides", "__lesions")


def is_code_table(name: str) -> bool:
    """Whether ``name`` is a code table (not one of the companions kept beside one)."""
    return not name.endswith(COMPANION_SUFFIXES)


def features_column(col: pa.ChunkedArray) -> npt.NDArray[np.int8]:
    """The ``feature`` column as (n, DIMS) int8, zeros where a row has none."""
    arr = col.combine_chunks()
    n = len(arr)
    if n == 0:
        return np.zeros((0, rerank.DIMS), np.int8)
    child = arr.values.fill_null(0) if arr.values.null_count else arr.values
    values = child.to_numpy(zero_copy_only=False)[arr.offset * rerank.DIMS : (arr.offset + n) * rerank.DIMS]
    out = np.asarray(values, np.int8).reshape(n, rerank.DIMS).copy()
    if arr.null_count:
        out[~arr.is_valid().to_numpy(zero_copy_only=False)] = 0
    return out


def list_tables(uri: str, s3: S3Config | None = None) -> list[str]:
    return sorted(connect(uri, s3).list_tables().tables)


def code_rows(item_ids: Sequence[str], codes: npt.NDArray[np.uint8], encoder_id: str, /, **columns: Any) -> pa.Table:
    """Rows of a code table from ids, packed (n, bytes) codes and metadata columns."""
    if len(item_ids) != len(codes):
        raise SchemaError(f"{len(item_ids)} item ids but {len(codes)} codes")
    n = len(codes)
    data: dict[str, Any] = {"item_id": pa.array(item_ids, pa.string()), **columns}
    data.setdefault("encoder_id", [encoder_id] * n)
    data.setdefault("indexed_at", pa.array([datetime.now(timezone.utc)] * n, pa.timestamp("us", tz="UTC")))
    data["code"] = pa.FixedSizeListArray.from_arrays(pa.array(codes.ravel(), pa.uint8()), codes.shape[1])
    return pa.table(data)


@dataclass(frozen=True)
class FragmentTarget:
    """A code table as a worker sees it: rows written here become fragments for the driver to commit."""

    dataset_uri: str
    schema: pa.Schema
    storage_options: dict[str, str] | None
    encoder_id: str

    def write(self, item_ids: Sequence[str], codes: npt.NDArray[np.uint8], **columns: Any) -> list[str]:
        """Write items (packed codes, metadata columns as in :meth:`CodeIndex.rows`) as uncommitted fragments."""
        from lance.fragment import write_fragments

        table = sch.conform(code_rows(item_ids, codes, self.encoder_id, **columns), self.schema)
        frags = write_fragments(table, self.dataset_uri, schema=self.schema, storage_options=self.storage_options)
        return [json.dumps(f.to_json()) for f in frags]


@dataclass
class _Snapshot:
    version: int
    dataset: Any  # lance.LanceDataset pinned at ``version``
    cols: npt.NDArray[np.uint64]  # (w, n) word columns in scan order
    item_ids: npt.NDArray[np.object_]
    rowids: npt.NDArray[np.uint64]
    rowid_order: npt.NDArray[np.int64]
    features: npt.NDArray[np.int8] | None = None  # (n, DIMS) compact features; zeros where a row has none
    meta: pa.Table | None = None  # the result columns of every row, for tables of at most metadata_in_memory_rows
    id_order: npt.NDArray[np.int64] | None = None  # argsort of item_ids, built on the first lookup by id
    sorted_ids: npt.NDArray[np.object_] | None = None


class CompanionTable:
    """A table kept beside a code table by the job (``<table>__slides``, ``<table>__lesions``): what their
    readers share. Subclasses set ``_table`` (a LanceDB table)."""

    _table: Any

    @property
    def version(self) -> int:
        return int(self._table.version)

    def refresh(self) -> None:
        """Follow the latest committed version."""
        self._table.checkout_latest()

    def count(self) -> int:
        return int(self._table.count_rows())


class CodeIndex:
    """A code table. Make one with :meth:`create` or :meth:`open`."""

    def __init__(self, table: Any, *, uri: str, name: str, s3: S3Config | None = None) -> None:
        self._table = table
        self.uri = uri
        self.name = name
        self._storage_options = lance_storage_options(uri, s3)
        schema = table.schema
        self.encoder: EncoderConfig = sch.encoder_of(schema)
        self._encoder_id = self.encoder.encoder_id  # a digest of the config: worth computing once
        self.checkpoint: str = sch.checkpoint_of(schema)
        self.recipes: dict[str, Any] | None = sch.recipes_of(schema)
        self.serves: tuple[str, ...] | None = sch.serves_of(schema)
        self._has_features = sch.has_features(schema)
        self._loading = threading.Lock()  # one thread loads a new version's snapshot; the others wait for it
        self._snapshot: _Snapshot | None = None
        self._version: int | None = None  # cached: asking LanceDB costs ~1 ms; writes and refresh reset it
        self._last_refresh = time.monotonic()
        #: exact top-k across versions: multi-index hashing once the table is large enough (see live.py)
        self.live = LiveSearch(table=name)
        #: a replica whose codes live in shards (index/shards.py): items are read by id from the table, and the
        #: snapshot of every code is never loaded here
        self.lean = False
        #: tables at most this large keep their hits' columns in memory with the codes (a take instead of a read)
        self.metadata_in_memory_rows: int | None = METADATA_IN_MEMORY_ROWS
        self._at: tuple[int, Any] | None = None  # (version, dataset) last read by position at a pinned version

    # -- lifecycle -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        uri: str,
        encoder: EncoderConfig,
        *,
        table: str = "codes",
        checkpoint: str = "",
        recipes: dict[str, Any] | None = None,
        s3: S3Config | None = None,
        exist_ok: bool = False,
    ) -> CodeIndex:
        """Create the table, or with ``exist_ok`` open it if it was made by the same encoder and recipes.

        ``recipes`` records how each kind of object is preprocessed, so the query path can repeat it.
        """
        db = connect(uri, s3)
        if table in db.list_tables().tables:
            if not exist_ok:
                raise FileExistsError(f"table {table!r} already exists at {uri}")
            idx = cls.open(uri, table=table, s3=s3)
            idx.check_encoder(encoder.encoder_id)
            if recipes and idx.recipes and recipes != idx.recipes:
                raise ConfigError(
                    f"table {table!r} at {uri} was indexed with preprocessing {json.dumps(idx.recipes)}; "
                    f"refusing to add items made with {json.dumps(recipes)}. Use a new table."
                )
            return idx
        tbl = db.create_table(table, schema=sch.code_schema(encoder, checkpoint, recipes))
        log.info("created code table %s at %s for encoder %s", table, uri, encoder.encoder_id)
        return cls(tbl, uri=uri, name=table, s3=s3)

    @classmethod
    def open(
        cls, uri: str, *, table: str = "codes", s3: S3Config | None = None, version: int | None = None
    ) -> CodeIndex:
        db = connect(uri, s3)
        names = db.list_tables().tables
        if table not in names:
            raise TableNotFoundError(
                f"no code table {table!r} at {uri}; tables there: {', '.join(sorted(names)) or '(none)'}"
            )
        tbl = db.open_table(table)
        if version is not None:
            tbl.checkout(version)
        return cls(tbl, uri=uri, name=table, s3=s3)

    # -- facts -----------------------------------------------------------------------
    @property
    def encoder_id(self) -> str:
        return self._encoder_id

    @property
    def has_features(self) -> bool:
        """Whether rows keep compact features beside their codes (for re-ranking; ``models/rerank.py``).
        Read from the schema when the table is opened and when it moves to a new version (asking costs ~0.4 ms)."""
        return self._has_features

    @property
    def version(self) -> int:
        if self._version is None:
            self._version = int(self._table.version)
        return self._version

    def versions(self) -> list[dict[str, Any]]:
        return [dict(v) for v in self._table.list_versions()]

    def count(self, where: str | None = None) -> int:
        return int(self._table.count_rows(where))

    def check_encoder(self, encoder_id: str) -> None:
        if encoder_id != self.encoder_id:
            raise EncoderMismatchError(
                f"table {self.name!r} at {self.uri} holds codes from encoder {self.encoder_id}; "
                f"refusing codes from {encoder_id}. Use a new table for a new encoder."
            )

    # -- writes ----------------------------------------------------------------------
    def set_serves(self, kinds: Sequence[str]) -> None:
        """Record the kinds of object a routed indexing job sends to this table (a new table version)."""
        self._table.to_lance().update_schema_metadata({sch.SERVES_KEY.decode(): json.dumps(sorted(kinds))})
        self._table.checkout_latest()
        self._version = None
        self.serves = sch.serves_of(self._table.schema)

    def rows(
        self,
        item_ids: Sequence[str],
        codes: npt.ArrayLike,
        **columns: Sequence[Any] | npt.ArrayLike,
    ) -> pa.Table:
        """Build rows for :meth:`upsert` from ids, packed codes and metadata columns."""
        return code_rows(item_ids, as_codes(codes, self.encoder.bits), self.encoder_id, **columns)

    def upsert(self, rows: pa.Table) -> int:
        """Insert rows, replacing any with the same ``item_id``; one commit. Returns rows written."""
        if rows.num_rows == 0:
            return 0
        table = self._conformed(rows)
        (self._table.merge_insert("item_id").when_matched_update_all().when_not_matched_insert_all().execute(table))
        self._version = None
        obs.INDEX_ROWS_WRITTEN.labels(table=self.name).inc(table.num_rows)
        return int(table.num_rows)

    def _conformed(self, rows: pa.Table) -> pa.Table:
        """``rows`` in the table's schema, from this table's encoder, one row per item id (the last wins)."""
        table = sch.conform(rows, self._table.schema)
        for enc in set(table.column("encoder_id").to_pylist()):
            self.check_encoder(enc)
        ids = table.column("item_id").to_numpy(zero_copy_only=False)
        _, last = np.unique(ids[::-1], return_index=True)
        if len(last) != len(ids):
            table = table.take(pa.array(np.sort(len(ids) - 1 - last)))
        return table

    def append(self, rows: pa.Table) -> int:
        """Bulk-load rows known to be new (a first load, a benchmark): one commit, no merge on ``item_id``."""
        if rows.num_rows == 0:
            return 0
        table = self._conformed(rows)
        self._table.add(table)
        self._version = None
        obs.INDEX_ROWS_WRITTEN.labels(table=self.name).inc(table.num_rows)
        return int(table.num_rows)

    def fragment_target(self) -> FragmentTarget:
        """What a worker needs to write rows of this table as uncommitted fragments (picklable)."""
        return FragmentTarget(
            dataset_uri=self._table.to_lance().uri,
            schema=self._table.schema,
            storage_options=self._storage_options,
            encoder_id=self.encoder_id,
        )

    def commit_fragments(self, fragments: Sequence[str], source_uris: Sequence[str]) -> int:
        """Make ``source_uris``' items exactly the rows of these worker-written fragments: one commit.

        The old items of the objects are deleted and the new fragments added in one Lance
        ``Update`` transaction, so a reader sees each object before or after, never half
        replaced, and a crash before the commit leaves the table as it was (the fragments'
        files stay unreferenced until a cleanup). Returns the rows added.
        """
        import lance

        ds = self._table.to_lance()
        new = [lance.FragmentMetadata.from_json(f) for f in fragments]
        removed: list[int] = []
        updated = []
        if source_uris:
            stale = f"source_uri IN ({', '.join(quote(u) for u in sorted(set(source_uris)))})"
            addr = ds.to_table(columns=[], filter=stale, with_row_address=True).column("_rowaddr").to_numpy()
            for fid in sorted(set((addr >> 32).tolist())):
                frag = ds.get_fragment(fid).delete(stale)
                if frag is None:
                    removed.append(fid)
                else:
                    updated.append(frag)
        if not (new or removed or updated):
            return 0
        op = lance.LanceOperation.Update(removed_fragment_ids=removed, updated_fragments=updated, new_fragments=new)
        lance.LanceDataset.commit(ds.uri, op, read_version=ds.version, storage_options=self._storage_options)
        self._table.checkout_latest()
        self._version = None
        n = sum(f.num_rows for f in new)
        obs.INDEX_ROWS_WRITTEN.labels(table=self.name).inc(n)
        return n

    @property
    def fragments(self) -> int:
        return len(self._table.to_lance().get_fragments())

    def compact(self, *, target_rows: int = 1 << 20) -> int:
        """Merge small fragments (the many a job's write tasks leave) into few; returns fragments removed.

        Old versions stay readable (a running query service is not disturbed); :meth:`optimize`
        also prunes them.
        """
        ds = self._table.to_lance()
        before = len(ds.get_fragments())
        if before < 2:
            return 0
        ds.optimize.compact_files(target_rows_per_fragment=target_rows, materialize_deletions_threshold=0.1)
        self._table.checkout_latest()
        self._version = None
        return before - self.fragments

    def ensure_scalar_indices(self) -> dict[str, str]:
        """A BTREE index on each of :data:`SCALAR_INDEX_COLUMNS`: made when missing, else brought up to date
        with the rows added since (until then those rows are still found, by scanning only the fragments the
        index does not cover). Returns column -> "created", "updated" or "current".

        They turn the reads by id of a lean (sharded) replica and the job's deletes by source from scans of
        the whole table into index lookups: 62 ms -> 9 ms per read of 10 ids at 1M rows here, and a scan
        grows with the table where a lookup does not.
        """
        ds = self._table.to_lance()
        have = {tuple(i["fields"]): i["name"] for i in ds.list_indices() if i.get("type") == "BTree"}
        out: dict[str, str] = {}
        stale = []
        for column in SCALAR_INDEX_COLUMNS:
            name = have.get((column,))
            if name is None:
                ds.create_scalar_index(column, "BTREE", replace=True)
                self._table.checkout_latest()
                ds = self._table.to_lance()
                out[column] = "created"
            elif ds.stats.index_stats(name)["num_unindexed_rows"]:
                stale.append(name)
                out[column] = "updated"
            else:
                out[column] = "current"
        if stale:
            ds.optimize.optimize_indices(index_names=stale)
        if stale or "created" in out.values():
            self._table.checkout_latest()
            self._version = None
        return out

    def delete(self, where: str) -> None:
        self._table.delete(where)
        self._version = None

    def delete_sources(self, source_uris: Sequence[str]) -> None:
        """Remove every item produced from these source objects."""
        for start in range(0, len(source_uris), 500):
            chunk = source_uris[start : start + 500]
            self._table.delete(f"source_uri IN ({', '.join(quote(u) for u in chunk)})")
        self._version = None

    def optimize(self, *, cleanup_older_than: timedelta | None = None) -> None:
        """Compact fragments, update indices and (optionally) drop versions older than given."""
        self._table.optimize(cleanup_older_than=cleanup_older_than)
        self._version = None

    # -- reads -----------------------------------------------------------------------
    def refresh(self, *, min_interval_s: float = 0.0) -> bool:
        """Follow the latest committed version; True when it changed. Cheap when called often."""
        now = time.monotonic()
        if now - self._last_refresh < min_interval_s:
            return False
        self._last_refresh = now
        before = self.version
        self._table.checkout_latest()
        self._version = None
        changed = self.version != before
        if changed:
            schema = self._table.schema
            self.serves = sch.serves_of(schema)
            self._has_features = sch.has_features(schema)
        return changed

    def _snap(self) -> _Snapshot:
        v = self.version
        snap = self._snapshot
        if snap is not None and snap.version == v:
            return snap
        with self._loading:
            return self._load_snapshot(self.version)

    def _load_snapshot(self, v: int) -> _Snapshot:
        if self._snapshot is None or self._snapshot.version != v:
            t0 = time.perf_counter()
            ds = self._table.to_lance()
            v = int(ds.version)  # what is read (another thread may have refreshed the table since)
            columns = ["item_id", "code", *([sch.FEATURE_COLUMN] if self.has_features else [])]
            keep_meta = self.metadata_in_memory_rows is not None and ds.count_rows() <= self.metadata_in_memory_rows
            if keep_meta:  # the hits' rows are then a take from memory, not a read of the table
                columns += [c for c in RESULT_COLUMNS if c not in columns]
            tbl = ds.to_table(columns=columns, with_row_id=True, scan_in_order=True)
            n = tbl.num_rows
            flat = tbl.column("code").combine_chunks().values.to_numpy(zero_copy_only=False)
            codes = flat.reshape(n, self.encoder.code_bytes) if n else np.zeros((0, self.encoder.code_bytes), np.uint8)
            rowids = tbl.column("_rowid").to_numpy()
            ids = tbl.column("item_id").combine_chunks()
            cols = to_columns(codes)
            self.live.update(v, ids, cols, self.encoder.code_bytes)
            self._snapshot = _Snapshot(
                version=v,
                dataset=ds,
                cols=cols,
                item_ids=ids.to_numpy(zero_copy_only=False),
                rowids=rowids,
                rowid_order=np.argsort(rowids, kind="stable"),
                features=features_column(tbl.column(sch.FEATURE_COLUMN)) if self.has_features else None,
                meta=tbl.select(RESULT_COLUMNS).combine_chunks() if keep_meta else None,
            )
            obs.INDEX_SIZE.labels(table=self.name).set(n)
            log.info("loaded %d codes of %s v%d in %.2fs", n, self.name, v, time.perf_counter() - t0)
        return self._snapshot

    def _positions(self, snap: _Snapshot, where: str) -> npt.NDArray[np.int64]:
        rids = snap.dataset.to_table(columns=["item_id"], filter=where, with_row_id=True).column("_rowid").to_numpy()
        sorted_rids = snap.rowids[snap.rowid_order]
        pos = snap.rowid_order[np.searchsorted(sorted_rids, rids)]
        return np.sort(pos)  # ascending positions keep the row-order tie-break

    def search_positions(
        self, query_codes: npt.ArrayLike, k: int = 10, *, where: str | None = None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]:
        """Exact top-``k`` row positions and distances (m, k) in the current snapshot; ``-1`` pads."""
        _, idx, dist = self._search(query_codes, k, where)
        return idx, dist

    def _search(
        self, query_codes: npt.ArrayLike, k: int, where: str | None
    ) -> tuple[_Snapshot, npt.NDArray[np.int64], npt.NDArray[np.int32]]:
        """:meth:`search_positions` with the snapshot it searched: every later read of the same query must use
        that one (another thread may load a newer version meanwhile)."""
        q = as_codes(query_codes, self.encoder.bits)
        t0 = time.perf_counter()
        snap = self._snap()
        if where:
            pos = self._positions(snap, where)
            if not len(pos):  # nothing matches the filter: no hits, not an error
                return snap, np.full((len(q), k), -1, np.int64), np.zeros((len(q), k), np.int32)
            idx, dist = topk_columns(np.ascontiguousarray(snap.cols[:, pos]), to_words(q), k)
            idx = np.where(idx >= 0, pos[np.maximum(idx, 0)], -1)
            obs.SEARCH_SECONDS.labels(path="exact").observe(time.perf_counter() - t0)
        else:  # the multi-index where it is built and measured faster, else the scan (timed inside)
            idx, dist = self.live.search(snap.version, snap.cols, q, k)
        return snap, idx, dist

    def search_ids(
        self, query_codes: npt.ArrayLike, k: int = 10, *, where: str | None = None
    ) -> tuple[npt.NDArray[np.object_], npt.NDArray[np.int32]]:
        """Exact top-``k`` item ids (``None`` pads) and distances, without reading metadata."""
        snap, idx, dist = self._search(query_codes, k, where)
        ids = snap.item_ids
        out = np.full(idx.shape, None, dtype=object)
        out[idx >= 0] = ids[idx[idx >= 0]]
        return out, dist

    def search(self, query_codes: npt.ArrayLike, k: int = 10, *, where: str | None = None) -> list[pa.Table]:
        """Exact Hamming top-``k`` for each query code; ties go to the earlier row.

        Returns one table per query: ``rank``, ``distance`` and the metadata columns.
        ``where`` is a SQL filter over metadata columns (see :func:`where_clause`).
        """
        snap, idx, dist = self._search(query_codes, k, where)
        return [self._hits(snap, i[i >= 0], d[i >= 0]) for i, d in zip(idx, dist, strict=True)]

    def search_reranked(
        self,
        query_code: npt.ArrayLike,
        query_feature: npt.NDArray[np.int8],
        k: int = 10,
        *,
        candidates: int = 100,
        where: str | None = None,
    ) -> pa.Table:
        """Two-stage search for one query: the Hamming top ``max(k, candidates)``, re-ranked by the similarity
        of their compact features to ``query_feature`` (most similar first; then distance, then row).

        The hits carry ``similarity`` (cosine, from the int8 features) beside ``distance``. A table without
        features, or rows without them, rank by similarity 0: such a table's order is the Hamming order.
        """
        snap, idx, dist = self._search(query_code, max(k, candidates), where)
        found = idx[0] >= 0
        pos, d = idx[0][found], dist[0][found]
        if snap.features is not None and len(pos):
            sims = rerank.similarity(np.asarray(query_feature, np.int8), snap.features[pos])
        else:
            sims = np.zeros(len(pos), np.int32)
        order = rerank.rerank_order(pos, d, sims)[:k]
        hits = self._hits(snap, pos[order], d[order])
        cos = sims[order].astype(np.float64) / rerank.SCALE**2
        return hits.append_column("similarity", pa.array(np.round(cos, 4), pa.float64()))

    def features_of(self, item_ids: Sequence[str]) -> npt.NDArray[np.int8] | None:
        """Stored compact features of these items (None for a table without them); unknown ids raise KeyError."""
        if self.lean:
            if not self.has_features:
                self._by_id(item_ids, [])  # unknown ids still raise
                return None
            return features_column(self._by_id(item_ids, [sch.FEATURE_COLUMN]).column(sch.FEATURE_COLUMN))
        snap, pos = self._lookup(item_ids)
        missing = [i for i, p in zip(item_ids, pos, strict=True) if p < 0]
        if missing:
            raise KeyError(f"items not in table {self.name!r}: {missing[:5]}")
        return None if snap.features is None else snap.features[pos]

    def _hits(self, snap: _Snapshot, pos: npt.NDArray[np.int64], dist: npt.NDArray[Any]) -> pa.Table:
        if snap.meta is not None:
            meta = snap.meta.take(pa.array(pos, pa.int64()))
        else:
            meta = snap.dataset.take(pos, columns=RESULT_COLUMNS)
        got = meta.column("item_id").to_numpy(zero_copy_only=False)
        assert (got == snap.item_ids[pos]).all(), "row positions out of sync with the snapshot"
        return meta.add_column(0, "distance", pa.array(dist, pa.int32())).add_column(
            0, "rank", pa.array(np.arange(len(pos)), pa.int32())
        )

    def _lookup(self, item_ids: Sequence[str]) -> tuple[_Snapshot, npt.NDArray[np.int64]]:
        """Snapshot row positions of ``item_ids`` (-1 where absent): a binary search, not a table scan."""
        snap = self._snap()
        if snap.id_order is None or snap.sorted_ids is None:
            snap.id_order = np.argsort(snap.item_ids, kind="stable")
            snap.sorted_ids = snap.item_ids[snap.id_order]
        ids = np.asarray(list(item_ids), dtype=object)
        if not len(snap.item_ids):
            return snap, np.full(len(ids), -1, np.int64)
        sorted_ids = snap.sorted_ids
        at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
        pos = snap.id_order[at]
        return snap, np.where(sorted_ids[at] == ids, pos, -1).astype(np.int64)

    def take_at(self, version: int, positions: npt.NDArray[np.int64], columns: Sequence[str]) -> pa.Table:
        """Rows at these scan-order positions of table version ``version`` (a sharded search's hits): read
        from that version, not from the snapshot."""
        at = self._at  # one read: another thread may pin another version meanwhile
        if at is None or at[0] != version:
            at = self._at = (version, self._table.to_lance().checkout_version(version))
        return at[1].take(np.asarray(positions, np.int64), columns=list(columns))

    def _by_id(self, item_ids: Sequence[str], columns: Sequence[str]) -> pa.Table:
        """These items' rows in the order given (lean: a filtered read, no snapshot); unknown ids raise KeyError."""
        if not item_ids:
            return self._table.schema.empty_table().select(list(columns))
        clause = f"item_id IN ({', '.join(quote(i) for i in item_ids)})"
        got = self._table.to_lance().to_table(
            columns=["item_id", *[c for c in columns if c != "item_id"]], filter=clause
        )
        at = {i: r for r, i in enumerate(got.column("item_id").to_pylist())}
        missing = [i for i in item_ids if i not in at]
        if missing:
            raise KeyError(f"items not in table {self.name!r}: {missing[:5]}")
        return got.take(pa.array([at[i] for i in item_ids])).select(list(columns))

    def codes_of(self, item_ids: Sequence[str]) -> npt.NDArray[np.uint8]:
        """Stored codes of these items, in the order given; unknown ids raise KeyError."""
        if self.lean:
            col = self._by_id(item_ids, ["code"]).column("code").combine_chunks()
            return col.flatten().to_numpy(zero_copy_only=False).reshape(len(item_ids), self.encoder.code_bytes)
        snap, pos = self._lookup(item_ids)
        missing = [i for i, p in zip(item_ids, pos, strict=True) if p < 0]
        if missing:
            raise KeyError(f"items not in table {self.name!r}: {missing[:5]}")
        words = np.ascontiguousarray(snap.cols[:, pos].T)
        return words.view(np.uint8).reshape(len(pos), -1)[:, : self.encoder.code_bytes].copy()

    def get(self, item_ids: Sequence[str], *, columns: Sequence[str] | None = None) -> pa.Table:
        """Rows of these items (those that exist), read by position from the current snapshot."""
        if not item_ids:
            return self._table.schema.empty_table()
        if self.lean:
            got = self._table.to_lance().to_table(
                columns=list(columns) if columns else None,
                filter=f"item_id IN ({', '.join(quote(i) for i in item_ids)})",
            )
            return got
        snap, pos = self._lookup(item_ids)
        pos = np.unique(pos[pos >= 0])
        return snap.dataset.take(pos, columns=list(columns) if columns else None)

    def to_arrow(self, columns: Sequence[str] | None = None, *, where: str | None = None) -> pa.Table:
        """The table's rows (those matching ``where``, a Lance SQL filter), these columns only."""
        return self._table.to_lance().to_table(columns=list(columns) if columns else None, filter=where)

    # -- approximate path ------------------------------------------------------------
    def create_ivf(self, *, num_partitions: int | None = None) -> None:
        """Build LanceDB's IVF_FLAT index with hamming distance over ``code``."""
        from lancedb.index import IvfFlat

        n = self.count()
        parts = num_partitions or max(1, int(np.sqrt(n)))
        self._table.create_index("code", config=IvfFlat(distance_type="hamming", num_partitions=parts))
        self._version = None

    def has_ivf(self) -> bool:
        """Whether ``code`` has an IVF index (made by :meth:`create_ivf`) in the current version."""
        return any("code" in list(i.columns) and "ivf" in str(i.index_type).lower() for i in self._table.list_indices())

    def search_ivf(
        self, query_codes: npt.ArrayLike, k: int = 10, *, nprobes: int = 20, where: str | None = None
    ) -> list[pa.Table]:
        """Approximate top-``k`` through the IVF index (probing ``nprobes`` partitions)."""
        q = as_codes(query_codes, self.encoder.bits)
        out = []
        t0 = time.perf_counter()
        for code in q:
            s = self._table.search(code, vector_column_name="code").distance_type("hamming").nprobes(nprobes)
            if where:
                s = s.where(where, prefilter=True)
            t = s.select([*RESULT_COLUMNS, "_distance"]).limit(k).to_arrow()
            dist = t.column("_distance").to_numpy().astype(np.int32)
            t = t.drop_columns(["_distance"]).select(RESULT_COLUMNS)
            t = t.add_column(0, "distance", pa.array(dist)).add_column(
                0, "rank", pa.array(np.arange(t.num_rows, dtype=np.int32))
            )
            out.append(t)
        obs.SEARCH_SECONDS.labels(path="ivf").observe(time.perf_counter() - t0)
        return out
