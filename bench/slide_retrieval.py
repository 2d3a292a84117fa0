"""Whole-slide retrieval on pseudo-slides: BENCHMARKS.md "Whole-slide retrieval".

    .venv/bin/python bench/slide_retrieval.py [--work DIR] [--transforms rot90 rot180 rot270 flip stain jpeg]
        [--encoders default histology] [--fit-tiles 256] [--out slide_retrieval.json]

**Data.** :func:`medret.eval.pseudoslides.write_pseudo_slides` cuts the H&E slides of ``wsi/`` into
non-overlapping 2,048 x 2,048 px blocks at level 0 and writes each block and its transformed copies
as Aperio-style pyramidal SVS files. Every file is checked to open through ``medret.io.wsi.open_slide``
with its mpp and 3 levels. The files go through the real indexing job (``run_index``, tiles of 224 px
at 0.5 mpp over tissue). The job also makes each slide's bag (``<table>__slides``, the default mosaic),
and these bags are the slides' representations here. No label goes into an index; the labels are
known only to this script.

**Our reading of the definitions** (BENCHMARKS.md names them without fixing every detail):

- Every pseudo-slide (each block and each of its copies) is a query once. Its bag is the one the
  job stored.
- **Acc@1.** The gallery is every other pseudo-slide: the query's own file is left out, and the
  other copies of its block stay in. A hit means the top-ranked slide is a copy of the query's block
  (same ``block_id``). "Copy of the query's block" can only be judged if those copies are in the
  gallery, so Acc@1 is not leave-one-block-out.
- **mMV@5, leave-one-block-out.** The gallery is every pseudo-slide not cut from the query's block:
  the block and all its copies are removed. The label of a slide is its base slide. *Plurality*
  counts a hit when the query's label is the most common label among the top 5; a tie for most
  common goes to the label ranked highest. *Strict* counts a hit when at least 3 of the 5 have the
  query's label. A query whose base slide has no other block cannot be right by either rule, so it
  is left out of mMV; the ``n`` column says how many queries count. With two labels among five
  hits, the two rules agree.
- **Ranking.** ``medret.slides.match.search``: by distance, equal distances in slide id (file
  name) order. No label is used. The methods are ``median_min`` (asymmetric), ``symmetric`` and
  ``vote`` (label-free). For ``vote`` the gallery is rebuilt without the left-out slides, so that
  no vote goes to them.

**Rows.**

- ``default``: the shipped 28 px grey encoder.
- ``histology``: the ``histology`` preset's ``frozen-itq`` encoder (48 bits). It is fitted by
  ``medret.train.trainer.fit`` on the pseudo-slide folder itself, with no labels. The fit uses the
  train part of the archive's seeded split (at most ``--fit-tiles`` tiles, each in 8 orientations).
- ``colour histogram``, the baseline: each indexed tissue tile (the default table's positions) is
  read at 0.5 mpp, 224 px. Its 8x8x8 RGB histogram is hashed to 48 bits by PCA-ITQ
  (``medret.eval.reid.HistogramHash``), fitted on all these tiles with no labels. Each slide's bag is
  then chosen from these codes by the job's own mosaic rule (``select_mosaic``, default config), and
  the bags are matched by the same three methods. Only the tile codes differ from an encoder row.
- ``random``: seeded random 48-bit codes, with each slide's bag the size of its ``default`` bag. This
  is the chance level.

These are **consistency figures**: they show whether a copy finds its block, and whether blocks of
one slide find each other, among a few pieces of two slides. They are **not diagnostic accuracy**.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from medret.config import data_root
from medret.eval import pseudoslides, reid
from medret.io.wsi import open_slide
from medret.slides.match import BagGallery, search
from medret.slides.mosaic import MosaicConfig, select_mosaic

METHODS = ("median_min", "symmetric", "vote")
BITS = 48
K = 5
TILE, MPP = 224, 0.5
log = logging.getLogger("slide_retrieval")
Bags = dict[str, np.ndarray]  # slide id (file name) -> packed bag codes (n, bytes)


# ---------------------------------------------------------------- scoring (pure)


def plurality(labels: list[str]) -> str:
    """The most common label; among equally common ones, the one ranked highest."""
    counts = Counter(labels)
    top = max(counts.values())
    return next(label for label in labels if counts[label] == top)


def ranked(query: np.ndarray, bags: Bags, gallery: list[str], k: int, method: str) -> list[str]:
    g = BagGallery.build([bags[n] for n in gallery], gallery)
    return [h.slide_id for h in search(query, g, k, method=method)]  # type: ignore[arg-type]


def evaluate(bags: Bags, meta: dict[str, dict[str, Any]], method: str) -> dict[str, Any]:
    """Acc@1 and both mMV@5 over every pseudo-slide as a query (the definitions: module docstring)."""
    names = sorted(bags)
    acc: dict[str, list[bool]] = {}
    plur, strict = [], []
    for q in names:
        block, label = meta[q]["block_id"], meta[q]["label"]
        top = ranked(bags[q], bags, [n for n in names if n != q], 1, method)[0]
        acc.setdefault(meta[q]["transform"], []).append(meta[top]["block_id"] == block)
        lobo = [n for n in names if meta[n]["block_id"] != block]
        if not any(meta[n]["label"] == label for n in lobo):
            continue  # no other block of its slide: mMV cannot be right
        labels = [meta[n]["label"] for n in ranked(bags[q], bags, lobo, K, method)]
        plur.append(plurality(labels) == label)
        strict.append(labels.count(label) >= 3)
    hits = [h for v in acc.values() for h in v]
    return {
        "acc1": float(np.mean(hits)),
        "acc1_n": len(hits),
        "acc1_by_query_transform": {t: float(np.mean(v)) for t, v in acc.items()},
        "mmv5_plurality": float(np.mean(plur)) if plur else float("nan"),
        "mmv5_strict": float(np.mean(strict)) if strict else float("nan"),
        "mmv5_n": len(plur),
    }


# ---------------------------------------------------------------- the job, the encoders, the baselines


def index(source: Path, uri: Path, encoder: str, out: Path) -> dict[str, Any]:
    from medret.index.store import CodeIndex
    from medret.pipelines.backfill import run_index
    from medret.pipelines.config import IndexJobConfig

    t0 = time.perf_counter()
    summary = run_index(
        IndexJobConfig(source=str(source), index={"uri": str(uri)}, encoder=encoder, out=str(out), progress=False)
    )
    if summary.quarantined:
        raise SystemExit(f"the job quarantined {summary.quarantined} pseudo-slides; see {out}")
    return {"index": CodeIndex.open(str(uri)), "index_s": time.perf_counter() - t0, "indexed": summary.indexed}


def slide_bags(idx: Any) -> tuple[Bags, dict[str, Any]]:
    """The job's bags, keyed by file name, and each slide's tiles (positions, codes) from the tile table."""
    from medret.slides.store import TILE_COLUMNS, SlideBags, bag_codes, group_tiles

    _, rows = SlideBags.open(idx).gallery()
    bags = {
        Path(u).name: bag_codes(c)
        for u, c in zip(rows["source_uri"].to_pylist(), rows["codes"].to_pylist(), strict=True)
    }
    t = idx.to_arrow(columns=TILE_COLUMNS)
    t = t.filter(t["tile_x"].is_valid())
    tiles = {Path(s.source_uri).name: s for s in group_tiles(t, idx.encoder.code_bytes)}
    return bags, tiles


def fit_histology(source: Path, work: Path, fit_tiles: int) -> tuple[str, dict[str, Any]]:
    from medret.models.encoder import load_encoder
    from medret.train.config import TrainConfig
    from medret.train.trainer import fit

    cfg = TrainConfig(
        preset="histology",
        method="frozen-itq",  # the encoder the recorded figures were measured with (the preset's default until 12-07)
        bits=BITS,
        source=str(source),
        samples_per_epoch=fit_tiles,
        output=str(work / "histology"),
        storage_path=str(work / "runs"),
    )
    t0 = time.perf_counter()
    report = fit(cfg)
    c = load_encoder(report.encoder_path).config
    info = {"encoder_id": c.encoder_id, "fit_samples": c.extra["fit"]["samples"], "fit_s": time.perf_counter() - t0}
    return str(report.encoder_path), info


def histogram_bags(tiles: dict[str, Any], paths: dict[str, str], seed: int) -> tuple[Bags, dict[str, Any]]:
    """The colour-histogram baseline: each tile's hashed RGB histogram, the bag by the job's mosaic rule."""
    t0 = time.perf_counter()
    read, owners = [], []
    for name in sorted(tiles):
        with open_slide(paths[name]) as s:
            read.append(np.stack([s.read((int(x), int(y)), (TILE, TILE), MPP) for x, y in tiles[name].xy]))
        owners += [name] * len(read[-1])
    everything = np.concatenate(read)
    hasher = reid.HistogramHash.fit(everything, bits=BITS)
    codes = hasher.encode(everything)
    owner = np.array(owners)
    bags = {}
    for name in sorted(tiles):
        c = codes[owner == name]
        bags[name] = c[select_mosaic(c, tiles[name].xy, config=MosaicConfig())]  # the job's mosaic
    return bags, {"tiles": len(everything), "fit_on": "all indexed tiles, no labels", "s": time.perf_counter() - t0}


def random_bags(like: Bags, seed: int) -> Bags:
    rng = np.random.default_rng(seed)
    return {n: reid.random_codes(len(like[n]), BITS, rng) for n in sorted(like)}


# ---------------------------------------------------------------- report


def check_files(manifest: list[dict[str, Any]]) -> None:
    for r in manifest:
        with open_slide(r["path"]) as s:
            if s.mpp != (r["mpp"], r["mpp"]) or s.level_count != 3 or s.dimensions != (r["size"], r["size"]):
                raise SystemExit(f"{r['path']}: opened as {s.dimensions} {s.mpp} {s.level_count} levels")


def table(rows: list[dict[str, Any]]) -> str:
    head = [
        "codes",
        "method",
        "Acc@1 (top slide is a copy of the query's block)",
        "n",
        "mMV@5 plurality (leave-one-block-out)",
        "mMV@5 strict >= 3 of 5 (leave-one-block-out)",
        "n",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r["scores"]
        cells = [r["codes"], r["method"], f"{s['acc1']:.3f}", str(s["acc1_n"])]
        cells += [f"{s['mmv5_plurality']:.3f}", f"{s['mmv5_strict']:.3f}", str(s["mmv5_n"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def counts(manifest: list[dict[str, Any]]) -> dict[str, Any]:
    blocks = Counter(r["base"] for r in manifest if r["transform"] == "orig")
    return {
        "pseudo_slides": len(manifest),
        "blocks": sum(blocks.values()),
        "blocks_per_slide": dict(blocks),
        "copies_per_block": len(manifest) // max(1, sum(blocks.values())),
        "mpp": {r["base"]: r["mpp"] for r in manifest},
    }


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import ray

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False)
    t0 = time.perf_counter()
    manifest = pseudoslides.write_pseudo_slides(
        work / "slides", data_root(), transforms=args.transforms, seed=args.seed, labels_csv=False
    )
    check_files(manifest)
    meta = {r["slide_id"]: r for r in manifest}
    paths = {r["slide_id"]: r["path"] for r in manifest}
    stages: dict[str, Any] = {"write_s": time.perf_counter() - t0}
    log.info("%s", counts(manifest))
    codes: dict[str, Bags] = {}
    info: dict[str, dict[str, Any]] = {}
    tiles: dict[str, Any] = {}
    for name in args.encoders:
        encoder, extra = "default", {}
        if name == "histology":
            encoder, extra = fit_histology(work / "slides", work, args.fit_tiles)
        job = index(work / "slides", work / f"index-{name}", encoder, work / f"out-{name}")
        codes[name], tiles[name] = slide_bags(job["index"])
        n_tiles = {n: len(t.item_ids) for n, t in tiles[name].items()}
        info[name] = {**extra, "encoder_id": job["index"].encoder_id, "index_s": job["index_s"], "tiles": n_tiles}
        log.info("%s: %d slides, %d tiles in %.0f s", name, len(codes[name]), sum(n_tiles.values()), job["index_s"])
    first = args.encoders[0]
    codes["colour histogram"], info["colour histogram"] = histogram_bags(tiles[first], paths, args.seed)
    codes["random"], info["random"] = random_bags(codes[first], args.seed + 1), {"bits": BITS, "bags_like": first}
    rows = []
    for name, bags in codes.items():
        missing = sorted(set(meta) - set(bags))
        if missing:
            raise SystemExit(f"{name}: no bag for {missing} (a pseudo-slide without tissue tiles?)")
        for method in METHODS:
            rows.append({"codes": name, "method": method, "scores": evaluate(bags, meta, method)})
            log.info("%s %s: %s", name, method, rows[-1]["scores"])
    stages["total_s"] = time.perf_counter() - t0
    return {"counts": counts(manifest), "info": info, "rows": rows, "stages": stages}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="folder for the pseudo-slides and indexes (default: a temp folder)")
    ap.add_argument("--transforms", nargs="*", default=list(pseudoslides.TRANSFORMS))
    ap.add_argument("--encoders", nargs="+", default=["default", "histology"], choices=["default", "histology"])
    ap.add_argument("--fit-tiles", type=int, default=256, help="tiles the histology encoder's ITQ is fitted on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    c0 = time.process_time()
    if args.work:
        result = run(args, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="medret-slide-retrieval-") as tmp:
            result = run(args, Path(tmp))
    result["meta"] = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "driver_cpu_s": time.process_time() - c0,
        "note": "consistency figures on pseudo-slides cut from two real H&E slides, not diagnostic accuracy",
    }
    print(json.dumps(result, indent=1, default=str))
    print()
    print(table(result["rows"]))
    c = result["counts"]
    print(
        f"\n{c['pseudo_slides']} pseudo-slides: {c['blocks']} blocks {c['blocks_per_slide']} x {c['copies_per_block']} "
        f"(each block and its copies). Consistency figures, not diagnostic accuracy."
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
