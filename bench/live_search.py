"""What a changing table costs the multi-index: exact top-k through base + delta + masked rows, against the scan.

    python bench/live_search.py [--n 1000000] [--changed 0.02 0.05 0.09] [--single 50] [--clock cpu]

A table of --n clustered 64-bit codes (as in bench/search.py) gets a multi-index (medret.index.live),
then new versions, each with a fraction --changed of its rows touched: a third appended, a third
recoded (an upsert moves the row to the end), a third deleted. For every version: the time to see it
through the old base (:meth:`LiveSearch.update`), and the median single-query time of the scan and of
the multi-index on the same queries, run alternately (half rows of the table, half fresh codes), with
every answer checked equal. The rebuild threshold (``REBUILD_FRACTION``, 10%) bounds the last column.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search import CENTRES, clustered_codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--changed", type=float, nargs="+", default=[0.02, 0.05, 0.09])
    ap.add_argument("--single", type=int, default=50)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import numba

    from medret.index.live import LiveSearch
    from medret.index.search import to_columns, topk_columns
    from medret.models.codes import to_words

    numba.set_num_threads(1)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    rng = np.random.default_rng(0)
    centres = rng.integers(0, 256, (CENTRES, 8), dtype=np.uint8)
    ids = np.array([f"item{i:09d}" for i in range(args.n)], dtype=object)
    codes = clustered_codes(rng, centres, args.n)
    live = LiveSearch(table="bench", min_rows=1, background=False, path="mih")
    t0 = clock()
    live.update(1, pa.array(ids), to_columns(codes), 8)
    build_s = clock() - t0
    base_ids, base_codes = ids, codes
    print(f"n={args.n:,}: base built and measured in {build_s:.2f} s; {live.stats()}", flush=True)
    rows = []
    for version, frac in enumerate([0.0, *args.changed], start=1):
        cur_ids, cur_codes = base_ids, base_codes
        touched = int(frac * args.n)
        if touched:
            third = touched // 3
            pick = rng.choice(args.n, 2 * third, replace=False)
            recode, delete = pick[:third], pick[third:]
            keep = np.setdiff1d(np.arange(args.n), pick)
            new_ids = np.array([f"new{version}-{i:09d}" for i in range(touched - 2 * third)], dtype=object)
            cur_ids = np.concatenate([base_ids[keep], base_ids[np.sort(recode)], new_ids])
            cur_codes = np.concatenate(
                [base_codes[keep], clustered_codes(rng, centres, third), clustered_codes(rng, centres, len(new_ids))]
            )
            _ = delete  # deleted rows are simply gone from the version
        cols = to_columns(cur_codes)
        t0 = clock()
        live.update(version + 1, pa.array(cur_ids), cols, 8)
        view_s = clock() - t0
        stats = live.stats()
        fresh = clustered_codes(rng, centres, args.single // 2)
        queries = np.concatenate([cur_codes[rng.integers(0, len(cur_codes), args.single - len(fresh))], fresh])
        t_scan, t_mih = [], []
        for i, q in enumerate(queries):
            q = q[None, :]
            v, c = version + 1, cols
            runs = [("scan", lambda q=q, c=c: topk_columns(c, to_words(q), args.k))]
            runs.append(("mih", lambda q=q, c=c, v=v: live.search(v, c, q, args.k)))
            out = {}
            for name, fn in runs if i % 2 else runs[::-1]:
                t0 = clock()
                out[name] = fn()
                (t_scan if name == "scan" else t_mih).append(clock() - t0)
            assert np.array_equal(out["scan"][0], out["mih"][0]) and np.array_equal(out["scan"][1], out["mih"][1])
        row = {
            "changed": frac,
            "delta_rows": stats["delta_rows"],
            "masked_rows": stats["masked_rows"],
            "view_s": view_s,
            "scan_ms": 1e3 * statistics.median(t_scan),
            "mih_ms": 1e3 * statistics.median(t_mih),
        }
        row["speedup"] = row["scan_ms"] / row["mih_ms"]
        rows.append(row)
        print(
            f"changed {frac:.0%}: delta {row['delta_rows']:,} masked {row['masked_rows']:,}; view in {view_s:.2f} s; "
            f"scan {row['scan_ms']:.2f} ms, multi-index {row['mih_ms']:.2f} ms: {row['speedup']:.1f}x",
            flush=True,
        )
    if args.json:
        meta = {
            "command": " ".join(sys.argv),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.platform(),
            "clock": args.clock,
            "build_s": build_s,
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
