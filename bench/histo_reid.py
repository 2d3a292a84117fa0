"""Histology tile re-identification under transforms: BENCHMARKS.md "Histology tiles", every transform.

    .venv/bin/python bench/histo_reid.py [--encoders default frozen-itq:efficientnet-lite0 run/encoder.npz]
        [--out histo_reid.json] [--cache DIR] [--backends openslide]

Gallery: every tissue tile of the H&E slides (``medret.eval.reid.HE_SLIDES``; why the other files
in ``wsi/`` are left out is in ``NOT_IN_GALLERY``) at 0.5 mpp, 224 px, stride 112 px, medret's
own tissue rules. Queries, one set per transform, made from each gallery tile:

- ``rot90/180/270``, ``flip``: the tile read from the slide, rotated / mirrored (exact).
- ``jpeg60``: Pillow JPEG at quality 60.  ``stain``: each channel's optical density scaled by a
  factor uniform in [0.95, 1.05] (``default_rng(0)``, one triple per tile).
  Relevant for these six: the tile itself (its axis neighbours share exactly 50% of it).
- ``shift-x`` / ``shift-xy``: read from the slide a quarter tile (56 px) to the right / to the
  right and down. Relevant: gallery tiles the query overlaps by >= 50% of their area (shift-x:
  the tile and its right neighbour, 75% each; shift-xy: up to four tiles, 56% each).
- ``mpp0.45`` / ``mpp0.55``: 224 px read at 0.45 / 0.55 mpp around the same centre (the field of
  view 10% smaller / larger). Relevant: gallery tiles with >= 50% of their area inside the query's
  field of view: at 0.45 the same-centre tile only (81%), at 0.55 it (100%) and its four
  axis neighbours (55%).

Acc@1: the top Hamming hit is relevant; ties go to the earlier tile in
``default_rng(12345).permutation(n)``. The JSON also has ``acc1_same_tile`` (the top hit is
the very tile the query was made from). Rows: each encoder, then the baselines: 48-bit PCA-ITQ
of 8x8x8 RGB histograms fitted on the gallery (the spec's baseline), the same with PCA and a
random rotation only (the variant the spec's figures were measured with), the float histograms'
Euclidean nearest neighbour (not a code; a reference), and seeded random 48-bit codes.
``frozen-itq:BACKBONE`` fits its ITQ on the gallery tiles (unsupervised, no labels exist);
``frozen-itq:BACKBONE+dihedral`` pools the backbone's features over the 8 rotations and mirror
images of each tile first (``arch.dihedral``; 8 times the encoder's cost).
``frozen-selfsup:BACKBONE[+dihedral]`` trains the hash layer on the same frozen features, without labels,
on the gallery tiles and 8 random views of each (``medret.methods.frozen_selfsup``; the views are the
``histology`` augmentation inside ``medret.train.augment.rescan``: a random dihedral transform, stain
jitter and JPEG at a quality in [40, 95], on a field of view moved by up to a quarter tile and rescaled).
With ``--selfsup-views slide`` (the default, and what ``medret train`` does for a slide archive) the moved
field of view is read again from the slide (``medret.train.augment.SlideViews``: centre moved by up to 56 px,
read at 0.45-0.55 mpp), so real tissue comes into view; with ``pixels`` it is moved within the tile's own
pixels, scaled by up to 13 %, edge mirrored (the rows recorded on 2026-12-07).
Like the ITQ rows it is fitted transductively on the gallery tiles, and its augmentation ranges are chosen
to cover the benchmark's transform families: the dihedral views include the query rotations and flip
exactly, and the moves, scales and JPEG qualities bracket the queries' values (drawn at random, not set
to them).
Gallery size: 364 tiles with the default readers (OpenSlide first: TCGA 187, CMU 177);
363 with ``--backends tiffslide`` (TCGA 186), the spec's count: the TCGA tile at level-0
(1120, 2912) has a tissue fraction of 0.5016 by OpenSlide's decode and 0.4996 by tiffslide's
(the two decoders' tiles differ by ~5 grey levels on average), against a threshold of 0.5.
Read tiles are cached in ``--cache`` (keyed by slides, backend and grid), so reruns skip the reads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from medret.config import data_root
from medret.eval import reid
from medret.io.wsi import open_slide

TILE, MPP, STRIDE, SHIFT = 224, 0.5, 112, 56
BITS = 48
READ_SETS = ("gallery", "shift-x", "shift-xy", "mpp0.45", "mpp0.55")
TRANSFORMS = ("rot90", "rot180", "rot270", "flip", "jpeg60", "stain", "shift-x", "shift-xy", "mpp0.45", "mpp0.55")
MOVED = READ_SETS[1:]  # the transforms that move the field of view (read again from the slide)
CACHE_VERSION = "1"
log = logging.getLogger("histo_reid")


# ---------------------------------------------------------------- tiles (read once, cached)


def cache_key(slides: list[Path], backends: tuple[str, ...]) -> str:
    parts = [CACHE_VERSION, *backends, f"{TILE} {MPP} {STRIDE} {SHIFT}"]
    parts += [f"{p.name} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in slides]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def read_sets(slides: list[tuple[Path, float | None]], backends: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Gallery tiles and the query sets that need the slide, all slides concatenated."""
    parts: dict[str, list[np.ndarray]] = {}

    def add(key: str, value: np.ndarray) -> None:
        parts.setdefault(key, []).append(value)

    for si, (path, mpp) in enumerate(slides):
        with open_slide(path, mpp=mpp, backends=backends) as slide:
            t0 = time.perf_counter()
            g = reid.read_gallery(slide, tile_px=TILE, mpp=MPP, stride_px=STRIDE)
            add("gallery", g.tiles)
            add("boxes/gallery", g.boxes.astype(np.float64))
            add("slides", np.full(len(g.boxes), si, np.int64))
            add("thumbnail_tiles", np.array([g.thumbnail_tiles]))
            for name, dx, dy in (("shift-x", SHIFT, 0), ("shift-xy", SHIFT, SHIFT)):
                boxes = reid.shifted_boxes(g.boxes, dx, dy, TILE)
                add(name, reid.read_boxes(slide, boxes, tile_px=TILE, mpp=MPP))
                add(f"boxes/{name}", boxes)
            for q_mpp in (0.45, 0.55):
                boxes = reid.rescaled_boxes(g.boxes, MPP, q_mpp)
                add(f"mpp{q_mpp}", reid.read_boxes(slide, boxes, tile_px=TILE, mpp=q_mpp))
                add(f"boxes/mpp{q_mpp}", boxes)
            log.info("%s: %d gallery tiles, 5 sets read in %.1f s", path.name, len(g.boxes), time.perf_counter() - t0)
    return {k: np.concatenate(v) for k, v in parts.items()}


def load_sets(
    slides: list[tuple[Path, float | None]], backends: tuple[str, ...], cache: Path | None
) -> tuple[dict[str, np.ndarray], bool]:
    if cache is None:
        return read_sets(slides, backends), False
    path = cache / f"histo-reid-{cache_key([p for p, _ in slides], backends)}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}, True
    sets = read_sets(slides, backends)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, allow_pickle=False, **sets)
    tmp.replace(path)
    return sets, False


def queries(sets: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Transform name -> (query tiles, level-0 footprints (x, y, extent))."""
    g, boxes = sets["gallery"], sets["boxes/gallery"]
    factors = reid.jitter_factors(np.random.default_rng(0), len(g))
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for k in (1, 2, 3):
        out[f"rot{90 * k}"] = (np.stack([reid.rotate(t, k) for t in g]), boxes)
    out["flip"] = (np.stack([reid.hflip(t) for t in g]), boxes)
    out["jpeg60"] = (np.stack([reid.jpeg(t, 60) for t in g]), boxes)
    out["stain"] = (np.stack([reid.stain_jitter(t, f) for t, f in zip(g, factors, strict=True)]), boxes)
    for name in READ_SETS[1:]:
        out[name] = (sets[name], sets[f"boxes/{name}"])
    return out


# ---------------------------------------------------------------- encoders


Coder = Callable[[np.ndarray], np.ndarray]  # RGB tiles -> packed codes (or float features for the NN row)


def frozen_coder(
    spec: str, gallery: np.ndarray, runtime: str = "torch", field: Any = None, places: list[Any] | None = None
) -> tuple[Coder, dict[str, Any]]:
    """``frozen-itq:BACKBONE`` / ``frozen-selfsup:BACKBONE``: the ``histology`` preset's frozen pretrained backbone
    + ITQ fitted on the gallery, or a hash layer trained on it self-supervised from the gallery tiles (their views
    read again from the slides by ``field`` at ``places``, or, without them, moved in their own pixels)."""
    method = spec.partition(":")[0]
    if method not in ("frozen-itq", "frozen-selfsup"):
        raise SystemExit(f"{spec}: a frozen encoder is frozen-itq:BACKBONE or frozen-selfsup:BACKBONE, got {method!r}")
    try:
        from medret.models.frozen import fit_frozen_itq
        from medret.models.presets import preset_config
    except ImportError as err:
        raise SystemExit(
            f"{spec}: needs medret.models.frozen (fit_frozen_itq) and medret.models.presets (preset_config), "
            f"which this checkout does not have ({err}); run without it"
        ) from err
    config = preset_config("histology", bits=BITS)
    backbone, _, option = spec.partition(":")[2].partition("+")
    if backbone and backbone != config.architecture:
        config = config.model_copy(update={"architecture": backbone})
    if option:
        if option != "dihedral":
            raise SystemExit(f"{spec}: the one option after '+' is 'dihedral', got {option!r}")
        arch = {**config.extra["arch"], "dihedral": True}  # features pooled over the 8 rotations and mirrors
        config = config.model_copy(update={"extra": {**config.extra, "arch": arch}})
    t0 = time.perf_counter()
    chunks = (reid.prepare_tiles(gallery[i : i + 64], config) for i in range(0, len(gallery), 64))
    if method == "frozen-selfsup":
        from medret.methods.frozen_selfsup import fit_frozen_selfsup
        from medret.train.augment import get_augmentation, rescan

        views = rescan(get_augmentation("histology"), field(config) if field else None)
        if places is not None:
            chunks = ((c, places[i * 64 : (i + 1) * 64]) for i, c in enumerate(chunks))
        encoder = fit_frozen_selfsup(config, chunks, views, max_samples=len(gallery))
    else:
        encoder = fit_frozen_itq(config, chunks)
    c = encoder.config
    info = {
        "encoder_id": c.encoder_id,
        "input": f"{c.input_size[0]}x{c.input_size[1]}x{c.channels}",
        "fit_s": time.perf_counter() - t0,
        "fitted_on": f"the {len(gallery)} gallery tiles (unsupervised: no labels, no queries)",
        "fit": {k: v for k, v in c.extra["fit"].items() if k != "backbone_sha256"},
    }
    if method == "frozen-selfsup":
        info["views"] = "read again from the slides" if field else "moved in the tile's own pixels (mirrored edge)"
    if runtime == "onnx":
        from medret.models.onnx import CheckedOnnxEncoder

        twin = CheckedOnnxEncoder.of(encoder, threads=os.cpu_count() or 1)  # torch's codes, exactly
        info["runtime"] = "onnx (checked twin: torch's codes)"
        return lambda tiles: in_chunks(twin.encode, reid.prepare_tiles(tiles, c)), info
    return lambda tiles: in_chunks(encoder.encode, reid.prepare_tiles(tiles, c)), info


def slide_field(slides: list[tuple[Path, float | None]], backends: tuple[str, ...], sets: dict[str, np.ndarray]) -> Any:
    """The training views of the gallery tiles read again from their slides (``medret.train.augment.SlideViews``,
    as ``medret train`` reads a slide archive's), and each gallery tile's place."""
    from medret.io.wsi import open_slide
    from medret.preprocess.wsi.tiling import TileAt, TilingConfig
    from medret.train.augment import SlideViews

    opened: dict[str, Any] = {}

    def open_(at: TileAt) -> Any:
        if at.slide not in opened:
            path, mpp = slides[int(at.slide)]
            opened[at.slide] = open_slide(path, mpp=mpp, backends=backends)
        return opened[at.slide]

    boxes = zip(sets["slides"], sets["boxes/gallery"], strict=True)
    places = [TileAt(str(int(s)), int(x), int(y)) for s, (x, y, _) in boxes]
    tiling = TilingConfig(tile_px=TILE, mpp=MPP)
    return (lambda config: SlideViews(open_, tiling, lambda rgb: reid.prepare_tiles(rgb, config))), places


def in_chunks(encode: Callable[[np.ndarray], np.ndarray], images: np.ndarray, chunk: int = 32) -> np.ndarray:
    """Codes of ``images`` encoded ``chunk`` at a time: a whole query set at once through a pooled (8-view)
    encoder would hold 8 x 364 images' activations (over 20 GB at 224 px in ONNX Runtime)."""
    return np.concatenate([encode(images[i : i + chunk]) for i in range(0, len(images), chunk)])


def encoder_coder(spec: str) -> tuple[Coder, dict[str, Any]]:
    from medret.models.pretrained import resolve_encoder

    encoder = resolve_encoder(spec)
    c = encoder.config
    info = {"encoder_id": c.encoder_id, "input": f"{c.input_size[0]}x{c.input_size[1]}x{c.channels}"}
    return lambda tiles: encoder.encode(reid.prepare_tiles(tiles, c)), info


def baseline_coders(gallery: np.ndarray) -> dict[str, tuple[Coder, dict[str, Any]]]:
    itq = reid.HistogramHash.fit(gallery, bits=BITS)
    rot = reid.HistogramHash.fit(gallery, bits=BITS, iterations=0)
    rng = np.random.default_rng(1)
    return {
        "histogram PCA-ITQ 48": (itq.encode, {"fitted_on": f"the {len(gallery)} gallery tiles"}),
        "histogram PCA+rotation 48": (rot.encode, {"fitted_on": f"the {len(gallery)} gallery tiles", "itq": 0}),
        "histogram float L2 (not a code)": (reid.colour_histograms, {"distance": "euclidean"}),
        "random 48": (lambda tiles: reid.random_codes(len(tiles), BITS, rng), {"seed": 1}),
    }


def relevance(name: str, q_boxes: np.ndarray, sets: dict[str, np.ndarray]) -> np.ndarray:
    """The tile itself for the pixel transforms; >= 50% overlap for those that move the field of view."""
    if name in MOVED:
        return reid.overlap_relevance(q_boxes, sets["slides"], sets["boxes/gallery"], sets["slides"])
    return reid.same_tile_relevance(len(q_boxes))


def score(coder: Coder, sets: dict[str, np.ndarray], qs: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    g_boxes = sets["boxes/gallery"]
    order = reid.gallery_order(len(g_boxes))
    t0, c0 = time.perf_counter(), time.process_time()
    g_codes = coder(sets["gallery"])
    q_codes = {name: coder(tiles) for name, (tiles, _) in qs.items()}
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n_tiles = len(g_codes) + sum(len(c) for c in q_codes.values())
    acc, same = {}, {}
    for name, (_, q_boxes) in qs.items():
        if g_codes.dtype == np.uint8:
            top = reid.hamming_top1(q_codes[name], g_codes, order)
        else:
            d = np.stack([((g_codes - q) ** 2).sum(axis=1) for q in q_codes[name]])
            top = reid.top1(d, order)
        rel = relevance(name, q_boxes, sets)
        acc[name] = reid.accuracy_at_1(top, rel)
        same[name] = float((top == np.arange(len(top))).mean())
    return {
        "acc1": acc,
        "acc1_same_tile": same,
        "encode_s": wall,
        "encode_cpu_s": cpu,
        "tiles_encoded": n_tiles,
        "ms_per_tile": 1e3 * wall / n_tiles,
    }


# ---------------------------------------------------------------- report


def table(rows: list[dict[str, Any]], n: int) -> str:
    head = ["encoder", *TRANSFORMS, "n tiles", "encode s wall / CPU (ms/tile wall)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], *(f"{r['acc1'][t]:.3f}" for t in TRANSFORMS), str(n)]
        cells.append(f"{r['encode_s']:.1f} / {r['encode_cpu_s']:.1f} ({r['ms_per_tile']:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def relevance_stats(sets: dict[str, np.ndarray], qs: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    out = {}
    for name, (_, q_boxes) in qs.items():
        rel = relevance(name, q_boxes, sets)
        out[name] = {"mean_relevant": float(rel.sum(1).mean()), "min_relevant": int(rel.sum(1).min())}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--encoders",
        nargs="*",
        default=["default"],
        help="shipped names, encoder.npz paths, frozen-itq:X, frozen-selfsup:X",
    )
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument(
        "--runtime",
        choices=["torch", "onnx"],
        default="torch",
        help="encode the tiles of a frozen-itq or frozen-selfsup encoder with torch, or with its checked ONNX Runtime "
        "twin (the same codes, several times faster on a CPU; the ITQ fit stays on torch; frozen-selfsup's cached "
        "training features always come from ONNX Runtime)",
    )
    ap.add_argument(
        "--selfsup-views",
        choices=["slide", "pixels"],
        default="slide",
        help="frozen-selfsup's training views: read again from the slides (moved, at 0.45-0.55 mpp; what medret "
        "train does for a slide archive), or moved within the tile's own pixels (edge mirrored; the 2026-12-07 rows)",
    )
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "medret-histo-reid")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument(
        "--backends", nargs="+", default=["openslide", "tiffslide", "pydicom"], help="slide readers, in order"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    root = data_root() / "wsi"
    slides = [(root / name, mpp) for name, mpp in reid.HE_SLIDES]
    t0 = time.perf_counter()
    sets, cached = load_sets(slides, tuple(args.backends), None if args.no_cache else args.cache)
    read_s = time.perf_counter() - t0
    qs = queries(sets)
    gallery, n = sets["gallery"], len(sets["gallery"])
    per_slide = {p.name: int((sets["slides"] == i).sum()) for i, (p, _) in enumerate(slides)}
    log.info("gallery: %d tiles %s (%s in %.1f s)", n, per_slide, "cache" if cached else "read", read_s)
    field, places = slide_field(slides, tuple(args.backends), sets) if args.selfsup_views == "slide" else (None, None)
    coders: dict[str, tuple[Coder, dict[str, Any]]] = {}
    for spec in args.encoders:
        if spec.startswith("frozen-"):
            coders[spec] = frozen_coder(spec, gallery, args.runtime, field, places)
        else:
            coders[spec] = encoder_coder(spec)
    coders.update(baseline_coders(gallery))
    rows = []
    for name, (coder, info) in coders.items():
        r = {"name": name, **info, **score(coder, sets, qs)}
        rows.append(r)
        log.info("%s: %s", name, " ".join(f"{t}={r['acc1'][t]:.3f}" for t in TRANSFORMS))
    meta = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "slides": per_slide,
        "thumbnail_tiles": dict(zip(per_slide, sets["thumbnail_tiles"].tolist(), strict=True)),
        "not_in_gallery": reid.NOT_IN_GALLERY,
        "backends": args.backends,
        "gallery_tiles": n,
        "tiles_read_s": read_s,
        "tiles_from_cache": cached,
        "relevant_per_query": relevance_stats(sets, qs),
    }
    print(table(rows, n))
    print(
        f"\n{n} gallery tiles ({', '.join(f'{k}: {v}' for k, v in per_slide.items())}); "
        f"{meta['command']} on {meta['machine']}, {meta['date']}"
    )
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
