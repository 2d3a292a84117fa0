"""Exact Hamming top-k by multi-index hashing (Norouzi, Punjani & Fleet, arXiv:1307.2982).

Each code of ``b`` bits is cut into ``m`` disjoint substrings, and each substring has a hash
table: for every substring value, the codes holding it. Once table ``t`` has been probed at
every radius up to ``r_t`` (every bucket whose value is within ``r_t`` bits of the query's
substring), a code found in no table differs from the query by more than ``r_t`` bits in every
substring, so it is at distance at least ``sum_t (r_t + 1)`` (pigeonhole; it holds for unequal
substring lengths too). A query probes one table one radius further at a time (the table whose
next radius has fewest buckets), so the bound grows by one per step; it computes the full
distance of every new code it meets (a code met again in a later table is recognised from its
substring distances, with no per-query state) and stops as soon as the ``k``-th best distance
seen is *below* the bound: every row at that distance or closer has then been seen, so sorting by
(distance, row) gives exactly :func:`medret.index.search.topk_reference`, ties included.

Layout. Each table holds every *distinct* code once, its 64-bit words stored contiguously per
bucket (so reading a bucket streams memory, and rows sharing a code cost one distance), with a
``uint32`` offset per bucket; table 0 also lists the rows of each code (``rstart``/``rows``,
just ``rows`` when all codes differ). The index holds the codes: nothing else need be kept.

Choice of m. The paper takes substrings of about ``log2(n)`` bits, so that a bucket holds about
one code. Here looking up a bucket costs far more than reading one more of its codes, so
:func:`choose_m` takes the ``m`` whose probing is cheapest for uniform codes (more codes per
bucket, fewer buckets), within memory: for 64-bit codes ``m = 5`` (12-13-bit substrings) at 1M,
``m = 4`` (16 bits) at 10M.

A query whose probing would cost more than scanning the distinct codes (far from everything,
or ``k`` close to ``n``) is answered by that scan instead: never an approximation.

>>> db = np.array([[0b1111_0000], [0b0000_0001], [0b0000_0011], [0b0000_0001]], dtype=np.uint8)
>>> index = MultiIndex.build(db, m=2)
>>> index.search(np.array([[0b0000_0001]], dtype=np.uint8), 3)
(array([[1, 3, 2]]), array([[0, 0, 1]], dtype=int32))
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numba
import numpy as np
import numpy.typing as npt

from medret.index import mih_build as build
from medret.index import mih_kernels as kern
from medret.models.codes import to_words

MAX_SUBSTRING_BITS = 28  # a table has 2**bits buckets: 1 GiB of offsets at 28
MAX_BYTES_PER_CODE_BYTE = 6  # 48 bytes per 64-bit code, codes included
QUERY_GROUP = 8


@functools.lru_cache(maxsize=1024)
def _kth_uniform(bits: int, n: int, k: int) -> int:
    """Distance of the k-th nearest of n uniform codes, about: the first d with n * P(distance <= d) >= k."""
    within = 0
    for d in range(bits + 1):
        within += math.comb(bits, d)
        if n * within >= k << bits:
            return d
    return bits


def probe_cost(bits: int, n: int, m: int, k: int) -> float:
    """Work units (see :mod:`medret.index.mih_kernels`) to probe m tables of n uniform codes for k nearest."""
    lens = sorted(substring_layout(bits, m)[1].tolist())
    steps = _kth_uniform(bits, n, k) + 1  # the bound must pass the k-th distance
    rounds, extra = divmod(steps, m)  # one radius further per table per round, shorter tables first
    cost = 0.0
    for t, s in enumerate(lens):
        buckets = sum(math.comb(s, r) for r in range(min(s, rounds + (t < extra) - 1) + 1))
        cost += buckets * (kern.BUCKET_UNITS + kern.CODE_UNITS * n / 2**s)
    return cost


def choose_m(bits: int, n: int) -> int:
    """Tables for n distinct codes: the m whose probing costs least for uniform codes, k = 10 and 100.

    Within memory: at most about four buckets per code (offsets cost at most 16 bytes per code and
    table), and the index at most :data:`MAX_BYTES_PER_CODE_BYTE` times the codes where the
    offsets allow (each table holds every code).
    """
    if bits <= 0:
        raise ValueError(f"bits must be positive, got {bits}")
    longest = min(MAX_SUBSTRING_BITS, max(8, math.floor(math.log2(max(n, 1))) + 2))
    lo = math.ceil(bits / longest)
    nbytes = math.ceil(bits / 8)
    hi = min(bits, max(lo, (MAX_BYTES_PER_CODE_BYTE * nbytes - 4) // (8 * math.ceil(bits / 64))))
    if n < 2:
        return min(bits, lo)
    return min(range(lo, hi + 1), key=lambda m: probe_cost(bits, n, m, 10) + probe_cost(bits, n, m, 100))


def substring_layout(bits: int, m: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(starts, lengths) of ``m`` contiguous substrings covering ``bits`` bits, lengths differing by at most one."""
    if not 1 <= m <= bits:
        raise ValueError(f"m must be between 1 and the code length {bits}, got {m}")
    base, extra = divmod(bits, m)
    lens = np.array([base] * (m - extra) + [base + 1] * extra, np.int64)
    if lens.max() > MAX_SUBSTRING_BITS:
        raise ValueError(f"m={m} makes {lens.max()}-bit substrings; use m >= {math.ceil(bits / MAX_SUBSTRING_BITS)}")
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    return starts, lens


def _masks(starts: npt.NDArray[np.int64], lens: npt.NDArray[np.int64], words: int) -> npt.NDArray[np.uint64]:
    bits = np.zeros((len(lens), words * 64), bool)
    for t, (s, n) in enumerate(zip(starts, lens, strict=True)):
        bits[t, s : s + n] = True
    # bit i of the word view is bit i % 64 of word i // 64
    weights = np.uint64(1) << np.arange(64, dtype=np.uint64)
    return (bits.reshape(len(lens), words, 64) * weights).sum(axis=2, dtype=np.uint64)


def _binomials(top: int = 64) -> npt.NDArray[np.int64]:
    table = np.zeros((top + 1, top + 2), np.int64)
    for a in range(top + 1):
        for b in range(a + 1):
            table[a, b] = math.comb(a, b)
    return table


class _Table0(NamedTuple):
    starts: npt.NDArray[np.int64]
    lens: npt.NDArray[np.int64]
    offs: npt.NDArray[np.uint32]  # all m tables' offsets; table 0's filled
    distinct: npt.NDArray[np.uint64]  # (U, w) in table 0's order
    rows: npt.NDArray[np.uint32]
    rstart: npt.NDArray[np.uint32]

    @property
    def size(self) -> int:
        return len(self.distinct)


def _table0(words: npt.NDArray[np.uint64], bits: int, m: int) -> _Table0:
    """The distinct codes of ``words`` (n, w) grouped by substring 0 of ``m``, and the rows of each."""
    n, w = words.shape
    starts, lens = substring_layout(bits, m)
    offs = np.empty(int(((1 << lens) + 1).sum()), np.uint32)
    distinct = np.empty((n, w), np.uint64)
    rows = np.empty(n, np.uint32)
    rstart = np.empty(n + 1, np.uint32)
    size = build.distinct_table0(words, starts[0], lens[0], offs[: (1 << lens[0]) + 1], rows, rstart, distinct)
    return _Table0(starts, lens, offs, distinct[:size], rows, rstart[: size + 1])


@dataclass(frozen=True)
class MultiIndex:
    """Packed codes (n, nbytes) in ``m`` substring tables; :meth:`search` is exact.

    Build with :meth:`build`; the arrays are laid out as :mod:`medret.index.mih_kernels` says.
    ``budget`` is the work (in units of about half a nanosecond) a query may spend probing before
    it scans the distinct codes instead; by default, what that scan costs.
    """

    n: int
    bits: int
    codes: npt.NDArray[np.uint64]  # (m, w, U): table t's distinct codes, grouped by substring t
    starts: npt.NDArray[np.int64]
    lens: npt.NDArray[np.int64]
    masks: npt.NDArray[np.uint64]
    offs: npt.NDArray[np.uint32]  # the m tables' group offsets, concatenated
    base: npt.NDArray[np.int64]  # where table t's offsets start in offs
    rstart: npt.NDArray[np.uint32]  # (U + 1,) rows[rstart[u]:rstart[u + 1]] hold code u of table 0
    rows: npt.NDArray[np.uint32]  # (n,)
    budget: int
    binom: npt.NDArray[np.int64] = field(default_factory=_binomials, repr=False)

    @classmethod
    def build(cls, codes: npt.NDArray[np.uint8], *, m: int | None = None, budget: int | None = None) -> MultiIndex:
        """Index packed codes (n, nbytes) uint8; ``m`` defaults to :func:`choose_m` of the distinct codes."""
        codes = np.asarray(codes)
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] == 0:
            raise ValueError(f"codes must be packed uint8 of shape (n, nbytes), got {codes.dtype} {codes.shape}")
        n, nbytes = codes.shape
        if n >= 1 << kern.ROW_BITS:
            raise ValueError(f"at most {(1 << kern.ROW_BITS) - 1} codes per index, got {n}")
        bits = nbytes * 8
        words = to_words(codes)
        first = _table0(words, bits, choose_m(bits, n) if m is None else m)
        if m is None and choose_m(bits, first.size) != len(first.lens):  # m follows the distinct codes
            first = _table0(words, bits, choose_m(bits, first.size))
        starts, lens, offs, size = first.starts, first.lens, first.offs, first.size
        m, w = len(lens), words.shape[1]
        sizes = (1 << lens) + 1
        base = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        uniq = first.distinct
        tables = np.empty((m, w, size), np.uint64)  # each table's codes in its bucket order
        tables[0] = uniq.T
        order = np.empty(size, np.int64)
        for t in range(1, m):
            build.group_by_substring(uniq, starts[t], lens[t], offs[base[t] : base[t] + sizes[t]], order)
            tables[t] = uniq[order].T
        # the row lists (a copy: the view would keep n + 1 entries alive); none when codes are distinct
        rstart = first.rstart.copy() if size < n else np.empty(0, np.uint32)
        if budget is None:
            budget = size * w * kern.SCAN_UNITS
        return cls(n, bits, tables, starts, lens, _masks(starts, lens, w), offs, base, rstart, first.rows, budget)

    @property
    def m(self) -> int:
        return len(self.lens)

    @property
    def distinct(self) -> int:
        """Number of distinct codes."""
        return int(self.codes.shape[2])

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the index (the codes are in it: nothing else needs to be kept)."""
        arrays = (self.codes, self.offs, self.rstart, self.rows, self.masks, self.starts, self.lens, self.base)
        return sum(int(a.nbytes) for a in arrays)

    def search(self, queries: npt.NDArray[np.uint8], k: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]:
        """Top-``k`` rows for packed ``queries`` (q, nbytes): ``(rows, distances)`` of shape (q, k).

        Identical to :func:`medret.index.search.topk` on the same codes: nearest first, ties to
        the lower row, ``-1`` where the database has fewer than ``k`` rows.
        """
        ids, dists, _ = self.search_counted(queries, k)
        return ids, dists

    def search_counted(
        self, queries: npt.NDArray[np.uint8], k: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32], npt.NDArray[np.bool_]]:
        """:meth:`search`, plus for each query whether it was answered by scanning instead of probing."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        queries = np.asarray(queries)
        nbytes = self.bits // 8
        if queries.dtype != np.uint8 or queries.ndim != 2 or queries.shape[1] != nbytes:
            raise ValueError(f"queries must be uint8 of shape (q, {nbytes}), got {queries.dtype} {queries.shape}")
        qw = to_words(queries)
        nq = len(qw)
        ids = np.empty((nq, k), np.int64)
        dists = np.empty((nq, k), np.int32)
        fell = np.ones(nq, np.bool_)
        if self.n == 0:
            ids[:] = -1
            dists[:] = -1
            return ids, dists, fell
        # (work allowed, where the k-th distance would be for uniform codes); no pruning when k >= n
        plan = (-1 if k >= self.n else self.budget, _kth_uniform(self.bits, self.n, k))
        ix = (self.codes, self.masks, self.starts, self.lens, self.offs, self.base, self.rstart, self.rows, self.binom)
        if nq <= 1 or numba.get_num_threads() == 1:
            kern.search_serial(ix, qw, k, plan, ids, dists, fell)
        else:
            kern.search_parallel(ix, qw, k, plan, QUERY_GROUP, ids, dists, fell)
        return ids, dists, fell
