"""Whole-slide search at scale: exact median-min over a gallery of bags, and the majority-code prefilter.

    NUMBA_NUM_THREADS=1 python bench/slide_scale.py              # 100,000 slides x 64 codes, 48 bits
    python bench/slide_scale.py --slides 2000 --queries 10       # a smoke run: seconds

The generator clusters like ``clustered_codes`` in bench/search.py: --centres random codes split
into --sites equal pools (sites of origin: 200 pools of 10 by default; --sites 0: one pool), and
each slide draws its --codes codes from 2-6 centres of one pool (a code is its centre with 0-3
distinct random bits flipped), as a slide holds a few tissue types. Queries, half of each:

- ``copy``: a gallery slide tiled again: each code of its bag gets 0-2 more bits flipped, and a
  quarter of them are replaced by new draws from the slide's centres;
- ``fresh``: a new slide from the generator.

Per query, on one core: the exact search two ways, which must agree (ids and distances), and
the prefiltered search:

- ``full scan``: median-min against every slide, then the top --k by distance, ties by slide id
  (``search(..., prune=False)``);
- ``sketch bounds``: the same answer, scoring exactly only the slides whose lower bound (from
  8 codes and a radius per slide) can reach the top --k (``search(...)``, the default);
- ``prefilter``: for each --prefilter n and both prefilter scores (``majority``: the query's
  majority code against each slide's; ``median``: the median over the query's codes of the
  distance to each slide's majority code), exact median-min on the n candidates only.
  recall@k is the share of the exact top-k (ids) the prefiltered top-k holds; the tie-aware
  recall counts a prefiltered hit as found when its distance is no worse than the exact k-th
  distance (a slide tied with the exact answers is an equally right answer), as bench/ivf.py does.

Every hit carries its matched tiles (the evidence), inside the timings. --check queries are also
verified against a numpy brute force over the whole gallery. --clock cpu times the process's CPU
time instead of the wall clock (steadier on a busy machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np


def flip_bits(rng: np.random.Generator, codes: np.ndarray, most: int) -> np.ndarray:
    """Each code with 0..``most`` distinct random bits flipped (in place; returns ``codes``)."""
    n, bits = len(codes), codes.shape[1] * 8
    flips = rng.integers(0, most + 1, n)
    pos = np.argsort(rng.random((n, bits)), axis=1)[:, :most] if n * bits <= 1 << 24 else None
    if pos is None:  # large n: draw positions per row and redraw rows where two collide
        pos = rng.integers(0, bits, (n, most))
        while (bad := (np.sort(pos, axis=1)[:, 1:] == np.sort(pos, axis=1)[:, :-1]).any(axis=1)).any():
            pos[bad] = rng.integers(0, bits, (int(bad.sum()), most))
    for j in range(most):
        r = np.flatnonzero(flips > j)
        codes[r, pos[r, j] // 8] ^= (1 << (7 - pos[r, j] % 8)).astype(np.uint8)
    return codes


def draw_slides(
    rng: np.random.Generator, centres: np.ndarray, slides: int, per_slide: int, sites: int
) -> tuple[np.ndarray, np.ndarray]:
    """(codes (slides * per_slide, bytes), each slide's centres (slides, 6) with -1 past its 2-6).

    With ``sites``, the centres are split into that many equal pools (tissue sites) and a slide
    takes its centres from one pool; with 0, from all the centres.
    """
    pool = len(centres) // sites if sites else len(centres)
    site = rng.integers(0, sites, slides) if sites else np.zeros(slides, np.int64)
    if pool <= 64:  # six distinct centres of the site's pool
        own = np.argsort(rng.random((slides, pool)), axis=1)[:, :6] + (site * pool)[:, None]
    else:  # six of many: a repeat is rare and harmless
        own = rng.integers(0, pool, (slides, 6))
    own[np.arange(6)[None, :] >= rng.integers(2, 7, slides)[:, None]] = -1
    return draw_from(rng, centres, own, per_slide), own


def draw_from(rng: np.random.Generator, centres: np.ndarray, own: np.ndarray, per_slide: int) -> np.ndarray:
    """``per_slide`` codes for each row of ``own``: a random one of its centres, 0-3 bits flipped."""
    count = (own >= 0).sum(axis=1)
    pick = (rng.random((len(own), per_slide)) * count[:, None]).astype(np.int64)
    centre = np.take_along_axis(own, pick, axis=1).reshape(-1)
    return flip_bits(rng, centres[centre], 3)


def make_queries(
    rng: np.random.Generator,
    centres: np.ndarray,
    own: np.ndarray,
    gallery_codes: np.ndarray,
    n: int,
    per: int,
    sites: int,
) -> list[tuple[str, np.ndarray, int]]:
    """(kind, bag, source slide or -1) for n queries, copies of gallery slides first, then fresh slides."""
    out: list[tuple[str, np.ndarray, int]] = []
    for s in rng.choice(len(own), n // 2, replace=False):
        bag = flip_bits(rng, gallery_codes[s * per : (s + 1) * per].copy(), 2)
        swap = rng.random(per) < 0.25
        bag[swap] = draw_from(rng, centres, own[s : s + 1], per)[swap]
        out.append(("copy", bag, int(s)))
    fresh, _ = draw_slides(rng, centres, n - n // 2, per, sites)
    out += [("fresh", fresh[i * per : (i + 1) * per], -1) for i in range(n - n // 2)]
    return out


def brute_median_min(query: np.ndarray, gallery_codes: np.ndarray, per: int) -> np.ndarray:
    """Median-min of every slide by numpy alone (slides of ``per`` codes each, a block at a time)."""
    q = np.unpackbits(query, axis=1).astype(bool)
    out = []
    for lo in range(0, len(gallery_codes), 256 * per):
        g = np.unpackbits(gallery_codes[lo : lo + 256 * per], axis=1).astype(bool)
        d = (q[:, None, :] != g[None, :, :]).sum(axis=2)  # (query codes, block codes)
        out.append(np.median(d.reshape(len(q), -1, per).min(axis=2), axis=0))
    return np.concatenate(out)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn: Any, clock: Any = time.perf_counter) -> tuple[float, Any]:
    t = clock()
    res = fn()
    return clock() - t, res


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numba

    from medret.slides.match import BagGallery, search

    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    centres = rng.integers(0, 256, (args.centres, args.bits // 8), dtype=np.uint8)
    gen_s, (codes, own) = timed(lambda: draw_slides(rng, centres, args.slides, args.codes, args.sites))
    ids = [f"slide-{i:07d}" for i in range(args.slides)]
    offsets = np.arange(0, len(codes) + 1, args.codes)
    build_s, gallery = timed(lambda: BagGallery.from_arrays(codes, offsets, ids))
    print(
        f"{args.slides:,} slides x {args.codes} codes, {args.bits} bits: generated in {gen_s:.1f} s, "
        f"gallery built in {build_s:.2f} s, {gallery.memory_bytes / 2**20:.1f} MiB",
        flush=True,
    )
    queries = make_queries(rng, centres, own, codes, args.queries, args.codes, args.sites)
    search(queries[0][1], gallery, args.k)  # compile / load the kernels before timing
    search(queries[0][1], gallery, args.k, prune=False)
    search(queries[0][1], gallery, args.k, prefilter_n=args.prefilter[0], prefilter_by="median")
    clock = CLOCKS[args.clock]
    load_before = os.getloadavg()[0]
    scan_t: list[float] = []
    pruned_t: list[float] = []
    pref: dict[str, dict[str, list[float]]] = {}
    self_first = []
    for qi, (_, bag, source) in enumerate(queries):
        t, hits = timed(lambda bag=bag: search(bag, gallery, args.k, prune=False), clock)
        scan_t.append(t)
        top = [h.position for h in hits]
        top_d = [h.distance for h in hits]
        t, pruned = timed(lambda bag=bag: search(bag, gallery, args.k), clock)
        pruned_t.append(t)
        if [h.position for h in pruned] != top or [h.distance for h in pruned] != top_d:
            raise SystemExit(f"query {qi}: the pruned search's top {args.k} differs from the full scan's")
        if source >= 0:
            self_first.append(top[0] == source)
        if qi < args.check:
            want = brute_median_min(bag, codes, args.codes)
            order = sorted(range(len(want)), key=lambda s: (want[s], ids[s]))[: args.k]
            if order != top or [float(want[s]) for s in order] != top_d:
                raise SystemExit(f"query {qi}: the kernel's top {args.k} differs from the numpy brute force")
        for by in ("majority", "median"):
            for n in args.prefilter:
                t, got = timed(
                    lambda bag=bag, n=n, by=by: search(bag, gallery, args.k, prefilter_n=n, prefilter_by=by), clock
                )
                cell = pref.setdefault(f"{by}:{n}", {"time": [], "recall": [], "tie_recall": []})
                cell["time"].append(t)
                cell["recall"].append(len({h.position for h in got} & set(top)) / len(top))
                cell["tie_recall"].append(sum(h.distance <= top_d[-1] for h in got) / len(top))
        if (qi + 1) % 10 == 0:
            print(
                f"  {qi + 1}/{len(queries)} queries: full scan p50 {statistics.median(scan_t) * 1e3:.0f} ms, "
                f"pruned p50 {statistics.median(pruned_t) * 1e3:.1f} ms",
                flush=True,
            )
    kinds = [kind for kind, _, _ in queries]
    return {
        "meta": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "threads": numba.get_num_threads(),
            "numba": numba.__version__,
            "numpy": np.__version__,
            "NUMBA_NUM_THREADS": os.environ.get("NUMBA_NUM_THREADS"),
            "clock": args.clock,
            "load_average_1min": [load_before, os.getloadavg()[0]],
        },
        "slides": args.slides,
        "codes_per_slide": args.codes,
        "bits": args.bits,
        "centres": args.centres,
        "queries": {"copy": kinds.count("copy"), "fresh": kinds.count("fresh")},
        "k": args.k,
        "gallery_mib": gallery.memory_bytes / 2**20,
        "gallery_bytes_per_slide": gallery.memory_bytes / args.slides,
        "build_s": build_s,
        "exact_p50_ms": statistics.median(scan_t) * 1e3,
        "exact_p95_ms": float(np.percentile(scan_t, 95)) * 1e3,
        "pruned_p50_ms": statistics.median(pruned_t) * 1e3,
        "pruned_p95_ms": float(np.percentile(pruned_t, 95)) * 1e3,
        "copy_finds_its_source_first": sum(self_first) / max(len(self_first), 1),
        "checked_against_numpy": min(args.check, len(queries)),
        "prefilter": [summary(key, cell, kinds, args.k) for key, cell in pref.items()],
    }


def summary(key: str, cell: dict[str, list[float]], kinds: list[str], k: int) -> dict[str, Any]:
    """One prefilter setting ("by:n") over all queries, and its recall on each kind of query."""
    recall = np.array(cell["recall"])
    kind = np.array(kinds)
    return {
        "by": key.split(":")[0],
        "n": int(key.split(":")[1]),
        "p50_ms": statistics.median(cell["time"]) * 1e3,
        "p95_ms": float(np.percentile(cell["time"], 95)) * 1e3,
        f"recall@{k}": float(recall.mean()),
        f"recall@{k}_copy": float(recall[kind == "copy"].mean()) if (kind == "copy").any() else None,
        f"recall@{k}_fresh": float(recall[kind == "fresh"].mean()) if (kind == "fresh").any() else None,
        f"tie_aware_recall@{k}": float(np.mean(cell["tie_recall"])),
        f"min_recall@{k}": float(recall.min()),
    }


def table(res: dict[str, Any]) -> str:
    k = res["k"]
    lines = [
        f"exact median-min, every slide scored: p50 {res['exact_p50_ms']:.0f} ms, p95 {res['exact_p95_ms']:.0f} ms; "
        f"exact with sketch bounds: p50 {res['pruned_p50_ms']:.1f} ms, p95 {res['pruned_p95_ms']:.1f} ms; "
        f"gallery {res['gallery_mib']:.1f} MiB ({res['gallery_bytes_per_slide']:.0f} bytes/slide)",
        "",
        f"| prefilter | n | p50 | p95 | recall@{k} | copies | fresh | tie-aware recall@{k} | worst query |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["prefilter"]:
        share = [r[f"recall@{k}"], r[f"recall@{k}_copy"], r[f"recall@{k}_fresh"], r[f"tie_aware_recall@{k}"]]
        cells = " | ".join("-" if v is None else f"{v:.3f}" for v in share)
        worst = r[f"min_recall@{k}"]
        lines.append(f"| {r['by']} | {r['n']} | {r['p50_ms']:.1f} ms | {r['p95_ms']:.1f} ms | {cells} | {worst:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=100_000)
    ap.add_argument("--codes", type=int, default=64, help="codes per slide's bag")
    ap.add_argument("--bits", type=int, default=48)
    ap.add_argument("--queries", type=int, default=100, help="half copies of gallery slides, half fresh slides")
    ap.add_argument("--centres", type=int, default=2000, help="cluster centres of the generator")
    ap.add_argument("--sites", type=int, default=200, help="pools the centres are split into (0: one pool)")
    ap.add_argument("--prefilter", type=int, nargs="+", default=[100, 300, 1000], help="candidate counts n")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--check", type=int, default=2, help="queries verified against a numpy brute force")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--clock", choices=list(CLOCKS), default="wall", help="cpu: the process's CPU time (steadier on a busy machine)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.bits % 8 or args.bits <= 0:
        raise SystemExit(f"--bits must be a positive multiple of 8, got {args.bits}")
    res = run(args)
    print(json.dumps(res, indent=2))
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
