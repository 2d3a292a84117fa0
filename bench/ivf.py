"""Recall and latency of the approximate path (LanceDB IVF_FLAT, hamming) against exact search.

    python bench/ivf.py [--n 200000] [--partitions 256] [--probes 1 4 16 64]

Codes are clustered like a trained encoder's (512 centres, 5% of bits flipped), 64 bits.
Recall@10 by ids = |IVF top 10 ∩ exact top 10| / 10; tie-aware recall counts an IVF hit when its
distance is no worse than the exact 10th distance (many codes tie there). 100 queries from the table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--partitions", type=int, default=256)
    ap.add_argument("--probes", type=int, nargs="+", default=[1, 4, 16, 64])
    args = ap.parse_args()

    from medret.index import CodeIndex
    from medret.models.encoder import EncoderConfig

    rng = np.random.default_rng(0)
    centres = rng.integers(0, 2, (512, 64), dtype=np.uint8)
    bits = centres[rng.integers(0, 512, args.n)] ^ (rng.random((args.n, 64)) < 0.05)
    codes = np.packbits(bits.astype(np.uint8), axis=1)
    with tempfile.TemporaryDirectory() as tmp:
        index = CodeIndex.create(tmp, EncoderConfig(name="bench", bits=64))
        index.upsert(index.rows([f"i{i}" for i in range(args.n)], codes, source_uri=["u"] * args.n))
        t = time.perf_counter()
        index.create_ivf(num_partitions=args.partitions)
        print(f"n={args.n:,} IVF_FLAT build with {args.partitions} partitions: {time.perf_counter() - t:.1f} s")
        queries = codes[rng.choice(args.n, 100, replace=False)]
        exact, exact_d = index.search_ids(queries, 10)
        t = time.perf_counter()
        index.search_ids(queries, 10)
        print(f"exact scan: {(time.perf_counter() - t) / len(queries) * 1e3:.2f} ms per query (batched)")
        for probes in args.probes:
            recall, tie_recall, lat = [], [], []
            for q, ex, exd in zip(queries, exact, exact_d, strict=True):
                t = time.perf_counter()
                hits = index.search_ivf(q, 10, nprobes=probes)[0]
                lat.append(time.perf_counter() - t)
                recall.append(len(set(hits.column("item_id").to_pylist()) & set(ex)) / 10)
                tie_recall.append(float((np.array(hits.column("distance").to_pylist()) <= exd[-1]).sum()) / 10)
            print(
                f"nprobes={probes:3d}  recall@10 by ids {np.mean(recall):.3f}  tie-aware {np.mean(tie_recall):.3f}  "
                f"median latency {statistics.median(lat) * 1e3:.1f} ms"
            )


if __name__ == "__main__":
    main()
