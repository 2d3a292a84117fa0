"""Exact Hamming top-k: medret's multi-index hashing and linear scan against faiss.IndexBinaryFlat, same codes.

    python bench/search.py [--sizes 1000000 10000000] [--ks 10 100] [--threads 1] [--json out.json]
    python bench/search.py --codes my_codes.npy       # a user's own packed uint8 codes (n, nbytes)
    python bench/search.py --codes medret-out/index   # ...or the codes of a code table (--table, default codes)

Every cell of BENCHMARKS.md "Search": code sets x query sets x k x sizes.

- Code sets: ``random`` (uniform codes) and ``clustered`` (2,000 random centres, each code a centre
  with 0-3 distinct random bits flipped), --bits long (64); or the codes of ``--codes FILE.npy``.
- Query sets: ``rows`` (rows of the database), ``fresh`` (new draws from the same generator; for
  --codes, rows held out of the database) and ``uniform`` (uniform random codes).

For each cell: the median single-query latency over --single queries, with the three methods run
one after the other on each query in a rotating order (so background load hits all alike), and the
per-query time of one batch of --batch queries (median of --repeats rotations). Ratios are
faiss / medret (above 1: medret is faster). Every result is checked against a numpy brute force
(all distances, stable sort): identical ids and distances for medret's two methods, identical
distances for faiss (which breaks ties its own way). ``scan`` is the share of queries the
multi-index answered by scanning rather than probing. --clock cpu times the process's CPU time
instead of the wall clock (steadier on a loaded machine; the default is the wall clock).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

CENTRES = 2000


def random_codes(rng: np.random.Generator, n: int, nbytes: int) -> np.ndarray:
    return rng.integers(0, 256, (n, nbytes), dtype=np.uint8)


def clustered_codes(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    """A random centre per code, with 0-3 distinct random bits flipped."""
    bits = centres.shape[1] * 8
    out = centres[rng.integers(0, len(centres), n)]
    flips = rng.integers(0, 4, n)
    pos = rng.integers(0, bits, (n, 3))
    while (bad := (pos[:, 0] == pos[:, 1]) | (pos[:, 0] == pos[:, 2]) | (pos[:, 1] == pos[:, 2])).any():
        pos[bad] = rng.integers(0, bits, (int(bad.sum()), 3))
    for j in range(3):
        r = np.flatnonzero(flips > j)
        out[r, pos[r, j] // 8] ^= (1 << (7 - pos[r, j] % 8)).astype(np.uint8)
    return out


def brute_topk(db: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Numpy brute force, independent of the kernels: all distances, then (distance, row) order."""
    from medret.models.codes import to_words

    out_i = np.full((len(queries), k), -1, np.int64)
    out_d = np.full((len(queries), k), -1, np.int64)
    words = to_words(db)
    for r, q in enumerate(to_words(queries)):
        d = np.bitwise_count(words[:, 0] ^ q[0]).astype(np.int64)
        for j in range(1, words.shape[1]):
            d += np.bitwise_count(words[:, j] ^ q[j])
        counts = np.cumsum(np.bincount(d, minlength=db.shape[1] * 8 + 1))
        kth = int(np.searchsorted(counts, min(k, len(db))))  # the k-th smallest distance
        rows = np.flatnonzero(d <= kth)  # ascending rows; a stable sort by distance keeps them so
        rows = rows[np.argsort(d[rows], kind="stable")][:k]
        out_i[r, : len(rows)] = rows
        out_d[r, : len(rows)] = d[rows]
    return out_i, out_d


def table_codes(uri: str, table: str) -> np.ndarray:
    """The packed codes of a medret code table (a local folder or ``s3://``; S3 settings from ``AWS_*``)."""
    from medret.index.store import CodeIndex

    index = CodeIndex.open(uri, table=table)
    col = index.to_arrow(["code"]).column("code").combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), index.encoder.code_bytes)


def code_sets(args: argparse.Namespace, n: int, q: int, rng: np.random.Generator) -> dict[str, tuple[Any, Any]]:
    """Name -> (database codes, fresh queries)."""
    if args.codes:
        codes = (
            table_codes(args.codes, args.table)
            if Path(args.codes).suffix != ".npy"
            else np.load(args.codes, mmap_mode="r")
        )
        if codes.dtype != np.uint8 or codes.ndim != 2:
            raise SystemExit(f"--codes must hold packed uint8 codes (n, nbytes), got {codes.dtype} {codes.shape}")
        held = rng.choice(len(codes), min(q, len(codes) // 2), replace=False)
        keep = np.ones(len(codes), bool)
        keep[held] = False
        db = np.ascontiguousarray(codes[keep][:n])
        return {Path(args.codes).stem: (db, np.ascontiguousarray(codes[held]))}
    nbytes = args.bits // 8
    sets: dict[str, tuple[Any, Any]] = {}
    if "random" in args.codesets:
        sets["random"] = (random_codes(rng, n, nbytes), random_codes(rng, q, nbytes))
    if "clustered" in args.codesets:
        centres = random_codes(rng, CENTRES, nbytes)
        sets["clustered"] = (clustered_codes(rng, centres, n), clustered_codes(rng, centres, q))
    return sets


def _rotated(fns: list[tuple[str, Callable[[], Any]]], turn: int, clock: Callable[[], int]) -> dict[str, Any]:
    """Run each method once, starting with a different one each turn: {name: (seconds, result)}."""
    out = {}
    for j in range(len(fns)):
        name, fn = fns[(turn + j) % len(fns)]
        t = clock()
        res = fn()
        out[name] = ((clock() - t) * 1e-9, res)
    return out


def run_cell(
    ctx: dict[str, Any], queries: np.ndarray, ref: tuple[np.ndarray, np.ndarray], k: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One cell: single queries, then the batch, each method on the same queries in rotating order."""
    from medret.index.search import topk_columns
    from medret.models.codes import to_words

    mih, cols, flat, clock = ctx["mih"], ctx["cols"], ctx["faiss"], ctx["clock"]
    qwords = to_words(queries)
    ref_i, ref_d = ref[0][:, :k], ref[1][:, :k]
    exact = {"mih": True, "linear": True, "faiss": True}

    def methods(lo: int, hi: int) -> list[tuple[str, Callable[[], Any]]]:
        return [
            ("mih", lambda: mih.search_counted(queries[lo:hi], k)),
            ("linear", lambda: topk_columns(cols, qwords[lo:hi], k)),
            ("faiss", lambda: flat.search(queries[lo:hi], k)),
        ]

    def verify(res: dict[str, Any], lo: int, hi: int) -> None:
        got_i, got_d, _ = res["mih"][1]
        exact["mih"] &= np.array_equal(got_i, ref_i[lo:hi]) and np.array_equal(got_d, ref_d[lo:hi])
        got_i, got_d = res["linear"][1]
        exact["linear"] &= np.array_equal(got_i, ref_i[lo:hi]) and np.array_equal(got_d, ref_d[lo:hi])
        exact["faiss"] &= np.array_equal(res["faiss"][1][0], ref_d[lo:hi])

    single: dict[str, list[float]] = {"mih": [], "linear": [], "faiss": []}
    scanned = 0
    for i in range(args.single):
        res = _rotated(methods(i, i + 1), i, clock)
        verify(res, i, i + 1)
        scanned += int(res["mih"][1][2].sum())
        for name in single:
            single[name].append(res[name][0])
    batch: dict[str, list[float]] = {"mih": [], "linear": [], "faiss": []}
    for rep in range(args.repeats):
        res = _rotated(methods(0, args.batch), rep, clock)
        verify(res, 0, args.batch)
        if rep == 0:
            scanned += int(res["mih"][1][2].sum())
        for name in batch:
            batch[name].append(res[name][0] / args.batch)
    row: dict[str, Any] = {"k": k}
    for name in single:
        row[f"single_ms_{name}"] = statistics.median(single[name]) * 1e3
        row[f"batch_ms_per_query_{name}"] = statistics.median(batch[name]) * 1e3
    for mode in ("single_ms", "batch_ms_per_query"):
        row[f"{mode}_faiss_over_mih"] = row[f"{mode}_faiss"] / row[f"{mode}_mih"]
        row[f"{mode}_faiss_over_linear"] = row[f"{mode}_faiss"] / row[f"{mode}_linear"]
    row["mih_scan_share"] = scanned / (args.single + args.batch)
    row["exact"] = exact
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", help="database sizes (default 1M and 10M; with --codes, all)")
    ap.add_argument("--ks", type=int, nargs="+", default=[10, 100])
    ap.add_argument(
        "--codes", help="a .npy of packed uint8 codes (n, nbytes), or a medret index (folder or s3://), to use instead"
    )
    ap.add_argument("--table", default="codes", help="with --codes INDEX: the code table")
    ap.add_argument("--codesets", nargs="+", default=["random", "clustered"], choices=["random", "clustered"])
    ap.add_argument(
        "--querysets", nargs="+", default=["rows", "fresh", "uniform"], choices=["rows", "fresh", "uniform"]
    )
    ap.add_argument("--bits", type=int, default=64, help="length of the generated codes")
    ap.add_argument("--single", type=int, default=50, help="single queries timed per cell")
    ap.add_argument("--batch", type=int, default=256, help="queries in the batched case")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of the batch per method")
    ap.add_argument("--m", type=int, help="tables of the multi-index (default: its own choice)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import faiss
    import numba

    from medret.index.mih import MultiIndex
    from medret.index.search import to_columns, topk_columns
    from medret.models.codes import to_words

    faiss.omp_set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    clock = time.perf_counter_ns if args.clock == "wall" else time.process_time_ns
    rng = np.random.default_rng(args.seed)
    q = max(args.single, args.batch)
    builds, rows = [], []
    sizes = args.sizes or ([1 << 62] if args.codes else [1_000_000, 10_000_000])
    for n in sizes:
        for set_name, (db, fresh) in code_sets(args, n, q, rng).items():
            n_db = len(db)
            t, c = time.perf_counter(), time.process_time()
            mih = MultiIndex.build(db, m=args.m)
            build = {
                "codes": set_name,
                "n": n_db,
                "bits": db.shape[1] * 8,
                "m": mih.m,
                "substring_bits": mih.lens.tolist(),
                "distinct": mih.distinct,
                "build_s": time.perf_counter() - t,
                "build_cpu_s": time.process_time() - c,
                "bytes_per_code": mih.memory_bytes / max(n_db, 1),
            }
            builds.append(build)
            print(
                f"{set_name} n={n_db:,}: multi-index m={mih.m} {mih.lens.tolist()} bits, {mih.distinct:,} distinct, "
                f"built in {build['build_s']:.2f} s ({build['build_cpu_s']:.2f} s CPU), "
                f"{build['bytes_per_code']:.1f} bytes/code",
                flush=True,
            )
            cols = to_columns(db)
            flat = faiss.IndexBinaryFlat(db.shape[1] * 8)
            flat.add(db)
            mih.search(db[:2], 10)  # compile / load the kernels before timing
            topk_columns(cols, to_words(db[:2]), 10)
            ctx = {"mih": mih, "cols": cols, "faiss": flat, "clock": clock}
            print(HEADER, flush=True)
            for qs_name in args.querysets:
                if qs_name == "rows":
                    queries = db[rng.integers(0, n_db, q)]
                elif qs_name == "fresh":
                    queries = fresh[:q]
                else:
                    queries = random_codes(rng, q, db.shape[1])
                ref = brute_topk(db, queries, max(args.ks))
                for k in args.ks:
                    row = {"codes": set_name, "queries": qs_name, "n": n_db, **run_cell(ctx, queries, ref, k, args)}
                    rows.append(row)
                    print(_line(row), flush=True)
            del db, cols, flat, mih, ctx
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": args.threads,
        "clock": args.clock,
        "faiss": faiss.__version__,
        "single": args.single,
        "batch": args.batch,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "builds": builds, "rows": rows}, f, indent=2)
    bad = [r for r in rows if not all(r["exact"].values())]
    if bad:
        raise SystemExit(
            f"{len(bad)} cells differ from brute force: {[(r['codes'], r['queries'], r['k']) for r in bad]}"
        )


HEADER = (
    f"{'codes':>9} {'queries':>7} {'n':>10} {'k':>4} | {'single ms: mih':>14} {'linear':>7} {'faiss':>7} "
    f"{'f/mih':>6} {'f/lin':>5} | {'batch ms/q: mih':>15} {'linear':>7} {'faiss':>7} {'f/mih':>6} {'f/lin':>5} | "
    "scan | exact"
)


def _line(r: dict[str, Any]) -> str:
    ok = "yes" if all(r["exact"].values()) else "NO " + str(r["exact"])
    cells = []
    for mode in ("single_ms", "batch_ms_per_query"):
        cells.append(
            f"{r[f'{mode}_mih']:{14 if mode == 'single_ms' else 15}.3f} {r[f'{mode}_linear']:7.3f} "
            f"{r[f'{mode}_faiss']:7.3f} {r[f'{mode}_faiss_over_mih']:6.1f} {r[f'{mode}_faiss_over_linear']:5.1f}"
        )
    return (
        f"{r['codes']:>9} {r['queries']:>7} {r['n']:>10} {r['k']:>4} | {cells[0]} | {cells[1]} | "
        f"{r['mih_scan_share']:4.0%} | {ok}"
    )


if __name__ == "__main__":
    main()
