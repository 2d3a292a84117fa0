"""Slide-level search for the query path: the slide list, slides like an indexed slide, slides like a region.

A slide is its bag of tile codes in the code table's ``__slides`` companion table
(:mod:`medret.slides.store`); matching is exact (:mod:`medret.slides.match`). A hit carries the
matched tile pairs as evidence: for each tile of the query's bag, the nearest tile of the hit's
bag, with both tiles' item ids and coordinates, so the page can show them side by side.

An uploaded region (a PNG/JPEG cut from a slide, with its microns per pixel) is rescaled to the
table's tiling mpp, cut into tiles on the table's grid, kept where there is tissue, prepared by the
slide recipe and encoded by the table's encoder; its bag is chosen by the table's mosaic rule.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from medret.errors import ConfigError, DataError, NotFound, TableNotFoundError
from medret.index.filters import quote
from medret.index.store import CodeIndex
from medret.slides.match import SlideHit, search
from medret.slides.mosaic import select_mosaic
from medret.slides.store import SlideBags, bag_codes

#: the most tiles an uploaded region may be cut into at the index's mpp (each is encoded: this bounds the cost
#: of a request, e.g. a small image claiming a huge mpp that would be scaled up to hundreds of tiles)
MAX_REGION_TILES = 64

#: slide matching rules a request may name (``median_min`` is the default)
METHODS = ("median_min", "symmetric", "vote")


def slide_kind() -> str:
    """The kind whose objects are tiled slides (the registry says which)."""
    from medret import kinds

    return next(k.name for k in kinds.all_kinds() if k.tiles)


class SlideSearch:
    """Answers slide queries against the slide tables of one index; thread-safe."""

    def __init__(self, s3: Any = None) -> None:
        self.s3 = s3
        self._lock = threading.Lock()
        self._bags: dict[str, SlideBags] = {}

    def bags(self, idx: CodeIndex) -> SlideBags:
        """The table's slide bags, following new versions of the slide table."""
        with self._lock:
            bags = self._bags.get(idx.name)
            if bags is None or bags.index is not idx:
                try:
                    bags = self._bags[idx.name] = SlideBags.open(idx, self.s3)
                except TableNotFoundError as err:
                    raise NotFound(str(err)) from None
            bags.refresh()
            return bags

    def slides(self, idx: CodeIndex) -> list[dict[str, Any]]:
        """Every indexed slide: id (its source URI), name, tile count, bag size, label, mpp."""
        cols = ["source_uri", "slide_id", "n_tiles", "tile_ids", "label", "mpp"]
        rows = self.bags(idx).rows(cols).to_pylist()
        return [
            {
                "id": r["source_uri"],
                "slide_id": r["slide_id"],
                "n_tiles": r["n_tiles"],
                "bag_size": len(r["tile_ids"]),
                "label": r["label"],
                "mpp": r["mpp"],
                "cover_tile": r["tile_ids"][0],
            }
            for r in rows
        ]

    def similar(self, idx: CodeIndex, slide: str, k: int, method: str = "median_min") -> dict[str, Any]:
        """The ``k`` slides most like the indexed slide ``slide`` (its source URI), itself left out."""
        _check_method(method)
        bags = self.bags(idx)
        row = self._find(bags, idx, slide)
        query = {
            "id": row["source_uri"],
            "slide_id": row["slide_id"],
            "bag_size": len(row["tile_ids"]),
            "tiles": _tiles(row["tile_ids"], row["tile_x"], row["tile_y"]),
        }
        hits = self._match(bags, bag_codes(row["codes"]), k, method, exclude=row["source_uri"])
        return {"query": query, "results": [self._hit(bags, h, query["tiles"]) for h in hits]}

    @staticmethod
    def _find(bags: SlideBags, idx: CodeIndex, slide: str) -> dict[str, Any]:
        """The bag of the slide whose id (source URI) is ``slide``, else of the one slide of that name."""
        row = bags.bag(slide)
        if row is not None:
            return row
        named = bags.rows(where=f"slide_id = {quote(slide)}").to_pylist()
        if len(named) == 1:
            return named[0]
        if len(named) > 1:
            ids = ", ".join(r["source_uri"] for r in named[:5])
            raise ConfigError(
                f"{len(named)} slides in table {idx.name!r} are named {slide[:200]!r}; give the id: {ids}"
            )
        raise NotFound(f"no slide {slide[:200]!r} in table {idx.name!r}; GET /v1/slides lists them")

    def region(
        self,
        idx: CodeIndex,
        rgb: npt.NDArray[np.uint8],
        name: str,
        mpp: float,
        k: int,
        encode: Callable[[Sequence[npt.NDArray[np.float32]]], npt.NDArray[np.uint8]],
        prepare: Callable[[npt.NDArray[np.uint8]], npt.NDArray[np.float32]],
        method: str = "median_min",
    ) -> dict[str, Any]:
        """The ``k`` slides most like an uploaded region ``rgb`` at ``mpp`` microns per pixel."""
        _check_method(method)
        self.bags(idx)  # a table without slides says so before any tile is encoded
        tiling = (idx.recipes or {}).get("tiling", {})
        tile_px, target = int(tiling.get("tile_px", 224)), float(tiling.get("mpp", 0.5))
        min_tissue = float(tiling.get("min_tissue", 0.5))
        tiles, xy = region_tiles(rgb, name, mpp, tile_px, target, min_tissue)
        codes = encode([prepare(t) for t in tiles])
        return self.of_codes(idx, codes, xy, {"region": name, "mpp": mpp}, k, method)

    def of_codes(
        self,
        idx: CodeIndex,
        codes: npt.NDArray[np.uint8],
        xy: npt.NDArray[np.int64],
        query: dict[str, Any],
        k: int,
        method: str = "median_min",
    ) -> dict[str, Any]:
        """The ``k`` slides most like a slide not in the table, given as its tiles' codes and places: its bag
        is chosen by the table's mosaic rule, as the indexing job would."""
        _check_method(method)
        bags = self.bags(idx)
        pick = select_mosaic(codes, xy, config=bags.mosaic)
        query_tiles = [
            {"tile": None, "x": int(x), "y": int(y)} for x, y in xy[pick]
        ]  # these tiles have no item id: they are not indexed
        hits = self._match(bags, codes[pick], k, method)
        query = {**query, "tiles_cut": len(codes), "bag_size": len(pick), "tiles": query_tiles}
        return {"query": query, "results": [self._hit(bags, h, query_tiles) for h in hits]}

    def _match(
        self, bags: SlideBags, query: npt.NDArray[np.uint8], k: int, method: str, exclude: str | None = None
    ) -> list[SlideHit]:
        gallery, _ = bags.gallery()
        if gallery is None:
            return []
        hits = search(query, gallery, min(len(gallery), k + (exclude is not None)), method=method)  # type: ignore[arg-type]
        return [h for h in hits if h.slide_id != exclude][:k]

    def _hit(self, bags: SlideBags, hit: SlideHit, query_tiles: list[dict[str, Any]]) -> dict[str, Any]:
        _, rows = bags.gallery()
        r = {c: rows.column(c)[hit.position].as_py() for c in ("source_uri", "slide_id", "label", "n_tiles")}
        ids, xs, ys = (rows.column(c)[hit.position].as_py() for c in ("tile_ids", "tile_x", "tile_y"))
        evidence = []
        for q, t, d in zip(query_tiles, hit.tiles.tolist(), hit.tile_distances.tolist(), strict=True):
            evidence.append(
                {
                    "query_tile": q["tile"],
                    "query_x": q["x"],
                    "query_y": q["y"],
                    "tile": ids[t],
                    "x": xs[t],
                    "y": ys[t],
                    "distance": int(d),
                }
            )
        evidence.sort(key=lambda e: (e["distance"], e["query_y"], e["query_x"]))
        return {
            "id": r["source_uri"],
            "slide_id": r["slide_id"],
            "label": r["label"],
            "n_tiles": r["n_tiles"],
            "bag_size": len(ids),
            "distance": hit.distance,
            "cover_tile": ids[0],
            "evidence": evidence,
        }


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method[:50]!r}")


def _tiles(ids: list[str], xs: list[int], ys: list[int]) -> list[dict[str, Any]]:
    return [{"tile": i, "x": x, "y": y} for i, x, y in zip(ids, xs, ys, strict=True)]


def region_tiles(
    rgb: npt.NDArray[np.uint8], name: str, mpp: float, tile_px: int, target_mpp: float, min_tissue: float
) -> tuple[list[npt.NDArray[np.uint8]], npt.NDArray[np.int64]]:
    """An uploaded region rescaled to ``target_mpp`` and cut into whole ``tile_px`` tiles on a grid from its
    top-left corner; tiles with at least ``min_tissue`` tissue, or all of them when none has. Positions are
    in the region's own pixels at ``mpp``."""
    from medret.io.wsi import resize_rgb
    from medret.preprocess.wsi.tissue import tissue_fraction

    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DataError(f"{name}: a slide region must be an RGB image, got shape {rgb.shape}")
    scale = mpp / target_mpp
    h, w = rgb.shape[:2]
    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    at = f"{w}x{h} px at {mpp:g} mpp is {out_w}x{out_h} px at the index's {target_mpp:g} mpp"
    if out_w < tile_px or out_h < tile_px:
        raise DataError(
            f"{name}: {at}, smaller than one {tile_px}-px tile; upload a larger region (or search by tile with "
            "POST /v1/search)"
        )
    n_tiles = (out_w // tile_px) * (out_h // tile_px)
    if n_tiles > MAX_REGION_TILES:  # checked before any pixel is rescaled
        raise DataError(
            f"{name}: {at}, {n_tiles} tiles of {tile_px} px; a region may hold at most {MAX_REGION_TILES}. "
            "Upload a smaller region, check its mpp, or search by the whole slide (GET /v1/slides/{id}/similar)"
        )
    if (out_w, out_h) != (w, h):
        rgb = resize_rgb(rgb, (out_w, out_h))
    tiles, xy, frac = [], [], []
    for y in range(0, out_h - tile_px + 1, tile_px):
        for x in range(0, out_w - tile_px + 1, tile_px):
            t = np.ascontiguousarray(rgb[y : y + tile_px, x : x + tile_px])
            tiles.append(t)
            xy.append((round(x / scale), round(y / scale)))
            frac.append(tissue_fraction(t))
    keep = [i for i, f in enumerate(frac) if f >= min_tissue] or list(range(len(tiles)))
    return [tiles[i] for i in keep], np.array([xy[i] for i in keep], np.int64)
