"""Exact Hamming top-k: medret's in-memory scan against faiss.IndexBinaryFlat, same codes, same run.

    python bench/search.py [--sizes 1000000 10000000] [--threads 1] [--json out.json]

Random 64-bit codes; queries are random codes (not database members). Reports the
median single-query latency over --single queries, and the per-query time of one
batch of --batch queries, for k = 10 and 100, and the ratio medret / faiss.
Results are checked: distances must equal faiss's for every query.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone

import numpy as np


def _timed(fn, *args):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--ks", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--single", type=int, default=50, help="single queries timed per case")
    ap.add_argument("--batch", type=int, default=256, help="queries in the batched case")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import faiss
    import numba

    from medret.index.search import to_columns, topk_columns
    from medret.models.codes import to_words

    faiss.omp_set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    for n in args.sizes:
        codes = rng.integers(0, 256, (n, 8), dtype=np.uint8)
        queries = rng.integers(0, 256, (max(args.single, args.batch), 8), dtype=np.uint8)
        cols, qwords = to_columns(codes), to_words(queries)
        index = faiss.IndexBinaryFlat(64)
        index.add(codes)
        topk_columns(cols, qwords[:1], 10)  # compile once
        for k in args.ks:
            ours, theirs = [], []
            for i in range(args.single):
                dt, (_, d_ours) = _timed(topk_columns, cols, qwords[i : i + 1], k)
                ours.append(dt)
                dt, (d_faiss, _) = _timed(index.search, queries[i : i + 1], k)
                theirs.append(dt)
                if not np.array_equal(d_ours, d_faiss):
                    raise SystemExit(f"distance mismatch at n={n} k={k} query {i}")
            b_ours, (_, db_ours) = _timed(topk_columns, cols, qwords[: args.batch], k)
            b_faiss, (db_faiss, _) = _timed(index.search, queries[: args.batch], k)
            if not np.array_equal(db_ours, db_faiss):
                raise SystemExit(f"batched distance mismatch at n={n} k={k}")
            row = {
                "n": n,
                "k": k,
                "single_ms_medret": statistics.median(ours) * 1e3,
                "single_ms_faiss": statistics.median(theirs) * 1e3,
                "batch_ms_per_query_medret": b_ours / args.batch * 1e3,
                "batch_ms_per_query_faiss": b_faiss / args.batch * 1e3,
            }
            row["single_ratio"] = row["single_ms_medret"] / row["single_ms_faiss"]
            row["batch_ratio"] = row["batch_ms_per_query_medret"] / row["batch_ms_per_query_faiss"]
            row["codes_per_s_medret_single"] = n / (row["single_ms_medret"] / 1e3)
            rows.append(row)
            print(
                f"n={n:>10,} k={k:>3}  single: medret {row['single_ms_medret']:7.3f} ms  faiss "
                f"{row['single_ms_faiss']:7.3f} ms  ratio {row['single_ratio']:.2f}   batch({args.batch}): medret "
                f"{row['batch_ms_per_query_medret']:7.3f} ms/q  faiss {row['batch_ms_per_query_faiss']:7.3f} ms/q  "
                f"ratio {row['batch_ratio']:.2f}",
                flush=True,
            )
        del codes, cols, index
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": args.threads,
        "faiss": faiss.__version__,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
