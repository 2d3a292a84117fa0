"""Exact search of one code table spread over N Ray actors (shards).

**Layout.** At table version ``v`` with ``n`` rows, shard ``s`` of ``N`` holds the rows at positions
``[s*n//N, (s+1)*n//N)`` of the table's scan order, the order :class:`~medret.index.store.CodeIndex`
loads its snapshot in; it reads only that range (Lance ``offset``/``limit`` in scan order) and keeps
it in memory as word columns, like the snapshot. The shards' ranges, one after the other, are the
snapshot, so a shard's local position plus its ``lo`` is the row's global position.

**Tie order.** Each shard returns its exact top-``k`` ordered by (distance, position); the driver
concatenates the N lists and orders them by (distance, global position). A row in the global
top-``k`` is in its shard's top-``k`` under the same order, so the merge equals one scan of the
whole table: same distances, same ids, ties to the lower position.

**Versions.** Every query is answered at one table version for all shards: the driver looks up
the latest version at most every ``refresh_s`` and sends it with the query; a shard holding
another version reloads its range at that version before answering. Shards therefore refresh
independently and lazily, and a restarted shard (empty) simply loads on its next query.

**Lifetime.** Shards shared by the service's replicas are named, detached actors, so that no one
replica's end takes them down. Each holds a lease: every replica renews it (a ``touch`` call every
quarter of ``lease_s``) and a shard that nobody renewed for ``lease_s`` ends itself (an intentional
exit: Ray does not restart it), so a deleted service or a changed shard count frees their memory. A
replica that finds a shared shard gone attaches to (or starts) the one of that name again.

**Faults.** Shards are actors with ``max_restarts=-1`` and ``max_task_retries=0``. A shard that
died, is restarting, cannot be reached, fails to read the store or does not answer within
``timeout_s`` fails the whole query with :class:`~medret.errors.SearchUnavailableError` (HTTP 503)
naming the table and the shards: never a partial merge. Ray restarts a killed shard; it answers
again once it has reloaded its range.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from medret.config import S3Config
from medret.errors import InfrastructureError, SearchUnavailableError
from medret.index.live import MIN_ROWS, LiveSearch
from medret.index.search import to_columns, topk_columns
from medret.index.store import CodeIndex
from medret.models.codes import as_codes, to_words

log = logging.getLogger(__name__)

SHARD_NAMESPACE = "medret-shards"
KEEP_PREVIOUS_S = 30.0  # a shard keeps the previous table version's range this long after its last use
#: a shared (detached) shard ends itself after this long with no call from any replica: replicas renew it
#: every quarter of it, so it outlives them by at most this (a service deleted, a shard count changed)
SHARD_LEASE_S = 600.0

Positions = npt.NDArray[np.int64]
Distances = npt.NDArray[np.int32]
Ids = npt.NDArray[np.object_]


def shard_range(n: int, shard: int, shards: int) -> tuple[int, int]:
    """Scan-order positions ``[lo, hi)`` that ``shard`` of ``shards`` holds in a table of ``n`` rows.

    >>> [shard_range(10, s, 4) for s in range(4)]
    [(0, 2), (2, 5), (5, 7), (7, 10)]
    """
    return shard * n // shards, (shard + 1) * n // shards


def merge_hits(parts: Sequence[tuple[Positions, Distances, Ids]], k: int) -> tuple[Positions, Distances, Ids]:
    """The exact top-``k`` of the shards' own top-``k`` lists (global positions, no padding), ordered by
    (distance, position); ``-1`` / ``None`` pad where there are fewer than ``k`` candidates.

    >>> a = (np.array([[4, 0]]), np.array([[1, 3]], np.int32), np.array([["e", "a"]], object))
    >>> b = (np.array([[9]]), np.array([[1]], np.int32), np.array([["j"]], object))
    >>> merge_hits([a, b], 3)[0].tolist(), merge_hits([a, b], 4)[2].tolist()
    ([[4, 9, 0]], [['e', 'j', 'a', None]])
    """
    pos = np.concatenate([p for p, _, _ in parts], axis=1)
    dist = np.concatenate([d for _, d, _ in parts], axis=1)
    ids = np.concatenate([i for _, _, i in parts], axis=1)
    m, have = pos.shape
    take = min(k, have)
    order = np.lexsort((pos, dist), axis=1)[:, :take]
    out_pos = np.full((m, k), -1, np.int64)
    out_dist = np.full((m, k), -1, np.int32)
    out_ids = np.full((m, k), None, object)
    out_pos[:, :take] = np.take_along_axis(pos, order, axis=1)
    out_dist[:, :take] = np.take_along_axis(dist, order, axis=1)
    out_ids[:, :take] = np.take_along_axis(ids, order, axis=1)
    return out_pos, out_dist, out_ids


@dataclass(frozen=True)
class ShardHits:
    """Exact top-``k`` of a sharded table at ``version``: (m, k) arrays, ``-1`` / ``None`` pad."""

    positions: Positions  # global positions in the table's scan order at ``version``
    distances: Distances
    item_ids: Ids
    version: int


@dataclass(frozen=True)
class _Range:
    version: int
    total: int  # rows in the whole table at ``version``
    lo: int
    cols: npt.NDArray[np.uint64]  # (w, hi - lo) word columns
    item_ids: Any  # a pyarrow string array, hi - lo long (one copy: the multi-index keys by it too)
    rowids: npt.NDArray[np.uint64]  # Lance row ids of the range (to place a filter's matches), hi - lo long
    rid_order: npt.NDArray[np.int64]  # argsort of rowids
    dataset: Any  # the Lance dataset at ``version`` (filters scan it)
    fragments: list[int]  # ids of the fragments the range reaches into (a filter scans only these)
    load_s: float

    @property
    def rows(self) -> int:
        return int(self.cols.shape[1])


class _Shard:
    """One shard's actor: holds its range of the table at one version, loads another on demand."""

    def __init__(
        self,
        dataset_uri: str,
        storage_options: dict[str, str] | None,
        code_bytes: int,
        shard: int,
        shards: int,
        mih_min_rows: int | None = MIN_ROWS,
        lease_s: float | None = None,
    ) -> None:
        self._used = time.monotonic()
        if lease_s:  # shared: end when no replica has renewed the lease for lease_s
            threading.Thread(target=self._watch, args=(lease_s,), name="shard-lease", daemon=True).start()
        self._uri = dataset_uri
        self._options = storage_options
        self._code_bytes = code_bytes
        self._shard = shard
        self._shards = shards
        # version -> (range, last asked for); nothing held until the first query (also after a restart). The
        # previous version is kept a while: replicas that refresh on their own clocks may ask for both.
        self._ranges: dict[int, tuple[_Range, float]] = {}
        # exact multi-index hashing over the range where it is large enough and measured faster (index/live.py)
        self._live = LiveSearch(table=f"{dataset_uri}#{shard}/{shards}", min_rows=mih_min_rows)

    # -- lease ------------------------------------------------------------------------
    def touch(self) -> None:
        """A replica still uses this shard: renew its lease."""
        self._used = time.monotonic()

    def _watch(self, lease_s: float) -> None:
        import ray

        me = ray.get_runtime_context().current_actor
        while True:
            time.sleep(min(lease_s / 4, 30.0))
            if time.monotonic() - self._used > lease_s:
                # decided in the actor's own call order, after any queued call; then no more asking for a while,
                # since an ending actor first finishes the calls queued to it
                me.expire.remote(lease_s)
                time.sleep(lease_s)

    def expire(self, lease_s: float) -> None:
        """End this shard if its lease ran out (no call for ``lease_s``): Ray does not restart it."""
        import ray

        if time.monotonic() - self._used > lease_s:
            log.info("shard %d/%d of %s: lease of %gs ran out, ending", self._shard, self._shards, self._uri, lease_s)
            ray.actor.exit_actor()

    # -- reads ------------------------------------------------------------------------
    def load(self, version: int) -> dict[str, Any]:
        """Hold the range at ``version`` and run one query through it (the kernel is loaded, too)."""
        self._used = time.monotonic()
        r = self._at(version)
        self._topk(r, np.zeros((1, r.cols.shape[0]), np.uint64), 1)
        return self.stats()

    def search(
        self, version: int, words: npt.NDArray[np.uint64], k: int, where: str | None = None
    ) -> tuple[int, int, Positions, Distances, Ids]:
        """``(version, table rows, positions, distances, ids)``: this range's top-``k`` in global positions;
        with ``where``, among the range's rows that match that filter."""
        self._used = time.monotonic()
        r = self._at(version)
        allowed = self._matching(r, where) if where else None
        take = min(k, r.rows if allowed is None else len(allowed))
        if take == 0:
            empty = np.zeros((len(words), 0), np.int64)
            return version, r.total, empty, empty.astype(np.int32), empty.astype(object)
        if allowed is None:
            local, dist = self._topk(r, words, k)
        else:  # the matching rows only, scanned (ties still to the lower position: allowed is ascending)
            sub, dist = topk_columns(np.ascontiguousarray(r.cols[:, allowed]), words, k)
            local = np.where(sub >= 0, allowed[np.maximum(sub, 0)], -1)
        local, dist = local[:, :take], dist[:, :take]
        ids = np.asarray(r.item_ids.take(local.ravel()).to_numpy(zero_copy_only=False), dtype=object)
        return version, r.total, local + r.lo, dist, ids.reshape(local.shape)

    def _topk(self, r: _Range, words: npt.NDArray[np.uint64], k: int) -> tuple[Positions, Distances]:
        """The one place a shard searches its whole range: local positions (ties to the lower one), distances;
        by the multi-index where built and faster, else the scan (identical answers)."""
        packed = np.ascontiguousarray(words.view(np.uint8).reshape(len(words), -1)[:, : self._code_bytes])
        return self._live.search(r.version, r.cols, packed, k)

    def _matching(self, r: _Range, where: str) -> Positions:
        """Local positions (ascending) of the range's rows that match ``where``: only the fragments the range
        reaches into are scanned."""
        ds = r.dataset
        wanted = set(r.fragments)
        frags = [f for f in ds.get_fragments() if f.fragment_id in wanted]
        if not frags:
            return np.zeros(0, np.int64)
        got = ds.scanner(columns=[], filter=where, with_row_id=True, fragments=frags).to_table()
        rids = np.sort(got.column("_rowid").to_numpy())
        order = r.rid_order
        sorted_rids = r.rowids[order]
        at = np.minimum(np.searchsorted(sorted_rids, rids), max(0, len(sorted_rids) - 1))
        hit = sorted_rids[at] == rids if len(sorted_rids) else np.zeros(len(rids), bool)
        return np.sort(order[at[hit]]).astype(np.int64)

    def stats(self) -> dict[str, Any]:
        import ray

        self._used = time.monotonic()
        r = self._ranges[max(self._ranges)][0] if self._ranges else None
        return {
            "shard": self._shard,
            "state": "loaded" if r else "unloaded",
            "version": r.version if r else None,
            "lo": r.lo if r else None,
            "rows": r.rows if r else 0,
            "bytes": int(r.cols.nbytes + r.item_ids.nbytes + r.rowids.nbytes) if r else 0,
            "load_s": r.load_s if r else None,
            "search": self._live.stats(),
            "node": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
        }

    def _at(self, version: int) -> _Range:
        now = time.monotonic()
        newest = max(self._ranges, default=None)
        for v in [v for v, (_, used) in self._ranges.items() if v != newest and now - used > KEEP_PREVIOUS_S]:
            del self._ranges[v]  # a previous version no replica asked for lately
        held = self._ranges.get(version)
        if held is None:
            if newest is not None and version > newest:  # at most two: the old newest and this one
                self._ranges = {newest: self._ranges[newest]}
            elif newest is not None:
                self._ranges.pop(min(self._ranges))
            held = (self._read(version), now)
        self._ranges[version] = (held[0], now)
        return held[0]

    def _read(self, version: int) -> _Range:
        import lance
        import pyarrow as pa

        t0 = time.perf_counter()
        ds = lance.dataset(self._uri, version=version, storage_options=self._options)
        total = ds.count_rows()
        lo, hi = shard_range(total, self._shard, self._shards)
        if hi > lo:
            tbl = ds.to_table(
                columns=["item_id", "code"], offset=lo, limit=hi - lo, scan_in_order=True, with_row_id=True
            )
            if tbl.num_rows != hi - lo:
                raise RuntimeError(f"{self._uri} v{version}: read {tbl.num_rows} rows of [{lo}, {hi})")
            # flatten() honours a chunk's slice offset (``.values`` would not)
            flat = tbl.column("code").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            codes = flat.reshape(hi - lo, self._code_bytes)
            ids = tbl.column("item_id").cast(pa.large_string()).combine_chunks()  # one array past 2 GiB too
            rowids = tbl.column("_rowid").to_numpy()
        else:
            codes, ids = np.zeros((0, self._code_bytes), np.uint8), pa.array([], pa.large_string())
            rowids = np.zeros(0, np.uint64)
        fragments, start = [], 0  # the fragments overlapping [lo, hi) in scan order
        for frag in ds.get_fragments() if hi > lo else []:
            end = start + frag.count_rows()
            if start < hi and end > lo:
                fragments.append(frag.fragment_id)
            start = end
        load_s = time.perf_counter() - t0
        log.info(
            "shard %d/%d loaded rows [%d, %d) of %s v%d in %.2fs",
            self._shard,
            self._shards,
            lo,
            hi,
            self._uri,
            version,
            load_s,
        )
        cols = to_columns(codes)
        self._live.update(version, ids, cols, self._code_bytes)
        return _Range(
            version=version,
            total=total,
            lo=lo,
            cols=cols,
            item_ids=ids,
            rowids=rowids,
            rid_order=np.argsort(rowids, kind="stable"),
            dataset=ds,
            fragments=fragments,
            load_s=load_s,
        )


class ShardedIndex:
    """A code table searched exactly by ``shards`` Ray actors; see the module docstring.

    ``num_cpus`` and ``memory_bytes`` are each shard's reservation in Ray's scheduler (a shard is put
    on a node with that much free); ``timeout_s`` bounds a query's wait for its slowest shard;
    ``refresh_s`` how often the latest table version is looked up.
    """

    def __init__(
        self,
        uri: str,
        table: str = "codes",
        *,
        shards: int,
        s3: S3Config | None = None,
        num_cpus: float = 1.0,
        memory_bytes: int | None = None,
        timeout_s: float = 30.0,
        refresh_s: float = 1.0,
        mih_min_rows: int | None = MIN_ROWS,
        shared_as: str | None = None,
        lease_s: float = SHARD_LEASE_S,
    ) -> None:
        """``shared_as`` names the shards (detached actors in Ray's ``medret-shards`` namespace), so that every
        query-service replica uses the same N shards instead of starting its own; this object renews their
        lease (``lease_s``) until :meth:`release` or :meth:`close`, which ends them."""
        import ray

        from medret.runtime import ensure_ray

        if shards < 1:
            raise ValueError(f"shards must be at least 1, got {shards}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self._index = CodeIndex.open(uri, table=table, s3=s3)
        self.name = table
        self.bits = self._index.encoder.bits
        self.timeout_s = timeout_s
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._looked_at = time.monotonic()
        target = self._index.fragment_target()  # the dataset's URI and storage options, picklable
        ensure_ray()
        options: dict[str, Any] = {
            "num_cpus": num_cpus,
            "memory": memory_bytes,
            "max_restarts": -1,
            "max_task_retries": 0,
            "scheduling_strategy": "SPREAD",
        }
        code_bytes = self._index.encoder.code_bytes
        self._shared_as = shared_as
        self.lease_s = lease_s if shared_as is not None else None

        def start(s: int) -> Any:
            shared = (
                {}
                if shared_as is None
                else {
                    "name": f"{shared_as}-{s}-of-{shards}",
                    "namespace": SHARD_NAMESPACE,
                    "lifetime": "detached",
                    "get_if_exists": True,
                }
            )
            actor = ray.remote(_Shard).options(**options, **shared)
            args = (target.dataset_uri, target.storage_options, code_bytes, s, shards, mih_min_rows, self.lease_s)
            return actor.remote(*args)

        self._start = start
        self._actors: list[Any] = [start(s) for s in range(shards)]
        self._renewing = threading.Event()
        if self.lease_s is not None:
            threading.Thread(target=self._renew, name=f"shard-lease-{table}", daemon=True).start()

    def _renew(self) -> None:
        """Renew the shared shards' lease every quarter of it, until released (the replica's end also ends this)."""
        assert self.lease_s is not None
        while not self._renewing.wait(self.lease_s / 4):
            for actor in list(self._actors):
                try:
                    actor.touch.remote()
                except Exception as err:  # one failed renewal must not end the renewing
                    log.warning("table %r: renewing a shard's lease failed: %s", self.name, err)

    # -- versions ---------------------------------------------------------------------
    @property
    def shards(self) -> int:
        return len(self._actors)

    @property
    def version(self) -> int:
        """The table version queries are answered at now."""
        return self._index.version

    def refresh(self) -> bool:
        """Look up the latest table version now; True when it changed (shards reload on their next query)."""
        with self._lock:
            return self._look_up()

    def _look_up(self) -> bool:
        self._looked_at = time.monotonic()
        try:
            return self._index.refresh()
        except OSError as err:
            self._looked_at = -math.inf
            raise SearchUnavailableError(
                f"table {self.name!r}: could not look up its latest version ({err}); retry later", table=self.name
            ) from err

    def _pinned(self) -> int:
        with self._lock:
            if time.monotonic() - self._looked_at >= self.refresh_s:
                self._look_up()
            return self._index.version

    # -- queries ----------------------------------------------------------------------
    def search(self, query_codes: npt.ArrayLike, k: int = 10, *, where: str | None = None) -> ShardHits:
        """Exact top-``k`` of each packed query code (m, nbytes) over all shards at one table version; with
        ``where`` (a SQL filter over metadata columns), among the rows that match it."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        words = to_words(as_codes(query_codes, self.bits))
        v = self._pinned()
        refs = [a.search.remote(v, words, k, where) for a in self._actors]
        answers = self._gather(refs, f"search at version {v}")
        totals = {total for _, total, _, _, _ in answers}
        assert {got for got, _, _, _, _ in answers} == {v} and len(totals) == 1, "shards answered out of step"
        pos, dist, ids = merge_hits([(p, d, i) for _, _, p, d, i in answers], k)
        return ShardHits(positions=pos, distances=dist, item_ids=ids, version=v)

    def load(self) -> list[dict[str, Any]]:
        """Make every shard hold its range at the current version now (a warm start); their stats."""
        v = self._pinned()
        return self._gather([a.load.remote(v) for a in self._actors], f"load of version {v}")

    def stats(self) -> list[dict[str, Any]]:
        """Per shard: state, version, first position, rows, bytes held, last load seconds, node, pid.

        ``state`` is ``"loaded"``, ``"unloaded"`` (no query since it started or restarted) or, for a shard
        that gave no answer in ``timeout_s``, ``"unavailable"`` with the ``reason``.
        """
        import ray

        refs = [a.stats.remote() for a in self._actors]
        ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        out = []
        for s, ref in enumerate(refs):
            try:
                out.append(ray.get(ref, timeout=0))
            except Exception as err:  # stats report a fault, they never raise one
                out.append({"shard": s, "state": "unavailable", "reason": _reason(err, self.timeout_s)})
        return out

    def _gather(self, refs: list[Any], what: str) -> list[Any]:
        """Every shard's answer, or :class:`SearchUnavailableError` naming those that gave none."""
        import ray
        from ray.exceptions import RayError, RayTaskError

        _, pending = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        late = set(pending)
        answers: list[Any] = []
        failed: dict[int, str] = {}
        for s, ref in enumerate(refs):
            if ref in late:
                failed[s] = f"no answer within {self.timeout_s:g}s"
                continue
            try:
                answers.append(ray.get(ref))
            except RayTaskError as err:  # the shard's own code raised: a store fault is 503, a bug is not
                if not isinstance(err.cause, InfrastructureError | OSError):
                    raise
                failed[s] = _reason(err, self.timeout_s)
            except RayError as err:  # died, restarting, unreachable, cancelled
                failed[s] = _reason(err, self.timeout_s)
        for ref in pending:  # a queued query is dropped; a running one cannot be interrupted
            ray.cancel(ref)
        if failed:
            self._looked_at = -math.inf  # look the version up again on the next query
            if self._shared_as is not None:  # a shared shard that ended (its lease ran out) is started again
                for s in failed:
                    self._actors[s] = self._start(s)
            which = ", ".join(str(s) for s in failed)
            raise SearchUnavailableError(
                f"table {self.name!r}: shard(s) {which} of {self.shards} unavailable for the {what} "
                f"({'; '.join(f'shard {s}: {r}' for s, r in failed.items())}); no partial answer is given, "
                "retry later",
                table=self.name,
                shards=tuple(failed),
            )
        return answers

    # -- lifecycle --------------------------------------------------------------------
    def release(self) -> None:
        """Stop renewing the shared shards' lease and let them be (other replicas may use them): they end by
        themselves ``lease_s`` after the last replica let go."""
        self._renewing.set()

    def close(self) -> None:
        """Kill the shards' actors (for good: Ray does not restart them)."""
        import ray

        self._renewing.set()
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []

    def __enter__(self) -> ShardedIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reason(err: BaseException, timeout_s: float) -> str:
    """A fault in a few words: its kind and the first line of its message."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayTaskError

    if isinstance(err, ActorDiedError):
        kind = "died"
    elif isinstance(err, ActorUnavailableError):
        kind = "unreachable or restarting"
    elif isinstance(err, GetTimeoutError):
        return f"no answer within {timeout_s:g}s"
    elif isinstance(err, RayTaskError):
        kind = f"failed ({type(err.cause).__name__})"
        err = err.cause
    else:
        kind = type(err).__name__
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{kind}: {first[:200]}" if first else kind
