"""A tile grid at a target mpp restricted to tissue, and the tiles themselves, read lazily."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from medret.errors import ConfigError
from medret.io.wsi import Slide
from medret.preprocess.wsi.tissue import tissue_fraction, tissue_mask


@dataclass(frozen=True)
class TileSpec:
    x: int  # level-0 column of the top-left corner
    y: int  # level-0 row
    extent: int  # side in level-0 pixels
    tissue: float  # tissue fraction from the thumbnail mask


@dataclass(frozen=True)
class Tile:
    image: npt.NDArray[np.uint8]  # (tile_size, tile_size, 3)
    slide_id: str
    x: int
    y: int
    mpp: float
    tissue: float


def tile_grid(
    slide: Slide,
    *,
    tile_size: int = 224,
    mpp: float = 0.5,
    min_tissue: float = 0.5,
    thumbnail_side: int = 1024,
) -> list[TileSpec]:
    """Non-overlapping tiles of ``tile_size`` px at ``mpp`` whose thumbnail tissue fraction is >= ``min_tissue``."""
    if tile_size <= 0:
        raise ConfigError(f"tile_size must be positive, got {tile_size}")
    if mpp <= 0:
        raise ConfigError(f"mpp must be positive, got {mpp}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ConfigError(f"min_tissue is a fraction in [0, 1], got {min_tissue}")
    extent = max(1, round(tile_size * mpp / slide.require_mpp()[0]))
    thumb, down = slide.thumbnail(thumbnail_side)
    mask = tissue_mask(thumb)
    w0, h0 = slide.dimensions
    specs = []
    for y in range(0, h0 - extent + 1, extent):
        for x in range(0, w0 - extent + 1, extent):
            y0, x0 = int(y / down), int(x / down)
            y1, x1 = max(int((y + extent) / down), y0 + 1), max(int((x + extent) / down), x0 + 1)
            frac = float(mask[y0:y1, x0:x1].mean()) if mask[y0:y1, x0:x1].size else 0.0
            if frac >= min_tissue and frac > 0:
                specs.append(TileSpec(x, y, extent, frac))
    return specs


def iter_tiles(
    slide: Slide,
    specs: list[TileSpec],
    *,
    tile_size: int = 224,
    mpp: float = 0.5,
    min_tissue: float = 0.5,
) -> Iterator[Tile]:
    """Read each tile at ``mpp`` and drop those whose own pixels are mostly background."""
    for spec in specs:
        image = slide.read((spec.x, spec.y), (tile_size, tile_size), mpp, "mpp")
        frac = tissue_fraction(image)
        if frac >= min_tissue:
            yield Tile(image, slide.slide_id, spec.x, spec.y, mpp, round(min(frac, spec.tissue), 4))
