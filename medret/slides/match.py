# mypy: check-untyped-defs=False
# (the numba kernels below are untyped by nature; their public wrappers are typed)
"""Exact bag-to-bag Hamming matching: which slides of a gallery look like a query slide.

A slide is a bag of packed tile codes (see :mod:`medret.slides.mosaic`). Every distance here
depends only on the multiset of codes in each bag, so the order of tiles within a bag never
changes a result. The definitions:

- **median-min** (asymmetric, query -> slide): for each query code, the smallest Hamming
  distance to any code of the slide; the slide's distance is the **median** of those minima.
  The median of an even count is the mean of the two middle values (``numpy.median``'s rule),
  so distances are multiples of 0.5.
- **symmetric**: the mean of median-min query -> slide and slide -> query (multiples of 0.25);
  the mean rather than the max, so that neither direction alone decides.
- **vote** (label-free): each query code finds its nearest tiles among *all* gallery tiles and
  gives one vote to every slide that holds a tile at that distance (all ties counted, no
  splitting). The distance is the number of query codes that did not vote for the slide.
- **ranking** (:func:`rank`): by distance, ties by slide id in string order. No label is used.
- **evidence** (:func:`best_tiles`): for each query code, the tile of the hit slide at the
  smallest distance, ties to the lower position in the slide's stored bag.
- **majority code** (:func:`majority_code`): bit ``i`` is 1 where more than half of the bag's
  codes have it (an exact half gives 0).

The kernel streams each slide's codes once and compares every gallery code with all of the
query's codes (held as word columns, so the inner loop vectorises in 32-bit lanes), keeping
the running minimum per query code; slides are spread over numba's threads in chunks.

Two ways to avoid scoring every slide:

- :func:`top_median_min` (exact, what :func:`search` uses): each bag, the query's too, gets a
  *sketch*, up to :data:`SKETCH_CODES` of its codes with a radius each that covers the rest of
  the bag; the triangle inequality turns the sketches into lower bounds on median-min at
  1/64 of the cost of a 64-code bag, and only the slides whose bound can reach the top ``k``
  are scored exactly.
- :func:`prefilter` (approximate): exact median-min on the ``n`` slides whose majority codes are
  nearest the query's; its recall against the exact ranking is measured by
  ``bench/slide_scale.py``, not assumed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numba
import numpy as np
import numpy.typing as npt

from medret.index.search import _popcount
from medret.models.codes import as_codes, to_words

SLIDE_CHUNK = 64  # slides a thread takes at a time
PARALLEL_MIN_PAIRS = 1 << 22  # code pairs below which a query runs on one thread
SKETCH_CODES = 8  # codes per slide in the sketch that bounds median-min from below
FIRST_BATCH = 64  # slides scored exactly before the bound's threshold is known


@numba.njit(nogil=True, cache=True, inline="always")
def _median(hist, count):  # type: ignore[no-untyped-def]
    """Median of ``count`` small integers given as a histogram; even counts: mean of the middle two."""
    lo_rank = (count - 1) // 2
    hi_rank = count // 2
    seen = 0
    lo = -1
    for v in range(hist.shape[0]):
        seen += hist[v]
        if lo < 0 and seen > lo_rank:
            lo = v
        if seen > hi_rank:
            return (lo + v) / 2.0
    return -1.0


@numba.njit(nogil=True, cache=True, inline="always")
def _code_vs_query(qcols, code, dist):  # type: ignore[no-untyped-def]
    """Hamming distances of one gallery code (its words) to every query code, into ``dist``."""
    m = qcols.shape[1]
    g = code[0]
    q = qcols[0]
    for i in range(m):
        dist[i] = np.int32(_popcount(q[i] ^ g))
    for t in range(1, qcols.shape[0]):
        g = code[t]
        q = qcols[t]
        for i in range(m):
            dist[i] += np.int32(_popcount(q[i] ^ g))


@numba.njit(nogil=True, cache=True)
def _scan_slides(qcols, words, offsets, slides, maxd, back, keep, mins, fwd, rev, lo, hi):  # type: ignore[no-untyped-def]
    # rows lo:hi of slides
    m = qcols.shape[1]
    best = np.empty(m, np.int32)  # 32-bit lanes: twice as many per vector as 64-bit ones
    dist = np.empty(m, np.int32)
    hist = np.empty(maxd + 1, np.int64)
    for r in range(lo, hi):
        s = slides[r]
        best[:] = maxd
        hist[:] = 0
        for j in range(offsets[s], offsets[s + 1]):
            _code_vs_query(qcols, words[j], dist)
            for i in range(m):
                best[i] = min(best[i], dist[i])
            if back:  # slide -> query: this code's nearest query code
                lowest = dist[0]
                for i in range(1, m):
                    lowest = min(lowest, dist[i])
                hist[lowest] += 1
        if back:
            rev[r] = _median(hist, offsets[s + 1] - offsets[s])
            hist[:] = 0
        for i in range(m):
            hist[best[i]] += 1
        fwd[r] = _median(hist, m)
        if keep:
            mins[r] = best


@numba.njit(nogil=True, cache=True)
def _bag_scan_serial(qcols, words, offsets, slides, maxd, back, keep, mins, fwd, rev):  # type: ignore[no-untyped-def]
    _scan_slides(qcols, words, offsets, slides, maxd, back, keep, mins, fwd, rev, 0, slides.shape[0])


@numba.njit(nogil=True, parallel=True, cache=True)
def _bag_scan_parallel(qcols, words, offsets, slides, maxd, back, keep, mins, fwd, rev):  # type: ignore[no-untyped-def]
    ns = slides.shape[0]
    for ch in numba.prange((ns + SLIDE_CHUNK - 1) // SLIDE_CHUNK):
        lo = ch * SLIDE_CHUNK
        _scan_slides(qcols, words, offsets, slides, maxd, back, keep, mins, fwd, rev, lo, min(ns, lo + SLIDE_CHUNK))


@numba.njit(nogil=True, cache=True)
def _within_slides(qcols, words, offsets, slack, limits, weights, out, lo, hi):  # type: ignore[no-untyped-def]
    # slides lo:hi: the weight of the query codes i with min_j (d(q_i, code j) - slack[j]) <= limits[i]
    m = qcols.shape[1]
    best = np.empty(m, np.int32)
    dist = np.empty(m, np.int32)
    for s in range(lo, hi):
        best[:] = 1 << 30
        for j in range(offsets[s], offsets[s + 1]):
            _code_vs_query(qcols, words[j], dist)
            sl = slack[j]
            for i in range(m):
                best[i] = min(best[i], dist[i] - sl)
        within = 0
        for i in range(m):
            if best[i] <= limits[i]:
                within += weights[i]
        out[s] = within


@numba.njit(nogil=True, cache=True)
def _within_serial(qcols, words, offsets, slack, limits, weights, out):  # type: ignore[no-untyped-def]
    _within_slides(qcols, words, offsets, slack, limits, weights, out, 0, out.shape[0])


@numba.njit(nogil=True, parallel=True, cache=True)
def _within_parallel(qcols, words, offsets, slack, limits, weights, out):  # type: ignore[no-untyped-def]
    ns = out.shape[0]
    for ch in numba.prange((ns + SLIDE_CHUNK - 1) // SLIDE_CHUNK):
        lo = ch * SLIDE_CHUNK
        _within_slides(qcols, words, offsets, slack, limits, weights, out, lo, min(ns, lo + SLIDE_CHUNK))


@numba.njit(nogil=True, cache=True)
def _majority_words(words, offsets, out):  # type: ignore[no-untyped-def]
    counts = np.empty(64, np.uint64)
    for s in range(offsets.shape[0] - 1):
        n = offsets[s + 1] - offsets[s]
        for t in range(words.shape[1]):
            counts[:] = 0
            for j in range(offsets[s], offsets[s + 1]):
                x = words[j, t]
                for b in range(64):
                    counts[b] += (x >> np.uint64(b)) & np.uint64(1)
            v = np.uint64(0)
            for b in range(64):
                if 2 * np.int64(counts[b]) > n:
                    v |= np.uint64(1) << np.uint64(b)
            out[s, t] = v


@numba.njit(nogil=True, cache=True, inline="always")
def _distance(a, b):  # type: ignore[no-untyped-def]
    d = 0
    for t in range(a.shape[0]):
        d += _popcount(a[t] ^ b[t])
    return np.int64(d)


@numba.njit(nogil=True, cache=True)
def _sketch_words(words, offsets, sk_offsets, out, radius, members):  # type: ignore[no-untyped-def]
    # per bag: farthest-point picks, then each pick's radius over (and count of) the codes nearest it
    for s in range(offsets.shape[0] - 1):
        a, n = offsets[s], offsets[s + 1] - offsets[s]
        c0, r = sk_offsets[s], sk_offsets[s + 1] - sk_offsets[s]
        near = np.empty(n, np.int64)
        which = np.zeros(n, np.int64)
        pick = 0
        for c in range(r):
            out[c0 + c] = words[a + pick]
            for j in range(n):
                d = _distance(words[a + j], words[a + pick])
                if c == 0 or d < near[j]:
                    near[j] = d
                    which[j] = c
            pick = np.argmax(near)
        radius[c0 : c0 + r] = 0
        members[c0 : c0 + r] = 0
        for j in range(n):
            radius[c0 + which[j]] = max(radius[c0 + which[j]], near[j])
            members[c0 + which[j]] += 1


def _sketches(
    words: npt.NDArray[np.uint64], offsets: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint64], npt.NDArray[np.int32], npt.NDArray[np.int64]]:
    """Each bag's sketch: (offsets, up to SKETCH_CODES codes per bag, their radii, how many codes each covers)."""
    sk_off = np.concatenate([[0], np.cumsum(np.minimum(np.diff(offsets), SKETCH_CODES))]).astype(np.int64)
    sketch = np.empty((sk_off[-1], words.shape[1]), np.uint64)
    radius = np.empty(sk_off[-1], np.int32)
    members = np.empty(sk_off[-1], np.int64)
    _sketch_words(words, offsets, sk_off, sketch, radius, members)
    return sk_off, sketch, radius, members


@dataclass(frozen=True, eq=False)
class BagGallery:
    """The bags of a set of slides, held for matching: all codes as uint64 words, one slide after another.

    Slide ``s`` owns rows ``offsets[s]:offsets[s + 1]`` of ``words``. ``majority`` is each
    slide's :func:`majority_code` (as words), the compact code :func:`prefilter` ranks by;
    ``id_rank`` is each slide's position in the id order that breaks ties. The sketch is up to
    :data:`SKETCH_CODES` codes of each bag (rows ``sketch_offsets[s]:sketch_offsets[s + 1]``) with
    a radius each such that every code of the bag lies within the radius of one of them: what
    :func:`top_median_min` bounds distances with.
    """

    ids: npt.NDArray[np.str_]
    offsets: npt.NDArray[np.int64]
    words: npt.NDArray[np.uint64]
    majority: npt.NDArray[np.uint64]
    id_rank: npt.NDArray[np.int64]
    sketch_offsets: npt.NDArray[np.int64]
    sketch: npt.NDArray[np.uint64]
    sketch_radius: npt.NDArray[np.int32]
    bits: int

    @classmethod
    def build(cls, bags: Sequence[npt.NDArray[np.uint8]], ids: Sequence[str]) -> BagGallery:
        """A gallery from one packed bag (n_i >= 1, bytes) per slide and the slides' distinct ids."""
        if len(bags) != len(ids):
            raise ValueError(f"got {len(bags)} bags for {len(ids)} slide ids")
        if not len(bags):
            raise ValueError("a gallery needs at least one slide")
        sizes = np.array([len(b) for b in bags], np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return cls.from_arrays(np.concatenate([np.asarray(b) for b in bags]), offsets, ids)

    @classmethod
    def from_arrays(cls, codes: npt.NDArray[np.uint8], offsets: npt.ArrayLike, ids: Sequence[str]) -> BagGallery:
        """A gallery from all bags' codes concatenated (n, bytes) and where each slide starts (slides + 1,)."""
        c = np.asarray(codes)
        if c.dtype != np.uint8 or c.ndim != 2 or c.shape[1] == 0:
            raise ValueError(f"codes must be packed uint8 of shape (n, bytes), got {c.dtype} {c.shape}")
        off = np.asarray(offsets, dtype=np.int64)
        if off.ndim != 1 or len(off) != len(ids) + 1 or off[0] != 0 or off[-1] != len(c):
            raise ValueError(f"offsets must run from 0 to {len(c)} with one entry per slide and one more")
        if (np.diff(off) < 1).any():
            empty = [ids[s] for s in np.flatnonzero(np.diff(off) < 1)[:5]]
            raise ValueError(f"every slide needs at least one code; empty bags: {empty}")
        id_arr = np.asarray(list(ids), dtype=np.str_)
        order = np.argsort(id_arr, kind="stable")
        if len(id_arr) > 1 and (id_arr[order][1:] == id_arr[order][:-1]).any():
            dup = id_arr[order][1:][id_arr[order][1:] == id_arr[order][:-1]]
            raise ValueError(f"slide ids must be distinct; repeated: {sorted(set(dup.tolist()))[:5]}")
        id_rank = np.empty(len(order), np.int64)
        id_rank[order] = np.arange(len(order))
        words = to_words(c)
        majority = np.empty((len(id_arr), words.shape[1]), np.uint64)
        _majority_words(words, off, majority)
        sk_off, sketch, radius, _ = _sketches(words, off)
        return cls(id_arr, off, words, majority, id_rank, sk_off, sketch, radius, c.shape[1] * 8)

    def __len__(self) -> int:
        return len(self.ids)

    def bag(self, slide: int) -> npt.NDArray[np.uint8]:
        """The packed codes (n, bytes) of the slide at position ``slide``."""
        rows = self.words[self.offsets[slide] : self.offsets[slide + 1]]
        return rows.view(np.uint8)[:, : self.bits // 8]

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the gallery's arrays (codes, offsets, ids, majority codes and sketches)."""
        arrays = (self.ids, self.offsets, self.words, self.majority, self.id_rank)
        return sum(a.nbytes for a in (*arrays, self.sketch_offsets, self.sketch, self.sketch_radius))


@dataclass(frozen=True)
class SlideHit:
    """One retrieved slide: its distance and, per query code, the best tile of its bag and that distance."""

    slide_id: str
    position: int
    distance: float
    tiles: npt.NDArray[np.int64]
    tile_distances: npt.NDArray[np.int64]


def _query(query: npt.ArrayLike, bits: int) -> npt.NDArray[np.uint8]:
    q = as_codes(query, bits)
    if not len(q):
        raise ValueError("the query bag is empty: it needs at least one code")
    return q


def _scan(
    query: npt.NDArray[np.uint8],
    words: npt.NDArray[np.uint64],
    offsets: npt.NDArray[np.int64],
    slides: npt.NDArray[np.int64],
    bits: int,
    *,
    back: bool = False,
    keep: bool = False,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """(median-min query -> slide, median-min slide -> query if ``back``, per-code minima if ``keep``)."""
    qcols = np.ascontiguousarray(to_words(query).T)
    ns, m = len(slides), len(query)
    fwd = np.empty(ns, np.float64)
    rev = np.empty(ns if back else 0, np.float64)
    mins = np.empty((ns if keep else 0, m), np.int64)
    pairs = m * ns * int(offsets[-1]) // (len(offsets) - 1)  # query codes x the slides' codes (mean bag)
    # small work stays on the calling thread: waking numba's pool costs more than it saves there
    scan = _bag_scan_parallel if pairs >= PARALLEL_MIN_PAIRS else _bag_scan_serial
    scan(qcols, words, offsets, slides, bits, back, keep, mins, fwd, rev)
    return fwd, rev, mins


def _slides(gallery: BagGallery, slides: npt.ArrayLike | None) -> npt.NDArray[np.int64]:
    if slides is None:
        return np.arange(len(gallery), dtype=np.int64)
    s = np.asarray(slides, dtype=np.int64).reshape(-1)
    if len(s) and (s.min() < 0 or s.max() >= len(gallery)):
        raise IndexError(f"slide positions must be in [0, {len(gallery)}), got {s.min()}..{s.max()}")
    return s


def median_min(
    query: npt.ArrayLike, gallery: BagGallery, *, slides: npt.ArrayLike | None = None
) -> npt.NDArray[np.float64]:
    """Median over the query's codes of the smallest distance to each slide's codes (query -> slide).

    One distance per slide of the gallery, or per position in ``slides`` when given.

    >>> g = BagGallery.build([np.array([[0b0000], [0b1111]], np.uint8), np.array([[0b0011]], np.uint8)], ["a", "b"])
    >>> median_min(np.array([[0b0001], [0b0111]], np.uint8), g).tolist()
    [1.0, 1.0]
    """
    q = _query(query, gallery.bits)
    return _scan(q, gallery.words, gallery.offsets, _slides(gallery, slides), gallery.bits)[0]


def symmetric(
    query: npt.ArrayLike, gallery: BagGallery, *, slides: npt.ArrayLike | None = None
) -> npt.NDArray[np.float64]:
    """Mean of the median-min query -> slide and slide -> query distances (multiples of 0.25)."""
    q = _query(query, gallery.bits)
    fwd, rev, _ = _scan(q, gallery.words, gallery.offsets, _slides(gallery, slides), gallery.bits, back=True)
    return (fwd + rev) / 2.0


def vote(query: npt.ArrayLike, gallery: BagGallery) -> npt.NDArray[np.float64]:
    """Per slide, how many query codes did *not* vote for it (each votes for every slide holding one of
    its nearest tiles among all gallery tiles). Lower is closer, as for the other distances."""
    q = _query(query, gallery.bits)
    _, _, mins = _scan(q, gallery.words, gallery.offsets, _slides(gallery, None), gallery.bits, keep=True)
    votes = (mins == mins.min(axis=0)).sum(axis=1)
    return (len(q) - votes).astype(np.float64)


def _top(distances: npt.NDArray[np.float64], id_rank: npt.NDArray[np.int64], k: int) -> npt.NDArray[np.int64]:
    k = min(k, len(distances))
    if k <= 0:
        return np.empty(0, np.int64)
    kth = np.partition(distances, k - 1)[k - 1]
    cand = np.flatnonzero(distances <= kth)
    return cand[np.lexsort((id_rank[cand], distances[cand]))[:k]]


def _could_reach(q: npt.NDArray[np.uint8], gallery: BagGallery, tau: float) -> npt.NDArray[np.bool_]:
    """Which slides may have median-min at most ``tau``: a superset, from the query's and the slides' sketches.

    Query code ``i`` lies within ``rho`` of its sketch code ``C``, and a slide's code ``g`` within
    ``r`` of its sketch code ``c``, so ``d(i, g) >= d(C, c) - rho - r`` (triangle inequality). A
    slide is kept when the query codes whose bound is at most ``tau`` make at least half of the
    query (the lower middle value, so the median, may then be within ``tau``).
    """
    _, centres, rho, weight = _sketches(to_words(q), np.array([0, len(q)], np.int64))
    qcols = np.ascontiguousarray(centres.T)
    limits = (int(tau) + rho).astype(np.int32)  # distances are integers: floor(tau) is the same limit
    out = np.empty(len(gallery), np.int64)
    pairs = len(centres) * len(gallery.sketch)
    within = _within_parallel if pairs >= PARALLEL_MIN_PAIRS else _within_serial
    within(qcols, gallery.sketch, gallery.sketch_offsets, gallery.sketch_radius, limits, weight, out)
    return out >= (len(q) + 1) // 2


def top_median_min(
    query: npt.ArrayLike, gallery: BagGallery, k: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """The exact top ``k`` by median-min (ties by slide id), scoring exactly only the slides that can be in it.

    The :data:`FIRST_BATCH` :func:`candidates` are scored first; their ``k``-th distance ``tau``
    bounds the answer's from above, so only the slides that :func:`_could_reach` ``tau`` are
    scored too. Identical to ranking :func:`median_min` over the whole gallery; how many slides
    are scored depends on how tight the sketches are (tight where a bag's codes cluster).
    """
    q = _query(query, gallery.bits)
    if k <= 0:
        return np.empty(0, np.int64), np.empty(0, np.float64)
    first = candidates(q, gallery, max(k, FIRST_BATCH))
    dist = median_min(q, gallery, slides=first)
    if len(first) < len(gallery):  # (else every slide is scored already)
        todo = _could_reach(q, gallery, float(np.partition(dist, k - 1)[k - 1]))
        todo[first] = False
        rest = np.flatnonzero(todo)
        first = np.concatenate([first, rest])
        dist = np.concatenate([dist, median_min(q, gallery, slides=rest)])
    top = _top(dist, gallery.id_rank[first], k)
    return first[top], dist[top]


def rank(distances: npt.ArrayLike, ids: Sequence[str] | npt.NDArray[np.str_], k: int) -> npt.NDArray[np.int64]:
    """Positions of the ``k`` smallest distances, nearest first; equal distances in slide id string order.

    >>> rank([2.0, 1.0, 1.0, 0.5], ["d", "c", "b", "a"], 3).tolist()
    [3, 2, 1]
    """
    if k < 0:
        raise ValueError(f"k must be non-negative, got {k}")
    d = np.asarray(distances, dtype=np.float64)
    id_arr = np.asarray(ids, dtype=np.str_)
    if d.shape != (len(id_arr),):
        raise ValueError(f"got {d.shape} distances for {len(id_arr)} ids")
    id_rank = np.empty(len(id_arr), np.int64)
    id_rank[np.argsort(id_arr, kind="stable")] = np.arange(len(id_arr))
    return _top(d, id_rank, k)


def best_tiles(
    query: npt.ArrayLike, gallery: BagGallery, slide: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Evidence for a hit: per query code, the position in the slide's bag of its nearest tile (ties to
    the lower position) and that distance."""
    q = _query(query, gallery.bits)
    bag = gallery.bag(slide)
    d = np.bitwise_count(np.bitwise_xor(q[:, None, :], bag[None, :, :])).sum(axis=2, dtype=np.int64)
    tiles = np.argmin(d, axis=1).astype(np.int64)
    return tiles, d[np.arange(len(q)), tiles]


def majority_code(bag: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """The bitwise majority (bytes,) of a packed bag (n, bytes): a bit is 1 where more than half the codes have it.

    >>> majority_code(np.array([[0b1100], [0b1010], [0b1001], [0b0000]], np.uint8)).tolist()
    [8]
    """
    b = np.asarray(bag)
    if b.dtype != np.uint8 or b.ndim != 2 or not len(b):
        raise ValueError(f"bag must be packed uint8 of shape (n >= 1, bytes), got {b.dtype} {b.shape}")
    ones = np.unpackbits(b, axis=1).sum(axis=0, dtype=np.int64)
    return np.packbits(2 * ones > len(b))


PrefilterBy = Literal["majority", "median"]


def candidates(
    query: npt.ArrayLike, gallery: BagGallery, n: int, *, by: PrefilterBy = "majority"
) -> npt.NDArray[np.int64]:
    """The ``n`` slides whose majority codes are nearest the query, nearest first (ties by slide id).

    ``by="majority"``: Hamming distance from the query's own majority code; ``by="median"``:
    median over the query's codes of the distance to each slide's majority code.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if by not in ("majority", "median"):
        raise ValueError(f"by must be 'majority' or 'median', got {by!r}")
    q = _query(query, gallery.bits)
    probe = majority_code(q)[None, :] if by == "majority" else q
    every = np.arange(len(gallery) + 1, dtype=np.int64)  # one majority code per slide
    coarse = _scan(probe, gallery.majority, every, every[:-1], gallery.bits)[0]
    return _top(coarse, gallery.id_rank, n)


def prefilter(
    query: npt.ArrayLike, gallery: BagGallery, n: int, *, by: PrefilterBy = "majority"
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Exact median-min on the :func:`candidates` only: (slide positions, their distances).

    Approximate as a ranking of the whole gallery (a slide outside the ``n`` candidates is never
    seen); with ``n >= len(gallery)`` it is exact.
    """
    cand = candidates(query, gallery, n, by=by)
    return cand, median_min(query, gallery, slides=cand)


METHODS: dict[str, Callable[..., npt.NDArray[np.float64]]] = {"median_min": median_min, "symmetric": symmetric}


def search(
    query: npt.ArrayLike,
    gallery: BagGallery,
    k: int,
    *,
    method: Literal["median_min", "symmetric", "vote"] = "median_min",
    prefilter_n: int | None = None,
    prefilter_by: PrefilterBy = "majority",
    prune: bool = True,
) -> list[SlideHit]:
    """The ``k`` slides nearest the query bag by ``method``, with the matched tiles as evidence.

    ``prefilter_n`` first narrows the gallery to that many :func:`candidates` (approximate; not
    with ``vote``, whose nearest tiles are taken over the whole gallery). Otherwise median-min
    is exact, through :func:`top_median_min` unless ``prune=False`` (score every slide).
    """
    every = np.arange(len(gallery), dtype=np.int64)
    if method == "vote":
        if prefilter_n is not None:
            raise ValueError("method='vote' counts nearest tiles over the whole gallery; drop prefilter_n")
        slides, dist = every, vote(query, gallery)
    elif method == "median_min" and prefilter_n is None and prune:
        slides, dist = top_median_min(query, gallery, k)
    elif method in METHODS:
        slides = every if prefilter_n is None else candidates(query, gallery, prefilter_n, by=prefilter_by)
        dist = METHODS[method](query, gallery, slides=slides)
    else:
        raise ValueError(f"method must be one of {[*METHODS, 'vote']}, got {method!r}")
    hits = []
    for r in _top(dist, gallery.id_rank[slides], k):
        s = int(slides[r])
        tiles, tile_d = best_tiles(query, gallery, s)
        hits.append(SlideHit(str(gallery.ids[s]), s, float(dist[r]), tiles, tile_d))
    return hits


def warm() -> None:
    """Compile the kernels (numba compiles on first use: seconds on a busy machine, or loads its cache) on a
    tiny gallery, so that a query service's first slide query does not pay for it."""
    rng = np.random.default_rng(0)
    gallery = BagGallery.build([rng.integers(0, 256, (3, 6), dtype=np.uint8) for _ in range(4)], list("abcd"))
    query = rng.integers(0, 256, (2, 6), dtype=np.uint8)
    for method in ("median_min", "symmetric", "vote"):
        search(query, gallery, 2, method=method)
