# mypy: check-untyped-defs=False
# (the numba kernels below are untyped by nature; their public wrappers are typed)
"""Exact Hamming top-k over packed codes held in memory.

One pass over the database per block of queries: XOR + popcount per code, and a
running threshold ``tau`` so that almost every code costs a compare and nothing
else. A candidate is kept only if it is strictly closer than ``tau``, the
distance at which ``k`` earlier codes are already known; codes at equal distance
therefore rank in database order, which is the documented tie-break: **ties go to
the lower row position**. The result is identical to a stable sort of all
distances (see :func:`topk_reference`).
"""

from __future__ import annotations

import numba
import numpy as np
import numpy.typing as npt
from numba import types
from numba.extending import intrinsic

from medret.models.codes import to_words

BLOCK_ROWS = 1 << 15  # rows a group of queries scans together, so the block stays in cache
QUERY_GROUP = 16
CHUNK = 2048  # distances computed branch-free per chunk, then one compare against tau


@intrinsic
def _popcount(typingctx, x):  # type: ignore[no-untyped-def]
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.ctpop(args[0])

    return sig, codegen


@numba.njit(nogil=True, cache=True)
def _compact(buf_i, buf_d, nb, tau, below, k):  # type: ignore[no-untyped-def]
    # keep everything closer than tau, then the earliest (k - below) at exactly tau
    keep_tau = k - below
    out = 0
    for c in range(nb):
        d = buf_d[c]
        if d < tau or (d == tau and keep_tau > 0):
            if d == tau:
                keep_tau -= 1
            buf_i[out] = buf_i[c]
            buf_d[out] = d
            out += 1
    return out


@numba.njit(nogil=True, cache=True, inline="always")
def chunk_distances(cols, c0, nc, q, dist):  # type: ignore[no-untyped-def]
    """Hamming distances of the ``nc`` codes from column ``c0`` of the word columns ``cols`` (w, n) to
    the query words ``q``, into ``dist[:nc]``; returns the lowest. Branch-free: these loops vectorise."""
    col = cols[0, c0 : c0 + nc]  # contiguous 1-D word columns
    qj = q[0]
    for r in range(nc):
        dist[r] = _popcount(col[r] ^ qj)
    for j in range(1, cols.shape[0]):
        col = cols[j, c0 : c0 + nc]
        qj = q[j]
        for r in range(nc):
            dist[r] += _popcount(col[r] ^ qj)
    lowest = dist[0]
    for r in range(1, nc):
        v = dist[r]
        lowest = v if v < lowest else lowest
    return lowest


@numba.njit(nogil=True, cache=True)
def _scan(cols, lo, hi, q, k, hist, st, buf_i, buf_d, dist):  # type: ignore[no-untyped-def]
    tau = st[0]
    below = st[1]
    nb = st[2]
    cap = buf_i.shape[0]
    for c0 in range(lo, hi, CHUNK):
        nc = min(CHUNK, hi - c0)
        lowest = chunk_distances(cols, c0, nc, q, dist)
        if lowest >= tau:
            continue
        for r in range(nc):
            d = np.int64(dist[r])
            if d < tau:
                if nb == cap:
                    nb = _compact(buf_i, buf_d, nb, tau, below, k)
                buf_i[nb] = c0 + r
                buf_d[nb] = d
                nb += 1
                hist[d] += 1
                below += 1
                while below >= k:
                    tau -= 1
                    below -= hist[tau]
    st[0] = tau
    st[1] = below
    st[2] = nb


@numba.njit(nogil=True, cache=True)
def _finish(buf_i, buf_d, nb, k, out_i, out_d):  # type: ignore[no-untyped-def]
    order = np.argsort(buf_d[:nb], kind="mergesort")  # stable: the buffer is in row order
    m = min(k, nb)
    for r in range(m):
        out_i[r] = buf_i[order[r]]
        out_d[r] = buf_d[order[r]]
    for r in range(m, k):
        out_i[r] = -1
        out_d[r] = -1


@numba.njit(nogil=True, cache=True)
def _knn_group(cols, qs, k, block, q0, q1, out_i, out_d):  # type: ignore[no-untyped-def]
    # queries q0 .. q1 together, block by block of the database (each block read once for the group)
    n = cols.shape[1]
    maxd = cols.shape[0] * 64
    cap = max(2 * k, 256)
    gq = q1 - q0
    hist = np.zeros((gq, maxd + 2), np.int64)
    st = np.zeros((gq, 3), np.int64)
    buf_i = np.empty((gq, cap), np.int64)
    buf_d = np.empty((gq, cap), np.int32)
    dist = np.empty(CHUNK, np.uint16)
    for a in range(gq):
        st[a, 0] = maxd + 1
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        for a in range(gq):
            _scan(cols, lo, hi, qs[q0 + a], k, hist[a], st[a], buf_i[a], buf_d[a], dist)
    for a in range(gq):
        _finish(buf_i[a], buf_d[a], st[a, 2], k, out_i[q0 + a], out_d[q0 + a])


@numba.njit(nogil=True, parallel=True, cache=True)
def _knn(cols, qs, k, block, group, out_i, out_d):  # type: ignore[no-untyped-def]
    m = qs.shape[0]
    for g in numba.prange((m + group - 1) // group):
        _knn_group(cols, qs, k, block, g * group, min(m, (g + 1) * group), out_i, out_d)


def to_columns(codes: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
    """Packed codes (n, nbytes) -> word columns (w, n): the layout the scan reads."""
    return np.ascontiguousarray(to_words(codes).T)


def topk_columns(
    cols: npt.NDArray[np.uint64], queries: npt.NDArray[np.uint64], k: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]:
    """Top-``k`` rows of the database ``cols`` (w, n) for ``queries`` (m, w), uint64 words.

    Returns ``(positions, distances)`` of shape (m, k), nearest first; where the
    database has fewer than ``k`` rows the tail is ``-1``. More than ``QUERY_GROUP``
    queries are spread over numba's threads in groups (``numba.set_num_threads`` caps
    them); one group runs on the calling thread.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if cols.dtype != np.uint64 or queries.dtype != np.uint64 or cols.ndim != 2 or queries.ndim != 2:
        raise ValueError("database and queries must be 2-D uint64 word arrays (see to_columns)")
    if cols.shape[0] != queries.shape[1]:
        raise ValueError(f"code widths differ: database {cols.shape[0]} words, queries {queries.shape[1]}")
    m = queries.shape[0]
    out_i = np.empty((m, k), np.int64)
    out_d = np.empty((m, k), np.int32)
    cols, queries = np.ascontiguousarray(cols), np.ascontiguousarray(queries)
    if m <= QUERY_GROUP:
        # one group: called directly, not through the thread pool, whose threads would then spin idle on
        # another core (OpenMP's wait policy) while the service's other threads need it
        _knn_group(cols, queries, k, BLOCK_ROWS, 0, m, out_i, out_d)
    else:
        _knn(cols, queries, k, BLOCK_ROWS, QUERY_GROUP, out_i, out_d)
    return out_i, out_d


def topk(
    db_codes: npt.NDArray[np.uint8], query_codes: npt.NDArray[np.uint8], k: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]:
    """:func:`topk_columns` on packed uint8 codes (n, nbytes) and (m, nbytes).

    >>> db = np.array([[0b1111], [0b0001], [0b0011], [0b0001]], dtype=np.uint8)
    >>> topk(db, np.array([[0b0001]], dtype=np.uint8), 3)
    (array([[1, 3, 2]]), array([[0, 0, 1]], dtype=int32))
    """
    return topk_columns(to_columns(db_codes), to_words(query_codes), k)


def topk_reference(
    db_codes: npt.NDArray[np.uint8], query_codes: npt.NDArray[np.uint8], k: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Brute force with numpy: all distances, stable sort. The oracle for tests."""
    out_i = np.full((len(query_codes), k), -1, np.int64)
    out_d = np.full((len(query_codes), k), -1, np.int64)
    for r, q in enumerate(query_codes):
        d = np.bitwise_count(np.bitwise_xor(db_codes, q)).sum(axis=1, dtype=np.int64)
        order = np.argsort(d, kind="stable")[:k]
        out_i[r, : len(order)] = order
        out_d[r, : len(order)] = d[order]
    return out_i, out_d
