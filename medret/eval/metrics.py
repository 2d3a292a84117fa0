"""Retrieval metrics exactly as ../shared/BENCHMARKS.md defines them. Pure numpy.

Inputs are rankings: ``ranked`` (q, K) gallery indices, best first (``-1`` pads
a gallery smaller than K). Relevance is derived from organ and class labels:

- strict: same organ AND same class;  organ: same organ.
- ``AP@k = (1/R_k) * sum_{m<=k} P(m) rel(m)``, ``R_k`` = relevant items in the top k;
  ``AP@k = 0`` when ``R_k = 0``.  ``mAP@k`` averages AP@k over queries.
- ``P@k`` = fraction of the top k that is relevant (strict).
- ``nDCG@k``: gain 2 same organ and class, 1 same organ only, 0 otherwise; discount
  ``log2(m+1)``; ideal DCG from the best ordering of the WHOLE gallery.
- ``mMV@k``: the query's label equals the majority label of its top k
  (a tie between labels goes to the one whose best-ranked item ranks first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


def average_precision_at_k(rel: npt.NDArray[np.bool_], k: int) -> FloatArray:
    """AP@k per query from a (q, >=k) relevance matrix of the ranked list.

    >>> average_precision_at_k(np.array([[1, 0, 1, 0]], bool), 4)  # (1/1 + 2/3) / 2
    array([0.83333333])
    >>> average_precision_at_k(np.array([[0, 0]], bool), 2)
    array([0.])
    """
    r = rel[:, :k].astype(np.float64)
    hits = np.cumsum(r, axis=1)
    precision = hits / np.arange(1, r.shape[1] + 1)
    rk = hits[:, -1] if r.shape[1] else np.zeros(len(r))
    total = (precision * r).sum(axis=1)
    return np.divide(total, rk, out=np.zeros_like(total), where=rk > 0)


def precision_at_k(rel: npt.NDArray[np.bool_], k: int) -> FloatArray:
    """Fraction of the top k that is relevant (a short list still divides by k)."""
    return np.asarray(rel[:, :k].sum(axis=1) / k, np.float64)


def ndcg_at_k(gains: IntArray, ideal_counts: IntArray, k: int) -> FloatArray:
    """nDCG@k from the gains of the ranked list (q, >=k) and, per query, how many gallery
    items have gain 2 and gain 1 (``ideal_counts`` (q, 2)): the ideal list is all 2s then all 1s.

    >>> ndcg_at_k(np.array([[1, 2]]), np.array([[1, 1]]), 2).round(4)
    array([0.8597])
    """
    g = gains[:, :k].astype(np.float64)
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (g * disc[: g.shape[1]]).sum(axis=1)
    pos = np.arange(k)
    n2, n1 = ideal_counts[:, :1], ideal_counts[:, 1:2]
    ideal = np.where(pos < n2, 2.0, np.where(pos < n2 + n1, 1.0, 0.0))
    idcg = (ideal * disc).sum(axis=1)
    return np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)


def majority_vote_at_k(ranked_labels: npt.NDArray[Any], query_labels: npt.NDArray[Any], k: int) -> FloatArray:
    """1.0 where the query's label is the majority among its top k, else 0.0.

    >>> majority_vote_at_k(np.array([["a", "b", "b"], ["a", "b", "c"]]), np.array(["b", "a"]), 3)
    array([1., 1.])
    """
    out = np.zeros(len(query_labels))
    for i, (row, ql) in enumerate(zip(ranked_labels[:, :k], query_labels, strict=True)):
        values, first, counts = np.unique(row, return_index=True, return_counts=True)
        best = counts.max()
        winner = values[first == first[counts == best].min()][0]
        out[i] = float(winner == ql)
    return out


def retrieval_metrics(
    ranked: IntArray,
    *,
    query_organ: IntArray,
    query_label: IntArray,
    gallery_organ: IntArray,
    gallery_label: IntArray,
    organs: Sequence[str],
    ks: Sequence[int] = (10, 100, 1000),
) -> dict[str, Any]:
    """All benchmark metrics, micro (over every query) and per organ with their unweighted mean.

    Returns ``{"micro": {metric: value}, "per_organ": {organ: {...}}, "macro": {...}, "queries": n}``
    with metric names ``mAP@k``, ``P@k``, ``nDCG@k``, ``mAP@k (organ)``.
    """
    valid = ranked >= 0
    safe = np.where(valid, ranked, 0)
    same_organ = (gallery_organ[safe] == query_organ[:, None]) & valid
    strict = same_organ & (gallery_label[safe] == query_label[:, None])
    gains = strict.astype(np.int64) + same_organ.astype(np.int64)
    # gallery-wide ideal counts per (organ, class): how many gain-2 and gain-1 items exist
    ideal = np.zeros((len(query_organ), 2), np.int64)
    for o in np.unique(query_organ):
        in_organ = gallery_organ == o
        n_organ = int(in_organ.sum())
        for c in np.unique(query_label[query_organ == o]):
            n_same = int((in_organ & (gallery_label == c)).sum())
            sel = (query_organ == o) & (query_label == c)
            ideal[sel] = (n_same, n_organ - n_same)
    per_query: dict[str, FloatArray] = {}
    for k in ks:
        per_query[f"mAP@{k}"] = average_precision_at_k(strict, k)
        per_query[f"P@{k}"] = precision_at_k(strict, k)
        per_query[f"nDCG@{k}"] = ndcg_at_k(gains, ideal, k)
        per_query[f"mAP@{k} (organ)"] = average_precision_at_k(same_organ, k)
    micro = {name: float(v.mean()) for name, v in per_query.items()}
    per_organ = {}
    for oi, organ in enumerate(organs):
        sel = query_organ == oi
        if sel.any():
            per_organ[organ] = {name: float(v[sel].mean()) for name, v in per_query.items()}
    macro = {name: float(np.mean([po[name] for po in per_organ.values()])) for name in per_query}
    return {"queries": len(query_organ), "micro": micro, "per_organ": per_organ, "macro": macro}
