"""Exact top-k over a table that keeps changing: a multi-index-hashing base, a delta, masked rows.

A code table moves through versions (appends, upserts, deletes, compaction) while the query service
reads it. Building a :class:`~medret.index.mih.MultiIndex` takes seconds per 10M codes, so it is
not rebuilt per version. Instead :class:`LiveSearch` keeps one *base*: a MultiIndex built at some
version, with the item id and code of each of its rows. For each newer version it works out, keyed
by item id (never Lance's ``_rowid``, which compaction changes):

- the base rows still present with the same code (*live*), and where each now sits in the
  version's scan order;
- the base rows gone or recoded (*masked*: ``dead`` of them);
- the version's other rows (*delta*), scanned linearly.

A query asks the base for a few more than its ``k`` nearest, drops the masked ones (asking again for
more while fewer than ``k`` are left), and merges the rest with the delta's ``k`` nearest by
(distance, position in the version). That is exactly the linear scan's answer, ties included,
whenever the live base rows keep their base order in the new version (Lance appends new and
rewritten rows after the old ones, and compaction keeps order); a base row that moved behind later
ones is masked and its row scanned in the delta instead. A version whose item ids repeat is scanned.

The base is rebuilt in a background thread once the delta and the masked rows together pass
``rebuild_fraction`` of it, and swapped in whole. After each build a few of the table's own codes
are searched both ways and timed: the faster path answers (results are identical either way; a
mismatch, which would be a bug, logs an error and keeps the scan). Tables below ``min_rows`` are
always scanned: there the scan is as fast and needs no index.

Memory: the base costs the MultiIndex (about 20-44 bytes per 64-bit code, see ``docs/benchmarks.md``)
plus 8 bytes per code word for the change check, beside the scan's own columns.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from medret import observability as obs
from medret.index.mih import MultiIndex
from medret.index.search import topk_columns
from medret.models.codes import to_words

log = logging.getLogger(__name__)

#: tables smaller than this are scanned: the scan answers in a few ms and needs no index
MIN_ROWS = 100_000
#: rebuild once delta + masked rows pass this fraction of the base
REBUILD_FRACTION = 0.1
PROBE_QUERIES = 8  # the table's own codes timed both ways after a build
PROBE_K = 10

Path = Literal["scan", "mih"]


@dataclass(frozen=True)
class _Base:
    """A MultiIndex built at ``version`` and the id and code words of each of its rows."""

    version: int
    index: MultiIndex
    ids: pa.Array
    words: npt.NDArray[np.uint64]  # (n, w)


@dataclass(frozen=True)
class _View:
    """One table version seen through a base: where its live rows are, how many are masked, the delta."""

    version: int
    base: _Base
    live: npt.NDArray[np.bool_]  # (n_base,)
    base_pos: npt.NDArray[np.int64]  # (n_base,) position in the version; -1 where masked
    dead: int
    delta_pos: npt.NDArray[np.int64]  # ascending positions of the version's rows not in the base
    delta_cols: npt.NDArray[np.uint64]  # (w, n_delta)

    @property
    def stale(self) -> int:
        return self.dead + len(self.delta_pos)


def unique_ids(ids: pa.Array) -> bool:
    """Whether no item id repeats (a table written by ``append`` or by others may repeat one: such a
    version is scanned, never seen through a base keyed by id)."""
    return int(pc.count_distinct(ids).as_py()) == len(ids)


def _view(base: _Base, version: int, ids: pa.Array, cols: npt.NDArray[np.uint64]) -> _View:
    """``version`` (its ids, unique, and word columns in scan order) through ``base``.

    A base row is live where its id is in the version with the same code *and* in base order: walking
    the version in scan order, a row whose base row comes after every base row seen so far. A row that
    moved back behind later ones (Lance moves a re-upserted row to the end, even with the same code) is
    masked in the base and put in the delta instead, so the merge keeps the scan's tie order."""
    n = len(ids)
    j = pc.fill_null(pc.index_in(ids, value_set=base.ids), -1).to_numpy(zero_copy_only=False).astype(np.int64)
    found = np.flatnonzero(j >= 0)
    same = (base.words[j[found]] == cols[:, found].T).all(axis=1)
    covered = found[same]
    if len(covered):
        jc = j[covered]
        covered = covered[jc == np.maximum.accumulate(jc)]  # in base order (ids are unique: ties cannot occur)
    base_pos = np.full(len(base.ids), -1, np.int64)
    base_pos[j[covered]] = covered
    live = base_pos >= 0
    in_base = np.zeros(n, bool)
    in_base[covered] = True
    delta_pos = np.flatnonzero(~in_base).astype(np.int64)
    return _View(
        version=version,
        base=base,
        live=live,
        base_pos=base_pos,
        dead=int(len(live) - live.sum()),
        delta_pos=delta_pos,
        delta_cols=np.ascontiguousarray(cols[:, delta_pos]),
    )


def _base_nearest(
    view: _View, queries: npt.NDArray[np.uint8], k: int
) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]]:
    """Each query's ``k`` nearest live base rows as (positions in the version, distances), nearest first.

    The base is asked for a few more than ``k`` (as many more as the masked share suggests); a query
    whose answer holds fewer than ``k`` live rows asks again for four times as many, until it does or
    the base has no more. The live rows of a base top-k' with at least ``k`` live rows are exactly the
    ``k`` nearest live rows: any other live row comes after all of them in (distance, row) order."""
    n = view.base.index.n
    out: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]] = [(np.empty(0, np.int64), np.empty(0, np.int32))]
    out = out * len(queries)
    todo = np.arange(len(queries))
    want = min(n, k + int(np.ceil(k * view.dead / max(1, n - view.dead))) + 8)
    while len(todo) and want > 0:
        rows, dist = view.base.index.search(queries[todo], want)
        again = []
        for r, qi in enumerate(todo):
            got = rows[r][rows[r] >= 0]
            keep = view.live[got]
            if keep.sum() >= k or want >= n:
                out[qi] = (view.base_pos[got[keep]][:k], dist[r][rows[r] >= 0][keep][:k])
            else:
                again.append(qi)
        todo, want = np.asarray(again, np.int64), min(n, 4 * want)
    return out


def _search_view(
    view: _View, queries: npt.NDArray[np.uint8], k: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]:
    """Top-``k`` positions in the view's version: the base's ``k`` nearest live rows merged with the
    delta's ``k`` nearest by (distance, position)."""
    m = len(queries)
    out_i = np.full((m, k), -1, np.int64)
    out_d = np.full((m, k), -1, np.int32)
    base = _base_nearest(view, queries, k)
    if view.delta_cols.shape[1]:
        d_idx, d_d = topk_columns(view.delta_cols, to_words(queries), k)
    else:
        d_idx, d_d = np.full((m, 0), -1, np.int64), np.zeros((m, 0), np.int32)
    for r in range(m):
        found = d_idx[r] >= 0
        pos = np.concatenate([base[r][0], view.delta_pos[d_idx[r][found]]])
        dist = np.concatenate([base[r][1], d_d[r][found]]).astype(np.int32)
        order = np.lexsort((pos, dist))[:k]
        out_i[r, : len(order)] = pos[order]
        out_d[r, : len(order)] = dist[order]
    return out_i, out_d


def _measure(
    view: _View, cols: npt.NDArray[np.uint64], nbytes: int, force: Path | None = None
) -> tuple[Path, dict[str, float]]:
    """Time a few of the table's own codes both ways; the faster path, unless the answers differ (a bug:
    logged, and the scan kept)."""
    n = cols.shape[1]
    rows = np.random.default_rng(0).choice(n, size=min(PROBE_QUERIES, n), replace=False)
    q = np.ascontiguousarray(np.ascontiguousarray(cols[:, rows].T).view(np.uint8).reshape(len(rows), -1)[:, :nbytes])
    _search_view(view, q[:1], PROBE_K)  # compiled and warm before timing
    topk_columns(cols, to_words(q[:1]), PROBE_K)
    t0 = time.perf_counter()
    got = [_search_view(view, q[i : i + 1], PROBE_K) for i in range(len(q))]
    t_mih = time.perf_counter() - t0
    t0 = time.perf_counter()
    want = [topk_columns(cols, to_words(q[i : i + 1]), PROBE_K) for i in range(len(q))]
    t_scan = time.perf_counter() - t0
    same = all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(got, want, strict=True))
    if not same:
        log.error("multi-index answers differ from the scan's (v%d); keeping the scan", view.version)
    path: Path = "scan" if not same else force or ("mih" if t_mih < t_scan else "scan")
    return path, {"mih_s": t_mih / len(q), "scan_s": t_scan / len(q)}


class LiveSearch:
    """Exact top-k for each version of one table, by multi-index hashing where that is faster.

    :meth:`update` is called with each version the table's reader loads; :meth:`search` answers for
    a version from its word columns, by the base (when one fits that version and measured faster, or
    ``path="mih"`` says so) or by the linear scan. Thread-safe; rebuilds run in one background thread
    at a time (``background=False``: :meth:`update` waits for them).
    """

    def __init__(
        self,
        *,
        table: str = "",
        min_rows: int | None = MIN_ROWS,
        rebuild_fraction: float = REBUILD_FRACTION,
        background: bool = True,
        path: Path | None = None,
    ) -> None:
        self.table = table
        self.min_rows = min_rows
        self.rebuild_fraction = rebuild_fraction
        self.background = background
        self.force = path  # a fixed path instead of the measured one (tests, benchmarks)
        self._lock = threading.Lock()
        self._latest: tuple[int, pa.Array, npt.NDArray[np.uint64], int] | None = None
        self._base: _Base | None = None
        self._view: _View | None = None
        self._path: Path = "scan"
        self._timings: dict[str, float] = {}
        self._builder: threading.Thread | None = None
        self.builds = 0

    # -- following the table ---------------------------------------------------------------
    def update(self, version: int, ids: pa.Array, cols: npt.NDArray[np.uint64], nbytes: int) -> None:
        """The table's reader loaded ``version``: ids and (w, n) word columns in scan order, ``nbytes`` per code."""
        with self._lock:
            self._latest = (version, ids, cols, nbytes)
            if self.min_rows is None or len(ids) < self.min_rows or not unique_ids(ids):
                self._view = None  # scanned (a repeated id: the scan is exact, a base keyed by id is not)
                return
            base = self._base
            view = _view(base, version, ids, cols) if base is not None else None
            self._view = view
            if view is not None and view.stale <= self.rebuild_fraction * max(1, base.index.n if base else 0):
                return
        self._rebuild()

    def _rebuild(self) -> None:
        with self._lock:
            if self._builder is not None and self._builder.is_alive():
                return  # the running build re-checks the latest version when it ends
            self._builder = threading.Thread(target=self._build_loop, name=f"medret-mih-{self.table}", daemon=True)
            self._builder.start()
        if not self.background:
            self.wait()

    def _build_loop(self) -> None:
        try:
            while True:
                with self._lock:
                    latest = self._latest
                if latest is None:
                    return
                t0 = time.perf_counter()
                base = self._build(*latest)
                built_s = time.perf_counter() - t0
                self.builds += 1
                log.info(
                    "built a multi-index of %d codes of %s v%d in %.2fs",
                    base.index.n,
                    self.table,
                    base.version,
                    built_s,
                )
                while True:  # see the latest version through the new base; measure it; install it unless newer came
                    with self._lock:
                        latest = self._latest
                    assert latest is not None
                    version, ids, cols, nbytes = latest
                    if self.min_rows is None or len(ids) < self.min_rows or not unique_ids(ids):
                        return  # the latest version is scanned (update() said so)
                    view = _view(base, version, ids, cols)
                    if view.stale > self.rebuild_fraction * max(1, base.index.n) and version != base.version:
                        break  # build again, from the latest version
                    path, timings = _measure(view, cols, nbytes, self.force)
                    with self._lock:
                        if self._latest is latest:
                            self._base, self._view, self._path = base, view, path
                            self._timings = {**timings, "build_s": built_s}
                            log.info(
                                "%s v%d answers by %s (mih %.2f ms, scan %.2f ms per query)",
                                self.table,
                                version,
                                path,
                                1e3 * timings["mih_s"],
                                1e3 * timings["scan_s"],
                            )
                            return
        except Exception:  # a failed build leaves the scan answering; it must not take the service down
            log.exception("building the multi-index of %s failed; the linear scan answers", self.table)

    @staticmethod
    def _build(version: int, ids: pa.Array, cols: npt.NDArray[np.uint64], nbytes: int) -> _Base:
        words = np.ascontiguousarray(cols.T)
        packed = np.ascontiguousarray(words.view(np.uint8).reshape(len(words), -1)[:, :nbytes])
        return _Base(version, MultiIndex.build(packed), ids, words)

    def wait(self, timeout: float | None = None) -> None:
        """Until the running rebuild (if any) has ended."""
        builder = self._builder
        if builder is not None:
            builder.join(timeout)

    # -- answering ------------------------------------------------------------------------
    def search(
        self, version: int, cols: npt.NDArray[np.uint64], queries: npt.NDArray[np.uint8], k: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]:
        """Top-``k`` positions and distances in ``version`` (whose word columns are ``cols``) for packed
        ``queries``: identical to :func:`~medret.index.search.topk_columns` on ``cols``."""
        view, path = self._view, self._path
        t0 = time.perf_counter()
        if path == "mih" and view is not None and view.version == version:
            out = _search_view(view, queries, k)
            obs.SEARCH_SECONDS.labels(path="mih").observe(time.perf_counter() - t0)
            return out
        out = topk_columns(cols, to_words(queries), k)
        obs.SEARCH_SECONDS.labels(path="exact").observe(time.perf_counter() - t0)
        return out

    def stats(self) -> dict[str, object]:
        """What answers now and why: the path, the base's version and size, the delta, the masked rows, timings."""
        view, base = self._view, self._base
        return {
            "path": self._path if view is not None else "scan",
            "base_version": base.version if base else None,
            "base_rows": base.index.n if base else 0,
            "base_bytes": (base.index.memory_bytes + base.words.nbytes) if base else 0,
            "view_version": view.version if view else None,
            "delta_rows": len(view.delta_pos) if view else 0,
            "masked_rows": view.dead if view else 0,
            "builds": self.builds,
            **self._timings,
        }
