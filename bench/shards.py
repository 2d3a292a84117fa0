"""Sharded exact search: what a shard holds, how long it takes to load, and what the fan-out costs a query.

    .venv/bin/python bench/shards.py [--n 1000000] [--shards 1 2 4] [--queries 100] [--json out.json]

A LanceDB table of --n clustered 64-bit codes (the ``bench/search.py`` generator) with 24-character item
ids, searched (k=10, single queries, rows of the table) by:
- ``CodeIndex`` in this process (the unsharded replica's own scan or multi-index), and
- ``ShardedIndex`` with N shards (Ray actors on this machine, one numba thread each).
For each N: each shard's rows, bytes held (codes, ids, Lance row ids, multi-index) and load seconds,
and the median query latency, every answer checked equal to the in-process one. On one machine the
shards share its cores, so the latency shows the fan-out's fixed cost (a Ray call per shard and the
merge), not the speed-up of N machines.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search import CENTRES, clustered_codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--json")
    args = ap.parse_args()

    import ray

    from medret.index.shards import ShardedIndex
    from medret.index.store import CodeIndex
    from medret.models.encoder import EncoderConfig

    rng = np.random.default_rng(0)
    codes = clustered_codes(rng, rng.integers(0, 256, (CENTRES, 8), dtype=np.uint8), args.n)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        idx = CodeIndex.create(tmp, EncoderConfig(name="pca-itq", bits=64, weights_sha256="bench"))
        ids = [f"s3://archive/item{i:012d}" for i in range(args.n)]
        for lo in range(0, args.n, 250_000):
            idx.append(idx.rows(ids[lo : lo + 250_000], codes[lo : lo + 250_000], source_uri=ids[lo : lo + 250_000]))
        queries = codes[rng.integers(0, args.n, args.queries)]
        idx.search_positions(queries[:1], 10)
        idx.live.wait()
        local = []
        for q in queries:
            t0 = time.perf_counter()
            idx.search_positions(q[None, :], 10)
            local.append(time.perf_counter() - t0)
        want = idx.search_ids(queries, 10)
        base = {"shards": 0, "p50_ms": 1e3 * statistics.median(local), "path": idx.live.stats()["path"]}
        print(f"in-process ({base['path']}): p50 {base['p50_ms']:.2f} ms", flush=True)
        for n in args.shards:
            t0 = time.perf_counter()
            sh = ShardedIndex(tmp, "codes", shards=n, num_cpus=0, timeout_s=600)
            stats = sh.load()
            start_s = time.perf_counter() - t0
            time.sleep(3)  # let each shard's multi-index build in the background
            sh.search(queries[:2], 10)
            lat = []
            for q in queries:
                t0 = time.perf_counter()
                sh.search(q[None, :], 10)
                lat.append(time.perf_counter() - t0)
            got = sh.search(queries, 10)
            assert (got.item_ids == want[0]).all() and (got.distances == want[1]).all()
            stats = sh.stats()
            row = {
                "shards": n,
                "start_and_load_s": start_s,
                "rows_per_shard": [s["rows"] for s in stats],
                "bytes_per_shard": [s["bytes"] + s["search"]["base_bytes"] for s in stats],
                "load_s": [round(s["load_s"], 2) for s in stats],
                "paths": [s["search"]["path"] for s in stats],
                "p50_ms": 1e3 * statistics.median(lat),
            }
            row["bytes_per_row"] = sum(row["bytes_per_shard"]) / args.n
            rows.append(row)
            print(
                f"{n} shard(s): started and loaded in {start_s:.1f} s; rows {row['rows_per_shard']}; "
                f"{row['bytes_per_row']:.0f} bytes/row held; load {row['load_s']} s; paths {row['paths']}; "
                f"p50 {row['p50_ms']:.2f} ms",
                flush=True,
            )
            sh.close()
    ray.shutdown()
    if args.json:
        meta = {
            "command": " ".join(sys.argv),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.platform(),
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "in_process": base, "sharded": rows}, indent=2))


if __name__ == "__main__":
    main()
