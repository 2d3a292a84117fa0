# mypy: check-untyped-defs=False
# (numba kernels are untyped by nature; medret.index.mih wraps them with typed functions)
"""Numba kernels that build the tables of :mod:`medret.index.mih`: counting sorts, O(n) but for small groups."""

from __future__ import annotations

import numba
import numpy as np

from medret.index.mih_kernels import substring

SMALL = 24  # groups up to this size are sorted by insertion, larger ones by merge sorts


@numba.njit(nogil=True, cache=True)
def _before(words, a, b):  # type: ignore[no-untyped-def]
    # code of row a < code of row b, words compared first to last
    for j in range(words.shape[1]):
        if words[a, j] != words[b, j]:
            return words[a, j] < words[b, j]
    return False


@numba.njit(nogil=True, cache=True)
def _sort_group(words, seg):  # type: ignore[no-untyped-def]
    # stable sort of the row ids in seg by code, in place
    if seg.shape[0] <= SMALL:
        for i in range(1, seg.shape[0]):
            row = seg[i]
            j = i - 1
            while j >= 0 and _before(words, row, seg[j]):
                seg[j + 1] = seg[j]
                j -= 1
            seg[j + 1] = row
        return
    out = seg.copy()
    for j in range(words.shape[1] - 1, -1, -1):  # least significant word first: stable sorts compose
        keys = np.empty(out.shape[0], np.uint64)
        for i in range(out.shape[0]):
            keys[i] = words[out[i], j]
        out = out[np.argsort(keys, kind="mergesort")]
    seg[:] = out


@numba.njit(nogil=True, cache=True)
def group_by_substring(words, start, length, offs, order):  # type: ignore[no-untyped-def]
    """Stable counting sort of the rows of ``words`` (r, w) by one substring: ``offs`` and ``order``."""
    r = words.shape[0]
    vals = np.empty(r, np.int64)
    offs[:] = 0
    for i in range(r):
        v = substring(words[i], start, length)
        vals[i] = v
        offs[v + 1] += 1
    for v in range(1, offs.shape[0]):
        offs[v] += offs[v - 1]
    cursor = offs[:-1].astype(np.int64)
    for i in range(r):
        v = vals[i]
        order[cursor[v]] = i
        cursor[v] += 1


@numba.njit(nogil=True, cache=True)
def distinct_table0(words, start, length, offs, rows, rstart, distinct):  # type: ignore[no-untyped-def]
    """Table 0: the distinct codes of ``words`` (n, w) grouped by substring 0, in code order within a group.

    Fills ``offs`` (2**length + 1) over the distinct codes, ``distinct`` (>= U, w) with them,
    ``rows`` (n) with the rows grouped by code, ascending within a code, and ``rstart`` (>= U + 1)
    with where each code's rows start. Returns U.
    """
    n = words.shape[0]
    w = words.shape[1]
    order = np.empty(n, np.int64)
    group_by_substring(words, start, length, offs, order)
    u = 0
    lo = np.int64(offs[0])
    for v in range(offs.shape[0] - 1):
        hi = np.int64(offs[v + 1])
        _sort_group(words, order[lo:hi])
        offs[v] = u
        for i in range(lo, hi):
            row = order[i]
            rows[i] = row
            if i == lo or _before(words, order[i - 1], row):
                for j in range(w):
                    distinct[u, j] = words[row, j]
                rstart[u] = i
                u += 1
        lo = hi
    offs[offs.shape[0] - 1] = u
    rstart[u] = n
    return u
