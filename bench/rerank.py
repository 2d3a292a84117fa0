"""Two-stage search on medmnist-4 in the benchmark's gallery order: what re-ranking the Hamming shortlist
by compact features buys, and what it costs a query.

    .venv/bin/python bench/rerank.py [--encoder default] [--candidates 100 200 1000] [--json out.json]

Quality: mAP@10/@100 (strict, per organ, micro and macro; ``medret.eval``) of
- the Hamming ranking (ties by gallery position),
- the Hamming top-N re-ranked by the encoder's full float features (cosine), as ``medret evaluate --rerank``,
- the Hamming top-N re-ranked by the compact int8 features the code table keeps (``medret.models.rerank``),
  which is exactly what the service does.

Cost: the median time of one query through the code table (a real LanceDB table of the gallery, hits read
with their metadata), plain Hamming (``CodeIndex.search``) against two-stage (``CodeIndex.search_reranked``),
alternated query by query; and the bytes a row's compact features take.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="default")
    ap.add_argument("--candidates", type=int, nargs="+", default=[100, 200, 1000])
    ap.add_argument("--timed", type=int, default=200, help="queries timed through the table")
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch

    from medret.eval.benchmarks import medmnist4
    from medret.eval.retrieval import hamming_rank, score
    from medret.index.search import topk
    from medret.index.store import CodeIndex
    from medret.models import rerank
    from medret.models.encoder import load_encoder
    from medret.models.pretrained import encoder_path

    torch.set_num_threads(1)
    ks = (10, 100)
    split = medmnist4()  # the benchmark's fixed shuffled gallery order
    enc = load_encoder(encoder_path(args.encoder))
    g_codes, g_feat = rerank_inputs(enc, split["gallery"].images)
    q_codes, q_feat = rerank_inputs(enc, split["query"].images)
    g_small, q_small = rerank.compact(g_feat), rerank.compact(q_feat)
    rows = [{"ranking": "hamming", **summary(score(hamming_rank(q_codes, g_codes, max(ks)), split, ks))}]
    for n in args.candidates:
        cand, dist = topk(g_codes, q_codes, max(n, max(ks)))
        for name, gf, qf in (("float features", g_feat, q_feat), ("compact int8 features", g_small, q_small)):
            ranked = np.full((len(q_codes), max(ks)), -1, np.int64)
            for i in range(len(q_codes)):
                c, d = cand[i], dist[i]
                if name.startswith("float"):
                    gn = gf[c] / np.maximum(np.linalg.norm(gf[c], axis=1, keepdims=True), 1e-12)
                    s = gn @ (qf[i] / max(float(np.linalg.norm(qf[i])), 1e-12))
                    order = np.lexsort((c, d, -s))
                else:
                    order = rerank.rerank_order(c, d, rerank.similarity(qf[i], gf[c]))
                ranked[i] = c[order][: max(ks)]
            rows.append({"ranking": f"top-{n} re-ranked by {name}", **summary(score(ranked, split, ks))})
    for r in rows:
        print(
            f"{r['ranking']:45s} micro mAP@100 {r['micro@100']:.4f}  macro {r['macro@100']:.4f}  "
            + "  ".join(f"{o} {v:.3f}" for o, v in r["organs@100"].items()),
            flush=True,
        )

    # the cost of the second stage, through a real table
    with tempfile.TemporaryDirectory() as tmp:
        idx = CodeIndex.create(tmp, enc.config)
        ids = [f"g{i:05d}" for i in range(len(g_codes))]
        feature = pa.FixedSizeListArray.from_arrays(pa.array(g_small.ravel(), pa.int8()), rerank.DIMS)
        idx.append(idx.rows(ids, g_codes, source_uri=ids, feature=feature))
        idx.search(q_codes[:1], 10)
        idx.search_reranked(q_codes[0], q_small[0], 10, candidates=100)
        plain, second = [], []
        for i in range(min(args.timed, len(q_codes))):
            runs = [
                (plain, lambda i=i: idx.search(q_codes[i : i + 1], 10)),
                (second, lambda i=i: idx.search_reranked(q_codes[i], q_small[i], 10, candidates=100)),
            ]
            for out, fn in runs if i % 2 else runs[::-1]:
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
    cost = {
        "rows": len(g_codes),
        "hamming_ms": 1e3 * statistics.median(plain),
        "reranked_top100_ms": 1e3 * statistics.median(second),
        "bytes_per_row": rerank.DIMS,
    }
    print(
        f"one query, k=10, {cost['rows']:,} rows: Hamming {cost['hamming_ms']:.2f} ms, Hamming top-100 re-ranked "
        f"{cost['reranked_top100_ms']:.2f} ms; {rerank.DIMS} bytes per row",
        flush=True,
    )
    if args.json:
        meta = {
            "command": " ".join(sys.argv),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.platform(),
            "encoder": enc.config.encoder_id,
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "quality": rows, "cost": cost}, indent=2))


def rerank_inputs(enc: object, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    both = getattr(enc, "encode_with_features", None)
    if both is not None:
        return both(images)  # type: ignore[no-any-return]
    return enc.encode(images), enc.forward_features(images)  # type: ignore[attr-defined]


def summary(result: dict) -> dict:  # type: ignore[type-arg]
    return {
        "micro@100": result["micro"]["mAP@100"],
        "macro@100": result["macro"]["mAP@100"],
        "micro@10": result["micro"]["mAP@10"],
        "organs@100": {o: v["mAP@100"] for o, v in result["per_organ"].items()},
    }


if __name__ == "__main__":
    main()
