# mypy: check-untyped-defs=False
# (numba kernels are untyped by nature; medret.index.mih wraps them with typed functions)
"""Numba kernels of multi-index hashing (see :mod:`medret.index.mih` for the method and the layout).

Arrays they share, for ``U`` distinct codes of ``w`` 64-bit words and ``m`` tables:

- ``codes`` (m, w, U) uint64: table ``t`` holds every distinct code once (word ``j`` of its code
  ``p`` is ``codes[t, j, p]``), grouped by the value of its substring ``t`` (``lens[t]`` bits from
  bit ``starts[t]`` of the word view, bit ``i`` being bit ``i % 64`` of word ``i // 64``), in
  increasing code order within a group (words compared first to last);
- ``offs[base[t] + v] : offs[base[t] + v + 1]`` is group (bucket) ``v`` of table ``t``;
- ``masks`` (m, w) uint64 selects substring ``t`` in each word;
- ``rows`` (n) and ``rstart`` (U + 1): the rows holding code ``u`` of table 0, ascending, are
  ``rows[rstart[u] : rstart[u + 1]]``; ``rstart`` is empty when every code is on one row only
  (then code ``u`` is on row ``rows[u]``).

A query's state is ``st = [kth, below, nb, work]``: ``kth`` the distance of the ``k``-th best row
seen (one above the largest distance until ``k`` rows are seen), ``below`` the rows seen closer
than ``kth`` (always fewer than ``k``), ``nb`` the candidates in ``buf``, kept as int64 keys
``distance << 32 | row`` so that sorting the keys sorts by (distance, row), and ``work`` the
work units the probing spent.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from medret.index.search import _popcount, chunk_distances

ROW_BITS = 32
ROW_MASK = (1 << ROW_BITS) - 1
CHUNK = 1024  # distances are computed branch-free per chunk of codes, then compared with kth once
# Work units (about half a nanosecond each, measured with cold caches, as between queries that
# other work separates) for choosing the tables and between probing and the scan.
BUCKET_UNITS = 200  # one bucket looked up: a cache miss or two, and a short loop
CODE_UNITS = 5  # one code of a bucket read
SCAN_UNITS = 1  # one code word scanned
BLOCK = 64  # buckets whose offsets, then first codes, are prefetched together before they are read


@intrinsic
def _prefetch(typingctx, arr, i):  # type: ignore[no-untyped-def]
    # ask for the cache line of arr[i] without waiting for it (LLVM's prefetch: read, keep, data cache)
    sig = types.void(arr, i)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        ptr = builder.bitcast(ptr, ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]), "llvm.prefetch.p0"
        )
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(nogil=True, cache=True)
def substring(words, start, length):  # type: ignore[no-untyped-def]
    """Value of ``length`` (<= 32) bits from bit ``start`` of the 1-D word array ``words``."""
    wi = start >> 6
    sh = start & 63
    v = words[wi] >> np.uint64(sh)
    if sh + length > 64:
        v |= words[wi + 1] << np.uint64(64 - sh)
    return np.int64(v & np.uint64((1 << length) - 1))


@numba.njit(nogil=True, cache=True)
def _find0(codes, offs, starts, lens, c):  # type: ignore[no-untyped-def]
    # position in table 0 of the code c: binary search in its group, which is in code order
    w = c.shape[0]
    v = substring(c, starts[0], lens[0])
    lo = np.int64(offs[v])
    hi = np.int64(offs[v + 1])
    while lo < hi:
        mid = (lo + hi) >> 1
        cmp = 0
        for j in range(w):
            if codes[0, j, mid] != c[j]:
                cmp = -1 if codes[0, j, mid] < c[j] else 1
                break
        if cmp == 0:
            return mid
        if cmp < 0:
            lo = mid + 1
        else:
            hi = mid
    return -1  # unreachable: every code of a table is in table 0


@numba.njit(nogil=True, cache=True)
def _accept(d, u, k, rstart, rows, st, hist, buf):  # type: ignore[no-untyped-def]
    # the rows of code u (table 0) are at distance d <= kth: count them, keep the first k
    if rstart.shape[0] == 0:  # every code on one row: no row lists
        rs = np.int64(u)
        cnt = np.int64(1)
    else:
        rs = np.int64(rstart[u])
        cnt = np.int64(rstart[u + 1]) - rs
    hist[d] += cnt
    nb = st[2]
    for i in range(min(cnt, k)):
        if nb == buf.shape[0]:
            buf[:nb].sort()  # only the k best keys seen can still be answers
            nb = k
        buf[nb] = (d << ROW_BITS) | np.int64(rows[rs + i])
        nb += 1
    st[2] = nb
    kth = st[0]
    if d < kth:
        below = st[1] + cnt
        while below >= k:
            kth -= 1
            below -= hist[kth]
        st[0] = kth
        st[1] = below


@numba.njit(nogil=True, cache=True)
def _reset(st, hist):  # type: ignore[no-untyped-def]
    hist[:] = 0
    st[0] = hist.shape[0] - 1
    st[1] = 0
    st[2] = 0


@numba.njit(nogil=True, cache=True)
def _select(dist, nc, kth, cand):  # type: ignore[no-untyped-def]
    # positions of the distances within kth (usually a handful) into cand; how many
    nsel = 0
    for r in range(nc):
        if dist[r] <= kth:
            cand[nsel] = r
            nsel += 1
    return nsel


@numba.njit(nogil=True, cache=True)
def scan(codes, rstart, rows, q, k, st, hist, buf, dist, cand):  # type: ignore[no-untyped-def]
    """Every distinct code of table 0 in turn: the linear scan, for queries probing would not help."""
    _reset(st, hist)
    cols = codes[0]
    size = cols.shape[1]
    for c0 in range(0, size, CHUNK):
        nc = min(CHUNK, size - c0)
        lowest = chunk_distances(cols, c0, nc, q, dist)
        if np.int64(lowest) > st[0]:
            continue
        nsel = _select(dist, nc, st[0], cand)
        d = np.int64(lowest)
        while d <= st[0]:  # nearest first, so that kth falls as fast as it can
            for i in range(nsel):
                if dist[cand[i]] == d and d <= st[0]:
                    _accept(d, c0 + cand[i], k, rstart, rows, st, hist, buf)
            d += 1


@numba.njit(nogil=True, cache=True)
def _next_table(lens, rad, binom):  # type: ignore[no-untyped-def]
    # every probe step raises the bound by one, so take the table whose next radius has fewest buckets
    best = 0
    for t in range(1, lens.shape[0]):
        if binom[lens[t], rad[t] + 1] < binom[lens[best], rad[best] + 1]:
            best = t
    return best


@numba.njit(nogil=True, cache=True)
def _seen_before(xw, masks, rad, t):  # type: ignore[no-untyped-def]
    # a code found in table t was found before iff it is within the radius already probed in another table
    for t2 in range(masks.shape[0]):
        if t2 != t and rad[t2] >= 0:
            d2 = 0
            for j in range(xw.shape[0]):
                d2 += np.int64(_popcount(xw[j] & masks[t2, j]))
            if d2 <= rad[t2]:
                return True
    return False


@intrinsic
def _ctz(typingctx, x):  # type: ignore[no-untyped-def]
    sig = types.int64(types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 0))

    return sig, codegen


@numba.njit(nogil=True, cache=True)
def _gosper(x, r, lim):  # type: ignore[no-untyped-def]
    # the next larger integer with the same number of set bits (lim once r = 0 has had its one mask)
    if r == 0:
        return lim
    y = x + (x & -x)
    return (((y ^ x) >> 2) >> _ctz(x)) | y


@numba.njit(nogil=True, cache=True)
def _take(ix, k, sc, t, p, d):  # type: ignore[no-untyped-def]
    # code p of table t is within kth (xw holds its XOR with the query): count its rows unless seen before
    codes, masks, starts, lens, offs, _, rstart, rows, _ = ix
    st, hist, buf, rad, _, xw, _, _, _, _ = sc
    if _seen_before(xw, masks, rad, t):
        return
    if t == 0:
        u = p
    else:
        for j in range(xw.shape[0]):
            xw[j] = codes[t, j, p]
        u = _find0(codes, offs, starts, lens, xw)
    _accept(d, u, k, rstart, rows, st, hist, buf)


@numba.njit(nogil=True, cache=True)
def _take_nearest(ix, k, sc, t, c0, nc, q):  # type: ignore[no-untyped-def]
    # codes c0 .. c0 + nc of table t, whose distances are in dist: take those within kth, nearest first
    codes = ix[0]
    st, _, _, _, _, xw, _, dist, _, cand = sc
    lowest = dist[0]
    for r in range(1, nc):
        lowest = min(lowest, dist[r])
    nsel = _select(dist, nc, st[0], cand)
    d = np.int64(lowest)
    while d <= st[0]:
        for i in range(nsel):
            p = c0 + cand[i]
            if dist[cand[i]] == d and d <= st[0]:
                for j in range(xw.shape[0]):
                    xw[j] = codes[t, j, p] ^ q[j]
                _take(ix, k, sc, t, p, d)
        d += 1


@numba.njit(nogil=True, cache=True)
def _step_cost(lens, binom, size, t, r):  # type: ignore[no-untyped-def]
    # work units to probe table t at radius r, for codes spread evenly over the buckets
    return binom[lens[t], r] * (BUCKET_UNITS + CODE_UNITS * (size >> lens[t]))


@numba.njit(nogil=True, cache=True)
def _cost_to(lens, rad, binom, size, bound, target, after):  # type: ignore[no-untyped-def]
    # work units to raise the bound from `bound` past `target` in the greedy order (after: scratch)
    after[:] = rad
    cost = 0
    while bound <= target:
        t = _next_table(lens, after, binom)
        if after[t] == lens[t]:
            break
        after[t] += 1
        cost += _step_cost(lens, binom, size, t, after[t])
        bound += 1
    return cost


@numba.njit(nogil=True, cache=True)
def probe(ix, q, k, plan, sc):  # type: ignore[no-untyped-def]
    """Probe the tables at growing radius until the bound passes kth; False if that would outspend the budget.

    ``ix`` is the index (codes, masks, starts, lens, offs, base, rstart, rows, binom), ``plan`` is
    (budget, guess): the work allowed, and about where the k-th distance is for uniform codes; ``sc``
    is the query's scratch (st, hist, buf, rad, qsub, xw, span, dist, after, cand); ``st[3]`` gets the work.
    Once every table has been probed at radius 0, the query gives up as soon as finishing (up to
    the nearer of kth and the guess) would cost more than the budget, rather than when it has.
    """
    codes, _, starts, lens, offs, base, _, _, binom = ix
    st, hist, _, rad, qsub, _, span, dist, after, _ = sc
    budget, guess = plan
    m = lens.shape[0]
    w = codes.shape[1]
    size = codes.shape[2]
    _reset(st, hist)
    bound = 0  # every code not yet seen is at least this far: sum over tables of (radius probed + 1)
    work = 0
    for t in range(m):
        qsub[t] = substring(q, starts[t], lens[t])
        rad[t] = -1
    while st[0] >= bound:
        t = _next_table(lens, rad, binom)
        r = rad[t] + 1
        ahead = _step_cost(lens, binom, size, t, r)
        if bound >= m:
            ahead = max(ahead, _cost_to(lens, rad, binom, size, bound, min(st[0], guess), after))
        if work + ahead > budget:
            st[3] = work
            return False
        tb = base[t]
        tab = codes[t]
        q0 = q[0]
        x = (np.int64(1) << r) - 1  # Gosper's hack walks the lens[t]-bit masks with r bits set
        lim = np.int64(1) << lens[t]
        while x < lim:
            # a block of buckets: prefetch their offsets, then their first codes, then read them
            nbk = 0
            while nbk < BLOCK and x < lim:
                b = tb + (qsub[t] ^ x)
                span[0, nbk] = b
                _prefetch(offs, b)
                nbk += 1
                x = _gosper(x, r, lim)
            for i in range(nbk):
                b = span[0, i]
                span[0, i] = offs[b]
                span[1, i] = offs[b + 1]
                if span[1, i] > span[0, i]:
                    for j in range(w):
                        _prefetch(tab[j], span[0, i])
            kth = st[0]
            for i in range(nbk):
                lo = span[0, i]
                hi = span[1, i]
                work += BUCKET_UNITS + CODE_UNITS * (hi - lo)
                for c0 in range(lo, hi, CHUNK):  # the hot loop: almost every code is farther than kth
                    nc = min(CHUNK, hi - c0)
                    col = tab[0, c0 : c0 + nc]
                    if w == 1:  # one pass for the nearest; distances are stored only if it is within kth
                        low = np.uint64(64)
                        for c in range(nc):
                            low = min(low, _popcount(col[c] ^ q0))
                        if np.int64(low) > kth:
                            continue
                    for c in range(nc):
                        dist[c] = _popcount(col[c] ^ q0)
                    for j in range(1, w):
                        col = tab[j, c0 : c0 + nc]
                        qj = q[j]
                        for c in range(nc):
                            dist[c] += _popcount(col[c] ^ qj)
                    _take_nearest(ix, k, sc, t, c0, nc, q)
                    kth = st[0]
            if work > budget:
                st[3] = work
                return False
        rad[t] = r
        bound += 1
        if r == lens[t]:  # this table has been read whole: every code has been seen
            break
    st[3] = work
    return True


@numba.njit(nogil=True, cache=True)
def _search_range(ix, qs, k, plan, q0, q1, out_i, out_d, fell):  # type: ignore[no-untyped-def]
    codes, _, _, lens, _, _, rstart, rows, _ = ix
    w = codes.shape[1]
    st = np.empty(4, np.int64)
    hist = np.empty(64 * w + 2, np.int64)
    buf = np.empty(max(4 * k, 1024), np.int64)
    dist = np.empty(CHUNK, np.uint16)
    cand = np.empty(CHUNK, np.int64)
    sc = (
        st,
        hist,
        buf,
        np.empty(lens.shape[0], np.int64),
        np.empty(lens.shape[0], np.int64),
        np.empty(w, np.uint64),
        np.empty((2, BLOCK), np.int64),
        dist,
        np.empty(lens.shape[0], np.int64),
        cand,
    )
    for a in range(q0, q1):
        fell[a] = not probe(ix, qs[a], k, plan, sc)
        if fell[a]:
            scan(codes, rstart, rows, qs[a], k, st, hist, buf, dist, cand)
        nb = st[2]
        buf[:nb].sort()
        got = min(nb, k)
        for r in range(got):
            out_i[a, r] = buf[r] & ROW_MASK
            out_d[a, r] = buf[r] >> ROW_BITS
        for r in range(got, k):
            out_i[a, r] = -1
            out_d[a, r] = -1


@numba.njit(nogil=True, cache=True)
def search_serial(ix, qs, k, plan, out_i, out_d, fell):  # type: ignore[no-untyped-def]
    """Queries ``qs`` (q, w) in turn: rows and distances into ``out_i``/``out_d``; ``fell`` marks the scanned ones."""
    _search_range(ix, qs, k, plan, 0, qs.shape[0], out_i, out_d, fell)


@numba.njit(nogil=True, parallel=True, cache=True)
def search_parallel(ix, qs, k, plan, group, out_i, out_d, fell):  # type: ignore[no-untyped-def]
    """:func:`search_serial` with groups of queries spread over numba's threads."""
    nq = qs.shape[0]
    for g in numba.prange((nq + group - 1) // group):
        _search_range(ix, qs, k, plan, g * group, min(nq, (g + 1) * group), out_i, out_d, fell)
