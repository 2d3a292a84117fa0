"""Score an encoder on a retrieval split: encode gallery and queries, rank by Hamming, measure."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import numpy.typing as npt

from medret.eval.benchmarks import GALLERY_SEED, RetrievalSplit, gallery_permutation
from medret.eval.metrics import average_precision_at_k, retrieval_metrics
from medret.index.search import topk
from medret.io.medmnist import to_channels
from medret.models.encoder import Encoder


def hamming_rank(query_codes: npt.NDArray[np.uint8], gallery_codes: npt.NDArray[np.uint8], k: int) -> Any:
    """(q, k) gallery positions by Hamming distance, ties to the earlier gallery item."""
    return topk(gallery_codes, query_codes, min(k, len(gallery_codes)))[0]


def score(ranked: npt.NDArray[np.int64], split: RetrievalSplit, ks: tuple[int, ...]) -> dict[str, Any]:
    g, q = split["gallery"], split["query"]
    if ranked.shape[1] < max(ks):  # a gallery smaller than k: pad with -1
        ranked = np.pad(ranked, ((0, 0), (0, max(ks) - ranked.shape[1])), constant_values=-1)
    return retrieval_metrics(
        ranked,
        query_organ=q.organ,
        query_label=q.label,
        gallery_organ=g.organ,
        gallery_label=g.label,
        organs=split.organs,
        ks=ks,
    )


def evaluate_encoder(
    encoder: Encoder, split: RetrievalSplit, *, ks: tuple[int, ...] = (10, 100, 1000), rerank: bool = False
) -> dict[str, Any]:
    """Metrics of ``encoder`` on the split's gallery and queries; ``rerank`` adds the two-stage ranking."""
    # a split is grey or RGB; each encoder gets the channels it takes (RGB -> grey is the split's own luma)
    gallery, query = (to_channels(split[p].images, encoder.config.channels) for p in ("gallery", "query"))
    t0 = time.perf_counter()
    g_codes = encoder.encode(gallery)
    q_codes = encoder.encode(query)
    t_encode = time.perf_counter() - t0
    t0 = time.perf_counter()
    ranked = hamming_rank(q_codes, g_codes, max(ks))
    t_search = time.perf_counter() - t0
    out: dict[str, Any] = {
        "encoder_id": encoder.config.encoder_id,
        "bits": encoder.config.bits,
        "method": encoder.config.method,
        "hamming": score(ranked, split, ks),
        "encode_images_per_s": (len(g_codes) + len(q_codes)) / t_encode,
        "search_ms_per_query": 1000 * t_search / max(1, len(q_codes)),
        "codes": {"gallery": g_codes, "query": q_codes, "ranked": ranked},
    }
    if rerank:
        from medret.methods.clshash import rerank as rerank_fn

        gf = encoder.forward_features(gallery)
        qf = encoder.forward_features(query)
        reranked = rerank_fn(q_codes, g_codes, qf, gf, k=max(ks), candidates=max(ks))
        out["reranked"] = score(reranked, split, ks)
    return out


def tie_order_spread(
    result: dict[str, Any], split: RetrievalSplit, n: int, *, ks: tuple[int, ...] = (10, 100, 1000)
) -> dict[str, Any]:
    """How much the gallery's order still moves an encoder's figures: the Hamming ranking re-scored
    with the gallery in ``n`` other fixed orders (``default_rng(GALLERY_SEED + i).permutation``,
    i = 1..n, applied to the evaluated order). The codes are the same; only the tie order changes."""
    g_codes, q_codes = result["codes"]["gallery"], result["codes"]["query"]
    runs = []
    for i in range(1, n + 1):
        perm = gallery_permutation(len(g_codes), GALLERY_SEED + i)
        ranked = hamming_rank(q_codes, g_codes[perm], max(ks))
        runs.append(score(ranked, split.reordered("gallery", perm), ks))
    out: dict[str, Any] = {"orders": n, "seeds": [GALLERY_SEED + i for i in range(1, n + 1)]}
    for name, pick in (("micro", lambda m: m["micro"]), ("macro", lambda m: m["macro"])):
        for metric in ("mAP@10", "mAP@100", "mAP@1000"):
            vals = [float(pick(m)[metric]) for m in runs]
            out[f"{name} {metric}"] = {"min": min(vals), "max": max(vals), "std": float(np.std(vals))}
    for organ in runs[0]["per_organ"] if runs else ():
        vals = [float(m["per_organ"][organ]["mAP@100"]) for m in runs]
        out[f"{organ} mAP@100"] = {"min": min(vals), "max": max(vals), "std": float(np.std(vals))}
    return out


def leave_one_out_map(
    codes: npt.NDArray[np.uint8], labels: npt.NDArray[np.int64], n_queries: int, k: int = 100, *, seed: int = 0
) -> float:
    """Strict mAP@k of ``n_queries`` items drawn at random (seeded) against all the others (a cheap validation score).

    Drawn, not the first ones: a benchmark part is ordered by organ and class, so its first items
    would be the first classes of the first organs only. Ties are broken as the benchmark breaks
    them, in a fixed label-independent order (the part permuted by ``default_rng(GALLERY_SEED)``),
    not by the part's class order, which would favour the first classes and make an epoch whose
    codes collapse whole classes together look better than it is.
    """
    n_queries = min(n_queries, len(codes))
    if n_queries == 0:
        return 0.0
    perm = gallery_permutation(len(codes))
    codes, labels = codes[perm], labels[perm]
    queries = np.sort(np.random.default_rng(seed).choice(len(codes), n_queries, replace=False))
    ranked = hamming_rank(codes[queries], codes, k + 1)
    r = np.array([row[row != i][:k] for i, row in zip(queries, ranked, strict=True)])
    rel = labels[r] == labels[queries, None]
    return float(average_precision_at_k(rel, k).mean())
