# mypy: check-untyped-defs=False
# (the numba kernel is untyped by nature; its public wrapper is typed)
"""Rank stored lesion slices by Dice with a sketch, exactly, from Hamming distance and popcounts.

For bit sets A (the sketch) and B (a stored code), ``H = |A| + |B| - 2|A & B|``, so
``Dice = 2|A & B| / (|A| + |B|) = 1 - H / (|A| + |B|)``: one XOR + popcount scan (the same
kernel as the code index's) over the candidate rows gives every Dice, and the stored popcount
``|B|`` is a column of the lesion table. Ties go to the lower row position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import numpy.typing as npt

from medret.index.search import _popcount, to_columns
from medret.models.codes import to_words

__all__ = ["best_per_patient", "dice_reference", "dice_scores", "rank_slices", "to_columns"]


@numba.njit(nogil=True, cache=True)
def _hamming_at(cols, rows, q, out):  # type: ignore[no-untyped-def]
    for i in range(rows.shape[0]):
        r = rows[i]
        d = 0
        for j in range(cols.shape[0]):
            d += _popcount(cols[j, r] ^ q[j])
        out[i] = d


def hamming_at(
    cols: npt.NDArray[np.uint64], rows: npt.NDArray[np.int64], query: npt.NDArray[np.uint8]
) -> npt.NDArray[np.int64]:
    """Hamming distances of the rows ``rows`` of word columns ``cols`` (w, n) to one packed query code."""
    q = to_words(np.asarray(query, np.uint8).reshape(1, -1))[0]
    if q.shape[0] != cols.shape[0]:
        raise ValueError(f"code widths differ: table {cols.shape[0]} words, query {q.shape[0]}")
    out = np.empty(rows.shape[0], np.int64)
    if rows.size:
        _hamming_at(cols, np.ascontiguousarray(rows, np.int64), q, out)
    return out


def dice_scores(
    cols: npt.NDArray[np.uint64],
    popcounts: npt.NDArray[np.int64],
    rows: npt.NDArray[np.int64],
    query: npt.NDArray[np.uint8],
) -> npt.NDArray[np.float64]:
    """Dice of the query with each of ``rows`` (stored codes are never empty; an empty query is refused earlier)."""
    a = int(np.unpackbits(np.asarray(query, np.uint8)).sum())
    h = hamming_at(cols, rows, query)
    total = a + popcounts[rows]
    # 1 - H / T written as (T - H) / T: both integers, so the value is bit-identical to 2|A & B| / T
    return np.asarray((total - h) / np.maximum(total, 1), np.float64)


def dice_reference(codes: npt.NDArray[np.uint8], query: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
    """Dice from unpacked bits with numpy: 2|A & B| / (|A| + |B|). The oracle for tests."""
    b = np.unpackbits(np.asarray(codes, np.uint8), axis=1).astype(bool)
    a = np.unpackbits(np.asarray(query, np.uint8)).astype(bool)
    inter = (b & a).sum(axis=1)
    return np.asarray(2.0 * inter / (a.sum() + b.sum(axis=1)), np.float64)


def rank_slices(scores: npt.NDArray[np.float64], rows: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Order of ``rows`` by score, best first; ties to the lower row position."""
    return np.lexsort((rows, -scores))


@dataclass(frozen=True)
class PatientHit:
    patient: str
    row: int  # position in the lesion snapshot of the patient's best slice
    score: float
    dice: float
    slices_ranked: int  # the best slice's rank among all slices (0 = first)


def best_per_patient(
    order: npt.NDArray[np.int64],
    rows: npt.NDArray[np.int64],
    scores: npt.NDArray[np.float64],
    dice: npt.NDArray[np.float64],
    patients: npt.NDArray[np.object_],
    k: int,
    *,
    slice_pool: int = 0,
) -> list[PatientHit]:
    """The top ``k`` patients by their best slice. ``slice_pool`` > 0 keeps only the top slices first (the
    paper's 200 -> 10); 0 ranks every candidate slice, which never loses a patient."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    pool = order[:slice_pool] if slice_pool > 0 else order
    seen: set[str] = set()
    out: list[PatientHit] = []
    for rank, i in enumerate(pool):
        p = str(patients[rows[i]])
        if p in seen:
            continue
        seen.add(p)
        out.append(PatientHit(p, int(rows[i]), float(scores[i]), float(dice[i]), rank))
        if len(out) == k:
            break
    return out
