"""``medret search``: the service's query, answered from the command line without a server."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from medret.cli.options import DEFAULT_INDEX, add_index, add_json, add_s3, add_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_index(parser, default=DEFAULT_INDEX)
    add_table(parser, shown="for --image, a table that serves its kind; for --item, the only or first one")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", help="query image: PNG/JPEG, DICOM, NIfTI or a slide tile")
    what.add_argument("--item", help="an indexed item id: find the items similar to it")
    what.add_argument(
        "--slide",
        help="a slide: an indexed one (its id, the source URI, or its file name), or one at a URI under the "
        "index's sources (tiled and encoded now): find the slides similar to it",
    )
    what.add_argument(
        "--sketch",
        metavar="MASK.png",
        help="a lesion drawn on a template level (a PNG over the level's box, as GET /v1/templates serves it; "
        "non-zero or opaque pixels are lesion): find the patients with such a lesion there, by Dice",
    )
    parser.add_argument("--level", type=int, help="--sketch: the template level it was drawn on")
    parser.add_argument("--class", dest="lesion_class", help="--sketch: its lesion class (default: the table's first)")
    parser.add_argument("--tolerance", type=int, default=1, help="--sketch: levels either side searched (default 1)")
    parser.add_argument(
        "--region-weight", type=float, default=0.0, help="--sketch: weight of the region-profile term (default 0)"
    )
    parser.add_argument(
        "--method",
        default="median_min",
        choices=("median_min", "symmetric", "vote"),
        help="--slide matching: median over the query's tiles of the nearest tile's distance (default), both "
        "directions' mean, or a vote of nearest tiles",
    )
    parser.add_argument("--k", type=int, default=10, help="number of results (default 10)")
    parser.add_argument(
        "--no-rerank",
        action="store_true",
        help="the pure Hamming order (default: the Hamming shortlist re-ranked by the items' compact features, "
        "where the table keeps them)",
    )
    parser.add_argument(
        "--kind",
        default="auto",
        help="what to read --image as: auto (from its content), or a kind's upload mode "
        "(image, dicom, nifti, tile, and those of plugin kinds; `medret kinds` lists them)",
    )
    parser.add_argument("--slice", type=int, help="NIfTI level or DICOM frame to query with (0-based)")
    parser.add_argument("--mpp", type=float, help="microns per pixel of a --kind tile image")
    parser.add_argument(
        "--filter", action="append", default=[], metavar="COLUMN=VALUE", help="metadata filter (repeatable)"
    )
    parser.add_argument("--checkpoint", help="encoder checkpoint, if the one the table names is not reachable")
    add_s3(parser)
    add_json(parser, "the results")


def run(args: argparse.Namespace) -> int:
    if args.sketch:
        return _sketch(args)
    from medret.config import load_config
    from medret.errors import ConfigError, ObjectNotFoundError
    from medret.serve.config import ServiceConfig
    from medret.serve.engine import QueryEngine

    cfg = load_config(
        ServiceConfig,
        overrides={
            "index": args.index,
            "table": args.table,
            "checkpoint": args.checkpoint,
            "s3.endpoint_url": args.s3_endpoint,
            # one query: building the ONNX twin (0.3-2.5 s) would cost more than it saves
            "encoder_runtime": "torch",
        },
    )
    filters: dict[str, list[str]] = {}
    for f in args.filter:
        col, sep, value = f.partition("=")
        if not sep:
            raise ConfigError(f"--filter takes COLUMN=VALUE, got {f!r}")
        filters.setdefault(col.strip(), []).append(value)
    flat = {c: v[0] if len(v) == 1 else v for c, v in filters.items()}
    engine = QueryEngine(cfg)
    t0 = time.perf_counter()
    query: dict[str, object]
    if args.image:
        path = Path(args.image)
        if not path.is_file():
            raise ObjectNotFoundError(f"query image {args.image!r} does not exist")
        data = path.read_bytes()
        idx = engine.route(args.table, data, path.name, args.kind)  # named, else a table serving its kind
        q = engine.prepare(idx, data, path.name, kind=args.kind, slice=args.slice, mpp=args.mpp)
        codes, feats = engine.encode_features(idx, [q.image])
        features = None if feats is None or args.no_rerank else feats[0]
        rows = engine.search(idx, codes[0], args.k, filters=flat, features=features)
        query = {"image": str(path), "kind": q.kind, **q.meta}
    elif args.slide:
        return _slides(engine, args, t0)
    else:
        idx = engine.index(args.table)
        rows = engine.similar(idx.name, args.item, args.k, filters=flat, rerank=not args.no_rerank)
        query = {"item_id": args.item}
    seconds = time.perf_counter() - t0
    if args.json:
        out = {"table": idx.name, "encoder_id": idx.encoder_id, "query": query, "results": rows, "seconds": seconds}
        print(json.dumps(out, indent=1, default=str))
        return 0
    print(f"{idx.name} ({idx.count():,} items, {idx.encoder_id}): top {len(rows)} for {query} in {seconds:.2f} s")
    for r in rows:
        meta = " ".join(f"{k}={r[k]}" for k in ("modality", "dataset", "label") if r.get(k))
        meta += f" ({r['label_name']})" if r.get("label_name") else ""
        sim = f" similarity {r['similarity']:.3f}" if "similarity" in r else ""
        print(f"  {r['rank'] + 1:3d}. distance {r['distance']:3d}{sim}  {r['item_id']}  {meta}")
    return 0


def _slides(engine: Any, args: argparse.Namespace, t0: float) -> int:
    """``--slide``: the slides most like an indexed slide, with the matched tile pairs (the service's code path)."""
    from medret.errors import NotFound

    try:
        idx, found = engine.similar_slides(args.table, args.slide, args.k, args.method)
    except NotFound:
        if "/" not in args.slide:
            raise
        idx, found = engine.similar_to_slide_at(args.table, args.slide, args.k, args.method)
    seconds = time.perf_counter() - t0
    if args.json:
        out = {"table": idx.name, "encoder_id": idx.encoder_id, "method": args.method, **found, "seconds": seconds}
        print(json.dumps(out, indent=1, default=str))
        return 0
    q = found["query"]
    print(
        f"{idx.name}: top {len(found['results'])} slides like {q['slide_id']} ({q['bag_size']} tiles in its bag, "
        f"{args.method}) in {seconds:.2f} s"
    )
    for rank, h in enumerate(found["results"], start=1):
        label = f"  label={h['label']}" if h.get("label") else ""
        print(f"  {rank:3d}. distance {h['distance']:6.2f}  {h['id']}  ({h['n_tiles']} tiles){label}")
        for e in h["evidence"][:3]:
            print(f"         ({e['query_x']}, {e['query_y']}) -> ({e['x']}, {e['y']})  distance {e['distance']}")
    return 0


def _sketch(args: argparse.Namespace) -> int:
    """``--sketch``: the top patients for a lesion drawn on a template level (the service's code path)."""
    from medret.config import load_config
    from medret.errors import ConfigError, ObjectNotFoundError
    from medret.serve.config import ServiceConfig
    from medret.serve.sketch import SketchSearch, decode_png, options

    path = Path(args.sketch)
    if not path.is_file():
        raise ObjectNotFoundError(f"sketch {args.sketch!r} does not exist")
    if args.level is None:
        raise ConfigError("--sketch needs --level (the template level it was drawn on; GET /v1/templates lists them)")
    t0 = time.perf_counter()
    cfg = load_config(ServiceConfig, overrides={"index": args.index, "s3.endpoint_url": args.s3_endpoint})
    search = SketchSearch(cfg.index, cfg.s3)
    _, enc = search.encoder(args.table)
    cls = args.lesion_class or enc.grid.config.classes[0]
    mask = decode_png(path.read_bytes(), name=str(path))
    found = search.search(
        args.table,
        args.level,
        {cls: mask_box(mask, enc, str(path))},
        options(args.k, args.tolerance, args.region_weight),
        thumbnails=False,
    )
    seconds = time.perf_counter() - t0
    if args.json:
        for q in found["query"].values():
            q.pop("png", None)
        print(json.dumps({**found, "seconds": seconds}, indent=1, default=str))
        return 0
    q = found["query"][cls]
    print(
        f"{found['table']}: top {len(found['results'])} of {found['patients_searchable']} sketch-searchable patients "
        f"for a {cls} sketch at level {found['level']} (z {found['level_mm']} mm, {q['bits']} cells, "
        f"{found['candidates']} slices scored) in {seconds:.2f} s"
    )
    for h in found["results"]:
        top = max(h["regions"], key=h["regions"].get) if h["regions"] else "-"
        print(
            f"  {h['rank']:3d}. Dice {h['dice']:.3f}  {h['patient']}  level {h['level']}  {h['hemisphere']}  {top}  "
            f"{h['area_mm2']:.0f} mm2"
        )
    return 0


def mask_box(mask: Any, enc: Any, name: str) -> Any:
    from medret.sketch.raster import to_box

    return to_box(mask, enc.grid, name=name)
