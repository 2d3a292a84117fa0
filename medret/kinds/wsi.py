"""``wsi``: whole-slide images (OpenSlide / tiffslide / DICOM WSI), tiled over tissue at a target mpp.

The job plans a slide into units of tile positions (:func:`~medret.preprocess.wsi.tiling.plan_units`)
and each unit's tiles go through the recorded slide recipe (``wsi-tiles``), which the
service also runs on an uploaded region (``kind=tile``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import numpy.typing as npt

from medret import itemid
from medret.kinds.base import Item, Kind, ReadContext, Unit, stats

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
SLIDE_SUFFIXES = (".svs", ".ndpi", ".qptiff", ".scn", ".bif", ".mrxs", ".vms", ".vmu", ".svslide")
#: a TIFF this large on a side (or tiled, or pyramidal) is treated as a slide
FLAT_TIFF_MAX_SIDE = 8192


def _slide(ctx: ReadContext, unit: Unit) -> Any:
    from medret.preprocess.wsi.tiling import open_cached_slide
    from medret.storage.cache import local_copy

    return open_cached_slide(local_copy(ctx.store, unit.key, unit.etag, ctx.cache_dir), ctx.tiling)


class Wsi(Kind):
    name = "wsi"
    description = "a whole-slide image, tiled over tissue at the tiling's mpp; one input per tile"
    patterns = ("*.svs", "*.ndpi", "*.qptiff", "*.scn", "*.mrxs")
    suffixes = SLIDE_SUFFIXES
    default_recipe = "wsi-tiles"
    recipe_input = "tiles"
    order = 20
    whole_object = False
    item_keys = ("x",)
    query_mode = "tile"
    query_files = ("raster",)
    tiles = True

    def recognise(self, name: str, head: bytes) -> bool:
        return head.startswith(TIFF_MAGIC) and PurePosixPath(name.lower()).suffix in SLIDE_SUFFIXES

    def plan(self, ctx: ReadContext, unit: Unit) -> list[str]:
        from medret.preprocess.wsi.tiling import plan_units

        return [json.dumps([list(p) for p in group]) for group in plan_units(_slide(ctx, unit), ctx.tiling)]

    def read_items(self, ctx: ReadContext, unit: Unit) -> tuple[list[Item], int, float]:
        from medret.preprocess.wsi.tiling import SlideTiles

        slide = _slide(ctx, unit)
        t = ctx.tiling
        spent = {"s": 0.0, "bytes": 0}

        def read(x: int, y: int) -> npt.NDArray[np.uint8]:
            t0 = time.perf_counter()
            rgb = slide.read((x, y), (t.tile_px, t.tile_px), t.mpp, "mpp")
            spent["s"] += time.perf_counter() - t0
            spent["bytes"] += rgb.nbytes
            return rgb

        positions = [(int(x), int(y), float(f)) for x, y, f in json.loads(unit.plan or "[]")]
        tiles = SlideTiles(positions, read, t, slide.slide_id)
        items = Item.of(ctx.recipe(self.name)(tiles, input_size=ctx.input_size))
        return items, int(spent["bytes"]), float(spent["s"])

    def items(self, ctx: ReadContext, unit: Unit, data: bytes | None) -> list[Item]:
        return self.read_items(ctx, unit)[0]

    def unit_of_item(self, ctx: ReadContext, unit: Unit, suffix: str) -> Unit:
        parts = itemid.parse(suffix)
        plan = json.dumps([[int(parts["x"]), int(parts["y"]), 1.0]])
        return Unit(unit.uri, unit.key, unit.etag, plan, unit.members)

    def upload(
        self, ctx: ReadContext, data: bytes, name: str, *, choice: int | None = None, mpp: float | None = None
    ) -> tuple[npt.NDArray[np.float32], dict[str, Any]]:
        """A region cut from a slide (PNG/JPEG/TIFF), rescaled from ``mpp`` to the index's, through the slide recipe."""
        from medret.io.base import check_budget
        from medret.io.raster import read_raster
        from medret.io.wsi import resize_rgb
        from medret.preprocess.wsi.tiling import SlideTiles

        rgb = np.asarray(read_raster(data, name=name, pixel_budget=ctx.pixel_budget).frame(0))
        target = float(ctx.tiling.mpp)
        if mpp is not None and mpp > 0 and abs(mpp - target) > 1e-6:
            h, w = rgb.shape[:2]
            scale = mpp / target
            out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
            # cost grows with the square of mpp: the rescaled tile is under the same budget
            check_budget(name, out_w * out_h * 3, ctx.pixel_budget, f"{w}x{h} at mpp {mpp:g} -> {out_w}x{out_h}x3")
            rgb = resize_rgb(rgb, (out_w, out_h))
        (prepared,) = ctx.recipe(self.name)(SlideTiles.of_region(rgb, ctx.tiling), input_size=ctx.input_size)
        return prepared.image, {"mpp": target}

    def render(self, ctx: ReadContext, unit: Unit, suffix: str) -> npt.NDArray[Any]:
        """The tile in colour, as read at the index's mpp, scaled down to the thumbnail size."""
        from medret.io.wsi import resize_rgb

        parts, t = itemid.parse(suffix), ctx.tiling
        rgb = _slide(ctx, unit).read((int(parts["x"]), int(parts["y"])), (t.tile_px, t.tile_px), t.mpp, "mpp")
        side = min(ctx.input_size[0], t.tile_px)
        return resize_rgb(np.asarray(rgb), (side, side))

    def describe(self, path: Path, label: str, **options: Any) -> dict[str, Any]:
        from medret.errors import MissingSpacingError
        from medret.io.wsi import open_slide
        from medret.preprocess.wsi.tiling import iter_tiles, tile_grid

        sample = int(options.get("sample_tiles", 8))
        with open_slide(path, mpp=options.get("mpp")) as s:
            thumb, down = s.thumbnail(512)
            out: dict[str, Any] = {
                "reader": s.backend,
                "vendor": s.vendor,
                "levels": s.level_count,
                "level_dimensions": [list(d) for d in s.level_dimensions],
                "level_downsamples": [round(d, 4) for d in s.level_downsamples],
                "mpp": list(s.mpp) if s.mpp else None,
                "objective_power": s.objective_power,
                "thumbnail": {**stats(thumb), "downsample": round(down, 3)},
            }
            try:
                target = max(0.5, s.require_mpp()[0])
            except MissingSpacingError as err:
                out["tiles"] = {"error": err.reason}
                return out
            specs = tile_grid(s, tile_size=224, mpp=target, min_tissue=0.25)
            step = max(1, len(specs) // max(sample, 1))
            tiles = list(iter_tiles(s, specs[::step][:sample], tile_size=224, mpp=target, min_tissue=0.0))
            out["tiles"] = {"mpp": target, "size": 224, "grid_tissue_tiles": len(specs), "sampled": len(tiles)}
        return out


class Tiff(Kind):
    """A TIFF without a slide's name: a slide if tiled, pyramidal or huge, else a flat image (settled from the file)."""

    name = "tiff"
    description = "a TIFF: a slide when tiled, pyramidal or over 8192 px a side, else a flat image"
    suffixes = (".tif", ".tiff")
    order = 21
    routable = False

    def recognise(self, name: str, head: bytes) -> bool:
        return head.startswith(TIFF_MAGIC)

    def needs_file(self) -> bool:
        return True

    def resolve(self, path: Path) -> Kind:
        import tifffile

        from medret import kinds

        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages.first
                pyramidal = len(tif.series[0].levels) > 1 if tif.series else False
                big = max(page.shape[:2]) > FLAT_TIFF_MAX_SIDE
                slide = page.is_tiled or pyramidal or big
        except Exception:
            slide = False  # let the raster reader report what is wrong with it
        return kinds.get(Wsi.name) if slide else self.as_upload()

    def as_upload(self) -> Kind:
        from medret import kinds
        from medret.kinds.raster import Raster

        return kinds.get(Raster.name)
